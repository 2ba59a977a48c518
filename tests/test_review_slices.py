"""Slices of the review app: the baseline lands where to_baseline.tfm says, PNGs keep geometry."""

from __future__ import annotations

import io

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from pipeline.review import slices

SPACING = (1.5, 0.75, 3.0)
DIRECTION = (-1, 0, 0, 0, 1, 0, 0, 0, 1)  # columns run right->left: a flipped x axis
SIZE = (40, 30, 10)


def _grid(origin) -> sitk.Image:
    img = sitk.Image(SIZE, sitk.sitkUInt8)
    img.SetSpacing(SPACING)
    img.SetDirection(DIRECTION)
    img.SetOrigin(origin)
    return img


def _write(folder, origin, marker_mm=None):
    """A study folder whose labels hold one 3x3x1 marker centred on ``marker_mm`` (LPS)."""
    folder.mkdir(parents=True)
    labels = _grid(origin)
    if marker_mm is not None:
        i, j, k = labels.TransformPhysicalPointToIndex(marker_mm)
        for di in (-1, 0, 1):
            for dj in (-1, 0, 1):
                labels[i + di, j + dj, k] = 3
    sitk.WriteImage(labels, str(folder / "labels.nii.gz"))
    for name in ("pre_registered", "subtraction"):
        sitk.WriteImage(sitk.Cast(labels, sitk.sitkFloat32) * 10.0, str(folder / f"{name}.nii.gz"))
    return labels


def test_baseline_is_moved_onto_the_follow_up_grid_by_the_inverse_of_to_baseline(tmp_path):
    out = tmp_path / "out"
    # The follow-up's grid and the baseline's grid differ (another origin: repositioning).
    current = _write(out / "patients/P/2026-02-01_b", origin=(100.0, -20.0, 5.0))
    baseline_point = (80.0, -5.0, 17.0)
    _write(out / "patients/P/2026-01-01_a", origin=(95.0, -25.0, 2.0), marker_mm=baseline_point)
    # to_baseline maps a baseline point to the follow-up point (ITK, baseline fixed).
    offset = (-6.0, 4.5, 3.0)
    sitk.WriteTransform(sitk.TranslationTransform(3, offset), str(out / "patients/P/2026-02-01_b/to_baseline.tfm"))
    key = slices.case_key(out, "patients/P/2026-02-01_b", "patients/P/2026-01-01_a", None, None, True)
    vol = slices.load_case(key)

    expected = tuple(p + o for p, o in zip(baseline_point, offset))
    i, j, k = current.TransformPhysicalPointToIndex(expected)
    moved = vol.labels["baseline"]  # (k, j, i)
    assert moved[k, j, i] == 3
    found = np.argwhere(moved == 3)
    assert found.mean(axis=0) == pytest.approx((k, j, i), abs=0.01)
    # The follow-up's own labels are untouched; post is absent and the page is told why.
    assert not vol.labels["current"].any()
    assert not vol.available("current", "post") and any("post-contrast not shown" in n for n in vol.notes)
    assert vol.available("baseline", "overlay") and vol.letters == ("L", "R", "A", "P")


def test_failed_baseline_registration_is_not_shown(tmp_path):
    out = tmp_path / "out"
    _write(out / "patients/P/b", origin=(0.0, 0.0, 0.0))
    _write(out / "patients/P/a", origin=(0.0, 0.0, 0.0), marker_mm=(-20.0, 10.0, 12.0))
    sitk.WriteTransform(sitk.TranslationTransform(3, (0.0, 0.0, 0.0)), str(out / "patients/P/b/to_baseline.tfm"))
    vol = slices.load_case(slices.case_key(out, "patients/P/b", "patients/P/a", None, None, False))
    assert not vol.available("baseline", "pre") and any("registration to the baseline" in n for n in vol.notes)


