"""Enhancing rim around the ablation zone: thickness along AZ-surface normals (criteria.md §6 rule 7).

Method
------
1. The AZ surface is the 0.5 iso-surface of the AZ mask (marching cubes, sub-voxel), sampled at its
   vertices, each weighted by its share of the surface area (mm^2) so that statistics are
   per-area, not per-vertex (vertex density depends on the surface's orientation to the grid).
2. Outward normals come from the gradient of the AZ mask smoothed with a 1 mm Gaussian (physical
   units), mapped to LPS with the full direction matrix. The raw staircase normals of a binary mask
   point up to 45 deg off; a ray that grazes the rim tangentially would report a fake thick rim.
3. From every sample, points are taken along the normal in physical space every ``step_mm``
   (<= 0.5 mm) up to ``max_search_mm`` and the enhancing mask is read there by linear
   interpolation of its 0/1 values (iso-level 0.5), through its own index<->LPS mapping, so the
   two masks may even be on different grids (anisotropic, oblique, flipped). The thickness is the
   length of the contiguous enhancing run that starts within ``start_within_mm`` of the surface,
   with both ends located by linear interpolation between samples (sub-step accuracy).
4. Angular position: azimuth of each sample around the AZ centroid in the **axial (LPS x-y)
   plane**, the plane in which radiologists judge "circumferential" on axial slices; elevation is
   the angle above that plane. Coverage uses samples with |elevation| <= 60 deg (near the poles the
   azimuth is degenerate), in 5 deg bins: a bin is covered when >= half of its surface area has
   rim >= 0.5 mm.

Robust maximum: a single ray can be noisy (a voxel of enhancement hit at a grazing angle). The
reported maximum is the maximum over samples of the median thickness of each sample's 7 nearest
surface neighbours (about a 1.5-2 mm patch). Unlike a 95th percentile, which would miss a nodule
covering < 5 % of the margin, it keeps any feature wider than ~2 mm and rejects isolated rays.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
from scipy.ndimage import gaussian_filter, map_coordinates
from scipy.spatial import cKDTree
from skimage.measure import marching_cubes

from pipeline.core.records import RimMetrics
from pipeline.measurement.axes import Grid

#: Rim thinner than this (mm) counts as absent for coverage and for the rim statistics.
MIN_RIM_MM = 0.5
#: Samples farther than this above/below the axial plane through the centroid have no usable
#: azimuth (the pole of the AZ) and are left out of the coverage.
MAX_ELEVATION_FOR_COVERAGE_DEG = 60.0
_ISO = 0.5
_ROBUST_K = 7  # neighbours (incl. itself) whose median thickness makes a sample's robust value


# --------------------------------------------------------------------------- records
@dataclass
class SurfaceSamples:
    """Sample points on the AZ surface.

    positions_lps: (N, 3) mm; normals_lps: (N, 3) unit outward normals; weights_mm2: (N,) surface
    area represented by each sample (sums to the surface area); centroid_lps: (3,) AZ centroid.
    """

    positions_lps: np.ndarray
    normals_lps: np.ndarray
    weights_mm2: np.ndarray
    centroid_lps: np.ndarray


@dataclass
class RimProfile:
    """Enhancing-tissue thickness along the AZ-surface normals.

    thickness_mm: (N,) length of the enhancing run (0 = none); start_mm: (N,) distance from the AZ
    surface where that run starts (nan when none); censored: (N,) bool, run still enhancing at
    ``max_search_mm`` (the thickness is then a lower bound). positions_lps / normals_lps: (N, 3);
    weights_mm2: (N,) area per sample; azimuth_deg: (N,) in [0, 360) around the AZ centroid in the
    LPS x-y (axial) plane, 0 = +x (patient left), 90 = +y (posterior); elevation_deg: (N,) in
    [-90, 90] above that plane (+z = superior); centroid_lps: (3,).
    """

    thickness_mm: np.ndarray
    start_mm: np.ndarray
    censored: np.ndarray
    positions_lps: np.ndarray
    normals_lps: np.ndarray
    weights_mm2: np.ndarray
    azimuth_deg: np.ndarray
    elevation_deg: np.ndarray
    centroid_lps: np.ndarray
    step_mm: float
    max_search_mm: float

    @property
    def n(self) -> int:
        return int(self.thickness_mm.size)


@dataclass
class FocusMargin:
    """Where an enhancing focus sits along the AZ margin.

    local_thickness_mm: robust maximum thickness of the focus along AZ-surface normals (mm);
    angular_extent_deg: azimuthal extent around the AZ centroid (deg, 0..360);
    pattern: "focal" (< focal_max_deg), "crescentic" (< crescentic_max_deg) or "circumferential";
    search_stopped: some ray through the focus was still inside it at ``max_search_mm`` (the
    thickness is then a lower bound).
    """

    local_thickness_mm: float
    angular_extent_deg: float
    pattern: str
    search_stopped: bool = False


# --------------------------------------------------------------------------- helpers
def _array_zyx(image: sitk.Image) -> np.ndarray:
    return sitk.GetArrayFromImage(image)


def _sample_linear(vol_zyx: np.ndarray, idx_xyz: np.ndarray) -> np.ndarray:
    """Linear interpolation of vol (z, y, x) at continuous (x, y, z) indices (..., 3); 0 outside."""
    flat = idx_xyz.reshape(-1, 3)
    vals = map_coordinates(vol_zyx, flat[:, ::-1].T, order=1, mode="constant", cval=0.0)
    return vals.reshape(idx_xyz.shape[:-1])


def _crop_to_points(image: sitk.Image, idx_xyz: np.ndarray, margin: int = 2
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Float32 crop of ``image`` around query indices, so that the full volume is never copied.

    idx_xyz: (..., 3) continuous indices into image. Returns (crop (z, y, x), offset (x, y, z)).
    """
    size = np.asarray(image.GetSize())
    flat = idx_xyz.reshape(-1, 3)
    lo = np.clip(np.floor(flat.min(axis=0)).astype(int) - margin, 0, size - 1)
    hi = np.clip(np.ceil(flat.max(axis=0)).astype(int) + margin, 0, size - 1)
    arr = _array_zyx(image)[lo[2]:hi[2] + 1, lo[1]:hi[1] + 1, lo[0]:hi[0] + 1]
    return (arr != 0).astype(np.float32), lo.astype(float)


