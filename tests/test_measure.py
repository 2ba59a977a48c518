"""Ablation-zone size on analytic ellipsoids: any orientation, anisotropic, oblique, flipped grids.

Truth is analytic. For an ellipsoid (x - c)^T A (x - c) <= 1 cut by the plane
x = c + t n + u e1 + v e2 (n = slice normal, e1/e2 = in-plane axes), the section is
w^T P w + 2 t w^T b + t^2 m <= 1 with M = B^T A B, B = [e1 e2 n], P = M[:2, :2], b = M[:2, 2],
m = M[2, 2]. Completing the square: an ellipse with matrix P / (1 - t^2 k), k = m - b^T P^-1 b,
centred at w0 = -t P^-1 b; semi-axes sqrt((1 - t^2 k) / eig(P)). All sections are similar, so
the largest one over the slices is the slice with the smallest |t|.

Masks are built from voxel-centre coordinates that SimpleITK itself computes
(PhysicalPointSource), independent of the code under test's index->LPS arithmetic.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import SimpleITK as sitk

from pipeline.measurement.axes import (
    Grid,
    axial_reformat_grid,
    feret_2d,
    measure_ablation_zone,
    percent_change,
    slice_obliquity_deg,
)
from tests.dicom_factory import rotation


# --------------------------------------------------------------------------- builders
def _points(size, spacing, direction, origin) -> np.ndarray:
    """(z, y, x, 3) LPS coordinates of the voxel centres, computed by SimpleITK."""
    img = sitk.PhysicalPointSource(
        sitk.sitkVectorFloat64, [int(s) for s in size], [float(o) for o in origin],
        [float(s) for s in spacing], [float(d) for d in np.ravel(direction)],
    )
    return sitk.GetArrayFromImage(img)


def _image(arr: np.ndarray, spacing, direction, origin) -> sitk.Image:
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing([float(s) for s in spacing])
    img.SetOrigin([float(o) for o in origin])
    img.SetDirection([float(d) for d in np.ravel(direction)])
    return img


def _quad(pts: np.ndarray, centre: np.ndarray, amat: np.ndarray) -> np.ndarray:
    d = pts - centre
    return np.einsum("...i,ij,...j->...", d, amat, d)


def ellipsoid(spacing, direction, centre, semi_axes, rot, supersample: int = 1,
              fov_mm=(120.0, 120.0, 120.0)):
    """Binary mask (and, when supersample > 1, a partial-volume soft map) of an ellipsoid.

    The grid is centred near ``centre`` (slightly off, so the ellipsoid is not grid-symmetric).
    Returns (mask uint8, soft float32 or None, amat, grid).
    """
    spacing = np.asarray(spacing, float)
    direction = np.asarray(direction, float)
    size = np.ceil(np.asarray(fov_mm) / spacing).astype(int)
    origin = centre - direction @ (spacing * (size - 1) / 2.0) + np.array([0.37, -0.21, 0.55])
    amat = rot @ np.diag(1.0 / np.asarray(semi_axes, float) ** 2) @ rot.T
    pts = _points(size, spacing, direction, origin)
    if supersample == 1:
        mask = (_quad(pts, centre, amat) <= 1.0).astype(np.uint8)
        return _image(mask, spacing, direction, origin), None, amat
    offs = (np.arange(supersample) + 0.5) / supersample - 0.5
    frac = np.zeros(pts.shape[:3], np.float32)
    for ox in offs:
        for oy in offs:
            for oz in offs:
                shift = direction @ (spacing * np.array([ox, oy, oz]))
                frac += _quad(pts + shift, centre, amat) <= 1.0
    frac /= supersample ** 3
    mask = _image((frac >= 0.5).astype(np.uint8), spacing, direction, origin)
    return mask, _image(frac, spacing, direction, origin), amat


def section_truth(amat: np.ndarray, centre: np.ndarray, grid: Grid, k: int | None = None):
    """Analytic largest section over the grid's slices (or the section on slice ``k``).

    Returns (long_mm, short_mm, slice_index, long_endpoints (2, 3) LPS, short_endpoints (2, 3)).
    """
    e1, e2, n = grid.direction[:, 0], grid.direction[:, 1], grid.direction[:, 2]
    bmat = np.column_stack([e1, e2, n])
    m = bmat.T @ amat @ bmat
    p, b, mm = m[:2, :2], m[:2, 2], m[2, 2]
    kappa = mm - b @ np.linalg.solve(p, b)
    ks = np.arange(grid.size[2])
    slice_pts = grid.index_to_lps(np.column_stack([np.zeros_like(ks), np.zeros_like(ks), ks]))
    t_all = (slice_pts - centre) @ n
    if k is None:
        k = int(np.argmin(np.abs(t_all)))
    t = t_all[k]
    lam, vec = np.linalg.eigh(p)  # ascending: lam[0] -> major axis
    f = 1.0 - t * t * kappa
    semi = np.sqrt(f / lam)
    w0 = -t * np.linalg.solve(p, b)
    centre_k = centre + t * n + w0[0] * e1 + w0[1] * e2
    major = vec[0, 0] * e1 + vec[1, 0] * e2
    minor = vec[0, 1] * e1 + vec[1, 1] * e2
    long_ends = np.array([centre_k - semi[0] * major, centre_k + semi[0] * major])
    short_ends = np.array([centre_k - semi[1] * minor, centre_k + semi[1] * minor])
    return 2 * semi[0], 2 * semi[1], k, long_ends, short_ends


def _match_pair(found, truth, tol: float) -> bool:
    """Endpoints match in either order within tol (mm)."""
    found, truth = np.asarray(found), np.asarray(truth)
    direct = np.linalg.norm(found - truth, axis=1).max()
    swapped = np.linalg.norm(found - truth[::-1], axis=1).max()
    return min(direct, swapped) <= tol


CENTRE = np.array([14.0, -23.0, 41.0])
CASES = {
    # name: (spacing, direction, ellipsoid rotation, semi-axes mm, expected plane)
    "aniso_0.9x1.3x3": ((0.9, 1.3, 3.0), np.eye(3), rotation(20, 35, 50), (22, 14, 10),
                        "acquired_axial"),
    "aniso_1.5x1.5x4": ((1.5, 1.5, 4.0), np.eye(3), rotation(-30, 15, 110), (20, 15, 11),
                        "acquired_axial"),
    "oblique_20deg": ((1.5, 1.5, 4.0), rotation(20, 0, 0), rotation(10, 40, -20), (21, 13, 12),
                      "acquired_axial"),
    "oblique_50deg_reformat": ((1.2, 1.2, 3.0), rotation(0, 50, 10), rotation(25, 5, 70),
                               (20, 12, 14), "axial_reformat"),
    "sagittal_reformat": ((1.0, 1.0, 3.0), np.array([[0, 0, -1], [1, 0, 0], [0, -1, 0]], float),
                          rotation(15, 25, 35), (19, 12, 10), "axial_reformat"),
    "flipped_y": ((1.5, 1.5, 4.0), np.diag([1.0, -1.0, 1.0]), rotation(0, 20, 30), (20, 12, 10),
                  "acquired_axial"),
    "flipped_x": ((1.5, 1.5, 4.0), np.diag([-1.0, 1.0, 1.0]), rotation(-10, 20, 55),
                  (20, 12, 10), "acquired_axial"),
}


def _measured_grid(mask: sitk.Image, measured_on: str) -> Grid:
    return axial_reformat_grid(mask) if measured_on == "axial_reformat" else Grid.of(mask)


def _tolerance(mask: sitk.Image, grid: Grid) -> float:
    """One voxel (mm): the in-plane spacing of the measured grid; on a reformat, at least the
    largest extent of an acquired voxel along an in-plane direction (a reformat cannot add
    resolution: a sagittal series has its 3 mm slice spacing along x on the axial reformat)."""
    voxel = float(max(grid.spacing[:2]))
    src = Grid.of(mask)
    if not np.allclose(grid.direction, src.direction):
        # Source-voxel extent along in-plane unit u is |S D^T u|: its largest value is the top
        # singular value of S D^T [e1 e2].
        m = (src.spacing[:, None] * src.direction.T) @ grid.direction[:, :2]
        voxel = max(voxel, float(np.linalg.svd(m, compute_uv=False)[0]))
    return voxel


def _check_endpoints(r, amat: np.ndarray, grid: Grid, tol: float) -> None:
    """Endpoints are where the ellipsoid is, in LPS: a dropped, flipped or swapped axis fails here.

    Checked in well-conditioned terms (the Feret direction of a mildly eccentric ellipse is not:
    a 0.1 mm change in length turns it by several degrees): every endpoint lies on the section's
    boundary within tol (in-plane distance), the long axis is centred on the section's centre, the
    short axis crosses the long axis near its middle. tol in mm.
    """
    n = grid.direction[:, 2]
    long_t, _, _, long_ends_t, _ = section_truth(amat, CENTRE, grid, k=r.slice_index)
    centre_k = long_ends_t.mean(axis=0)
    for p in np.asarray(r.long_axis_endpoints_lps + r.short_axis_endpoints_lps):
        d = p - CENTRE
        q = d @ amat @ d
        grad = 2 * amat @ d
        grad_in_plane = grad - (grad @ n) * n
        assert abs(q - 1.0) / np.linalg.norm(grad_in_plane) <= tol, (p, q)
    long_found = np.asarray(r.long_axis_endpoints_lps)
    assert np.linalg.norm(long_found.mean(axis=0) - centre_k) <= 1.5 * tol
    u = np.diff(long_found, axis=0)[0] / r.long_axis_mm
    short_mid = np.mean(r.short_axis_endpoints_lps, axis=0) - long_found[0]
    assert np.linalg.norm(short_mid - (short_mid @ u) * u) <= 1.5 * tol  # crosses the long axis
    assert abs(short_mid @ u - r.long_axis_mm / 2) <= 0.25 * r.long_axis_mm  # near its middle
    # Both axes lie in the measured slice plane and are perpendicular.
    n = grid.direction[:, 2]
    la = np.diff(np.asarray(r.long_axis_endpoints_lps), axis=0)[0]
    sa = np.diff(np.asarray(r.short_axis_endpoints_lps), axis=0)[0]
    assert abs(la @ n) < 1e-6 and abs(sa @ n) < 1e-6
    assert abs(la @ sa) / (np.linalg.norm(la) * np.linalg.norm(sa)) < 1e-6
    assert np.linalg.norm(la) == pytest.approx(r.long_axis_mm)
    assert np.linalg.norm(sa) == pytest.approx(r.short_axis_mm)


# --------------------------------------------------------------------------- tests
@pytest.mark.parametrize("name", list(CASES))
def test_ellipsoid_binary_mask(name):
    spacing, direction, rot, semi, plane = CASES[name]
    mask, _, amat = ellipsoid(spacing, direction, CENTRE, semi, rot)
    r = measure_ablation_zone(mask)
    assert r is not None
    assert r.measured_on == plane
    grid = _measured_grid(mask, r.measured_on)
    long_t, short_t, k_t, _, _ = section_truth(amat, CENTRE, grid)
    tol = _tolerance(mask, grid)
    assert r.in_plane_spacing_mm == pytest.approx(list(grid.spacing[:2]))
    assert abs(r.long_axis_mm - long_t) <= tol, (r.long_axis_mm, long_t, tol)
    assert abs(r.short_axis_mm - short_t) <= tol, (r.short_axis_mm, short_t, tol)
    # Neighbouring sections differ by far less than a voxel, so either may hold the maximum.
    assert abs(r.slice_index - k_t) <= 1
    # 3D diameter of a binary mask: one voxel measured along the true diameter (with 3-4 mm
    # slices the iso-surface of a binary mask cannot place a tip better than the slice allows).
    major_idx = Grid.of(mask).direction.T @ rot[:, int(np.argmax(semi))]
    voxel_3d = float(np.linalg.norm(np.asarray(spacing) * major_idx))
    assert abs(r.max_3d_diameter_mm - 2 * max(semi)) <= voxel_3d
    volume_true = 4.0 / 3.0 * np.pi * np.prod(semi) / 1000.0
    assert r.volume_ml == pytest.approx(volume_true, rel=0.03)
    assert np.allclose(r.centroid_lps, CENTRE, atol=0.5)
    _check_endpoints(r, amat, grid, tol)


@pytest.mark.parametrize("name", ["aniso_0.9x1.3x3", "oblique_20deg", "oblique_50deg_reformat",
                                  "flipped_x"])
def test_ellipsoid_soft_map_within_one_in_plane_voxel(name):
    spacing, direction, rot, semi, plane = CASES[name]
    mask, soft, amat = ellipsoid(spacing, direction, CENTRE, semi, rot, supersample=3)
    r = measure_ablation_zone(mask, soft)
    assert r.measured_on == plane
    grid = _measured_grid(mask, r.measured_on)
    long_t, short_t, k_t, _, _ = section_truth(amat, CENTRE, grid)
    voxel = float(min(grid.spacing[:2]))  # the stricter in-plane spacing
    assert abs(r.long_axis_mm - long_t) <= voxel
    assert abs(r.short_axis_mm - short_t) <= voxel
    assert abs(r.slice_index - k_t) <= 1
    assert abs(r.max_3d_diameter_mm - 2 * max(semi)) <= voxel
    assert r.volume_ml == pytest.approx(4.0 / 3.0 * np.pi * np.prod(semi) / 1000.0, rel=0.03)
    _check_endpoints(r, amat, grid, voxel)


def test_flipped_axis_is_caught():
    """The same physical ellipsoid on a y-flipped grid gives the same LPS answer; ignoring the
    direction matrix would put it at the mirrored place."""
    rot, semi = rotation(0, 20, 30), (20, 12, 10)
    plain, _, _ = ellipsoid((1.5, 1.5, 4.0), np.eye(3), CENTRE, semi, rot)
    flipped, _, _ = ellipsoid((1.5, 1.5, 4.0), np.diag([1.0, -1.0, 1.0]), CENTRE, semi, rot)
    a, b = measure_ablation_zone(plain), measure_ablation_zone(flipped)
    assert np.allclose(a.centroid_lps, b.centroid_lps, atol=0.5)
    assert _match_pair(a.long_axis_endpoints_lps, b.long_axis_endpoints_lps, 1.5 * 1.5)
    # The mirrored answer (direction dropped) must be far away: the test can fail.
    stripped = sitk.Image(flipped)
    stripped.SetDirection(tuple(np.eye(3).ravel()))
    c = measure_ablation_zone(stripped)
    assert np.linalg.norm(np.asarray(c.centroid_lps) - CENTRE) > 20.0


@pytest.mark.parametrize("flip", [(1, -1, 1), (-1, 1, 1), (-1, -1, -1)])
def test_same_voxels_on_a_flipped_grid_give_identical_lps(flip):
    """Exactly the same physical voxels stored with negated index axes: every LPS output equal."""
    spacing = np.array([1.5, 1.5, 4.0])
    mask, _, _ = ellipsoid(spacing, np.eye(3), CENTRE, (20, 12, 10), rotation(0, 20, 30))
    arr = sitk.GetArrayFromImage(mask)
    size = np.asarray(mask.GetSize())
    f = np.asarray(flip, float)
    # New index i' = (size-1) - i on flipped axes: origin moves to the old last voxel.
    origin = np.asarray(mask.GetOrigin()) + np.where(f < 0, spacing * (size - 1), 0.0)
    flipped_arr = arr[:: int(f[2]), :: int(f[1]), :: int(f[0])]
    flipped = _image(np.ascontiguousarray(flipped_arr), spacing, np.diag(f), origin)
    a, b = measure_ablation_zone(mask), measure_ablation_zone(flipped)
    assert b.long_axis_mm == pytest.approx(a.long_axis_mm, abs=1e-6)
    assert b.short_axis_mm == pytest.approx(a.short_axis_mm, abs=1e-6)
    assert b.max_3d_diameter_mm == pytest.approx(a.max_3d_diameter_mm, abs=1e-6)
    assert b.volume_ml == pytest.approx(a.volume_ml)
    assert np.allclose(a.centroid_lps, b.centroid_lps, atol=1e-6)
    assert _match_pair(a.long_axis_endpoints_lps, b.long_axis_endpoints_lps, 1e-6)
    assert _match_pair(a.short_axis_endpoints_lps, b.short_axis_endpoints_lps, 1e-6)


def test_reformat_geometry():
    spacing, direction, rot, semi, _ = CASES["oblique_50deg_reformat"]
    mask, _, _ = ellipsoid(spacing, direction, CENTRE, semi, rot)
    assert slice_obliquity_deg(mask) == pytest.approx(50.0, abs=0.5)
    grid = axial_reformat_grid(mask)
    assert np.allclose(grid.direction, np.eye(3))
    assert np.allclose(grid.spacing, [1.2, 1.2, 3.0])
    r = measure_ablation_zone(mask)
    z = [p[2] for p in r.long_axis_endpoints_lps + r.short_axis_endpoints_lps]
    assert np.allclose(z, grid.origin[2] + r.slice_index * grid.spacing[2])


def test_empty_mask_returns_none():
    img = sitk.Image([10, 10, 5], sitk.sitkUInt8)
    assert measure_ablation_zone(img) is None


def test_single_voxel_and_thin_line():
    arr = np.zeros((5, 8, 9), np.uint8)
    arr[2, 4, 3] = 1
    r = measure_ablation_zone(sitk.GetImageFromArray(arr))
    assert r.long_axis_mm == pytest.approx(1.0) and r.volume_ml == pytest.approx(0.001)
    arr[2, 4, 3:7] = 1  # a one-voxel-thin line keeps its length (no anti-alias erosion)
    r = measure_ablation_zone(sitk.GetImageFromArray(arr))
    assert r.long_axis_mm == pytest.approx(4.0, abs=0.05)


def test_performance_40mm_on_192x192x44():
    spacing = np.array([1.5, 1.5, 4.0])
    size = np.array([192, 192, 44])
    origin = -spacing * (size - 1) / 2.0
    pts = _points(size, spacing, np.eye(3), origin)
    amat = rotation(10, 20, 30) @ np.diag(1.0 / np.array([20.0, 15.0, 13.0]) ** 2) @ rotation(
        10, 20, 30).T
    mask = _image((_quad(pts, np.zeros(3), amat) <= 1).astype(np.uint8), spacing, np.eye(3), origin)
    measure_ablation_zone(mask)  # warm-up (imports, caches)
    best = min(_timed(measure_ablation_zone, mask) for _ in range(3))
    assert best < 0.2, best


def _timed(fn, *args) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


# --------------------------------------------------------------------------- helpers
def test_feret_2d_ellipse_circle_and_degenerate():
    t = np.linspace(0, 2 * np.pi, 721)[:-1]
    ell = np.column_stack([10 * np.cos(t), 4 * np.sin(t)])
    rot = np.array([[np.cos(0.3), -np.sin(0.3)], [np.sin(0.3), np.cos(0.3)]])
    long_mm, long_ends, short_mm, short_ends = feret_2d(ell @ rot.T + [5, -2])
    assert long_mm == pytest.approx(20.0, abs=1e-3)
    assert short_mm == pytest.approx(8.0, abs=1e-2)
    assert abs(np.diff(long_ends, axis=0)[0] @ np.diff(short_ends, axis=0)[0]) < 1e-6
    circle = np.column_stack([5 * np.cos(t), 5 * np.sin(t)])
    assert feret_2d(circle)[0] == pytest.approx(10.0, abs=1e-3)
    assert feret_2d(circle)[2] == pytest.approx(10.0, abs=1e-2)
    line = np.column_stack([np.arange(5.0), np.zeros(5)])
    long_mm, _, short_mm, _ = feret_2d(line)
    assert long_mm == pytest.approx(4.0) and short_mm == 0.0
    assert feret_2d(np.zeros((0, 2)))[0] == 0.0


def test_feret_2d_short_axis_is_longest_perpendicular_chord():
    # Right triangle (0,0), (4,0), (0,3): long = hypotenuse 5; the longest chord perpendicular to
    # it goes through the right-angle vertex: the altitude 3 * 4 / 5 = 2.4.
    tri = np.array([[0.0, 0.0], [4.0, 0.0], [0.0, 3.0]])
    long_mm, _, short_mm, short_ends = feret_2d(tri)
    assert long_mm == pytest.approx(5.0)
    assert short_mm == pytest.approx(2.4)
    assert any(np.allclose(p, [0.0, 0.0]) for p in short_ends)


def test_percent_change():
    assert percent_change(12.0, 10.0) == pytest.approx(20.0)
    assert percent_change(8.0, 10.0) == pytest.approx(-20.0)
    assert percent_change(5.0, 0.0) is None
    assert percent_change(None, 10.0) is None
    assert percent_change(5.0, None) is None
    assert percent_change(float("nan"), 10.0) is None
