"""Size of the ablation zone (AZ): long/short axis, 3D maximum diameter, volume.

Conventions (DESIGN.md "Measurement conventions"):

* Coordinates are DICOM patient space (LPS, mm) exactly as SimpleITK holds them; every index ->
  physical mapping goes through origin + direction @ (spacing * index) so a flipped or oblique
  axis is never lost.
* Long axis = maximum Feret diameter of the AZ over the acquired slices (largest over slices).
* Short axis = the longest chord of the AZ's convex in-plane outline that is perpendicular to the
  long axis, on the slice holding the long axis (RECIST-style "longest perpendicular diameter").
  For a convex outline this is the longest perpendicular segment that stays inside the AZ; for an
  ellipse it equals the minor axis (and the caliper width perpendicular to the long axis).
* All diameters are measured on a sub-voxel boundary: the 0.5 iso-contour (2D) / iso-surface (3D)
  of the binary mask (linear interpolation between voxel centres) or of the soft segmentation.
  Voxel corners would overestimate by up to a voxel diagonal, voxel centres underestimate by one.
* A series whose slice plane is more than 30 deg from axial is measured on an axial reformat:
  identity direction, in-plane spacing = the smallest acquired in-plane spacing, slice spacing =
  the acquired slice spacing. The reformat grid covers the whole series (``axial_reformat_grid``),
  so ``slice_index`` is reproducible by any other stage that rebuilds the same grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
from scipy.ndimage import gaussian_filter
from scipy.spatial import ConvexHull, QhullError
from scipy.spatial.distance import pdist, squareform
from skimage.measure import find_contours, marching_cubes

from pipeline.core.records import AxisMeasurement

#: Slice planes tilted more than this from axial are measured on an axial reformat.
MAX_ACQUIRED_OBLIQUITY_DEG = 30.0
#: Gaussian sigma (voxels, per axis) that anti-aliases a *binary* mask before its 0.5 iso-contour
#: is taken. A binary mask's iso-contour is a staircase whose corners stick out; the maximum
#: Feret diameter picks those corners and overestimates by ~0.5 voxel on average (measured on
#: random ellipsoids). Smoothing leaves a flat boundary where it is (symmetric kernel) and moves a
#: curved one by only ~sigma^2 * curvature / 2 (< 0.1 mm for a 10 mm AZ), but cuts the bias to
#: ~0.2 voxel. Not applied to soft maps, which already carry sub-voxel information.
BINARY_ANTIALIAS_SIGMA_VOX = 0.7
_ISO = 0.5  # iso-level of the boundary on a binary mask or a probability map


# --------------------------------------------------------------------------- geometry helpers
@dataclass(frozen=True)
class Grid:
    """Geometry of a 3D image grid.

    origin: (3,) LPS mm of voxel index (0, 0, 0); spacing: (3,) mm along index axes (x, y, z);
    direction: (3, 3) column j = LPS unit vector of index axis j; size: (3,) voxels (x, y, z).
    """

    origin: np.ndarray
    spacing: np.ndarray
    direction: np.ndarray
    size: np.ndarray

    @classmethod
    def of(cls, image: sitk.Image) -> "Grid":
        return cls(
            origin=np.asarray(image.GetOrigin(), dtype=float),
            spacing=np.asarray(image.GetSpacing(), dtype=float),
            direction=np.asarray(image.GetDirection(), dtype=float).reshape(3, 3),
            size=np.asarray(image.GetSize(), dtype=int),
        )

    def index_to_lps(self, idx_xyz: np.ndarray) -> np.ndarray:
        """Continuous (x, y, z) indices, shape (N, 3) or (3,) -> LPS mm, same shape."""
        idx = np.asarray(idx_xyz, dtype=float)
        return self.origin + (idx * self.spacing) @ self.direction.T

    def lps_to_index(self, points_lps: np.ndarray) -> np.ndarray:
        """LPS mm, shape (N, 3) or (3,) -> continuous (x, y, z) indices, same shape.

        Uses the matrix inverse rather than the transpose so that a (rare) non-orthonormal
        direction matrix is still inverted correctly.
        """
        m = self.direction * self.spacing  # column j scaled by spacing[j]
        return (np.asarray(points_lps, dtype=float) - self.origin) @ np.linalg.inv(m).T


def slice_obliquity_deg(image: sitk.Image) -> float:
    """Angle (deg, 0..90) between the slice normal (direction[:, 2]) and the LPS z axis."""
    normal = Grid.of(image).direction[:, 2]
    cos = abs(normal[2]) / max(np.linalg.norm(normal), 1e-12)
    return math.degrees(math.acos(min(1.0, cos)))


def axial_reformat_grid(image: sitk.Image) -> Grid:
    """The axial reformat grid that covers the whole series ``image``.

    Identity direction; spacing (m, m, s_z) with m = min acquired in-plane spacing and s_z = the
    acquired slice spacing; the grid's voxel boxes cover the physical extent (voxel boxes) of the
    series. Deterministic, so a slice index on it means the same thing to every stage.
    """
    g = Grid.of(image)
    lo = -0.5
    hi = g.size - 0.5
    corners = np.array([[x, y, z] for x in (lo, hi[0]) for y in (lo, hi[1]) for z in (lo, hi[2])])
    pts = g.index_to_lps(corners)
    pmin, pmax = pts.min(axis=0), pts.max(axis=0)
    m = float(min(g.spacing[0], g.spacing[1]))
    spacing = np.array([m, m, float(g.spacing[2])])
    size = np.maximum(np.ceil((pmax - pmin) / spacing - 1e-6).astype(int), 1)
    return Grid(origin=pmin + spacing / 2.0, spacing=spacing, direction=np.eye(3), size=size)


def _bbox(arr: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Inclusive (z, y, x) index bounding box of the nonzero elements of ``arr``; None if empty."""
    nz = np.nonzero(arr)
    if nz[0].size == 0:
        return None
    lo = np.array([a.min() for a in nz])
    hi = np.array([a.max() for a in nz])
    return lo, hi


