"""Anatomy drawn against the ablation zone: a vessel touching it, organs lying beside it.

Both are placed by the support function of the zone's ellipsoid (the distance from its
centre to its tangent plane of a given normal), after the zone itself is drawn
(``scenarios.plan_patient``).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from .body import (
    ZC_IN_A,
    ZC_IN_B,
    ZC_IN_X,
    ZC_IN_Y,
    ZC_SPINE_X,
    ZC_SPINE_Y,
    Anatomy,
    Organ,
    Vessel,
    random_rotation_small,
)
from .geometry import random_rotation
from .partial_volume import ellipsoid


def touching_vessel(rng: np.random.Generator, az_centre: np.ndarray, az_rot: np.ndarray,
                    semi_axes: np.ndarray, avoid_dir: np.ndarray | None = None, *, venous: bool = False) -> Vessel:
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
                  float(az_centre[2]), r, touching=True, touch_dir=n[:2].copy(), touch_h=h, venous=venous)


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
    point (bisection on the first-order distance of ``ellipsoid``; at most 20 mm)."""
    def clearance(shift: float) -> float:
        d, _, _ = ellipsoid(az_surface.astype(np.float32), centre - shift * n, rot, semi)
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


def liver_around_zone(rng: np.random.Generator, anatomy: Anatomy, az_centre: np.ndarray, reach_mm: float) -> Anatomy:
    """The anatomy with a liver holding the ablation zone and 2-4 intrahepatic veins (``liver`` profile).

    The liver is an ellipsoid (semi-axes 20-45 mm beyond the lesion's largest reach in-plane,
    40-70 mm along S-I) placed off-centre about the zone so that the zone lies >= 12 mm inside
    it whatever it becomes (growth, nodule: ``reach_mm``). It is not shrunk to the body: the
    renderer clips it to the body interior (``render``'s precedence: bone, spinal canal and the
    organs already there keep their place, as the kidney indents the liver), so the liver
    reaches the body wall as it does in practice. The veins (portal and hepatic branches,
    radius 2.5-6 mm) run roughly S-I through the liver and stay >= 4 mm clear of the lesion's
    reach: a vein touching the zone is the profile's ``touching_vessel``.
    """
    semi = np.array([reach_mm + rng.uniform(20, 45), reach_mm + rng.uniform(20, 45), reach_mm + rng.uniform(40, 70)])
    rot = random_rotation_small(rng, 15.0)
    # An offset whose ellipsoid-normalised length leaves the reach's sphere inside (semi - 12 mm).
    offset = rng.uniform(-1, 1, 3)
    offset *= 0.9 * (1.0 - reach_mm / float(np.min(semi - 12.0))) / max(1.0, float(np.linalg.norm(offset)))
    liver = Organ("liver", az_centre - rot @ (offset * (semi - 12.0)), rot, semi)
    veins: list[Vessel] = []
    n_veins = int(rng.integers(2, 5))
    for _ in range(200):
        if len(veins) >= n_veins:
            break
        r = rng.uniform(2.5, 6.0)
        ang = rng.uniform(0, 2 * np.pi)
        radial = rng.uniform(reach_mm + r + 4.0, reach_mm + r + 30.0)
        base = az_centre[:2] + radial * np.array([np.cos(ang), np.sin(ang)])
        dang = rng.uniform(0, 2 * np.pi)
        v = Vessel(base, np.zeros(2), 0.0, 0.0, r,
                   drift_xy=rng.uniform(0.0, 0.2) * np.array([np.cos(dang), np.sin(dang)]),
                   zref=float(az_centre[2]), venous=True)
        zs = np.arange(az_centre[2] - reach_mm - 20, az_centre[2] + reach_mm + 20.1, 2.0)
        cx, cy = v.centre_xy(zs.astype(np.float32))
        clear = np.hypot(cx - az_centre[0], cy - az_centre[1]) >= reach_mm + r + 4.0
        inside = [np.sum((((np.array([x, y, z]) - liver.centre) @ liver.rot) / liver.semi) ** 2) < 1
                  for x, y, z in zip(cx, cy, zs)]
        apart = all(np.min(np.hypot(cx - w.centre_xy(zs.astype(np.float32))[0],
                                    cy - w.centre_xy(zs.astype(np.float32))[1])) >= r + w.radius + 4 for w in veins)
        if clear.all() and np.mean(inside) > 0.6 and apart:
            veins.append(v)
    return replace(anatomy, organs=anatomy.organs + (liver,), vessels=anatomy.vessels + tuple(veins),
                   physiology="abdominal")
