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

from dataclasses import dataclass, replace

import numpy as np

from pipeline.core.records import Label

from .geometry import Grid, Pose, random_rotation

T1_PHASE_SECONDS = (20, 70, 180)

# Tissue order is also the precedence order inside the body interior: a tissue earlier in
# the list displaces later ones (a nodule replaces necrosis, a vessel pushes the rim aside).
LESION_TISSUES = ("nodule", "tumour", "az", "vessel", "rim", "bone")
# Then the other interior structures, before muscle (septa = intermuscular fat, fat-suppressed).
ANATOMY_TISSUES = ("canal", "disc", "kidney_medulla", "kidney_cortex", "fluid", "bowel_wall", "spleen", "septum")


# --------------------------------------------------------------------------- patient anatomy
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

    def touch_shift(self, lesion: "LesionState") -> np.ndarray | None:
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
    homogeneous) or ``bowel`` (a loop: fluid contents inside an enhancing wall ``wall_mm`` thick).
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
    from .geometry import rotation_matrix

    return rotation_matrix(*rng.uniform(-max_deg, max_deg, 3))


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
                  float(az_centre[2]), r, touching=True, touch_dir=n[:2].copy(), touch_h=h)


def _support(rot: np.ndarray, semi: np.ndarray, n: np.ndarray) -> float:
    """Support function of an ellipsoid (centre 0): distance to its tangent plane of normal n."""
    m = rot @ np.diag(np.asarray(semi, float) ** 2) @ rot.T
    return float(np.sqrt(n @ m @ n))


def _fits_in_body(anatomy: Anatomy, pts: np.ndarray, margin: float) -> bool:
    """All points inside the muscle interior (``margin`` mm in) and clear of the spine and canal."""
    for x, y, z in pts:
        r_ = anatomy.at_z(float(z))
        if ((x - r_[ZC_IN_X]) / (r_[ZC_IN_A] - margin)) ** 2 + ((y - r_[ZC_IN_Y]) / (r_[ZC_IN_B] - margin)) ** 2 >= 1:
            return False
        sx, sy = r_[ZC_SPINE_X], r_[ZC_SPINE_Y]
        if np.hypot(x - sx, y - sy) < anatomy.bone_radius + margin:
            return False
        if np.hypot(x - sx, y - sy - anatomy.canal_offset()) < anatomy.canal_radius + 4 + margin:
            return False
    return True


def _fibonacci_sphere(n: int) -> np.ndarray:
    """``n`` near-uniform unit vectors (deterministic: no draw from the patient's generator)."""
    i = np.arange(n) + 0.5
    phi = np.arccos(1 - 2 * i / n)
    theta = np.pi * (1 + 5 ** 0.5) * i
    return np.column_stack([np.cos(theta) * np.sin(phi), np.sin(theta) * np.sin(phi), np.cos(phi)])


_FIBONACCI_SPHERE = _fibonacci_sphere(4000)


def _slide_to_gap(centre: np.ndarray, n: np.ndarray, rot: np.ndarray, semi: np.ndarray, az_surface: np.ndarray,
                  gap: float) -> np.ndarray:
    """Organ centre moved along -n so that its surface is ``gap`` mm from the nearest AZ surface
    point (bisection on the first-order distance of ``_ellipsoid``; at most 20 mm)."""
    def clearance(shift: float) -> float:
        d, _, _ = _ellipsoid(az_surface.astype(np.float32), centre - shift * n, rot, semi)
        return float(d.min())

    lo, hi = 0.0, 20.0
    if clearance(lo) <= gap:
        return centre
    for _ in range(30):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if clearance(mid) > gap else (lo, mid)
    return centre - lo * n