# --------------------------------------------------------------------------- 2D Feret
def _hull_vertices(points: np.ndarray) -> np.ndarray:
    """Convex hull vertices in counter-clockwise order; all points when degenerate (collinear)."""
    if len(points) >= 3:
        try:
            return points[ConvexHull(points).vertices]
        except QhullError:  # collinear / coincident points: no 2D hull
            pass
    return points


def feret_2d(points_mm: np.ndarray) -> tuple[float, np.ndarray, float, np.ndarray]:
    """Maximum Feret diameter and the longest perpendicular chord of a 2D point set.

    points_mm: (N, 2) in-plane coordinates in mm in any orthonormal frame (e.g. contour points).
    Returns (long_mm, long_endpoints (2, 2), short_mm, short_endpoints (2, 2)), endpoints in the
    input frame.

    Long = max pairwise distance between convex-hull vertices (exact Feret max).
    Short = longest chord of the convex hull perpendicular to the long axis. The chord length of
    a convex polygon is a concave piecewise-linear function of the position along the long axis,
    so its maximum sits on a line through a hull vertex: evaluating those lines is exact.
    """
    pts = np.asarray(points_mm, dtype=float).reshape(-1, 2)
    if len(pts) == 0:
        return 0.0, np.zeros((2, 2)), 0.0, np.zeros((2, 2))
    hull = _hull_vertices(pts)
    if len(hull) == 1:
        p = hull[[0, 0]]
        return 0.0, p, 0.0, p.copy()
    d = squareform(pdist(hull))
    i, j = np.unravel_index(int(np.argmax(d)), d.shape)
    long_mm = float(d[i, j])
    long_ends = hull[[i, j]]
    if long_mm == 0.0 or len(hull) < 3:
        return long_mm, long_ends, 0.0, np.repeat(long_ends[:1], 2, axis=0)

    # Frame (u along the long axis, v perpendicular), origin at the first endpoint.
    u = (long_ends[1] - long_ends[0]) / long_mm
    v = np.array([-u[1], u[0]])
    rel = hull - long_ends[0]
    pu, pv = rel @ u, rel @ v
    # Each hull edge (k -> k+1); for every candidate line u = s (s = a vertex's u) intersect it.
    a_u, b_u = pu, np.roll(pu, -1)
    a_v, b_v = pv, np.roll(pv, -1)
    # Candidate lines: through every vertex, plus through the long axis's midpoint (the tie-break
    # target below).
    s = np.append(pu, long_mm / 2.0)[:, None]  # (n_lines, 1) against (n_edges,)
    du = b_u - a_u
    with np.errstate(divide="ignore", invalid="ignore"):
        t = (s - a_u) / du
    crosses = (t >= 0) & (t <= 1) & (du != 0)
    v_at = np.where(crosses, a_v + t * (b_v - a_v), np.nan)
    # Edges lying on the line (du == 0 at u == s) contribute both endpoints.
    on_line = (du == 0) & np.isclose(a_u, s)
    v_hi = np.fmax(np.nanmax(np.where(crosses, v_at, -np.inf), axis=1),
                   np.max(np.where(on_line, np.maximum(a_v, b_v), -np.inf), axis=1))
    v_lo = np.fmin(np.nanmin(np.where(crosses, v_at, np.inf), axis=1),
                   np.min(np.where(on_line, np.minimum(a_v, b_v), np.inf), axis=1))
    chord = v_hi - v_lo
    chord[~np.isfinite(chord)] = 0.0
    # Ties (a flat stretch of the chord-length function, common on staircase outlines) go to the
    # line nearest the long axis's midpoint: deterministic, and independent of the hull's vertex
    # order, so a mirrored grid gives the same chord.
    sv = s[:, 0]
    tied = np.flatnonzero(chord >= chord.max() - 1e-6)
    k = int(tied[np.argmin(np.abs(sv[tied] - long_mm / 2.0))])
    short_mm = float(chord[k])
    short_ends = long_ends[0] + np.array([sv[k] * u + v_lo[k] * v, sv[k] * u + v_hi[k] * v])
    if not np.all(np.isfinite(short_ends)):
        short_ends = np.repeat(long_ends[:1], 2, axis=0)
        short_mm = 0.0
    return long_mm, long_ends, short_mm, short_ends


