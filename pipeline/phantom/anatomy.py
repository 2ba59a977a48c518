"""Analytic anatomy and lesion of one synthetic patient, rendered at voxel positions.

Everything is defined in the patient's *world* frame (mm, LPS-aligned, origin at the body
centre; see ``geometry.py``) and evaluated at each voxel's world coordinate, so any grid,
pose, obliquity or deformation renders consistently.

Partial volume: each shape has an (approximate) signed distance ``d`` (mm, negative inside)
and outward normal ``n``; a voxel's fraction is the box-filter of a plane,
``clip(0.5 - d / w, 0, 1)`` with ``w = sum_i |n . a_i|`` and ``a_i`` the voxel's edge
vectors (in-plane spacings and the slice *thickness*). Truth labels use the voxel centre
(``d < 0``), which is the 0.5 iso-level of that fraction.

Intensities are arbitrary units before vendor scaling (T1 fat-sat GRE: muscle ~260).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .geometry import Grid, Pose, random_rotation

T1_PHASE_SECONDS = (20, 70, 180)

# Tissue order is also the precedence order inside the body interior: a tissue earlier in
# the list displaces later ones (a nodule replaces necrosis, a vessel pushes the rim aside).
LESION_TISSUES = ("nodule", "tumour", "az", "vessel", "rim", "bone")


# --------------------------------------------------------------------------- patient anatomy
@dataclass(frozen=True)
class Vessel:
    """Tube running S-I: centreline(z) = base + bend * (1 - cos(k (z - z0))) (world mm)."""

    base_xy: np.ndarray
    bend_xy: np.ndarray
    k: float  # rad/mm
    z0: float
    radius: float
    touching: bool = False

    def centre_xy(self, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        c = 1.0 - np.cos(np.float32(self.k) * (z - np.float32(self.z0)))
        return (np.float32(self.base_xy[0]) + np.float32(self.bend_xy[0]) * c,
                np.float32(self.base_xy[1]) + np.float32(self.bend_xy[1]) * c)


@dataclass(frozen=True)
class Anatomy:
    """The fixed anatomy of one patient (world frame, mm) and its T1 tissue constants."""

    body_semi_xy: tuple[float, float]  # elliptic cylinder along S-I
    fat_mm: float
    bone_xy: np.ndarray
    bone_radius: float
    vessels: tuple[Vessel, ...]
    texture_waves: np.ndarray  # (3, 3) rad/mm
    texture_phases: np.ndarray  # (3,)
    target: np.ndarray  # AZ / tumour centre, world mm
    muscle_t1: float  # T1 pre-contrast muscle intensity
    muscle_re: float  # muscle relative enhancement at the portal phase


def _ellipse_distance(x: float, y: float, a: float, b: float) -> float:
    """Unsigned distance from (x, y) to the ellipse (a, b) (dense sampling, for setup only)."""
    t = np.linspace(0, 2 * np.pi, 2881)
    return float(np.min(np.hypot(a * np.cos(t) - x, b * np.sin(t) - y)))


def random_anatomy(rng: np.random.Generator, fat_range: tuple[float, float],
                   muscle_re_range: tuple[float, float], lesion_reach_mm: float) -> Anatomy:
    """Draw a patient: body, spine, 2-3 vessels clear of the lesion, a target in muscle.

    ``lesion_reach_mm``: largest distance from the target the lesion may ever reach (AZ at
    its largest + rim + nodule); vessels are kept clear of it by 8 mm.
    """
    a, b = 150.0 + rng.uniform(-8, 8), 110.0 + rng.uniform(-8, 8)
    fat = rng.uniform(*fat_range)
    bone_xy = np.array([rng.uniform(-10, 10), b - fat - rng.uniform(28, 36)])
    bone_r = rng.uniform(15, 20)
    while True:  # target >= 55 mm deep (lesion growth stays in muscle), clear of the spine
        side = rng.choice([-1.0, 1.0])
        tx, ty = side * rng.uniform(35, 70), rng.uniform(-35, 15)
        if (_ellipse_distance(tx, ty, a, b) >= max(55.0, fat + lesion_reach_mm + 6)
                and np.hypot(tx - bone_xy[0], ty - bone_xy[1]) > bone_r + lesion_reach_mm + 10):
            break
    target = np.array([tx, ty, 0.0])
    vessels = []
    n_vessels = int(rng.integers(2, 4))
    while len(vessels) < n_vessels:
        r = rng.uniform(2.5, 4.5)
        x, y = rng.uniform(-a + 40, a - 40), rng.uniform(-b + 35, b - 35)
        inner_margin = _ellipse_distance(x, y, a - fat, b - fat)
        inside = (x / (a - fat)) ** 2 + (y / (b - fat)) ** 2 < 1
        if not inside or inner_margin < r + 10:
            continue
        if np.hypot(x - bone_xy[0], y - bone_xy[1]) < bone_r + r + 8:
            continue
        if np.hypot(x - tx, y - ty) < lesion_reach_mm + r + 8 + 8:  # bend <= 8 mm
            continue
        if any(np.hypot(x - v.base_xy[0], y - v.base_xy[1]) < 25 for v in vessels):
            continue
        ang = rng.uniform(0, 2 * np.pi)
        vessels.append(Vessel(np.array([x, y]), rng.uniform(2, 8) * np.array([np.cos(ang), np.sin(ang)]),
                              2 * np.pi / rng.uniform(150, 300), rng.uniform(-100, 100), r))
    dirs = rng.standard_normal((3, 3))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    waves = dirs * (2 * np.pi / rng.uniform(15, 40, 3))[:, None]
    return Anatomy((a, b), fat, bone_xy, bone_r, tuple(vessels), waves, rng.uniform(0, 2 * np.pi, 3),
                   target, 260.0 * rng.uniform(0.95, 1.05), rng.uniform(*muscle_re_range))


def touching_vessel(rng: np.random.Generator, az_centre: np.ndarray, az_rot: np.ndarray,
                    semi_axes: np.ndarray, avoid_dir: np.ndarray | None = None) -> Vessel:
    """A vessel running S-I whose wall is tangent to the AZ surface at the AZ's mid-level.

    The support function of the ellipsoid in the in-plane direction ``n`` is
    ``h(n) = sqrt(n^T M n)``, ``M = R diag(a^2) R^T``: a vertical tube at ``h + r`` from the
    centre touches it; it bends away from the AZ above and below.
    """
    m = az_rot @ np.diag(np.asarray(semi_axes) ** 2) @ az_rot.T
    while True:
        ang = rng.uniform(0, 2 * np.pi)
        n = np.array([np.cos(ang), np.sin(ang), 0.0])
        if avoid_dir is None or n @ avoid_dir < 0.3:
            break
    r = rng.uniform(2.5, 4.5)
    h = float(np.sqrt(n @ m @ n))
    base = az_centre[:2] + n[:2] * (h + r)
    return Vessel(base, n[:2] * rng.uniform(3, 6), 2 * np.pi / rng.uniform(150, 300),
                  float(az_centre[2]), r, touching=True)


# --------------------------------------------------------------------------- lesion state
@dataclass(frozen=True)
class LesionState:
    """The lesion at one study (world frame, mm) and its contrast behaviour.

    ``az_semi_axes`` None = no ablation zone (pre-ablation). ``rim_asym`` = (w1, w2) unit
    vectors of the smooth thickness modulation, None for a uniform rim.
    """

    az_centre: np.ndarray
    az_rot: np.ndarray
    az_semi_axes: np.ndarray | None
    rim_mm: float = 0.0
    rim_asym: tuple[np.ndarray, np.ndarray] | None = None
    rim_asym_amp_mm: float = 0.0
    nodule_centre: np.ndarray | None = None
    nodule_radius: float = 0.0
    tumour_radius: float = 0.0  # pre-ablation tumour, centred on az_centre
    az_t1_ratio: float = 2.2  # AZ / muscle, pre-contrast
    az_re: float = 0.01
    rim_re: float = 0.6  # at the delayed phase
    nodule_re: float = 1.0  # at the arterial phase
    az_t2: float = 90.0

    def reach(self) -> float:
        """Largest distance (mm) from az_centre the lesion covers."""
        r = self.tumour_radius
        if self.az_semi_axes is not None:
            r = max(r, float(np.max(self.az_semi_axes)) + self.rim_mm + self.rim_asym_amp_mm)
        if self.nodule_centre is not None:
            r = max(r, float(np.linalg.norm(self.nodule_centre - self.az_centre)) + self.nodule_radius)
        return r


def surface_point(centre: np.ndarray, rot: np.ndarray, semi_axes: np.ndarray, direction: np.ndarray) -> np.ndarray:
    """Point where the ray from the ellipsoid centre along ``direction`` leaves it."""
    n = direction / np.linalg.norm(direction)
    w = rot.T @ n
    return centre + n / np.sqrt(np.sum((w / semi_axes) ** 2))


def random_lesion_orientation(rng: np.random.Generator) -> np.ndarray:
    return random_rotation(rng)


# --------------------------------------------------------------------------- rendering
@dataclass
class Rendered:
    """Tissue fractions (sum to 1), smooth texture and truth labels on one grid."""

    fractions: dict[str, np.ndarray]
    texture: np.ndarray  # in [-1, 1], world-fixed
    labels: np.ndarray  # uint8: 0 bg, 1 AZ, 2 rim, 3 tumour/nodule


def _frac(d: np.ndarray, n: np.ndarray, axes: np.ndarray) -> np.ndarray:
    """Box-filter fraction of a plane: d (...) mm, n (..., 3) unit normals, axes (3, 3) columns."""
    w = np.abs(n @ axes.astype(np.float32)).sum(axis=-1)
    return np.clip(0.5 - d / np.maximum(w, 1e-3), 0.0, 1.0)


def _frac_inplane(d: np.ndarray, nx: np.ndarray, ny: np.ndarray, axes: np.ndarray) -> np.ndarray:
    """``_frac`` for normals in the axial (x, y) plane, without building (..., 3) arrays.

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


