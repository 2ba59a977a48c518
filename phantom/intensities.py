"""Tissue intensities: T1 fat-sat GRE per contrast phase, T2 fat-sat TSE, and the noise-free image.

Intensities are arbitrary units before vendor scaling (T1 fat-sat GRE: muscle ~260); noise,
coil bias and vendor storage are added by ``acquisition``.
"""

from __future__ import annotations

import numpy as np

from .body import Anatomy
from .lesion import LesionState
from .render import Rendered

T1_PHASE_SECONDS = (20, 70, 180)


def t1_tissue_values(anatomy: Anatomy, lesion: LesionState, phase_seconds: int | None) -> dict[str, float]:
    """T1 fat-sat GRE intensity per tissue; ``phase_seconds`` None = pre-contrast.

    Relative enhancement (RE) per phase 20 / 70 / 180 s: vessels +250 % then +180 %; rim
    strongest late (benign hyperaemia/granulation); nodule and tumour strongest arterial.
    """
    m = anatomy.muscle_t1
    pre = {"air": 0.0, "fat": 60.0, "muscle": m, "bone": 150.0, "vessel": 120.0,
           "az": lesion.az_t1_ratio * m, "rim": m, "nodule": 1.05 * m, "tumour": 1.05 * m,
           "septum": 60.0, "disc": 0.35 * m, "canal": 0.25 * m, "kidney_cortex": 0.95 * m,
           "kidney_medulla": 0.72 * m, "fluid": 0.2 * m, "bowel_wall": 0.95 * m, "spleen": 0.85 * m,
           "liver": 1.2 * m, "vein": 120.0}
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
        # Liver and its veins (the ``liver`` profile only, always with abdominal physiology):
        # the parenchyma takes ~75 % of its blood from the portal vein, so it enhances little in
        # the arterial phase and most in the portal-venous phase, then plateaus; the portal and
        # hepatic veins fill from the portal phase (the usual description of dynamic liver MRI
        # with an extracellular agent; LI-RADS v2018 names arterial hyper-enhancement of the
        # tumour against this parenchyma as its major feature). Engineering values, not measured.
        "liver": (0.25, 0.75, 0.6)[p],
        "vein": (0.4, 1.8, 1.4)[p],
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
            "fluid": 250.0, "bowel_wall": 110.0, "spleen": 150.0, "liver": 110.0, "vein": 40.0}


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
