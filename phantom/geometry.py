"""Grids, patient poses and the mild deformation of the synthetic cohort.

Frames (all mm):
- *world*: the patient's anatomy, fixed for the whole cohort life of a patient; axes
  aligned with LPS, origin at the body centre.
- *body* ``u``: the world before the study's mild deformation, ``x = u + d(u)``.
- *physical* ``p`` (LPS, DICOM patient space): ``p = R u + t`` (the study's pose: where
  the scanner found the patient).

So a voxel at physical point ``p`` shows the anatomy at ``x = u + d(u)``, ``u = R^T (p - t)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def rotation_matrix(rx_deg: float, ry_deg: float, rz_deg: float) -> np.ndarray:
    """R = Rz @ Ry @ Rx, angles (degrees) about the L, P and S axes."""
    ax, ay, az = np.deg2rad([rx_deg, ry_deg, rz_deg])
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    """Uniformly random 3D rotation (for lesion orientation)."""
    q = rng.standard_normal(4)
    q /= np.linalg.norm(q)
    w, x, y, z = q
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    )


@dataclass(frozen=True)
class Grid:
    """A DICOM-like image grid, in SimpleITK's conventions.

    ``size`` = (columns, rows, slices) = (i, j, k); ``spacing`` = (column spacing, i.e.
    along the row cosine; row spacing, along the column cosine; slice spacing) in mm;
    ``direction`` columns = row cosine, column cosine, slice normal (row x column);
    ``origin`` = centre of voxel (0, 0, 0), LPS mm. Arrays are indexed ``[k, j, i]``.
    ``slice_thickness`` may be smaller than the slice spacing (2D sequences with a gap).
    """

    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: np.ndarray
    direction: np.ndarray
    slice_thickness: float

    @property
    def shape(self) -> tuple[int, int, int]:
        """numpy shape (slices, rows, columns)."""
        return (self.size[2], self.size[1], self.size[0])

    def index_to_physical(self, ijk: np.ndarray) -> np.ndarray:
        """(..., 3) continuous (i, j, k) indices -> (..., 3) LPS mm."""
        return self.origin + (np.asarray(ijk, float) * self.spacing) @ self.direction.T

    def physical_to_index(self, p: np.ndarray) -> np.ndarray:
        return ((np.asarray(p, float) - self.origin) @ self.direction) / self.spacing

    def physical_points(self, box: tuple[slice, slice, slice] | None = None) -> np.ndarray:
        """LPS coordinates of voxel centres, shape (nk, nj, ni, 3), float32.

        ``box`` = (k, j, i) slices restricting to a sub-block.
        """
        ks, js, is_ = box if box is not None else (slice(None),) * 3
        k = np.arange(self.size[2])[ks].astype(np.float32) * np.float32(self.spacing[2])
        j = np.arange(self.size[1])[js].astype(np.float32) * np.float32(self.spacing[1])
        i = np.arange(self.size[0])[is_].astype(np.float32) * np.float32(self.spacing[0])
        d = self.direction.astype(np.float32)
        # Separable: p = o + i*d0 + j*d1 + k*d2 (broadcast, no index meshgrid needed).
        return (
            self.origin.astype(np.float32)
            + k[:, None, None, None] * d[:, 2]
            + j[None, :, None, None] * d[:, 1]
            + i[None, None, :, None] * d[:, 0]
        )

    def row_cosine(self) -> np.ndarray:
        return self.direction[:, 0]

    def column_cosine(self) -> np.ndarray:
        return self.direction[:, 1]

    def slice_positions(self) -> np.ndarray:
        """ImagePositionPatient of every slice, (nk, 3) LPS mm."""
        k = np.arange(self.size[2])[:, None] * self.spacing[2]
        return self.origin + k * self.direction[:, 2]


def make_grid(
    centre: np.ndarray,
    direction: np.ndarray,
    size: tuple[int, int, int],
    spacing: tuple[float, float, float],
    slice_thickness: float,
) -> Grid:
    """Grid whose centre lies at ``centre`` (LPS mm)."""
    half = (np.asarray(size, float) - 1) / 2 * np.asarray(spacing)
    origin = np.asarray(centre, float) - direction @ half
    return Grid(tuple(int(s) for s in size), tuple(float(s) for s in spacing), origin,
                np.asarray(direction, float), float(slice_thickness))


def axial_direction(tilt_deg: float = 0.0) -> np.ndarray:
    """Direction for an axial acquisition tilted by ``tilt_deg`` about the L-R axis.

    Row cosine stays (1, 0, 0); the column cosine leaves (0, 1, 0) towards S/I, so the
    slice normal is within ``tilt_deg`` of S (still "axial" when under 30 degrees).
    """
    t = np.deg2rad(tilt_deg)
    row = np.array([1.0, 0.0, 0.0])
    col = np.array([0.0, np.cos(t), np.sin(t)])
    return np.stack([row, col, np.cross(row, col)], axis=1)


def coronal_direction() -> np.ndarray:
    """Coronal: rows along L, columns towards I (DICOM convention), normal along P."""
    row = np.array([1.0, 0.0, 0.0])
    col = np.array([0.0, 0.0, -1.0])
    return np.stack([row, col, np.cross(row, col)], axis=1)


def sagittal_direction() -> np.ndarray:
    row = np.array([0.0, 1.0, 0.0])
    col = np.array([0.0, 0.0, -1.0])
    return np.stack([row, col, np.cross(row, col)], axis=1)


@dataclass(frozen=True)
class Deformation:
    """Smooth displacement ``d(u)`` (mm) of body coordinates ``u`` (mm).

    Component ``c`` is ``amp[c] * sin(wave[c] . u + phase[c])``: one long-wavelength
    sinusoid per axis (wavelength 120-250 mm), so the Jacobian stays close to identity and
    the fixed-point inversion converges in a few steps.
    """

    amp: np.ndarray  # (3,) mm
    wave: np.ndarray  # (3, 3) rad/mm, row c = wave vector of component c
    phase: np.ndarray  # (3,) rad

    @staticmethod
    def random(rng: np.random.Generator, max_amp: float) -> "Deformation":
        amp = rng.uniform(0.4, 1.0, 3) * max_amp * rng.choice([-1.0, 1.0], 3)
        dirs = rng.standard_normal((3, 3))
        dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
        wavelength = rng.uniform(120.0, 250.0, 3)
        wave = dirs * (2 * np.pi / wavelength)[:, None]
        return Deformation(amp, wave, rng.uniform(0, 2 * np.pi, 3))

    @staticmethod
    def identity() -> "Deformation":
        return Deformation(np.zeros(3), np.zeros((3, 3)), np.zeros(3))

    def __call__(self, u: np.ndarray) -> np.ndarray:
        """(..., 3) -> (..., 3) displacement, same dtype as ``u``."""
        arg = u @ self.wave.T.astype(u.dtype) + self.phase.astype(u.dtype)
        return np.sin(arg) * self.amp.astype(u.dtype)


@dataclass(frozen=True)
class Pose:
    """Where the body is in the scanner for one acquisition: ``p = R u + t``, ``x = u + d(u)``."""

    R: np.ndarray
    t: np.ndarray
    deform: Deformation

    def physical_to_world(self, p: np.ndarray) -> np.ndarray:
        """(..., 3) LPS mm -> (..., 3) world mm (vectorised; keeps float32)."""
        dt = p.dtype
        u = (p - self.t.astype(dt)) @ self.R.astype(dt)  # R^T (p - t), row vectors
        return u + self.deform(u)

    def grid_world(self, grid: Grid) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """World coordinates (X, Y, Z), each (nk, nj, ni) float32, of every voxel of ``grid``.

        Same as ``physical_to_world(grid.physical_points())`` but separable: ``u`` and the
        sinusoid arguments are affine in the voxel index, so they are broadcast sums of 1D
        arrays (several times faster than (N, 3) matrix products).
        """
        f32 = np.float32
        steps = self.R.T @ grid.direction * np.asarray(grid.spacing)  # body step per index, columns i, j, k
        u0 = self.R.T @ (grid.origin - self.t)
        idx = [np.arange(n, dtype=np.float64) for n in grid.size]  # i, j, k

        def affine(c0: float, coef: np.ndarray) -> np.ndarray:
            # c0 + coef[0] * i + coef[1] * j + coef[2] * k, shape (nk, nj, ni)
            return (f32(c0) + (coef[2] * idx[2]).astype(f32)[:, None, None]
                    + (coef[1] * idx[1]).astype(f32)[None, :, None]
                    + (coef[0] * idx[0]).astype(f32)[None, None, :])

        out = []
        dfm = self.deform
        for c in range(3):
            x = affine(u0[c], steps[c])
            if dfm.amp[c] != 0:
                arg = affine(dfm.wave[c] @ u0 + dfm.phase[c], dfm.wave[c] @ steps)
                np.sin(arg, out=arg)
                arg *= f32(dfm.amp[c])
                x += arg
            out.append(x)
        return out[0], out[1], out[2]

    def world_to_physical(self, x: np.ndarray, iterations: int = 30) -> np.ndarray:
        """(..., 3) world mm -> LPS mm; inverts ``u + d(u) = x`` by fixed-point iteration."""
        x = np.asarray(x, float)
        u = x.copy()
        for _ in range(iterations):
            u = x - self.deform(u)
        return u @ self.R.T + self.t

    def moved(self, R_m: np.ndarray, t_m: np.ndarray, centre: np.ndarray) -> "Pose":
        """The same body after a rigid motion about ``centre`` (physical mm): p' = R_m (p - c) + c + t_m."""
        return Pose(R_m @ self.R, R_m @ (self.t - centre) + centre + t_m, self.deform)

    def body_axes(self, grid: Grid) -> np.ndarray:
        """Grid axes (columns i, j, k) as world vectors of length one voxel step (mm).

        Used for the partial-volume width; the deformation's Jacobian (~1 +- 0.05) is ignored.
        """
        return self.R.T @ grid.direction * np.asarray(grid.spacing)