def percent_change(value: float | None, reference: float | None) -> float | None:
    """100 * (value - reference) / reference; None when either is missing/non-finite or ref == 0."""
    if value is None or reference is None:
        return None
    value, reference = float(value), float(reference)
    if not (math.isfinite(value) and math.isfinite(reference)) or reference == 0.0:
        return None
    return 100.0 * (value - reference) / reference


# --------------------------------------------------------------------------- 3D helpers
def max_diameter_3d(points_lps: np.ndarray) -> float:
    """Maximum pairwise distance (mm) of a 3D point set (N, 3), via its convex hull."""
    pts = np.asarray(points_lps, dtype=float).reshape(-1, 3)
    if len(pts) < 2:
        return 0.0
    if len(pts) >= 4:
        try:
            pts = pts[ConvexHull(pts).vertices]
        except QhullError:  # planar / degenerate: fall back to all points
            pass
    return float(pdist(pts).max())


def _isosurface_lps(vol_zyx: np.ndarray, grid: Grid, offset_xyz: np.ndarray) -> np.ndarray:
    """Vertices (N, 3) in LPS of the 0.5 iso-surface of a zero-padded crop.

    vol_zyx: crop of the grid's array (numpy order z, y, x), padded so the surface is closed;
    offset_xyz: grid index (x, y, z) of the crop's element [0, 0, 0].
    """
    verts, _, _, _ = marching_cubes(vol_zyx, level=_ISO)  # in crop index units (z, y, x)
    return grid.index_to_lps(verts[:, ::-1] + offset_xyz)