def organs_beside_zone(rng: np.random.Generator, anatomy: Anatomy, az_centre: np.ndarray, az_rot: np.ndarray,
                       semi_axes: np.ndarray, avoid_dir: np.ndarray | None) -> Anatomy:
    """The anatomy with 1-2 enhancing organs lying against the ablation zone (``abdomen`` profile).

    Each organ (a kidney, the spleen's tip or a bowel loop) is placed along an in-plane-ish
    direction ``n`` so that its tangent plane coincides with the AZ's (``_support``) plus a
    0-2 mm gap: the two touch, as a paraspinal or retroperitoneal zone touches the kidney in
    practice. ``avoid_dir`` (the nodule's direction) is kept > 40 degrees away so that the
    nodule stays visible, yet may lie next to the organ. Organs that do not fit in the body are
    shrunk (x0.85) and tried again.
    """
    u = rng.standard_normal((300, 3))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    az_surface = az_centre + (_FIBONACCI_SPHERE * np.asarray(semi_axes, float)) @ az_rot.T
    kinds = [str(rng.choice(["kidney", "kidney", "spleen", "bowel"]))]
    if rng.random() < 0.5:
        kinds.append(str(rng.choice([k for k in ("bowel", "kidney", "spleen") if k != kinds[0]])))
    placed: list[Organ] = []
    for kind in kinds:
        if kind == "kidney":
            semi = np.array([rng.uniform(22, 28), rng.uniform(16, 20), rng.uniform(45, 55)])
            rot = random_rotation_small(rng, 25.0)
        elif kind == "spleen":
            semi = np.array([rng.uniform(22, 32), rng.uniform(35, 50), rng.uniform(40, 55)])
            rot = random_rotation_small(rng, 25.0)
        else:
            semi = np.array([rng.uniform(10, 16), rng.uniform(10, 16), rng.uniform(30, 60)])
            rot = random_rotation(rng)
        wall = float(rng.uniform(1.5, 3.0)) if kind == "bowel" else 0.0
        for attempt in range(120):
            if attempt and attempt % 40 == 0:
                semi = semi * 0.85
            ang = rng.uniform(0, 2 * np.pi)
            n = np.array([np.cos(ang), np.sin(ang), rng.uniform(-0.25, 0.25)])
            n /= np.linalg.norm(n)
            if avoid_dir is not None and n @ avoid_dir > np.cos(np.deg2rad(40)):
                continue
            if any(n @ ((o.centre - az_centre) / np.linalg.norm(o.centre - az_centre)) > np.cos(np.deg2rad(70))
                   for o in placed):
                continue
            gap = rng.uniform(0.0, 2.0)
            c = az_centre + n * (_support(az_rot, semi_axes, n) + gap + _support(rot, semi, n))
            # Coincident tangent planes leave a gap where the two contact points are offset
            # laterally: slide the organ along -n until the surfaces are ``gap`` apart.
            c = _slide_to_gap(c, n, rot, semi, az_surface, gap)
            pts = c + (u * semi) @ rot.T
            if not _fits_in_body(anatomy, pts[::3], 3.0):
                continue
            placed.append(Organ(kind, c, rot, semi, wall_mm=wall, beside_zone=True))
            break
    return replace(anatomy, organs=anatomy.organs + tuple(placed), physiology="abdominal")


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
    labels: np.ndarray  # uint8 Label values: the tumour/nodule is the enhancing focus
    muscle_gain: np.ndarray | None = None  # per-voxel muscle compartment gain (~1 +- 8 %)


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


