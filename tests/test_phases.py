"""Another phase's relative enhancement brought onto the grid segmented (pipeline/imaging/phases.py).

The chain chosen grid -> pre -> that phase decides where an arterial-phase nodule lands on the
grid the foci are judged on (pipeline/segmentation/surroundings.py): composed the wrong way
round, the nodule lands beside itself. The registration is replaced by the known transforms so
that the test checks the composition alone, in LPS millimetres.
"""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

import pipeline.imaging.phases as phases
from pipeline.core.config import load_config
from pipeline.core.records import RegistrationQC, SeriesRecord, SeriesRole

SIZE = (60, 60, 30)  # x, y, z voxels
SPACING = (2.0, 2.0, 2.0)
ORIGIN = (-60.0, -60.0, -30.0)
NODULE_PRE_LPS = np.array([12.0, -8.0, 4.0])  # where the nodule is in the pre-contrast's space


def volume(shift_mm: np.ndarray, nodule_re: float) -> sitk.Image:
    """The body (a ball of 45 mm) and a 7 mm nodule, the patient moved by ``shift_mm`` (LPS)."""
    image = sitk.Image(SIZE, sitk.sitkFloat32)
    image.SetSpacing(SPACING)
    image.SetOrigin(ORIGIN)
    z, y, x = np.meshgrid(*(np.arange(n) * s + o for n, s, o in zip(SIZE[::-1], SPACING[::-1], ORIGIN[::-1])),
                          indexing="ij")
    p = np.stack([x, y, z], axis=-1) - shift_mm
    body = np.linalg.norm(p, axis=-1) <= 45.0
    nodule = np.linalg.norm(p - NODULE_PRE_LPS, axis=-1) <= 7.0
    arr = np.where(body, 100.0, 0.0) * (1.0 + nodule_re * nodule)
    out = sitk.GetImageFromArray(arr.astype(np.float32))
    out.CopyInformation(image)
    return out


def translation(offset_mm) -> sitk.Transform:
    return sitk.TranslationTransform(3, tuple(float(v) for v in offset_mm))


@pytest.mark.parametrize("phase_shift, chosen_shift", [((6.0, 0.0, 0.0), (0.0, -5.0, 0.0)),
                                                       ((0.0, 0.0, -4.0), (5.0, 3.0, 0.0))])
def test_another_phase_lands_where_the_anatomy_is_on_the_grid_segmented(phase_shift, chosen_shift, monkeypatch):
    phase_shift, chosen_shift = np.array(phase_shift), np.array(chosen_shift)
    pre = volume(np.zeros(3), 0.0)
    arterial = volume(phase_shift, 1.0)  # the patient moved by phase_shift; the nodule enhances
    chosen_grid = volume(chosen_shift, 0.0)  # only its grid is used
    qc = RegistrationQC(name="pre_to_post_phase1", method="test", metric="none", metric_before=0.0, metric_after=0.0,
                        iterations=0, stop_condition="", motion_corrected_mm=0.0, ok=True)
    # A point x of a phase's grid holds the anatomy found at x - shift in the pre-contrast.
    monkeypatch.setattr(phases, "load_series", lambda series: arterial)
    monkeypatch.setattr(phases, "register_intra_study", lambda fixed, moving, cfg, name: (translation(-phase_shift), qc))
    series = SeriesRecord("P", "1.2", "1.2.3", 5, "arterial", "MR", "x", [], role=SeriesRole.T1_POST, phase_index=1)
    re = phases.relative_enhancement_on_grid(series, pre, chosen_grid, translation(-chosen_shift),
                                             load_config().registration)
    assert re is not None
    arr = sitk.GetArrayFromImage(re)
    zyx = np.argwhere(arr > 0.5)
    assert len(zyx) > 20
    centre = np.mean([re.TransformIndexToPhysicalPoint(tuple(int(v) for v in p[::-1])) for p in zyx], axis=0)
    np.testing.assert_allclose(centre, NODULE_PRE_LPS + chosen_shift, atol=1.0)