def _ellipse_frac(X: np.ndarray, Y: np.ndarray, a: float, b: float, axes: np.ndarray) -> np.ndarray:
    """Fraction inside the axis-aligned ellipse (a, b) of the (x, y) plane (elliptic cylinder).

    Signed distance ~ (q - 1) / |grad q| with q the normalised radius.
    """
    a2, b2 = np.float32(1 / (a * a)), np.float32(1 / (b * b))
    gx, gy = X * a2, Y * b2
    q = np.sqrt(X * gx + Y * gy)
    gx *= gx
    gy *= gy
    g = np.sqrt(gx + gy)
    g += np.float32(1e-9)
    q -= 1
    d = q * (q + 1) / g

    def normal(component, scale):
        return lambda band: component[band] * scale / g[band]

    return _frac_inplane(d, normal(X, a2), normal(Y, b2), axes)


def _tube(X: np.ndarray, Y: np.ndarray, cx, cy, r: float, axes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(signed distance mm, fraction) of a tube along S-I with centre (cx, cy) (scalars or arrays)."""
    dx, dy = X - cx, Y - cy
    rr = np.sqrt(dx * dx + dy * dy)
    rr += np.float32(1e-6)
    d = rr - np.float32(r)
    return d, _frac_inplane(d, lambda band: dx[band] / rr[band], lambda band: dy[band] / rr[band], axes)


def _ellipsoid(x: np.ndarray, centre: np.ndarray, rot: np.ndarray, semi: np.ndarray):
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


def render(grid: Grid, pose: Pose, anatomy: Anatomy, lesion: LesionState) -> Rendered:
    """Tissue fractions, texture and labels of ``grid`` seen with the patient at ``pose``."""
    X, Y, Z = pose.grid_world(grid)
    axes = pose.body_axes(grid)
    axes[:, 2] *= grid.slice_thickness / grid.spacing[2]  # thickness, not spacing, blurs

    a, b = anatomy.body_semi_xy
    f_body = _ellipse_frac(X, Y, a, b, axes)
    f_in = np.minimum(_ellipse_frac(X, Y, a - anatomy.fat_mm, b - anatomy.fat_mm, axes), f_body)

    raw = {"bone": _tube(X, Y, np.float32(anatomy.bone_xy[0]), np.float32(anatomy.bone_xy[1]),
                         anatomy.bone_radius, axes)[1]}
    raw_v = np.zeros_like(X)
    d_vessel = np.full_like(X, np.inf)
    for v in anatomy.vessels:
        cx, cy = v.centre_xy(Z)
        d_v, f_v = _tube(X, Y, cx, cy, v.radius, axes)
        np.maximum(raw_v, f_v, out=raw_v)
        np.minimum(d_vessel, d_v, out=d_vessel)
    raw["vessel"] = raw_v

    labels = np.zeros(grid.shape, np.uint8)
    for name in ("nodule", "tumour", "az", "rim"):
        raw[name] = np.zeros_like(X)

    # Lesion: evaluate only in a box around it (its shapes are the costly ones).
    box = _lesion_box(grid, pose, lesion)
    if box is not None:
        xb = np.stack([X[box], Y[box], Z[box]], axis=-1)
        centre_lab = np.zeros(xb.shape[:-1], np.uint8)
        if lesion.az_semi_axes is not None:
            d_az, n_az, u_az = _ellipsoid(xb, lesion.az_centre, lesion.az_rot, lesion.az_semi_axes)
            f_az = _frac(d_az, n_az, axes)
            raw["az"][box] = f_az
            if lesion.rim_mm > 0:
                t = np.full(d_az.shape, lesion.rim_mm, np.float32)
                if lesion.rim_asym is not None:
                    w1, w2 = (np.asarray(w, np.float32) for w in lesion.rim_asym)
                    mod = 0.6 * (u_az @ w1) + 0.4 * (2 * (u_az @ w2) ** 2 - 1)  # smooth, in [-1, 1]
                    t = t + np.float32(lesion.rim_asym_amp_mm) * mod
                f_outer = _frac(d_az - t, n_az, axes)
                # rim fraction conditional on "not AZ", for the precedence product below
                raw["rim"][box] = np.clip((f_outer - f_az) / np.maximum(1 - f_az, 1e-6), 0, 1)
                centre_lab[(d_az - t < 0)] = 2
            centre_lab[d_vessel[box] < 0] = 0
            centre_lab[d_az < 0] = 1
        for name, c, r in (("tumour", lesion.az_centre, lesion.tumour_radius),
                           ("nodule", lesion.nodule_centre, lesion.nodule_radius)):
            if c is None or r <= 0:
                continue
            v = xb - np.asarray(c, np.float32)
            rr = np.sqrt(np.sum(v * v, axis=-1)) + np.float32(1e-6)
            d = rr - np.float32(r)
            raw[name][box] = _frac(d, v / rr[..., None], axes)
            centre_lab[d < 0] = 3
        labels[box] = centre_lab

    # Precedence product: each interior tissue takes its share of what is left.
    fr = {"air": 1 - f_body, "fat": f_body - f_in}
    rem = f_in
    for name in LESION_TISSUES:
        f = raw[name]
        f *= rem
        fr[name] = f
        rem -= f
    fr["muscle"] = rem

    tex = np.zeros_like(X)
    for k in range(3):
        wx, wy, wz = (np.float32(w) for w in anatomy.texture_waves[k])
        arg = X * wx
        arg += Y * wy
        arg += Z * wz
        arg += np.float32(anatomy.texture_phases[k])
        tex += np.sin(arg, out=arg)
    tex /= 3
    return Rendered(fr, tex, labels)


def _lesion_box(grid: Grid, pose: Pose, lesion: LesionState) -> tuple[slice, slice, slice] | None:
    """Index box (k, j, i) holding the lesion with a margin (deformation <= 1.5 mm, blur)."""
    reach = lesion.reach()
    if reach <= 0:
        return None
    pc = pose.world_to_physical(lesion.az_centre)
    ijk = grid.physical_to_index(pc)
    half = (reach + 6.0) / np.asarray(grid.spacing)
    lo = np.floor(ijk - half).astype(int)
    hi = np.ceil(ijk + half).astype(int) + 1
    lo = np.maximum(lo, 0)
    hi = np.minimum(hi, grid.size)
    if np.any(hi <= lo):
        return None
    return (slice(lo[2], hi[2]), slice(lo[1], hi[1]), slice(lo[0], hi[0]))


# --------------------------------------------------------------------------- intensities
def t1_tissue_values(anatomy: Anatomy, lesion: LesionState, phase_seconds: int | None) -> dict[str, float]:
    """T1 fat-sat GRE intensity per tissue; ``phase_seconds`` None = pre-contrast.

    Relative enhancement (RE) per phase 20 / 70 / 180 s: vessels +250 % then +180 %; rim
    strongest late (benign hyperaemia/granulation); nodule and tumour strongest arterial.
    """
    m = anatomy.muscle_t1
    pre = {"air": 0.0, "fat": 60.0, "muscle": m, "bone": 150.0, "vessel": 120.0,
           "az": lesion.az_t1_ratio * m, "rim": m, "nodule": 1.05 * m, "tumour": 1.05 * m}
    if phase_seconds is None:
        return pre
    p = {20: 0, 70: 1, 180: 2}[phase_seconds]
    re = {
        "air": 0.0,
        "fat": 0.02,
        "muscle": anatomy.muscle_re * (0.8, 1.0, 1.0)[p],
        "bone": 0.0,
        "vessel": (2.5, 1.8, 1.8)[p],
        "az": lesion.az_re,
        "rim": lesion.rim_re * (0.6, 0.85, 1.0)[p],
        "nodule": lesion.nodule_re * (1.0, 0.9, 0.8)[p],
        "tumour": 0.9 * (1.0, 0.95, 0.85)[p],
    }
    return {k: v * (1 + re[k]) for k, v in pre.items()}


def t2_tissue_values(lesion: LesionState) -> dict[str, float]:
    """T2 fat-sat TSE intensity per tissue (AZ darkens over time, nodule bright)."""
    return {"air": 0.0, "fat": 80.0, "muscle": 100.0, "bone": 30.0, "vessel": 40.0,
            "az": lesion.az_t2, "rim": 115.0, "nodule": 200.0, "tumour": 180.0}


def intensity(r: Rendered, values: dict[str, float], texture_amp: float = 0.03) -> np.ndarray:
    """Noise-free image: sum of fractions x tissue values, times the +-3 % texture."""
    img = np.zeros_like(r.texture)
    for name, f in r.fractions.items():
        v = values[name]
        if v:
            img += np.float32(v) * f
    img *= 1 + np.float32(texture_amp) * r.texture
    return img
