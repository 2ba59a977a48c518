"""Partial volume of analytic shapes: approximate signed distances and box-filter fractions.

Each shape has an (approximate) signed distance ``d`` (mm, negative inside) and outward
normal ``n``; a voxel's fraction is the box-filter of a plane, ``clip(0.5 - d / w, 0, 1)``
with ``w = sum_i |n . a_i|`` and ``a_i`` the voxel's edge vectors (in-plane spacings and the
slice *thickness*). Truth labels use the voxel centre (``d < 0``), which is the 0.5
iso-level of that fraction.
"""

from __future__ import annotations

import numpy as np


def frac(d: np.ndarray, n: np.ndarray, axes: np.ndarray) -> np.ndarray:
    """Box-filter fraction of a plane: d (...) mm, n (..., 3) unit normals, axes (3, 3) columns."""
    w = np.abs(n @ axes.astype(np.float32)).sum(axis=-1)
    return np.clip(0.5 - d / np.maximum(w, 1e-3), 0.0, 1.0)


def frac_inplane(d: np.ndarray, nx: np.ndarray, ny: np.ndarray, axes: np.ndarray) -> np.ndarray:
    """``frac`` for normals in the axial (x, y) plane, without building (..., 3) arrays.

    Only voxels within half the largest possible width of the boundary need the per-voxel
    width; the others are fully inside (1) or outside (0). ``nx``, ``ny`` may be callables
    (evaluated on that band only) to save their computation over the whole volume.
    """
    ax = axes.astype(np.float32)
    w_max = float(np.sum(np.hypot(ax[0], ax[1])))
    f = (d < 0).astype(np.float32)
    band = np.nonzero(np.abs(d) < w_max / 2)
    db = d[band]
    nxb = nx(band) if callable(nx) else nx[band]
    nyb = ny(band) if callable(ny) else ny[band]
    w = np.abs(nxb * ax[0, 0] + nyb * ax[1, 0])
    w += np.abs(nxb * ax[0, 1] + nyb * ax[1, 1])
    w += np.abs(nxb * ax[0, 2] + nyb * ax[1, 2])
    np.maximum(w, np.float32(1e-3), out=w)
    f[band] = np.clip(np.float32(0.5) - db / w, 0.0, 1.0)
    return f


def ellipse_frac(X: np.ndarray, Y: np.ndarray, a, b, axes: np.ndarray) -> np.ndarray:
    """Fraction inside the axis-aligned ellipse (a, b) of the (x, y) plane (elliptic cylinder).

    ``a``, ``b`` scalars or per-voxel arrays (float32). Signed distance ~ (q - 1) / |grad q|
    with q the normalised radius.
    """
    a2 = np.float32(1) / (np.asarray(a, np.float32) * np.asarray(a, np.float32))
    b2 = np.float32(1) / (np.asarray(b, np.float32) * np.asarray(b, np.float32))
    gx, gy = X * a2, Y * b2
    q = np.sqrt(X * gx + Y * gy)
    gx *= gx
    gy *= gy
    g = np.sqrt(gx + gy)
    g += np.float32(1e-9)
    q -= 1
    d = q * (q + 1) / g

    def normal(component, scale):
        if scale.ndim:
            return lambda band: component[band] * scale[band] / g[band]
        return lambda band: component[band] * scale / g[band]

    return frac_inplane(d, normal(X, a2), normal(Y, b2), axes)


def tube(X: np.ndarray, Y: np.ndarray, cx, cy, r: float, axes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(signed distance mm, fraction) of a tube along S-I with centre (cx, cy) (scalars or arrays)."""
    dx, dy = X - cx, Y - cy
    rr = np.sqrt(dx * dx + dy * dy)
    rr += np.float32(1e-6)
    d = rr - np.float32(r)
    return d, frac_inplane(d, lambda band: dx[band] / rr[band], lambda band: dy[band] / rr[band], axes)


def ellipsoid(x: np.ndarray, centre: np.ndarray, rot: np.ndarray, semi: np.ndarray):
    """Approximate signed distance (mm), unit normal (world) and unit direction (ellipsoid frame).

    First-order distance ``(q - 1) / |grad q|`` with ``q`` the normalised radius: exact on
    the surface, accurate to ~0.1 mm within a few mm of it for axis ratios <= 2.
    """
    w = (x - centre.astype(np.float32)) @ rot.astype(np.float32)  # ellipsoid frame
    s = semi.astype(np.float32)
    ws = w / s
    q = np.sqrt(np.sum(ws * ws, axis=-1)) + np.float32(1e-6)
    g = w / (s * s)  # q * grad q
    gn = np.sqrt(np.sum(g * g, axis=-1)) + np.float32(1e-9)
    d = (q - 1) * q / gn
    n = (g / gn[..., None]) @ rot.T.astype(np.float32)
    return d, n, ws / q[..., None]
