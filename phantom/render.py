"""Rendering: one patient's anatomy and lesion as tissue fractions, texture and truth labels on a grid.

Shapes are evaluated at each voxel's world coordinate (``pose.grid_world``) with the partial
volume of ``partial_volume``; interior tissues share what is left by precedence
(``LESION_TISSUES`` then ``ANATOMY_TISSUES``, then muscle).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.core.records import Label

from .body import (
    ZC_BODY_A,
    ZC_BODY_B,
    ZC_BODY_X,
    ZC_BODY_Y,
    ZC_IN_A,
    ZC_IN_B,
    ZC_IN_X,
    ZC_IN_Y,
    ZC_SEPTA,
    ZC_SPINE_X,
    ZC_SPINE_Y,
    ZC_VERT_D,
    Z_TABLE_N,
    Z_TABLE_START,
    Z_TABLE_STEP,
    Anatomy,
)
from .geometry import Grid, Pose
from .lesion import LesionState
from .partial_volume import ellipse_frac, ellipsoid, frac, frac_inplane, tube

# Tissue order is also the precedence order inside the body interior: a tissue earlier in
# the list displaces later ones (a nodule replaces necrosis, a vessel pushes the rim aside).
LESION_TISSUES = ("nodule", "tumour", "az", "vessel", "vein", "rim", "bone")
# Then the other interior structures, before muscle (septa = intermuscular fat, fat-suppressed).
ANATOMY_TISSUES = ("canal", "disc", "kidney_medulla", "kidney_cortex", "fluid", "bowel_wall", "spleen", "liver",
                   "septum")


@dataclass
class Rendered:
    """Tissue fractions (sum to 1), smooth texture and truth labels on one grid."""

    fractions: dict[str, np.ndarray]
    texture: np.ndarray  # in [-1, 1], world-fixed
    labels: np.ndarray  # uint8 Label values: the tumour/nodule is the enhancing focus
    muscle_gain: np.ndarray | None = None  # per-voxel muscle compartment gain (~1 +- 8 %)


def _zlookup(Z: np.ndarray) -> np.ndarray:
    """Per-voxel index into the z tables (nearest sample, clipped)."""
    t = (Z - np.float32(Z_TABLE_START)) * np.float32(1 / Z_TABLE_STEP)
    t += np.float32(0.5)
    np.clip(t, 0, Z_TABLE_N - 1, out=t)
    return t.astype(np.int32)


def render(grid: Grid, pose: Pose, anatomy: Anatomy, lesion: LesionState) -> Rendered:
    """Tissue fractions, texture and labels of ``grid`` seen with the patient at ``pose``."""
    X, Y, Z = pose.grid_world(grid)
    axes = pose.body_axes(grid)
    axes[:, 2] *= grid.slice_thickness / grid.spacing[2]  # thickness, not spacing, blurs
    f32 = np.float32
    tab = anatomy.ztab
    zi = _zlookup(Z)

    def col(c: int) -> np.ndarray:
        return tab[c][zi]

    bx, by = col(ZC_BODY_X), col(ZC_BODY_Y)
    f_body = ellipse_frac(X - bx, Y - by, col(ZC_BODY_A), col(ZC_BODY_B), axes)
    del bx, by
    f_in = np.minimum(ellipse_frac(X - col(ZC_IN_X), Y - col(ZC_IN_Y), col(ZC_IN_A), col(ZC_IN_B), axes), f_body)

    # Spine: vertebral bodies (discs between them), canal, posterior arch.
    sx, sy = col(ZC_SPINE_X), col(ZC_SPINE_Y)
    f_col = tube(X, Y, sx, sy, anatomy.bone_radius, axes)[1]
    wz = f32(max(float(np.abs(axes[2]).sum()), 1e-3))
    g_vert = np.clip(f32(0.5) - col(ZC_VERT_D) / wz, 0.0, 1.0)
    ccy = sy + f32(anatomy.canal_offset())
    f_canal = tube(X, Y, sx, ccy, anatomy.canal_radius, axes)[1]
    f_arch = tube(X, Y, sx, ccy, anatomy.canal_radius + 4.0, axes)[1]
    raw = {"bone": np.maximum(f_col * g_vert, f_arch), "disc": f_col * (1 - g_vert), "canal": f_canal}
    del f_col, g_vert, f_arch, ccy

    # Intermuscular septa (thin fat sheets) from the spine axis; muscle gain per compartment.
    n_sep = (tab.shape[0] - ZC_SEPTA) // 2
    vx, vy = X - sx, Y - sy
    del sx, sy
    f_sep = np.zeros_like(X)
    left = []
    t0, hw = f32(anatomy.septa_t0), f32(anatomy.septa_half_mm)
    for k in range(n_sep):
        ux, uy = col(ZC_SEPTA + 2 * k), col(ZC_SEPTA + 2 * k + 1)
        perp = vx * uy
        perp -= vy * ux
        t = vx * ux
        t += vy * uy
        t -= t0
        np.minimum(t, 0, out=t)
        t *= t
        d = perp * perp
        d += t
        np.sqrt(d, out=d)
        d -= hw
        del t
        sgn = np.where(perp < 0, f32(1), f32(-1))  # normal = sign * (uy, -ux) ... away from the septum
        left.append(perp < 0)  # counter-clockwise of the septum direction
        f_k = frac_inplane(d, lambda band, s=sgn, u=uy: s[band] * u[band],
                            lambda band, s=sgn, u=ux: -s[band] * u[band], axes)
        np.maximum(f_sep, f_k, out=f_sep)
    raw["septum"] = f_sep
    gain = None
    if n_sep >= 2 and anatomy.sector_gain is not None:
        gain = np.ones_like(X)
        for k in range(n_sep):
            g_k = float(anatomy.sector_gain[k]) - 1.0
            if g_k:
                gain += f32(g_k) * (left[k] & ~left[(k + 1) % n_sep])
    del left, vx, vy

    raw_v = np.zeros_like(X)
    raw_vein = np.zeros_like(X)  # stays zero unless the anatomy has veins (the ``liver`` profile)
    d_vessel = np.full_like(X, np.inf)
    for v in anatomy.vessels:
        cx, cy = v.centre_xy(Z, v.touch_shift(lesion))
        d_v, f_v = tube(X, Y, cx, cy, v.radius, axes)
        if v.z_start is not None:
            dz = (Z - f32(v.z_start)) * f32(v.z_dir)
            f_v *= np.clip(f32(0.5) + dz / wz, 0.0, 1.0)
            d_v[dz < 0] = np.inf
        np.maximum(raw_vein if v.venous else raw_v, f_v, out=raw_vein if v.venous else raw_v)
        np.minimum(d_vessel, d_v, out=d_vessel)
    raw["vessel"] = raw_v
    raw["vein"] = raw_vein

    for name in ("kidney_cortex", "kidney_medulla", "fluid", "bowel_wall", "spleen", "liver"):
        raw[name] = np.zeros_like(X)

    def put(name: str, box, f: np.ndarray) -> None:  # organs may share a box: keep the larger share
        raw[name][box] = np.maximum(raw[name][box], f)

    for o in anatomy.organs:
        box = _box(grid, pose, o.centre, float(np.max(o.semi)))
        if box is None:
            continue
        xb = np.stack([X[box], Y[box], Z[box]], axis=-1)
        d_o, n_o, _ = ellipsoid(xb, o.centre, o.rot, o.semi)
        f_o = frac(d_o, n_o, axes)
        if o.kind == "kidney":
            d_m, n_m, _ = ellipsoid(xb, o.centre, o.rot, o.semi * o.inner)
            f_m = frac(d_m, n_m, axes)
            put("kidney_medulla", box, f_m)
            put("kidney_cortex", box, np.clip((f_o - f_m) / np.maximum(1 - f_m, 1e-6), 0, 1))
        elif o.kind == "bowel":
            f_c = frac(d_o + np.float32(o.wall_mm), n_o, axes)  # contents: the wall's inner surface
            put("fluid", box, f_c)
            put("bowel_wall", box, np.clip((f_o - f_c) / np.maximum(1 - f_c, 1e-6), 0, 1))
        elif o.kind in ("spleen", "liver"):
            put(o.kind, box, f_o)
        else:
            put("fluid", box, f_o)

    labels = np.zeros(grid.shape, np.uint8)
    for name in ("nodule", "tumour", "az", "rim"):
        raw[name] = np.zeros_like(X)

    # Lesion: evaluate only in a box around it (its shapes are the costly ones).
    box = _lesion_box(grid, pose, lesion)
    if box is not None:
        xb = np.stack([X[box], Y[box], Z[box]], axis=-1)
        centre_lab = np.zeros(xb.shape[:-1], np.uint8)
        if lesion.az_semi_axes is not None:
            d_az, n_az, u_az = ellipsoid(xb, lesion.az_centre, lesion.az_rot, lesion.az_semi_axes)
            f_az = frac(d_az, n_az, axes)
            raw["az"][box] = f_az
            if lesion.rim_mm > 0:
                t = np.full(d_az.shape, lesion.rim_mm, np.float32)
                if lesion.rim_asym is not None:
                    w1, w2 = (np.asarray(w, np.float32) for w in lesion.rim_asym)
                    mod = 0.6 * (u_az @ w1) + 0.4 * (2 * (u_az @ w2) ** 2 - 1)  # smooth, in [-1, 1]
                    t = t + np.float32(lesion.rim_asym_amp_mm) * mod
                f_outer = frac(d_az - t, n_az, axes)
                # rim fraction conditional on "not AZ", for the precedence product below
                raw["rim"][box] = np.clip((f_outer - f_az) / np.maximum(1 - f_az, 1e-6), 0, 1)
                centre_lab[(d_az - t < 0)] = Label.RIM
            centre_lab[d_vessel[box] < 0] = Label.BACKGROUND
            centre_lab[d_az < 0] = Label.ABLATION_ZONE
        for name, c, r in (("tumour", lesion.az_centre, lesion.tumour_radius),
                           ("nodule", lesion.nodule_centre, lesion.nodule_radius)):
            if c is None or r <= 0:
                continue
            v = xb - np.asarray(c, np.float32)
            rr = np.sqrt(np.sum(v * v, axis=-1)) + np.float32(1e-6)
            d = rr - np.float32(r)
            raw[name][box] = frac(d, v / rr[..., None], axes)
            centre_lab[d < 0] = Label.ENHANCING_FOCUS
        labels[box] = centre_lab

    # Precedence product: each interior tissue takes its share of what is left.
    fr = {"air": 1 - f_body, "fat": f_body - f_in}
    rem = f_in
    for name in LESION_TISSUES + ANATOMY_TISSUES:
        f = raw[name]
        f *= rem
        fr[name] = f
        rem -= f
    fr["muscle"] = rem

    tex = np.zeros_like(X)
    for k in range(len(anatomy.texture_phases)):
        wx, wy, wz_ = (np.float32(w) for w in anatomy.texture_waves[k])
        arg = X * wx
        arg += Y * wy
        arg += Z * wz_
        arg += np.float32(anatomy.texture_phases[k])
        tex += np.sin(arg, out=arg)
    tex /= len(anatomy.texture_phases)
    return Rendered(fr, tex, labels, gain)


def _box(grid: Grid, pose: Pose, centre_world: np.ndarray, reach: float) -> tuple[slice, slice, slice] | None:
    """Index box (k, j, i) holding a ball of ``reach`` mm about a world point, with a margin
    (deformation <= 1.5 mm, blur)."""
    if reach <= 0:
        return None
    pc = pose.world_to_physical(np.asarray(centre_world, float))
    ijk = grid.physical_to_index(pc)
    half = (reach + 6.0) / np.asarray(grid.spacing)
    lo = np.floor(ijk - half).astype(int)
    hi = np.ceil(ijk + half).astype(int) + 1
    lo = np.maximum(lo, 0)
    hi = np.minimum(hi, grid.size)
    if np.any(hi <= lo):
        return None
    return (slice(lo[2], hi[2]), slice(lo[1], hi[1]), slice(lo[0], hi[0]))


def _lesion_box(grid: Grid, pose: Pose, lesion: LesionState) -> tuple[slice, slice, slice] | None:
    """Index box (k, j, i) holding the lesion with a margin (deformation <= 1.5 mm, blur)."""
    return _box(grid, pose, lesion.az_centre, lesion.reach())
