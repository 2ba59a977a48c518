"""The scanner's side of a series: patient pose and motion, slice grids, coil bias, Rician noise
and the vendor's stored pixel values. Every function draws from the patient's generator."""

from __future__ import annotations

import numpy as np

from .geometry import (
    Deformation,
    Grid,
    Pose,
    axial_direction,
    coronal_direction,
    make_grid,
    rotation_matrix,
)
from .profiles import Profile


def random_pose(rng: np.random.Generator, rot_deg: float, trans_mm: float, max_def: float) -> Pose:
    R = rotation_matrix(*rng.uniform(-rot_deg, rot_deg, 3))
    return Pose(R, rng.uniform(-trans_mm, trans_mm, 3), Deformation.random(rng, max_def))


def small_motion(rng: np.random.Generator, rot_deg: float, trans_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """Rigid motion with rotation angle <= rot_deg about a random axis and |t| <= trans_mm."""
    axis = rng.standard_normal(3)
    axis /= np.linalg.norm(axis)
    ang = np.deg2rad(rng.uniform(0.2, 1.0) * rot_deg)
    K = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    R = np.eye(3) + np.sin(ang) * K + (1 - np.cos(ang)) * K @ K
    t = rng.standard_normal(3)
    t *= rng.uniform(0.3, 1.0) * trans_mm / np.linalg.norm(t)
    return R, t


def coil_bias(grid: Grid, centre: np.ndarray, g: np.ndarray, h: float, lo: float, hi: float) -> np.ndarray:
    """Smooth multiplicative coil bias ``1 + g.(p-c)/100 + h |p-c|^2/100^2`` (p LPS mm), clipped.

    Separable in the voxel index because the direction matrix is orthonormal:
    ``p - c = D (e + s*idx)`` with ``e = D^T (o - c)``, so ``|p - c|^2 = sum_i (e_i + s_i idx_i)^2``.
    """
    e = grid.direction.T @ (grid.origin - centre)
    gd = grid.direction.T @ g  # g in grid axes
    b = np.float32(1.0)
    for ax, shape in ((0, (1, 1, -1)), (1, (1, -1, 1)), (2, (-1, 1, 1))):
        r = (e[ax] + grid.spacing[ax] * np.arange(grid.size[ax])) / 100.0
        b = b + (gd[ax] * r + h * r * r).astype(np.float32).reshape(shape)
    return np.clip(b, lo, hi)


def draw_t1_grid(rng: np.random.Generator, prof: Profile, target_phys: np.ndarray) -> tuple[Grid, float]:
    tilt = 0.0
    if rng.random() < prof.oblique_fraction:
        tilt = float(rng.uniform(*prof.oblique_tilt_deg) * rng.choice([-1, 1]))
    direction = axial_direction(tilt)
    ni = int(rng.choice(np.arange(prof.t1_matrix[0], prof.t1_matrix[1] + 1, 8)))
    nj = ni if rng.random() < 0.6 else int(max(prof.t1_matrix[0], ni - 8 * rng.integers(1, 4)))
    nk = int(rng.integers(prof.t1_slices[0], prof.t1_slices[1] + 1))
    px = float(np.round(rng.uniform(*prof.t1_pixel_mm), 4))
    off = np.array([*rng.uniform(-prof.fov_offset_mm, prof.fov_offset_mm, 2), rng.uniform(-8, 8)])
    slice_mm = prof.t1_slice_mm
    if prof.t1_slice_mm_choices:
        slice_mm = float(rng.choice(prof.t1_slice_mm_choices))
        nk = int(round(nk * prof.t1_slice_mm / slice_mm))  # the same slab, thicker slices
    grid = make_grid(target_phys + direction @ off, direction, (ni, nj, nk), (px, px, slice_mm), slice_mm)
    return grid, tilt


def draw_t2_grid(rng: np.random.Generator, target_phys: np.ndarray) -> tuple[Grid, bool]:
    coronal = rng.random() < 0.25
    thick = float(rng.choice([4.0, 4.5, 5.0]))
    gap = float(rng.choice([0.0, 0.4, 0.5]))
    sx = float(np.round(rng.uniform(1.3, 1.7), 4))
    sy = sx if rng.random() < 0.5 else float(np.round(sx * rng.uniform(1.05, 1.2), 4))  # rectangular pixels
    if coronal:
        size = (int(rng.choice([176, 192])), int(rng.choice([144, 160])), int(rng.integers(22, 27)))
        direction = coronal_direction()
    else:
        size = (int(rng.choice([176, 192])), int(rng.choice([160, 176])), int(rng.integers(22, 29)))
        direction = axial_direction(0.0)
    off = np.array([*rng.uniform(-15, 15, 2), rng.uniform(-5, 5)])
    return make_grid(target_phys + direction @ off, direction, size, (sx, sy, thick + gap), thick), coronal


def store_pixels(rng: np.random.Generator, img: np.ndarray, philips: bool) -> tuple[np.ndarray, tuple | None, float]:
    """Vendor gain and quantisation: uint16 (12 bits used), optional Philips-like rescale.

    Returns (stored, (slope, intercept) or None, scale) with real = stored*slope + intercept
    = scale * img (up to rounding).
    """
    gain = float(rng.uniform(2.0, 4.5))
    stored = np.rint(img * np.float32(gain))
    rescale = None
    scale = gain
    if philips:
        slope = float(np.round(rng.uniform(0.4, 3.0), 5))
        offset = int(rng.choice([0, 0, 100]))  # stored offset compensated by the intercept
        stored += offset
        rescale = (slope, -offset * slope)
        scale = gain * slope
    return np.clip(stored, 0, 4095).astype(np.uint16), rescale, scale


def rician(rng: np.random.Generator, img: np.ndarray, sigma: float) -> np.ndarray:
    """Magnitude of the image plus complex Gaussian noise of std ``sigma`` per channel."""
    n1 = rng.standard_normal(img.shape, dtype=np.float32) * np.float32(sigma)
    n2 = rng.standard_normal(img.shape, dtype=np.float32) * np.float32(sigma)
    return np.sqrt((img + n1) ** 2 + n2 * n2)