# --------------------------------------------------------------------------- main entry
def _antialias(arr: np.ndarray, sigma_vox: float) -> np.ndarray:
    """Gaussian-smoothed copy of a binary (0/1) crop, or ``arr`` itself where smoothing hurts.

    Smoothing must only round the staircase, not erode the object: where it removes more than
    10 % of the >= 0.5 area/volume (structures about two voxels thin or less) the raw mask is kept.
    The crop must be zero-padded by >= 3 voxels (the kernel radius at sigma 0.7).
    """
    if sigma_vox <= 0:
        return arr
    smooth = gaussian_filter(arr, sigma_vox, mode="constant")
    raw_n = np.count_nonzero(arr >= _ISO)
    return smooth if np.count_nonzero(smooth >= _ISO) >= 0.9 * raw_n else arr


def _crop(arr: np.ndarray, support: np.ndarray, pad: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Crop arr (z, y, x) to the bbox of ``support`` and zero-pad by ``pad`` voxels.

    Returns (crop, offset_xyz) where offset_xyz is the grid index (x, y, z) of crop[0, 0, 0];
    None when ``support`` is empty.
    """
    bb = _bbox(support)
    if bb is None:
        return None
    lo, hi = bb
    crop = arr[lo[0]:hi[0] + 1, lo[1]:hi[1] + 1, lo[2]:hi[2] + 1]
    crop = np.pad(crop, pad, mode="constant", constant_values=0)
    offset_xyz = (lo - pad)[::-1].astype(float)
    return crop.astype(np.float32, copy=False), offset_xyz


def _reformat_crop(vol_zyx: np.ndarray, offset_xyz: np.ndarray, src: Grid,
                   full: Grid) -> tuple[np.ndarray, np.ndarray]:
    """Linearly resample a crop of the source grid onto the matching part of the axial grid.

    vol_zyx: float crop (z, y, x) of the source grid, zero-padded; offset_xyz: its source index.
    Returns (crop on the reformat grid (z, y, x), zero-padded by 1; its reformat index offset).
    """
    nz, ny, nx = vol_zyx.shape
    corners = np.array([[x, y, z] for x in (0, nx - 1) for y in (0, ny - 1) for z in (0, nz - 1)],
                       dtype=float)
    pts = src.index_to_lps(corners + offset_xyz)
    idx = full.lps_to_index(pts)
    lo = np.floor(idx.min(axis=0)).astype(int) - 1
    hi = np.ceil(idx.max(axis=0)).astype(int) + 1
    size = (hi - lo + 1).astype(int)

    img = sitk.GetImageFromArray(vol_zyx.astype(np.float32, copy=False))
    img.SetSpacing(tuple(src.spacing))
    img.SetDirection(tuple(src.direction.ravel()))
    img.SetOrigin(tuple(src.index_to_lps(offset_xyz)))
    out = sitk.Resample(
        img, [int(s) for s in size], sitk.Transform(), sitk.sitkLinear,
        tuple(full.index_to_lps(lo.astype(float))), tuple(full.spacing),
        tuple(full.direction.ravel()), 0.0, sitk.sitkFloat32,
    )
    arr = np.pad(sitk.GetArrayFromImage(out), 1)
    return arr, (lo - 1).astype(float)


def measure_ablation_zone(
    mask: sitk.Image,
    soft: sitk.Image | None = None,
    antialias_sigma_vox: float = BINARY_ANTIALIAS_SIGMA_VOX,
) -> AxisMeasurement | None:
    """Measure the ablation zone per DESIGN.md "Measurement conventions".

    mask: binary AZ mask (any integer type, nonzero = AZ) on the native grid of the post-contrast
    series; any direction matrix, anisotropic spacing.
    soft: optional AZ probability map (0..1) on the same grid; when given, boundaries are its 0.5
    iso-contour/-surface and the volume is its sum (expected volume), otherwise the binary mask's.
    antialias_sigma_vox: Gaussian sigma (voxels) applied to a binary mask before its iso-contour
    (in-plane only for the 2D axes, 3D for the 3D diameter); 0 disables. Ignored with ``soft``.
    Returns None for an empty mask.

    Long/short axis in mm on the acquired slices, or on the axial reformat
    (``axial_reformat_grid``) when the slice plane is > 30 deg from axial; 3D maximum diameter
    (mm, max pairwise distance over the 0.5 iso-surface) and volume (mL) always on the native
    grid (they do not depend on the slice plane, and resampling would only blur them).
    """
    grid = Grid.of(mask)
    binary = sitk.GetArrayFromImage(mask) != 0  # (z, y, x)
    if soft is not None:
        if tuple(soft.GetSize()) != tuple(mask.GetSize()):
            raise ValueError("soft must be on the same grid as mask")
        field = np.clip(sitk.GetArrayFromImage(soft).astype(np.float32), 0.0, 1.0)
        support = binary | (field >= _ISO)
    else:
        field = binary
        support = binary
    cropped = _crop(field, support, pad=3)
    if cropped is None:
        return None
    vol, offset = cropped
    boundary_3d = vol
    if soft is None:
        boundary_3d = _antialias(vol, antialias_sigma_vox)

    # ---- volume and centroid (native grid, weighted by the soft map when given)
    voxel_ml = float(np.prod(grid.spacing)) / 1000.0
    weights = vol.astype(np.float64)
    total = float(weights.sum())
    volume_ml = total * voxel_ml
    zz, yy, xx = np.nonzero(weights)
    w = weights[zz, yy, xx]
    centroid_idx = np.array([xx @ w, yy @ w, zz @ w]) / total + offset
    centroid = grid.index_to_lps(centroid_idx)

    # ---- 3D maximum diameter on the native iso-surface
    max_3d = max_diameter_3d(_isosurface_lps(boundary_3d, grid, offset))

    # ---- 2D axes on the acquired slices or on the axial reformat
    if slice_obliquity_deg(mask) > MAX_ACQUIRED_OBLIQUITY_DEG:
        plane_grid = axial_reformat_grid(mask)
        plane_vol, plane_offset = _reformat_crop(vol, offset, grid, plane_grid)
        measured_on = "axial_reformat"
    else:
        plane_grid, plane_vol, plane_offset = grid, vol, offset
        measured_on = "acquired_axial"
    sx, sy = float(plane_grid.spacing[0]), float(plane_grid.spacing[1])

    best: tuple[float, int, np.ndarray] | None = None  # (long_mm, k, contour points mm)
    for k in range(plane_vol.shape[0]):
        sl = plane_vol[k]
        if sl.max() < _ISO:
            continue
        if soft is None:
            sl = _antialias(sl, antialias_sigma_vox)
        contours = find_contours(sl, _ISO)  # (row, col) = (y, x) in crop index units
        if not contours:
            continue
        rc = np.concatenate(contours, axis=0)
        pts_mm = np.column_stack([rc[:, 1] * sx, rc[:, 0] * sy])  # isometric in-plane frame
        hull = _hull_vertices(pts_mm)
        long_mm = float(pdist(hull).max()) if len(hull) > 1 else 0.0
        if best is None or long_mm > best[0]:
            best = (long_mm, k, pts_mm)
    if best is None:  # only sub-threshold partial volume after reformatting
        return None
    _, k_best, pts_mm = best
    long_mm, long_ends, short_mm, short_ends = feret_2d(pts_mm)

    def to_lps(ends_mm: np.ndarray) -> list[list[float]]:
        idx = np.column_stack([ends_mm[:, 0] / sx, ends_mm[:, 1] / sy, np.full(len(ends_mm), k_best)])
        return plane_grid.index_to_lps(idx + plane_offset).tolist()

    return AxisMeasurement(
        long_axis_mm=long_mm,
        short_axis_mm=short_mm,
        max_3d_diameter_mm=max(max_3d, long_mm),
        volume_ml=volume_ml,
        slice_index=int(round(k_best + plane_offset[2])),
        long_axis_endpoints_lps=to_lps(long_ends),
        short_axis_endpoints_lps=to_lps(short_ends),
        centroid_lps=centroid.tolist(),
        measured_on=measured_on,
        in_plane_spacing_mm=[sx, sy],
    )
