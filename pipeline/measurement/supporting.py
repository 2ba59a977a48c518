"""Supporting signals of each suspicious focus: enhancement by phase and T2 signal (criteria.md
§2, rule 16). Reported in assessment.json; they never decide a category (off by default in the
rules, as the criteria ask), and a failure here only leaves a value empty.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from pipeline.core.config import RegistrationConfig
from pipeline.core.geometry import resample_to
from pipeline.core.records import SeriesRecord, SeriesRole, StudyRecord
from pipeline.imaging.phases import relative_enhancement_on_grid
from pipeline.imaging.volumes import SeriesGeometryError, load_series


def _mean(values: np.ndarray, mask: np.ndarray) -> float | None:
    return float(values[mask].mean()) if mask.any() else None


def enhancement_by_phase(
    study: StudyRecord, pre: sitk.Image, chosen: SeriesRecord, chosen_grid: sitk.Image,
    chosen_to_pre: sitk.Transform, chosen_re: sitk.Image, masks: list[np.ndarray], registration: RegistrationConfig,
    already_read: dict[str, sitk.Image | None] | None = None,
) -> list[dict[str, float]]:
    """Mean relative enhancement of each focus mask (on the chosen grid) in every usable phase.

    Each other phase is read by ``pipeline.imaging.phases.relative_enhancement_on_grid``, unless
    ``already_read`` holds its RE map on the chosen grid (None there: read and found unusable).
    Keys are phase indices as text.
    """
    out = [{} for _ in masks]
    re_chosen = sitk.GetArrayFromImage(chosen_re)
    for values, mask in zip(out, masks):
        mean = _mean(re_chosen, mask)
        if mean is not None:
            values[str(chosen.phase_index)] = round(mean, 3)
    for series in study.with_role(SeriesRole.T1_POST):
        if series is chosen or not masks:
            continue
        key = str(series.phase_index)
        if already_read is not None and key in already_read:
            re_here = already_read[key]
        else:
            re_here = relative_enhancement_on_grid(series, pre, chosen_grid, chosen_to_pre, registration)
        if re_here is None:
            continue
        re_on_chosen = sitk.GetArrayFromImage(re_here)
        for values, mask in zip(out, masks):
            mean = _mean(re_on_chosen, mask)
            if mean is not None:
                values[str(series.phase_index)] = round(mean, 3)
    return out


def t2_ratios(study: StudyRecord, grid: sitk.Image, az: np.ndarray, body: np.ndarray,
              masks: list[np.ndarray]) -> tuple[list[tuple[float | None, float | None]], str]:
    """(T2 of focus / T2 of AZ, T2 of focus / median T2 of the body) per focus, and a note.

    The T2 series of the same study is sampled in scanner coordinates (same FrameOfReference),
    not registered: T1/T2 contrast defeats the correlation QC, and over a focus of >= 6 mm the
    few millimetres of motion within one study change a mean little.
    """
    t2s = study.with_role(SeriesRole.T2)
    if not t2s or not masks:
        return [(None, None) for _ in masks], "no T2 series" if not t2s else ""
    try:
        t2 = load_series(t2s[0])
    except (SeriesGeometryError, OSError, ValueError) as exc:
        return [(None, None) for _ in masks], f"T2 unreadable: {exc}"
    identity = sitk.Euler3DTransform()
    covered = sitk.GetArrayFromImage(resample_to(sitk.Cast(t2 * 0 + 1, sitk.sitkFloat32), grid, identity)) > 0.5
    t2_a = sitk.GetArrayFromImage(resample_to(t2, grid, identity))
    az_t2 = _mean(t2_a, az & covered)
    body_t2 = float(np.median(t2_a[body & covered])) if (body & covered).any() else None
    out = []
    for mask in masks:
        focus_t2 = _mean(t2_a, mask & covered)
        out.append((
            None if focus_t2 is None or not az_t2 else round(focus_t2 / az_t2, 3),
            None if focus_t2 is None or not body_t2 else round(focus_t2 / body_t2, 3),
        ))
    return out, "T2 sampled in scanner coordinates (same study), not registered"
