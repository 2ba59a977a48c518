"""The fixed anatomy of one synthetic patient: body outline, fat, spine, septa, organs, vessels.

Everything is defined in the patient's *world* frame (mm, LPS-aligned, origin at the body
centre; see ``geometry.py``) and evaluated at each voxel's world coordinate (``render``), so
any grid, pose, obliquity or deformation renders consistently. The ablation zone and its
lesion are in ``lesion``; anatomy drawn against the zone in ``zone_contact``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .geometry import rotation_matrix
from .lesion import LesionState

# Quantities that vary along S-I (body outline, fat, spine course, septa) are tabulated on a
# fine z grid once per patient and looked up per voxel (nearest sample: cheap, and the
# profiles change by < 0.05 mm per sample).
Z_TABLE_START, Z_TABLE_STEP, Z_TABLE_N = -400.0, 0.5, 1601


def z_table_axis() -> np.ndarray:
    return Z_TABLE_START + Z_TABLE_STEP * np.arange(Z_TABLE_N)


# Columns of ``Anatomy.ztab``; the septa add (ux, uy) column pairs after these.
(ZC_BODY_X, ZC_BODY_Y, ZC_BODY_A, ZC_BODY_B, ZC_IN_X, ZC_IN_Y, ZC_IN_A, ZC_IN_B, ZC_SPINE_X, ZC_SPINE_Y,
 ZC_VERT_D) = range(11)
ZC_SEPTA = 11


@dataclass(frozen=True)
class Vessel:
    """Tube running roughly S-I (world mm); centreline(z) = base + bend (1 - cos(k (z - z0)))
    + drift (z - zref) + curve ((z - zref) / 100)^2.

    A branch (``z_start`` not None) exists only on the side ``z_dir`` of ``z_start`` and
    leaves its parent's centreline there. A ``touching`` vessel (``touch_dir``, ``touch_h``)
    follows the AZ surface when it involutes: it is shifted along ``touch_dir`` by the change
    of the AZ's support function from ``touch_h``.
    """

    base_xy: np.ndarray
    bend_xy: np.ndarray
    k: float  # rad/mm
    z0: float
    radius: float
    touching: bool = False
    drift_xy: np.ndarray | None = None  # mm per mm
    curve_xy: np.ndarray | None = None  # mm at 100 mm from zref
    zref: float = 0.0
    z_start: float | None = None
    z_dir: float = 1.0
    touch_dir: np.ndarray | None = None
    touch_h: float = 0.0
    venous: bool = False  # a portal or hepatic vein (``intensities``: enhances from the portal phase)

    def centre_xy(self, z: np.ndarray, shift_xy: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        f = np.float32
        c = 1.0 - np.cos(f(self.k) * (z - f(self.z0)))
        cx = f(self.base_xy[0]) + f(self.bend_xy[0]) * c
        cy = f(self.base_xy[1]) + f(self.bend_xy[1]) * c
        if self.drift_xy is not None or self.curve_xy is not None:
            t = (z - f(self.zref)) * f(0.01)
            dr = self.drift_xy if self.drift_xy is not None else np.zeros(2)
            cu = self.curve_xy if self.curve_xy is not None else np.zeros(2)
            cx = cx + t * (f(100 * dr[0]) + f(cu[0]) * t)
            cy = cy + t * (f(100 * dr[1]) + f(cu[1]) * t)
        if shift_xy is not None:
            cx, cy = cx + f(shift_xy[0]), cy + f(shift_xy[1])
        return cx, cy

    def touch_shift(self, lesion: LesionState) -> np.ndarray | None:
        """In-plane shift (mm) that keeps a touching vessel on the current AZ surface."""
        if not self.touching or self.touch_dir is None or lesion.az_semi_axes is None:
            return None
        n = np.array([self.touch_dir[0], self.touch_dir[1], 0.0])
        m = lesion.az_rot @ np.diag(np.asarray(lesion.az_semi_axes, float) ** 2) @ lesion.az_rot.T
        return (float(np.sqrt(n @ m @ n)) - self.touch_h) * n[:2]


@dataclass(frozen=True)
class Organ:
    """An ellipsoidal organ: ``kidney`` (cortex + medulla = inner ellipsoid x ``inner``),
    ``fluid`` (fluid-filled, dark on T1 and bright on T2, non-enhancing), ``spleen`` (solid,
    homogeneous), ``bowel`` (a loop: fluid contents inside an enhancing wall ``wall_mm`` thick)
    or ``liver`` (parenchyma around the ablation zone, the ``liver`` profile).
    ``beside_zone``: placed against the ablation zone (the ``abdomen`` profile)."""

    kind: str
    centre: np.ndarray
    rot: np.ndarray
    semi: np.ndarray
    inner: float = 0.6
    wall_mm: float = 0.0
    beside_zone: bool = False


@dataclass(frozen=True)
class Anatomy:
    """The fixed anatomy of one patient (world frame, mm) and its T1 tissue constants.

    ``body_semi_xy``, ``fat_mm`` and ``bone_xy`` are the nominal values at the target level
    (z = 0); the body outline, the subcutaneous fat (per side), the spine course and the
    intermuscular septa vary smoothly with z (``ztab``, columns ``ZC_*``).
    """

    body_semi_xy: tuple[float, float]
    fat_mm: float
    bone_xy: np.ndarray
    bone_radius: float
    vessels: tuple[Vessel, ...]
    texture_waves: np.ndarray  # (n, 3) rad/mm
    texture_phases: np.ndarray  # (n,)
    target: np.ndarray  # AZ / tumour centre, world mm
    muscle_t1: float  # T1 pre-contrast muscle intensity
    muscle_re: float  # muscle relative enhancement at the portal phase
    ztab: np.ndarray | None = None  # (n_columns, Z_TABLE_N) float32
    canal_radius: float = 7.0
    septa_t0: float = 40.0  # septa start this far (mm) from the spine axis
    septa_half_mm: float = 1.0
    sector_gain: np.ndarray | None = None  # muscle gain between septum k and k+1
    organs: tuple[Organ, ...] = ()
    # "mild": organs barely enhance (the default/heldout profiles); "abdominal": dynamic-contrast
    # physiology of abdominal organs (``t1_tissue_values``), the ``abdomen`` profile.
    physiology: str = "mild"

    def at_z(self, z: float) -> np.ndarray:
        """Row of ``ztab`` at world z (nearest sample)."""
        i = int(np.clip(round((z - Z_TABLE_START) / Z_TABLE_STEP), 0, Z_TABLE_N - 1))
        return self.ztab[:, i]

    def canal_offset(self) -> float:
        return self.bone_radius + 2.0 + self.canal_radius


def _ellipse_distance(x: float, y: float, a: float, b: float) -> float:
    """Unsigned distance from (x, y) to the ellipse (a, b) (dense sampling, for setup only)."""
    t = np.linspace(0, 2 * np.pi, 2881)
    return float(np.min(np.hypot(a * np.cos(t) - x, b * np.sin(t) - y)))


def _profile(rng: np.random.Generator, z: np.ndarray, amp: float) -> np.ndarray:
    """Smooth, non-periodic profile along z, 0 at z = 0: a sigmoid step plus a bump."""
    z1, l1 = rng.uniform(-70, 70), rng.uniform(60, 110)
    z2, l2 = rng.uniform(-90, 90), rng.uniform(35, 60)
    a1, a2 = rng.uniform(-amp, amp), rng.uniform(-amp, amp)

    def f(t):
        return a1 * np.tanh((t - z1) / l1) + a2 * np.exp(-(((t - z2) / l2) ** 2))

    return f(z) - f(0.0)


def _interior_q(an_row: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Normalised radius of (x, y) in the fat/muscle boundary ellipse of a ``ztab`` row."""
    return np.hypot((x - an_row[ZC_IN_X]) / an_row[ZC_IN_A], (y - an_row[ZC_IN_Y]) / an_row[ZC_IN_B])


