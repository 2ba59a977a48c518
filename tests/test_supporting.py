"""Supporting signals: a phase's RE map already read on the chosen grid is not read again (issue 19)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

import pipeline.measurement.supporting as supporting
from pipeline.core.config import load_config
from pipeline.core.records import SeriesRecord, SeriesRole, StudyRecord


def _study() -> StudyRecord:
    series = [SeriesRecord("P1", "S1", f"S1.{i}", i, "t1 post", "MR", "X", [Path("x")], SeriesRole.T1_POST,
                           phase_index=i) for i in (1, 2, 3)]
    return StudyRecord("P1", "S1", None, "MRI", series)


def _map(value: float) -> sitk.Image:
    return sitk.GetImageFromArray(np.full((4, 5, 6), value, np.float32))


def test_a_phase_already_read_is_reused_and_an_unusable_one_not_read_again(monkeypatch):
    study = _study()
    chosen = study.series[2]
    mask = np.zeros((4, 5, 6), bool)
    mask[1:3, 1:4, 1:5] = True
    read = []

    def read_phase(series, *args):
        read.append(series.phase_index)
        return _map(0.5)

    monkeypatch.setattr(supporting, "relative_enhancement_on_grid", read_phase)
    registration = load_config(None).registration
    out = supporting.enhancement_by_phase(study, _map(0), chosen, _map(0), sitk.Euler3DTransform(), _map(0.9),
                                          [mask], registration, {"1": _map(1.4)})
    assert read == [2]  # phase 1 came from the map given, phase 3 is the chosen one
    assert out == [{"3": pytest.approx(0.9), "1": pytest.approx(1.4), "2": pytest.approx(0.5)}]
    read.clear()
    out = supporting.enhancement_by_phase(study, _map(0), chosen, _map(0), sitk.Euler3DTransform(), _map(0.9),
                                          [mask], registration, {"1": None})
    assert read == [2] and "1" not in out[0]  # read before and unusable: skipped, not retried
