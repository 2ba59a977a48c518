"""Which follow-up foci enhanced at the registered baseline already (pipeline/measurement/baseline_comparison.py)."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from pipeline.core.records import Focus, Label
from pipeline.measurement.baseline_comparison import foci_seen_at_baseline, focus_voxels
from pipeline.measurement.study import StudyImages

SHAPE = (20, 60, 60)  # z, y, x
SPACING = (1.5, 1.5, 3.0)  # x, y, z mm
SHIFT_LPS = np.array([6.0, -4.5, 3.0])  # where the follow-up sees a baseline point: baseline point + shift
# Boxes (z, y, x slices) of the baseline: A enhances (an organ's edge), C is the baseline's own
# suspicious focus (a residual tumour), B does not enhance.
BOX = {"A": (slice(8, 12), slice(10, 20), slice(10, 20)),
       "B": (slice(8, 12), slice(40, 50), slice(10, 20)),
       "C": (slice(8, 12), slice(40, 50), slice(40, 50))}


def _image(arr: np.ndarray, origin=(0.0, 0.0, 0.0)) -> sitk.Image:
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(SPACING)
    img.SetOrigin(tuple(float(v) for v in origin))
    return img


def _studies(above_surroundings: bool = False):
    """(follow-up, baseline, baseline -> follow-up transform): the follow-up's grid is the
    baseline's moved by SHIFT_LPS, so a voxel index names the same anatomy in both."""
    pre = np.zeros(SHAPE, np.float32)
    pre[:, 4:-4, 4:-4] = 100.0  # the body, in air
    sub = np.zeros(SHAPE, np.float32)
    sub[BOX["A"]] = 80.0  # RE 0.8
    sub[BOX["C"]] = 90.0
    base_labels = np.zeros(SHAPE, np.uint8)
    base_labels[BOX["C"]] = Label.ENHANCING_FOCUS
    fu_labels = np.zeros(SHAPE, np.uint8)
    for box in BOX.values():
        fu_labels[box] = Label.ENHANCING_FOCUS
    above = _image(sub / 100.0) if above_surroundings else None
    baseline = StudyImages(post=_image(pre + sub), pre_registered=_image(pre), subtraction=_image(sub),
                           labels=_image(base_labels), above_surroundings=above)
    fu_grid = dict(origin=SHIFT_LPS)
    follow_up = StudyImages(post=_image(pre, **fu_grid), pre_registered=_image(pre, **fu_grid),
                            subtraction=_image(sub, **fu_grid), labels=_image(fu_labels, **fu_grid))
    transform = sitk.TranslationTransform(3, SHIFT_LPS.tolist())
    return follow_up, baseline, transform


def _focus(box: str, suspicious: bool = True, offset_mm: float = 0.0) -> Focus:
    z, y, x = (0.5 * (s.start + s.stop - 1) for s in BOX[box])
    centre = SHIFT_LPS + np.array([x * SPACING[0] + offset_mm, y * SPACING[1], z * SPACING[2]])
    return Focus(centroid_lps=centre.tolist(), volume_ml=0.5, diameter_mm=15.0, max_thickness_mm=8.0,
                 distance_to_az_surface_mm=1.0, mean_relative_enhancement=0.8, angular_extent_deg=40.0,
                 pattern="focal", local=True, suspicious=suspicious, reason="nodular")


def test_a_focus_over_tissue_enhancing_at_the_baseline_is_seen_there_a_new_one_and_a_residual_are_not():
    follow_up, baseline, transform = _studies()
    foci = [_focus("A"), _focus("B"), _focus("C"), _focus("A", suspicious=False)]
    out = foci_seen_at_baseline(foci, follow_up, baseline, transform, False, 0.15)
    assert [f.seen_at_baseline_fraction for f in out] == [pytest.approx(1.0), 0.0, 0.0, None]
    # The transform's direction matters: its inverse would look 7-9 mm away.
    wrong = foci_seen_at_baseline(foci, follow_up, baseline, transform.GetInverse(), False, 0.15)
    assert wrong[0].seen_at_baseline_fraction < 0.5


def test_zone_in_parenchyma_is_compared_above_the_surroundings_or_not_at_all():
    follow_up, baseline, transform = _studies(above_surroundings=True)
    out = foci_seen_at_baseline([_focus("A"), _focus("B")], follow_up, baseline, transform, True, 0.15)
    assert [f.seen_at_baseline_fraction for f in out] == [pytest.approx(1.0), 0.0]
    # The baseline kept no map above its surroundings: nothing is measured (never discounted).
    follow_up, baseline, transform = _studies()
    out = foci_seen_at_baseline([_focus("A")], follow_up, baseline, transform, True, 0.15)
    assert out[0].seen_at_baseline_fraction is None


def test_without_a_usable_registration_nothing_is_measured_and_an_earlier_value_is_cleared():
    follow_up, baseline, _ = _studies()
    stale = _focus("A").model_copy(update={"seen_at_baseline_fraction": 0.9})
    assert foci_seen_at_baseline([stale], follow_up, baseline, None, False, 0.15)[0].seen_at_baseline_fraction is None


def test_a_focus_whose_centroid_lies_off_its_voxels_is_found_nearby():
    follow_up, _, _ = _studies()
    mask = focus_voxels(_focus("A", offset_mm=-9.0), follow_up.labels)  # 1.5 mm outside box A
    assert mask is not None and mask[BOX["A"]].all() and int(mask.sum()) == 400
    assert focus_voxels(_focus("A", offset_mm=-30.0), follow_up.labels) is None


def test_a_follow_up_stored_with_flipped_axes_gives_the_same_fractions():
    """Physical geometry end to end: the same follow-up anatomy on a grid whose x and y axes run
    the other way (direction -1, -1, 1; origin at the far corner) and the focus centroids in LPS."""
    follow_up, baseline, transform = _studies()
    flipped = sitk.Image(follow_up.labels)
    size = np.array(flipped.GetSize())
    far = np.array(follow_up.labels.TransformIndexToPhysicalPoint([int(v) for v in size - 1]))
    flipped.SetDirection((-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0))
    flipped.SetOrigin((float(far[0]), float(far[1]), follow_up.labels.GetOrigin()[2]))
    identity = sitk.Transform()

    def on_flipped(img, interpolator=sitk.sitkLinear):
        return sitk.Resample(img, flipped, identity, interpolator, 0.0, img.GetPixelID())

    moved = StudyImages(post=on_flipped(follow_up.post), pre_registered=on_flipped(follow_up.pre_registered),
                        subtraction=on_flipped(follow_up.subtraction),
                        labels=on_flipped(follow_up.labels, sitk.sitkNearestNeighbor))
    # The arrays really are reversed along x and y, the anatomy is where it was.
    np.testing.assert_array_equal(sitk.GetArrayFromImage(moved.labels),
                                  sitk.GetArrayFromImage(follow_up.labels)[:, ::-1, ::-1])
    foci = [_focus("A"), _focus("B"), _focus("C")]
    out = foci_seen_at_baseline(foci, moved, baseline, transform, False, 0.15)
    assert [f.seen_at_baseline_fraction for f in out] == [pytest.approx(1.0), 0.0, 0.0]
