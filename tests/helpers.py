"""Builders of hand-made records for rule tests (no images)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from pipeline.core.records import (
    AxisMeasurement,
    Focus,
    RimMetrics,
    SeriesRecord,
    SeriesRole,
    StudyImaging,
    StudyRecord,
)

DAY0 = dt.date(2024, 3, 1)


def study(uid: str, days: int, post: bool = True, patient: str = "P1") -> StudyRecord:
    series = [SeriesRecord(patient, uid, f"{uid}.1", 1, "t1 pre", "MR", "X", [Path("a")], SeriesRole.T1_PRE)]
    if post:
        series.append(SeriesRecord(patient, uid, f"{uid}.2", 2, "t1 post", "MR", "X", [Path("b")],
                                   SeriesRole.T1_POST, phase_index=1))
    return StudyRecord(patient, uid, DAY0 + dt.timedelta(days=days), "MRI", series)


def az(long_mm: float, short_mm: float | None = None, volume_ml: float | None = None) -> AxisMeasurement:
    short_mm = short_mm if short_mm is not None else 0.8 * long_mm
    volume = volume_ml if volume_ml is not None else 3.1416 / 6 * long_mm * short_mm * short_mm / 1000
    return AxisMeasurement(long_axis_mm=long_mm, short_axis_mm=short_mm, max_3d_diameter_mm=long_mm,
                           volume_ml=volume, slice_index=10, long_axis_endpoints_lps=[[0, 0, 0], [long_mm, 0, 0]],
                           short_axis_endpoints_lps=[[0, 0, 0], [0, short_mm, 0]], centroid_lps=[0, 0, 0],
                           measured_on="acquired_axial", in_plane_spacing_mm=[1.5, 1.5])


def focus(diameter: float = 8.0, thickness: float = 7.0, distance: float = 0.0, suspicious: bool = True) -> Focus:
    return Focus(centroid_lps=[10, 0, 0], volume_ml=0.3, diameter_mm=diameter, max_thickness_mm=thickness,
                 distance_to_az_surface_mm=distance, mean_relative_enhancement=0.9, angular_extent_deg=60,
                 pattern="focal" if distance <= 10 else "distant", local=distance <= 10, suspicious=suspicious,
                 reason="nodular")


def imaging(long_mm: float | None = 30.0, foci: list[Focus] | None = None, ok: bool = True,
            reason: str = "") -> StudyImaging:
    rim = RimMetrics(present=True, median_thickness_mm=1.5, max_thickness_mm=2.0, coverage_deg=350, cv=0.2,
                     volume_ml=1.0, benign_pattern=True)
    return StudyImaging(ok=ok, reason=reason, az_found=long_mm is not None,
                        ablation_zone=az(long_mm) if long_mm is not None else None, rim=rim, foci=foci or [])


def classify_sections(cfg):
    """What the per-patient driver hands ``classify_patient`` and ``assess_timeline``
    (pipeline/run/patient.py): the rules, the focus thresholds, the review uncertainty."""
    return cfg.rules, cfg.foci, cfg.segmentation.network_review_uncertainty