def _ellipse_frac(X: np.ndarray, Y: np.ndarray, a, b, axes: np.ndarray) -> np.ndarray:
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
    f_body = _ellipse_frac(X - bx, Y - by, col(ZC_BODY_A), col(ZC_BODY_B), axes)
    del bx, by
    f_in = np.minimum(_ellipse_frac(X - col(ZC_IN_X), Y - col(ZC_IN_Y), col(ZC_IN_A), col(ZC_IN_B), axes), f_body)

    # Spine: vertebral bodies (discs between them), canal, posterior arch.
    sx, sy = col(ZC_SPINE_X), col(ZC_SPINE_Y)
    f_col = _tube(X, Y, sx, sy, anatomy.bone_radius, axes)[1]
    wz = f32(max(float(np.abs(axes[2]).sum()), 1e-3))
    g_vert = np.clip(f32(0.5) - col(ZC_VERT_D) / wz, 0.0, 1.0)
    ccy = sy + f32(anatomy.canal_offset())
    f_canal = _tube(X, Y, sx, ccy, anatomy.canal_radius, axes)[1]
    f_arch = _tube(X, Y, sx, ccy, anatomy.canal_radius + 4.0, axes)[1]
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
        f_k = _frac_inplane(d, lambda band, s=sgn, u=uy: s[band] * u[band],
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
    d_vessel = np.full_like(X, np.inf)
    for v in anatomy.vessels:
        cx, cy = v.centre_xy(Z, v.touch_shift(lesion))
        d_v, f_v = _tube(X, Y, cx, cy, v.radius, axes)
        if v.z_start is not None:
            dz = (Z - f32(v.z_start)) * f32(v.z_dir)
            f_v *= np.clip(f32(0.5) + dz / wz, 0.0, 1.0)
            d_v[dz < 0] = np.inf
        np.maximum(raw_v, f_v, out=raw_v)
        np.minimum(d_vessel, d_v, out=d_vessel)
    raw["vessel"] = raw_v

    for name in ("kidney_cortex", "kidney_medulla", "fluid", "bowel_wall", "spleen"):
        raw[name] = np.zeros_like(X)

    def put(name: str, box, f: np.ndarray) -> None:  # organs may share a box: keep the larger share
        raw[name][box] = np.maximum(raw[name][box], f)

    for o in anatomy.organs:
        box = _box(grid, pose, o.centre, float(np.max(o.semi)))
        if box is None:
            continue
        xb = np.stack([X[box], Y[box], Z[box]], axis=-1)
        d_o, n_o, _ = _ellipsoid(xb, o.centre, o.rot, o.semi)
        f_o = _frac(d_o, n_o, axes)
        if o.kind == "kidney":
            d_m, n_m, _ = _ellipsoid(xb, o.centre, o.rot, o.semi * o.inner)
            f_m = _frac(d_m, n_m, axes)
            put("kidney_medulla", box, f_m)
            put("kidney_cortex", box, np.clip((f_o - f_m) / np.maximum(1 - f_m, 1e-6), 0, 1))
        elif o.kind == "bowel":
            f_c = _frac(d_o + np.float32(o.wall_mm), n_o, axes)  # contents: the wall's inner surface
            put("fluid", box, f_c)
            put("bowel_wall", box, np.clip((f_o - f_c) / np.maximum(1 - f_c, 1e-6), 0, 1))
        elif o.kind == "spleen":
            put("spleen", box, f_o)
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
            raw[name][box] = _frac(d, v / rr[..., None], axes)
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


# --------------------------------------------------------------------------- intensities
def t1_tissue_values(anatomy: Anatomy, lesion: LesionState, phase_seconds: int | None) -> dict[str, float]:
    """T1 fat-sat GRE intensity per tissue; ``phase_seconds`` None = pre-contrast.

    Relative enhancement (RE) per phase 20 / 70 / 180 s: vessels +250 % then +180 %; rim
    strongest late (benign hyperaemia/granulation); nodule and tumour strongest arterial.
    """
    m = anatomy.muscle_t1
    pre = {"air": 0.0, "fat": 60.0, "muscle": m, "bone": 150.0, "vessel": 120.0,
           "az": lesion.az_t1_ratio * m, "rim": m, "nodule": 1.05 * m, "tumour": 1.05 * m,
           "septum": 60.0, "disc": 0.35 * m, "canal": 0.25 * m, "kidney_cortex": 0.95 * m,
           "kidney_medulla": 0.72 * m, "fluid": 0.2 * m, "bowel_wall": 0.95 * m, "spleen": 0.85 * m}
    if phase_seconds is None:
        return pre
    p = {20: 0, 70: 1, 180: 2}[phase_seconds]
    abdominal = anatomy.physiology == "abdominal"
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
        # Other structures: mild (< +12 %, never a false tumour focus) or none.
        "septum": 0.02,
        "disc": 0.02,
        "canal": 0.0,
        "kidney_cortex": (0.10, 0.11, 0.11)[p],
        "kidney_medulla": (0.03, 0.06, 0.08)[p],
        "fluid": 0.0,
        "bowel_wall": 0.02,
        "spleen": 0.02,
    }
    if abdominal:
        # Dynamic-contrast physiology as abdominal MRI texts describe it (engineering values in
        # the reported ranges, not measurements): the renal cortex enhances as strongly as
        # arteries in the corticomedullary (arterial) phase, the medulla catches up in the
        # nephrographic phase; the spleen enhances strongly and evenly by the portal phase; the
        # bowel wall enhances at the portal phase, its contents do not. Every one of them
        # enhances as much as, or more than, a viable tumour nodule: only shape, scale and
        # continuity tell them apart.
        re.update({
            "kidney_cortex": (2.0, 1.5, 1.1)[p],
            "kidney_medulla": (0.5, 1.3, 1.4)[p],
            "spleen": (1.4, 1.1, 0.9)[p],
            "bowel_wall": (0.7, 1.0, 0.8)[p],
        })
    return {k: v * (1 + re[k]) for k, v in pre.items()}


def t2_tissue_values(lesion: LesionState) -> dict[str, float]:
    """T2 fat-sat TSE intensity per tissue (AZ darkens over time, nodule bright)."""
    return {"air": 0.0, "fat": 80.0, "muscle": 100.0, "bone": 30.0, "vessel": 40.0,
            "az": lesion.az_t2, "rim": 115.0, "nodule": 200.0, "tumour": 180.0,
            "septum": 80.0, "disc": 150.0, "canal": 230.0, "kidney_cortex": 120.0, "kidney_medulla": 150.0,
            "fluid": 250.0, "bowel_wall": 110.0, "spleen": 150.0}


def intensity(r: Rendered, values: dict[str, float], texture_amp: float = 0.05) -> np.ndarray:
    """Noise-free image: sum of fractions x tissue values (muscle x compartment gain), times the +-5 % texture."""
    img = np.zeros_like(r.texture)
    for name, f in r.fractions.items():
        v = values[name]
        if v:
            if name == "muscle" and r.muscle_gain is not None:
                img += np.float32(v) * f * r.muscle_gain
            else:
                img += np.float32(v) * f
    img *= 1 + np.float32(texture_amp) * r.texture
    return img