def random_anatomy(rng: np.random.Generator, fat_range: tuple[float, float],
                   muscle_re_range: tuple[float, float], lesion_reach_mm: float) -> Anatomy:
    """Draw a patient: z-varying body and fat, spine with vertebrae/discs/canal, septa between
    muscle compartments, a kidney and a fluid-filled organ, 2-3 curved (branching) vessels
    clear of the lesion, and a target in muscle.

    ``lesion_reach_mm``: largest distance from the target the lesion may ever reach (AZ at
    its largest + rim + nodule); vessels are kept clear of it by 8 mm, septa by 6 mm, organs
    by 40 mm.
    """
    reach = lesion_reach_mm
    zz = z_table_axis()
    a, b = 150.0 + rng.uniform(-8, 8), 110.0 + rng.uniform(-8, 8)
    fat = rng.uniform(*fat_range)
    # Body outline: semi-axes and centre vary smoothly over ~150 mm.
    pa, pb = 1 + _profile(rng, zz, 0.09), 1 + _profile(rng, zz, 0.08)
    bx, by = 9.0 * _profile(rng, zz, 1.0), 6.0 * _profile(rng, zz, 1.0)
    A, B = a * pa, b * pb
    # Subcutaneous fat per side (L, R, P, A), varying with z.
    side = rng.uniform(0.75, 1.25, 4)
    fl, fr, fp, fa = (np.maximum(5.0, fat * side[s] * (1 + _profile(rng, zz, 0.25))) for s in range(4))
    a_in, b_in = A - (fl + fr) / 2, B - (fp + fa) / 2
    x_in, y_in = bx + (fr - fl) / 2, by + (fa - fp) / 2
    # Spine: vertebral body, canal and posterior arch behind it, with a gentle curve.
    bone_r = rng.uniform(14, 18)
    canal_r = rng.uniform(6, 8)
    i0 = int(round(-Z_TABLE_START / Z_TABLE_STEP))
    back0 = y_in[i0] + b_in[i0]  # posterior fat/muscle boundary at z = 0
    bone_xy = np.array([rng.uniform(-10, 10), back0 - (bone_r + 2 * canal_r + 6) - rng.uniform(14, 20)])
    zs, curv = rng.uniform(-150, 150), rng.uniform(-8, 8)
    sx = bone_xy[0] + 0.7 * (bx - bx[i0])
    sy = bone_xy[1] + (by - by[i0]) + curv * (((zz - zs) / 150) ** 2 - (zs / 150) ** 2)
    # Vertebral bodies 22-30 mm with 5-10 mm discs (non-periodic).
    lo, hi = [], []
    zc = Z_TABLE_START + rng.uniform(0, 25)
    while zc < -Z_TABLE_START:
        h = rng.uniform(22, 30)
        lo.append(zc)
        hi.append(zc + h)
        zc += h + rng.uniform(5, 10)
    lo, hi = np.array(lo), np.array(hi)
    vert_d = np.min(np.maximum(lo[:, None] - zz, zz - hi[:, None]), axis=0)
    cols = [bx, by, A, B, x_in, y_in, a_in, b_in, sx, sy, vert_d]
    tab = np.array(cols)

    def row(z):
        i = int(np.clip(round((z - Z_TABLE_START) / Z_TABLE_STEP), 0, Z_TABLE_N - 1))
        return tab[:, i]

    z_near = np.arange(-reach - 6, reach + 6.1, 4.0)
    while True:  # target >= 55 mm deep (lesion growth stays in muscle), clear of the spine
        s = rng.choice([-1.0, 1.0])
        tx, ty = s * rng.uniform(35, 70), rng.uniform(-35, 15)
        ok = True
        for z in z_near:
            r_ = row(z)
            if (_ellipse_distance(tx - r_[ZC_BODY_X], ty - r_[ZC_BODY_Y], r_[ZC_BODY_A], r_[ZC_BODY_B]) < 55.0
                    or _interior_q(r_, tx, ty) >= 1
                    or _ellipse_distance(tx - r_[ZC_IN_X], ty - r_[ZC_IN_Y], r_[ZC_IN_A], r_[ZC_IN_B]) < reach + 6
                    or np.hypot(tx - r_[ZC_SPINE_X], ty - r_[ZC_SPINE_Y]) < bone_r + reach + 10):
                ok = False
                break
        if ok:
            break
    target = np.array([tx, ty, 0.0])

    # Intermuscular septa: K rays from the spine axis, the target mid-sector.
    n_sep = 4
    phi = np.arctan2(ty - bone_xy[1], tx - bone_xy[0])
    t0 = bone_r + 2 * canal_r + 10
    for _ in range(60):
        th0 = phi + np.pi / n_sep + 2 * np.pi * np.arange(n_sep) / n_sep + rng.uniform(-0.15, 0.15, n_sep)
        th = np.array([th0[k] + _profile(rng, zz, 0.3) for k in range(n_sep)])
        ok = True
        for z in z_near:
            i = int(round((z - Z_TABLE_START) / Z_TABLE_STEP))
            vx, vy = tx - sx[i], ty - sy[i]
            for k in range(n_sep):
                ux, uy = np.cos(th[k, i]), np.sin(th[k, i])
                t = vx * ux + vy * uy
                d = np.hypot(vx * uy - vy * ux, min(t - t0, 0.0))
                if d < reach + 6:
                    ok = False
        if ok:
            break
    else:  # should not happen (target mid-sector, >= 30 degrees clear); drop the nearest septa
        th = th[[k for k in range(n_sep) if abs(np.angle(np.exp(1j * (th0[k] - phi)))) > np.pi / 3]]
        n_sep = len(th)
    for k in range(n_sep):
        tab = np.vstack([tab, np.cos(th[k])[None], np.sin(th[k])[None]])
    # Sector k lies between septum k and k+1 (counter-clockwise); the target's sector keeps
    # the nominal muscle intensity, the others differ by 3-8 %.
    gain = rng.uniform(0.03, 0.08, n_sep) * rng.choice([-1.0, 1.0], n_sep) + 1.0
    gain[n_sep - 1] = 1.0  # target at phi, between septum n-1 (phi - pi/n) and septum 0
    septa_half = rng.uniform(0.8, 1.2)

    def inside_interior(p, margin):
        r_ = row(p[2])
        sc_a, sc_b = r_[ZC_IN_A] - margin, r_[ZC_IN_B] - margin
        return ((p[0] - r_[ZC_IN_X]) / sc_a) ** 2 + ((p[1] - r_[ZC_IN_Y]) / sc_b) ** 2 < 1

    def clear_of_spine(p, margin):
        r_ = row(p[2])
        if np.hypot(p[0] - r_[ZC_SPINE_X], p[1] - r_[ZC_SPINE_Y]) < bone_r + margin:
            return False
        return np.hypot(p[0] - r_[ZC_SPINE_X], p[1] - r_[ZC_SPINE_Y] - bone_r - 2 - canal_r) >= canal_r + 4 + margin

    # Organs: a kidney beside the spine and a fluid-filled (bowel-like) structure anteriorly,
    # both >= 40 mm from anything the lesion may reach.
    u = rng.standard_normal((400, 3))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    organs: list[Organ] = []
    for kind in ("kidney", "fluid"):
        for _ in range(80):
            if kind == "kidney":
                semi = np.array([rng.uniform(22, 28), rng.uniform(16, 20), rng.uniform(45, 55)])
                c = np.array([-s * rng.uniform(50, 80) + bone_xy[0], bone_xy[1] - rng.uniform(0, 15),
                              rng.choice([-1.0, 1.0]) * rng.uniform(20, 55)])
                rot = random_rotation_small(rng, 20.0)
            else:
                semi = np.array([rng.uniform(15, 24), rng.uniform(12, 18), rng.uniform(25, 45)])
                c = np.array([rng.uniform(-70, 70), rng.uniform(-b + 25, -20), rng.uniform(-45, 45)])
                rot = random_rotation_small(rng, 35.0)
            pts = c + (u * semi) @ rot.T
            if np.min(np.linalg.norm(pts - target, axis=1)) - reach < 40:
                continue
            if not all(inside_interior(p, 4.0) and clear_of_spine(p, 4.0) for p in pts[::4]):
                continue
            if any(np.min(np.sum((((pts - o.centre) @ o.rot) / o.semi) ** 2, axis=1)) < 1.3 for o in organs):
                continue
            organs.append(Organ(kind, c, rot, semi))
            break

    def vessel_ok(v: Vessel, parent: Vessel | None) -> bool:
        zs_ = np.arange(-160.0, 160.1, 4.0)
        if v.z_start is not None:
            zs_ = zs_[(zs_ - v.z_start) * v.z_dir > 0]
        cx, cy = v.centre_xy(zs_.astype(np.float32))
        r = v.radius
        for x, y, z in zip(cx, cy, zs_):
            p = np.array([x, y, z])
            if not inside_interior(p, r + 6) or not clear_of_spine(p, r + 5):
                return False
            if abs(z) <= reach + 12 and np.hypot(x - tx, y - ty) < reach + r + 8:
                return False
            for o in organs:
                if np.sum((((p - o.centre) @ o.rot) / (o.semi + r + 3)) ** 2) < 1:
                    return False
            for w in vessels:
                if w is parent:
                    continue
                wx, wy = w.centre_xy(np.float32(z))
                exists = w.z_start is None or (z - w.z_start) * w.z_dir > 0
                if exists and np.hypot(x - wx, y - wy) < r + w.radius + 8:
                    return False
        return True

    vessels: list[Vessel] = []
    n_vessels = int(rng.integers(2, 4))
    tries = 0
    while len(vessels) < n_vessels and tries < 400:
        tries += 1
        r = rng.uniform(3.0, 4.5)
        x, y = rng.uniform(-a + 40, a - 40), rng.uniform(-b + 35, b - 35)
        ang = rng.uniform(0, 2 * np.pi)
        dang = rng.uniform(0, 2 * np.pi)
        cang = rng.uniform(0, 2 * np.pi)
        v = Vessel(np.array([x, y]), rng.uniform(2, 8) * np.array([np.cos(ang), np.sin(ang)]),
                   2 * np.pi / rng.uniform(180, 320), rng.uniform(-100, 100), r,
                   drift_xy=rng.uniform(0.08, 0.25) * np.array([np.cos(dang), np.sin(dang)]),
                   curve_xy=rng.uniform(6, 15) * np.array([np.cos(cang), np.sin(cang)]))
        if vessel_ok(v, None):
            vessels.append(v)
    # Branches: leave a parent vessel and diverge (up or down), thinner than it.
    for parent in list(vessels):
        for _ in range(30):
            zb = rng.uniform(-70, 70)
            bx0, by0 = parent.centre_xy(np.float32(zb))
            dang = rng.uniform(0, 2 * np.pi)
            v = Vessel(np.array([float(bx0), float(by0)]), np.zeros(2), 0.0, 0.0,
                       min(parent.radius - 0.3, rng.uniform(2.5, 3.5)),
                       drift_xy=rng.uniform(0.25, 0.45) * np.array([np.cos(dang), np.sin(dang)]),
                       curve_xy=rng.uniform(-8, 8, 2), zref=zb, z_start=zb, z_dir=float(rng.choice([-1.0, 1.0])))
            if vessel_ok(v, parent):
                vessels.append(v)
                break

    n_tex = 4
    dirs = rng.standard_normal((n_tex, 3))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    waves = dirs * (2 * np.pi / rng.uniform(20, 70, n_tex))[:, None]
    return Anatomy((a, b), fat, bone_xy, bone_r, tuple(vessels), waves, rng.uniform(0, 2 * np.pi, n_tex),
                   target, 260.0 * rng.uniform(0.95, 1.05), rng.uniform(*muscle_re_range),
                   ztab=tab.astype(np.float32), canal_radius=canal_r, septa_t0=t0, septa_half_mm=septa_half,
                   sector_gain=gain, organs=tuple(organs))


def random_rotation_small(rng: np.random.Generator, max_deg: float) -> np.ndarray:
    """Rotation by up to ``max_deg`` about each axis."""
    return rotation_matrix(*rng.uniform(-max_deg, max_deg, 3))
