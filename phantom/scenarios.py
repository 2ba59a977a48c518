"""Per-patient timelines: ablation sessions, studies, truth categories and lesion states.

Scenarios (cycled over patients, so ``n_patients >= 8`` covers all; 2 -> complete, ltp;
4 -> complete, ltp, residual, growth):

- ``complete``: complete ablation, clean follow-ups, AZ involution x0.9/x0.8/x0.7.
- ``ltp``: clean baseline and 3-month, nodule at 6 months (grown at 12).
- ``residual``: nodule at the margin from the baseline on, growing.
- ``growth``: no nodule; AZ x0.92 (nadir) at 3 months, x1.30 at 6, x1.50 at 12.
- ``vessel``: complete, with a vessel touching the AZ (never tumour).
- ``asymmetric_rim``: complete, with a slightly asymmetric thin rim (1.0-2.8 mm).
- ``missing_post``: complete, but the 6-month study has no post-contrast series.
- ``reablation``: residual at baseline 1, second session 60-75 days later, clean baseline 2
  (AZ in the same place, x1.15), clean follow-up.

Categories follow DESIGN.md "Clinical rules" and ``pipeline.core.records.Category``.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, replace

import numpy as np

from .body import Anatomy, random_anatomy
from .lesion import LesionState, random_lesion_orientation, surface_point
from .profiles import Profile
from .zone_contact import liver_around_zone, organs_beside_zone, touching_vessel

SCENARIOS = ("complete", "ltp", "residual", "growth", "vessel", "asymmetric_rim", "missing_post", "reablation")
VENDORS = ("SIEMENS", "Philips Medical Systems", "GE MEDICAL SYSTEMS", "CANON_MEC")

# Follow-up schedule after a session: (label, nominal days, +- days).
FOLLOW_UPS = (("fu03", 90, 10), ("fu06", 180, 15), ("fu12", 365, 20))
RIM_FACTOR = (1.0, 0.75, 0.5, 0.0)  # rim thickness x this at baseline, 3, 6, 12 months


@dataclass
class StudyPlan:
    key: str  # unique within the patient, e.g. "pre", "s1_base", "s1_fu06"
    date: dt.date
    timepoint: str  # pre_ablation | baseline | follow_up
    session: int | None
    days_since_ablation: int | None
    category: str
    has_post: bool
    lesion: LesionState
    vessel_touching: bool


@dataclass
class PatientPlan:
    index: int
    patient_id: str
    scenario: str
    vendor: str
    ablation_dates: list[dt.date]
    anatomy: Anatomy
    studies: list[StudyPlan]


def rescale_az(lesion: LesionState, factor: float) -> LesionState:
    """AZ scaled about its centre; a nodule keeps its offset outside the (moved) surface."""
    c, semi = lesion.az_centre, lesion.az_semi_axes
    nod = lesion.nodule_centre
    if nod is not None:
        v = nod - c
        dist = float(np.linalg.norm(v))
        r = float(np.linalg.norm(surface_point(c, lesion.az_rot, semi, v) - c))
        nod = c + v / dist * (r * factor + dist - r)
    return replace(lesion, az_semi_axes=semi * factor, nodule_centre=nod)


def scenario_for(index: int) -> str:
    return SCENARIOS[index % len(SCENARIOS)]


def plan_patient(index: int, rng: np.random.Generator, profile: Profile) -> PatientPlan:
    """Draw one patient's anatomy, lesion and study timeline (deterministic given ``rng``)."""
    scenario = scenario_for(index)
    # Anisotropy <= ~1.4: ablation zones are rounded, and a cigar-shaped AZ would make the
    # in-plane long axis swing with the slice tilt of each study.
    lo, hi = profile.az_semi_axes_mm
    a0 = rng.uniform(lo + 0.3 * (hi - lo), hi)
    semi0 = np.array([a0, *np.maximum(lo, a0 * rng.uniform(0.72, 1.0, 2))])
    # Largest reach over the timeline: growth x1.5, asymmetric rim, a 15 mm nodule outside.
    reach = max(float(semi0[0]) * 1.5 + 3.0, float(semi0[0]) * 1.05 + 16.0)
    anatomy = random_anatomy(rng, profile.fat_thickness_mm, profile.muscle_re, reach)
    az_rot = random_lesion_orientation(rng)
    centre = anatomy.target

    # Nodule direction: mostly in-plane, so it sits on the axial slices through the AZ.
    ang = rng.uniform(0, 2 * np.pi)
    nod_dir = np.array([np.cos(ang), np.sin(ang), rng.uniform(-0.3, 0.3)])
    nod_dir /= np.linalg.norm(nod_dir)
    nod_d0 = rng.uniform(*profile.nodule_diameter_mm)
    nod_re = rng.uniform(*profile.nodule_re)

    vessel_touching = scenario == "vessel"
    if profile.organs_beside_zone:  # draws only for such profiles: the others' cohorts are unchanged
        anatomy = organs_beside_zone(rng, anatomy, centre, az_rot, semi0, nod_dir)
        vessel_touching = vessel_touching or bool(rng.random() < profile.touching_vessel_fraction)
    if profile.zone_in_liver:  # draws only for such profiles: the others' cohorts are unchanged
        anatomy = liver_around_zone(rng, anatomy, centre, reach)
        vessel_touching = vessel_touching or bool(rng.random() < profile.touching_vessel_fraction)
    if vessel_touching:
        anatomy = replace(anatomy, vessels=anatomy.vessels + (
            touching_vessel(rng, centre, az_rot, semi0, nod_dir, venous=profile.zone_in_liver),))

    rim0 = rng.uniform(*profile.rim_thickness_mm)
    rim_re = rng.uniform(*profile.rim_re)
    asym = None
    if scenario == "asymmetric_rim":
        w = rng.standard_normal((2, 3))
        asym = tuple(v / np.linalg.norm(v) for v in w)
    t1_ratio0 = rng.uniform(*profile.az_t1_ratio_baseline)
    az_re = rng.uniform(*profile.az_re)
    tumour_d = min(rng.uniform(*profile.tumour_diameter_mm), 2 * float(semi0.min()) - 6.0)

    def lesion(scale: float, fu_index: int, nodule_d: float | None, *, az: bool = True,
               rim_scale: float = 1.0) -> LesionState:
        semi = semi0 * scale
        nod_c = None
        if nodule_d is not None:
            # Eccentric nodule on the margin: centre 0.35 r outside the current AZ surface.
            nod_c = surface_point(centre, az_rot, semi, nod_dir) + nod_dir * 0.35 * nodule_d / 2
        rim = rim0 * rim_scale * RIM_FACTOR[min(fu_index, 3)]
        if asym is not None:
            rim_mean, rim_amp = 1.9 * RIM_FACTOR[min(fu_index, 3)], 0.9 * RIM_FACTOR[min(fu_index, 3)]
        else:
            rim_mean, rim_amp = rim, 0.0
        if rim_mean < 0.5:  # sub-millimetre: the rim has resolved
            rim_mean, rim_amp = 0.0, 0.0
        return LesionState(
            az_centre=centre, az_rot=az_rot, az_semi_axes=semi if az else None,
            rim_mm=rim_mean, rim_asym=asym if rim_amp > 0 else None, rim_asym_amp_mm=rim_amp,
            nodule_centre=nod_c, nodule_radius=(nodule_d or 0.0) / 2,
            az_t1_ratio=max(1.6, t1_ratio0 * 0.92 ** fu_index), az_re=az_re,
            rim_re=rim_re, nodule_re=nod_re, az_t2=max(60.0, 90.0 - 10.0 * fu_index),
        )

    start = dt.date(2023, 1, 1)
    abl1 = start + dt.timedelta(days=int(rng.integers(0, 3 * 365)))
    has_pre = (index % 2 == 1) if index < 2 else bool(rng.random() < profile.pre_ablation_fraction)
    studies: list[StudyPlan] = []

    def add(key, date, timepoint, session, abl, category, les, has_post=True):
        studies.append(StudyPlan(key, date, timepoint, session,
                                 None if abl is None else (date - abl).days, category, has_post, les,
                                 vessel_touching))

    if has_pre:
        pre_lesion = LesionState(az_centre=centre, az_rot=az_rot, az_semi_axes=None, tumour_radius=tumour_d / 2)
        add("pre", abl1 - dt.timedelta(days=int(rng.integers(7, 31))), "pre_ablation", None, None,
            "pre_ablation", pre_lesion)

    base_day = int(rng.integers(28, 43))
    fu_days = [int(nom + rng.integers(-pm, pm + 1)) for _, nom, pm in FOLLOW_UPS]
    ablation_dates = [abl1]

    # (scale, nodule diameter or None, category) at baseline, 3, 6, 12 months.
    g = 1.18  # nodule growth per follow-up
    clean = [(1.0, None, "complete_ablation"), (0.9, None, "no_evidence_of_ltp"),
             (0.8, None, "no_evidence_of_ltp"), (0.7, None, "no_evidence_of_ltp")]
    table = {
        "complete": clean,
        "vessel": clean,
        "asymmetric_rim": clean,
        "missing_post": clean,
        "residual": [(1.0, nod_d0, "residual_unablated_tumour"),
                     (0.95, nod_d0 * g, "residual_unablated_tumour"),
                     (0.9, nod_d0 * g ** 2, "residual_unablated_tumour"),
                     (0.85, nod_d0 * g ** 3, "residual_unablated_tumour")],
        "ltp": [(1.0, None, "complete_ablation"), (0.9, None, "no_evidence_of_ltp"),
                (0.85, nod_d0, "local_tumour_progression"),
                (0.8, nod_d0 * 1.35, "local_tumour_progression")],
        "growth": [(1.0, None, "complete_ablation"), (0.92, None, "no_evidence_of_ltp"),
                   (1.30, None, "suspected_local_tumour_progression"),
                   (1.50, None, "suspected_local_tumour_progression")],
    }

    if scenario == "reablation":
        add("s1_base", abl1 + dt.timedelta(days=base_day), "baseline", 1, abl1,
            "residual_unablated_tumour", lesion(1.0, 0, nod_d0))
        abl2 = abl1 + dt.timedelta(days=int(rng.integers(60, 76)))
        ablation_dates.append(abl2)
        add("s2_base", abl2 + dt.timedelta(days=int(rng.integers(28, 36))), "baseline", 2, abl2,
            "complete_ablation", lesion(1.15, 0, None))
        add("s2_fu03", abl2 + dt.timedelta(days=fu_days[0]), "follow_up", 2, abl2,
            "no_evidence_of_ltp", lesion(1.05, 1, None))
    else:
        rows = table[scenario]
        add("s1_base", abl1 + dt.timedelta(days=base_day), "baseline", 1, abl1, rows[0][2],
            lesion(rows[0][0], 0, rows[0][1]))
        for fi, ((label, _, _), days, (scale, nod, cat)) in enumerate(zip(FOLLOW_UPS, fu_days, rows[1:]), 1):
            has_post = not (scenario == "missing_post" and label == "fu06")
            add(f"s1_{label}", abl1 + dt.timedelta(days=days), "follow_up", 1, abl1,
                cat if has_post else "indeterminate", lesion(scale, fi, nod), has_post)

    vendor = VENDORS[index % len(VENDORS)]
    return PatientPlan(index, f"ABL-{index + 1:03d}", scenario, vendor, ablation_dates, anatomy, studies)