def _angles(positions: np.ndarray, centroid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Azimuth in [0, 360) and elevation in [-90, 90] (deg) of positions around centroid (LPS)."""
    d = positions - centroid
    az = np.degrees(np.arctan2(d[:, 1], d[:, 0])) % 360.0
    el = np.degrees(np.arctan2(d[:, 2], np.hypot(d[:, 0], d[:, 1])))
    return az, el


def _weighted_quantile(values: np.ndarray, weights: np.ndarray, q: float) -> float:
    order = np.argsort(values)
    v, w = values[order], weights[order]
    cw = np.cumsum(w)
    return float(v[min(np.searchsorted(cw, q * cw[-1]), len(v) - 1)])


# --------------------------------------------------------------------------- surface
def az_surface_samples(az_mask: sitk.Image, n_directions: int = 6000, normal_sigma_mm: float = 1.0,
                       seed: int = 0) -> SurfaceSamples | None:
    """Sample points, outward normals and area weights on the AZ's 0.5 iso-surface.

    az_mask: binary AZ mask (nonzero = AZ), any grid. n_directions: most samples kept; a denser
    surface is subsampled in proportion to area (fixed seed: reproducible). normal_sigma_mm:
    Gaussian sigma (mm) of the smoothing from which the normals are taken. None for an empty mask.
    """
    grid = Grid.of(az_mask)
    binary = _array_zyx(az_mask) != 0
    nz = np.nonzero(binary)
    if nz[0].size == 0:
        return None
    pad = 2 + int(math.ceil(3 * normal_sigma_mm / grid.spacing.min()))
    lo = np.array([a.min() for a in nz]) - pad  # (z, y, x), may be < 0: the pad is explicit below
    hi = np.array([a.max() for a in nz])
    crop = np.pad(binary[lo[0] + pad:hi[0] + 1, lo[1] + pad:hi[1] + 1, lo[2] + pad:hi[2] + 1], pad)
    crop = crop.astype(np.float32)
    offset_xyz = lo[::-1].astype(float)

    zz, yy, xx = np.nonzero(crop)
    centroid = grid.index_to_lps(np.array([xx.mean(), yy.mean(), zz.mean()]) + offset_xyz)

    verts, faces, _, _ = marching_cubes(crop, level=_ISO)  # (z, y, x) crop index units
    idx = verts[:, ::-1] + offset_xyz
    pos = grid.index_to_lps(idx)

    # Area weights: each triangle gives a third of its area (mm^2, physical) to each corner.
    tri = pos[faces]
    area = 0.5 * np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=1)
    weights = np.zeros(len(pos))
    for j in range(3):
        np.add.at(weights, faces[:, j], area / 3.0)

    # Normals: -grad of the smoothed mask, chain rule index -> LPS: grad_p = inv(D S)^T grad_idx.
    sigma_zyx = normal_sigma_mm / grid.spacing[::-1]
    smooth = gaussian_filter(crop, sigma_zyx, mode="constant")
    g_zyx = np.gradient(smooth)
    v_zyx = verts.T
    g_idx = np.stack([map_coordinates(g_zyx[2 - a], v_zyx, order=1) for a in range(3)], axis=1)
    m_inv_t = np.linalg.inv(grid.direction * grid.spacing).T
    n = -(g_idx @ m_inv_t.T)
    norm = np.linalg.norm(n, axis=1)
    radial = pos - centroid
    bad = norm < 1e-9  # flat gradient (should not happen on an iso-surface): use the radial direction
    n[bad] = radial[bad]
    n /= np.maximum(np.linalg.norm(n, axis=1), 1e-12)[:, None]

    if len(pos) > n_directions:
        rng = np.random.default_rng(seed)
        keep = rng.choice(len(pos), size=n_directions, replace=False, p=weights / weights.sum())
        total = weights.sum()
        pos, n = pos[keep], n[keep]
        weights = np.full(n_directions, total / n_directions)
    return SurfaceSamples(positions_lps=pos, normals_lps=n, weights_mm2=weights, centroid_lps=centroid)


# --------------------------------------------------------------------------- profile
def rim_thickness_profile(
    az_mask: sitk.Image,
    enhancing_mask: sitk.Image,
    max_search_mm: float = 8.0,
    n_directions: int = 6000,
    *,
    start_within_mm: float = 1.0,
    step_mm: float | None = None,
    surface: SurfaceSamples | None = None,
) -> RimProfile:
    """Thickness (mm) of the enhancing tissue along the outward AZ-surface normals.

    az_mask: binary AZ mask; enhancing_mask: binary enhancing-tissue mask (subtraction-based), on
    any grid (read through its own geometry). max_search_mm: how far out each ray goes.
    n_directions: most surface samples (rays). start_within_mm: the enhancing run must begin within
    this distance of the AZ surface (farther tissue is a separate focus, not the rim). step_mm: ray
    step, default min(0.5, smallest enhancing spacing / 2). surface: precomputed
    ``az_surface_samples`` (reuse it when profiling several masks against the same AZ).
    Raises ValueError for an empty AZ mask.
    """
    if surface is None:
        surface = az_surface_samples(az_mask, n_directions)
    if surface is None:
        raise ValueError("empty AZ mask: no surface to measure the rim from")
    egrid = Grid.of(enhancing_mask)
    if step_mm is None:
        step_mm = min(0.5, float(egrid.spacing.min()) / 2.0)
    steps = np.arange(0.0, max_search_mm + step_mm / 2.0, step_mm)  # (S,)
    pts = surface.positions_lps[:, None, :] + steps[None, :, None] * surface.normals_lps[:, None, :]
    idx = egrid.lps_to_index(pts)  # (N, S, 3)
    vol, off = _crop_to_points(enhancing_mask, idx)
    f = _sample_linear(vol, idx - off)  # (N, S) in [0, 1]
    on = f >= _ISO

    n, s = on.shape
    cols = np.arange(s)
    start_ok = steps <= start_within_mm + 1e-9
    has = np.any(on & start_ok[None, :], axis=1)
    i0 = np.argmax(on & start_ok[None, :], axis=1)
    after = cols[None, :] > i0[:, None]
    off_after = (~on) & after
    ends_inside = np.any(off_after, axis=1)
    i_off = np.where(ends_inside, np.argmax(off_after, axis=1), s)  # first non-enhancing after run
    rows = np.arange(n)

    def crossing(i_lo: np.ndarray, i_hi: np.ndarray) -> np.ndarray:
        """Position (mm) where f crosses 0.5 between steps i_lo and i_hi (linear)."""
        f_lo, f_hi = f[rows, i_lo], f[rows, i_hi]
        with np.errstate(divide="ignore", invalid="ignore"):
            t = np.where(f_hi != f_lo, (_ISO - f_lo) / (f_hi - f_lo), 0.5)
        return steps[i_lo] + np.clip(t, 0.0, 1.0) * step_mm

    entry = np.where(i0 > 0, crossing(np.maximum(i0 - 1, 0), i0), 0.0)
    i_last = np.minimum(i_off, s - 1) - np.where(ends_inside, 1, 0)
    exit_ = np.where(ends_inside, crossing(i_last, np.minimum(i_off, s - 1)), steps[-1])
    thickness = np.where(has, np.maximum(exit_ - entry, 0.0), 0.0)
    start = np.where(has, entry, np.nan)
    censored = has & ~ends_inside

    az, el = _angles(surface.positions_lps, surface.centroid_lps)
    return RimProfile(
        thickness_mm=thickness, start_mm=start, censored=censored,
        positions_lps=surface.positions_lps, normals_lps=surface.normals_lps,
        weights_mm2=surface.weights_mm2, azimuth_deg=az, elevation_deg=el,
        centroid_lps=surface.centroid_lps, step_mm=float(step_mm), max_search_mm=float(max_search_mm),
    )


# --------------------------------------------------------------------------- metrics
def robust_thickness(profile: RimProfile, k: int = _ROBUST_K) -> np.ndarray:
    """(N,) median thickness (mm) over each sample's k nearest surface samples (itself included)."""
    if profile.n == 0:
        return np.zeros(0)
    k = min(k, profile.n)
    _, nb = cKDTree(profile.positions_lps).query(profile.positions_lps, k=k)
    nb = np.asarray(nb).reshape(profile.n, k)
    return np.median(profile.thickness_mm[nb], axis=1)


def coverage_deg(profile: RimProfile, min_thickness_mm: float = MIN_RIM_MM, bin_deg: float = 5.0,
                 max_elevation_deg: float = MAX_ELEVATION_FOR_COVERAGE_DEG,
                 min_fraction: float = 0.5) -> float:
    """Degrees of the axial circumference (0..360) around the AZ centroid that carry rim.

    A ``bin_deg`` azimuth bin is covered when at least ``min_fraction`` of its surface area
    (samples with |elevation| <= max_elevation_deg) has thickness >= min_thickness_mm. Bins
    without samples (tiny AZ) are left out and the result is scaled to 360 deg.
    """
    use = np.abs(profile.elevation_deg) <= max_elevation_deg
    if not np.any(use):
        return 0.0
    n_bins = int(round(360.0 / bin_deg))
    b = np.minimum((profile.azimuth_deg[use] / bin_deg).astype(int), n_bins - 1)
    w = profile.weights_mm2[use]
    rim = profile.thickness_mm[use] >= min_thickness_mm
    area = np.bincount(b, weights=w, minlength=n_bins)
    rim_area = np.bincount(b, weights=w * rim, minlength=n_bins)
    known = area > 0
    covered = known & (rim_area >= min_fraction * area)
    return float(360.0 * covered.sum() / known.sum())


def rim_metrics(
    profile: RimProfile,
    rim_volume_ml: float,
    benign_max_thickness_mm: float = 3.0,
    benign_min_coverage_deg: float = 270.0,
    benign_max_cv: float = 0.5,
    min_thickness_mm: float = MIN_RIM_MM,
) -> RimMetrics:
    """Rim statistics and the benign-rim call (criteria.md §6 rules 7-8).

    Statistics are area-weighted over the samples that carry rim (thickness >= min_thickness_mm):
    median (mm), robust max (mm, see module doc: max of the 7-neighbour median, not a single ray),
    coefficient of variation (std / mean), coverage (deg, ``coverage_deg``). rim_volume_ml is
    passed through. benign_pattern = max <= benign_max_thickness_mm and coverage >=
    benign_min_coverage_deg and cv <= benign_max_cv; ``reason`` lists each failed criterion.
    No rim at all: present=False and benign_pattern=True (nothing enhances, so no suspicious
    rim pattern); callers look at ``present`` first.
    """
    t, w = profile.thickness_mm, profile.weights_mm2
    has = t >= min_thickness_mm
    if not np.any(has):
        return RimMetrics(present=False, median_thickness_mm=0.0, max_thickness_mm=0.0,
                          coverage_deg=0.0, cv=0.0, volume_ml=float(rim_volume_ml),
                          benign_pattern=True, reason="no enhancing rim along the AZ surface")
    tv, wv = t[has], w[has]
    median = _weighted_quantile(tv, wv, 0.5)
    mean = float(np.average(tv, weights=wv))
    cv = float(math.sqrt(np.average((tv - mean) ** 2, weights=wv)) / mean) if mean > 0 else 0.0
    robust = robust_thickness(profile)
    max_t = float(robust.max())
    cov = coverage_deg(profile, min_thickness_mm)

    failed = []
    if max_t > benign_max_thickness_mm:
        failed.append(f"max thickness {max_t:.1f} mm > {benign_max_thickness_mm:g} mm")
    if cov < benign_min_coverage_deg:
        failed.append(f"coverage {cov:.0f} deg < {benign_min_coverage_deg:g} deg")
    if cv > benign_max_cv:
        failed.append(f"thickness CV {cv:.2f} > {benign_max_cv:g}")
    if np.any(profile.censored & has):
        failed_note = f"; rim reaches the {profile.max_search_mm:g} mm search limit on some rays"
    else:
        failed_note = ""
    reason = ("benign rim pattern" if not failed else "not benign: " + "; ".join(failed)) + failed_note
    return RimMetrics(
        present=True, median_thickness_mm=median, max_thickness_mm=max_t, coverage_deg=cov, cv=cv,
        volume_ml=float(rim_volume_ml), benign_pattern=not failed, reason=reason,
    )


# --------------------------------------------------------------------------- foci
def angular_extent_deg(points_lps: np.ndarray, az_centroid: np.ndarray,
                       axis: np.ndarray | None = None, bin_deg: float = 5.0,
                       min_radius_mm: float = 1.0) -> float:
    """Angular extent (deg, 0..360) of a point set around the AZ centroid.

    points_lps: (N, 3) mm, e.g. voxel centres of one enhancing focus; az_centroid: (3,) mm.
    axis: plane normal (default LPS z: the extent is measured in the axial plane, like
    ``RimProfile.azimuth_deg``). Azimuths are binned at ``bin_deg``; the extent is 360 minus the
    largest circular run of empty bins, so holes inside the arc count as covered. Points within
    ``min_radius_mm`` of the axis through the centroid have no defined azimuth and are ignored.
    """
    pts = np.asarray(points_lps, dtype=float).reshape(-1, 3) - np.asarray(az_centroid, float)
    a = np.array([0.0, 0.0, 1.0]) if axis is None else np.asarray(axis, float)
    a = a / np.linalg.norm(a)
    # Orthonormal in-plane basis (e1, e2) for the given axis; for z this is (x, y).
    helper = np.array([1.0, 0.0, 0.0]) if abs(a[0]) < 0.9 else np.array([0.0, 1.0, 0.0])
    e1 = helper - a * (helper @ a)
    e1 /= np.linalg.norm(e1)
    e2 = np.cross(a, e1)
    u, v = pts @ e1, pts @ e2
    ok = np.hypot(u, v) >= min_radius_mm
    if not np.any(ok):
        return 0.0
    n_bins = int(round(360.0 / bin_deg))
    az = np.degrees(np.arctan2(v[ok], u[ok])) % 360.0
    occ = np.zeros(n_bins, bool)
    occ[np.minimum((az / bin_deg).astype(int), n_bins - 1)] = True
    if occ.all():
        return 360.0
    # Longest circular run of empty bins: unroll twice and scan.
    empty = np.concatenate([~occ, ~occ])
    best = run = 0
    for e in empty:
        run = run + 1 if e else 0
        best = max(best, run)
    best = min(best, n_bins)
    return float(360.0 - best * bin_deg)


def focus_pattern(extent_deg: float, focal_max_deg: float = 90.0,
                  crescentic_max_deg: float = 270.0) -> str:
    """focal (< focal_max_deg) / crescentic (< crescentic_max_deg) / circumferential."""
    if extent_deg < focal_max_deg:
        return "focal"
    if extent_deg < crescentic_max_deg:
        return "crescentic"
    return "circumferential"


def focus_margin_metrics(
    focus_mask: sitk.Image,
    az_mask: sitk.Image,
    max_search_mm: float = 10.0,
    surface: SurfaceSamples | None = None,
    focal_max_deg: float = 90.0,
    crescentic_max_deg: float = 270.0,
    start_within_mm: float | None = None,
) -> FocusMargin:
    """Local thickness along the AZ normals and angular extent of one enhancing focus.

    focus_mask: binary mask of one focus (connected component), any grid; az_mask: binary AZ mask.
    The thickness is that of the focus's own run along the rays from the AZ surface (it may start
    anywhere within ``start_within_mm``, default ``max_search_mm``, since a focus need not touch
    the AZ; rays end at ``max_search_mm``), robust max as in
    ``rim_metrics``; extent from the focus's voxel centres around the AZ centroid in the axial
    plane. Raises ValueError for an empty AZ mask.
    """
    if surface is None:
        surface = az_surface_samples(az_mask)
    if surface is None:
        raise ValueError("empty AZ mask")
    prof = rim_thickness_profile(az_mask, focus_mask, max_search_mm=max_search_mm,
                                 start_within_mm=max_search_mm if start_within_mm is None else start_within_mm,
                                 surface=surface)
    hit = prof.thickness_mm > 0
    thickness = float(robust_thickness(prof)[hit].max()) if np.any(hit) else 0.0
    fgrid = Grid.of(focus_mask)
    zz, yy, xx = np.nonzero(_array_zyx(focus_mask))
    pts = fgrid.index_to_lps(np.column_stack([xx, yy, zz]).astype(float))
    extent = angular_extent_deg(pts, surface.centroid_lps)
    return FocusMargin(local_thickness_mm=thickness, angular_extent_deg=extent,
                       pattern=focus_pattern(extent, focal_max_deg, crescentic_max_deg),
                       search_stopped=bool(np.any(prof.censored & hit)))
