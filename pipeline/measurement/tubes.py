"""What a tube does not explain: a nodule merged with a vessel (issue 15).

Tumour left beside a vessel is the classic residual of thermal ablation (the vessel's flow
carries the heat away). On the post-contrast image the nodule and the vessel enhance alike and
merge into one elongated piece, which the vessel test of rule 9 would dismiss whole. A vessel
is a tube: along its axis its cross-sections are discs of one calibre whose centres drift
slowly. Fitting that tube and taking out what it explains leaves the nodule to be judged on
its own shape.

The fit (hand-written: no library fits a single tube to a voxel mask with a bump on it;
skeletons put a spur into the bump and centre the axis between tube and bump):

1. the structure's first principal axis; the points cut into slabs across it;
2. per slab, the cross-section's area and its centre (median of the points, robust to a bump on
   one side); the tube's calibre is the median cross-section, its slabs those within 1.5x of
   that area (a bump makes its slabs wider, so they do not steer the axis);
3. the axis through the tube slabs' centres, smoothed by a running median and interpolated
   across the bump;
4. a point farther than the tube's radius plus a margin from the axis is not the tube's.

Limits: a vessel that bends through more than about 45 deg within the structure is cut into
slabs obliquely and leaves slivers outside its fit (they are thin and judged as such); a
nodule centred on the vessel's own axis is explained by it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class TubeFit:
    """A tube fitted to a point set (mm): its radius and, per point, the distance to its axis."""

    radius_mm: float
    axis_distance_mm: np.ndarray  # (N,) distance of each point to the fitted axis

    def unexplained(self, margin_mm: float) -> np.ndarray:
        """Points (bool, N) farther than the tube's radius plus ``margin_mm`` from its axis."""
        return self.axis_distance_mm > self.radius_mm + margin_mm


def _running_median(values: np.ndarray, half_window: int) -> np.ndarray:
    return np.array([np.median(values[max(0, i - half_window): i + half_window + 1], axis=0)
                     for i in range(len(values))])


def fit_tube(points_mm: np.ndarray, slab_mm: float, voxel_ml: float) -> TubeFit | None:
    """Fit one tube to ``points_mm`` ((N, 3) voxel centres in mm); None when there is no tube.

    ``slab_mm``: slab thickness across the axis (at least the largest voxel side, so that no
    slab falls between two slices); ``voxel_ml``: one voxel's volume in mm^3.
    """
    if len(points_mm) < 20:
        return None
    centre = points_mm.mean(0)
    centred = points_mm - centre
    _, vecs = np.linalg.eigh(np.cov(centred.T))
    axis, across = vecs[:, -1], vecs[:, :2]
    t = centred @ axis
    perp = centred @ across  # (N, 2) coordinates in the plane across the axis
    slab = np.floor((t - t.min()) / slab_mm).astype(int)
    n_slabs = int(slab.max()) + 1
    if n_slabs < 5:
        return None
    counts = np.bincount(slab, minlength=n_slabs)
    filled = np.flatnonzero(counts)
    area = counts * voxel_ml / slab_mm  # mm^2
    typical = float(np.median(area[filled]))
    tube_slabs = filled[area[filled] <= 1.5 * typical]
    if len(tube_slabs) < 3:
        return None
    centres = np.array([np.median(perp[slab == s], axis=0) for s in tube_slabs])
    centres = _running_median(centres, 2)
    # The axis across every slab: interpolated between tube slabs, held at the ends.
    axis_at = np.stack([np.interp(np.arange(n_slabs), tube_slabs, centres[:, k]) for k in range(2)], axis=1)
    distance = np.linalg.norm(perp - axis_at[slab], axis=1)
    return TubeFit(radius_mm=float(np.sqrt(typical / np.pi)), axis_distance_mm=distance)