def test_png_has_square_physical_pixels_and_the_overlay_colours(tmp_path):
    out = tmp_path / "out"
    _write(out / "patients/P/b", origin=(0.0, 0.0, 0.0), marker_mm=(-30.0, 11.0, 12.0))
    key = slices.case_key(out, "patients/P/b", None, None, None, False)
    k = int(np.argwhere(slices.load_case(key).labels["current"] == 3)[0][0])
    image = Image.open(io.BytesIO(slices.slice_png(key, "current", "overlay", k)))
    # 40 columns of 1.5 mm and 30 rows of 0.75 mm: 60 mm x 22.5 mm at 0.75 mm per pixel.
    assert image.size == (80, 30)
    pixels = np.asarray(image.convert("RGB")).reshape(-1, 3)
    assert any(r > 200 and g < 120 for r, g, _ in pixels)  # the red focus is drawn
    assert slices.slice_png(key, "current", "overlay", k) is slices.slice_png(key, "current", "overlay", k)
    with pytest.raises(KeyError):
        slices.slice_png(key, "current", "../labels", k)


def test_baseline_and_follow_up_subtractions_share_one_window(tmp_path):
    """Issue 18: each subtraction was windowed on its own, so a faint follow-up looked as bright
    as a strongly enhancing baseline."""
    out = tmp_path / "out"
    _write(out / "patients/P/b", origin=(0.0, 0.0, 0.0), marker_mm=(-20.0, 10.0, 12.0))
    _write(out / "patients/P/a", origin=(0.0, 0.0, 0.0), marker_mm=(-20.0, 10.0, 12.0))
    for study, value in (("b", 7.5), ("a", 30.0)):  # the follow-up enhances a quarter as much
        labels = sitk.ReadImage(str(out / f"patients/P/{study}/labels.nii.gz"))
        sitk.WriteImage(sitk.Cast(labels, sitk.sitkFloat32) * 0.0 + value, str(out / f"patients/P/{study}/subtraction.nii.gz"))
    sitk.WriteTransform(sitk.TranslationTransform(3, (0.0, 0.0, 0.0)), str(out / "patients/P/b/to_baseline.tfm"))
    vol = slices.load_case(slices.case_key(out, "patients/P/b", "patients/P/a", None, None, True))
    assert vol.windows[("current", "subtraction")] == vol.windows[("baseline", "subtraction")]
    lo, hi = vol.windows[("baseline", "subtraction")]
    assert hi == pytest.approx(30.0, rel=0.01) and lo == -hi  # the baseline's (stronger) window
    # The same tissue renders darker in the fainter study.
    k = int(np.argwhere(vol.labels["current"] == 3)[0][0])
    current = np.asarray(slices.render_slice(vol, "current", "subtraction", k))
    baseline = np.asarray(slices.render_slice(vol, "baseline", "subtraction", k))
    assert current.max() < baseline.max()


def test_enhancement_above_surroundings_is_a_panel_only_where_it_was_written(tmp_path):
    """A zone read above enhancing parenchyma keeps above_surroundings.nii.gz (what its rim and
    foci were read on): the reviewer sees it beside the subtraction, on one window for both
    studies; a study without it has no such panel."""
    out = tmp_path / "out"
    _write(out / "patients/P/b", origin=(0.0, 0.0, 0.0), marker_mm=(-20.0, 10.0, 12.0))
    _write(out / "patients/P/a", origin=(0.0, 0.0, 0.0), marker_mm=(-20.0, 10.0, 12.0))
    sitk.WriteTransform(sitk.TranslationTransform(3, (0.0, 0.0, 0.0)), str(out / "patients/P/b/to_baseline.tfm"))
    key = slices.case_key(out, "patients/P/b", "patients/P/a", None, None, True)
    assert not any(slices.load_case(key).available(v, "above") for v in slices.VIEWS)
    for study, value in (("b", 0.2), ("a", 0.8)):
        labels = sitk.ReadImage(str(out / f"patients/P/{study}/labels.nii.gz"))
        above = sitk.Cast(labels, sitk.sitkFloat32) * 0.0 + value
        sitk.WriteImage(above, str(out / f"patients/P/{study}/above_surroundings.nii.gz"))
    key = slices.case_key(out, "patients/P/b", "patients/P/a", None, None, True)  # new mtimes: a new key
    vol = slices.load_case(key)
    assert vol.available("current", "above") and vol.available("baseline", "above")
    assert vol.windows[("current", "above")] == vol.windows[("baseline", "above")]
    assert vol.windows[("current", "above")][1] == pytest.approx(0.8, rel=0.01)
    k = int(np.argwhere(vol.labels["current"] == 3)[0][0])
    assert Image.open(io.BytesIO(slices.slice_png(key, "current", "above", k))).size == (80, 30)
