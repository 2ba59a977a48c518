"""load_series: exact physical geometry, and a precise error for every broken series."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.uid import generate_uid

from pipeline.core.records import SeriesRecord
from pipeline.imaging.volumes import SeriesGeometryError, SeriesPixelDataError, load_series
from tests.dicom_factory import SeriesSpec, rotation, truncate, write_series


def _record(files: list[Path]) -> SeriesRecord:
    return SeriesRecord("P1", "1.2", "1.2.3", 5, "t1_vibe_fs_tra_pre", "MR", "SIEMENS",
                        sorted(files))


def _volume(shape=(9, 14, 12), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 1000, size=shape).astype(float)


def _physical(spec: SeriesSpec, ijk: tuple[int, int, int]) -> np.ndarray:
    """Ground truth: LPS position of voxel (i, j, k) of ``spec`` (the DICOM equation)."""
    d = np.asarray(spec.direction, float)
    return np.asarray(spec.origin) + d @ (np.asarray(ijk) * np.asarray(spec.spacing))


def test_oblique_anisotropic_round_trip(tmp_path: Path) -> None:
    spec = SeriesSpec(volume=_volume(), origin=(-50.3, 20.1, 33.7), spacing=(0.8, 1.1, 2.5),
                      direction=rotation(rx_deg=20, rz_deg=10),
                      rescale_slope=0.5, rescale_intercept=-100.0)
    files = write_series(spec, tmp_path / "s", shuffle_seed=3)  # file order != slice order
    img = load_series(_record(files))

    assert img.GetPixelID() == sitk.sitkFloat32
    assert img.GetSize() == (12, 14, 9)
    np.testing.assert_allclose(img.GetOrigin(), spec.origin, atol=1e-4)
    np.testing.assert_allclose(img.GetSpacing(), spec.spacing, atol=1e-4)
    np.testing.assert_allclose(np.reshape(img.GetDirection(), (3, 3)), spec.direction, atol=1e-6)
    for ijk in [(0, 0, 0), (3, 5, 7), (11, 13, 8)]:
        point = _physical(spec, ijk)
        assert img.TransformPhysicalPointToIndex(tuple(point)) == ijk
        expected = np.round((spec.volume[ijk[::-1]] + 100) / 0.5) * 0.5 - 100
        assert img.GetPixel(ijk) == pytest.approx(expected)

    # An independent reader (GDCM inside SimpleITK) agrees on geometry and values.
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(tmp_path / "s")))
    ref = reader.Execute()
    np.testing.assert_allclose(img.GetOrigin(), ref.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(img.GetSpacing(), ref.GetSpacing(), atol=1e-4)
    np.testing.assert_allclose(img.GetDirection(), ref.GetDirection(), atol=1e-5)
    np.testing.assert_allclose(sitk.GetArrayFromImage(img), sitk.GetArrayFromImage(ref))


def test_flipped_axis_keeps_marker_in_place(tmp_path: Path) -> None:
    """Negated column cosine and slices stacked against the normal: the loader reverses the
    slice order and the direction; a marker voxel must stay at its physical position."""
    r = np.array([1.0, 0.0, 0.0])
    c = np.array([0.0, -1.0, 0.0])  # column cosine flipped (posterior -> anterior)
    stack = -np.cross(r, c)  # slices written in the direction opposite to r x c
    direction = np.column_stack([r, c, stack])
    vol = np.zeros((6, 10, 8))
    vol[1, 3, 2] = 900.0  # marker at index (i=2, j=3, k=1)
    spec = SeriesSpec(volume=vol, origin=(10.0, 40.0, -7.0), spacing=(1.5, 2.0, 3.0),
                      direction=direction)
    img = load_series(_record(write_series(spec, tmp_path / "f", shuffle_seed=1)))

    marker = _physical(spec, (2, 3, 1))
    idx = img.TransformPhysicalPointToIndex(tuple(marker))
    assert img.GetPixel(idx) == 900.0
    np.testing.assert_allclose(img.TransformIndexToPhysicalPoint(idx), marker, atol=1e-4)
    d = np.reshape(img.GetDirection(), (3, 3))
    np.testing.assert_allclose(d[:, 1], c, atol=1e-6)  # flipped cosine kept
    np.testing.assert_allclose(d[:, 2], np.cross(r, c), atol=1e-6)  # sorted along the normal
    # Dropping the direction would put the marker elsewhere: the test above is meaningful.
    no_dir = sitk.Image(img)
    no_dir.SetDirection(np.eye(3).ravel().tolist())
    idx2 = no_dir.TransformPhysicalPointToIndex(tuple(marker))
    inside = all(0 <= a < s for a, s in zip(idx2, no_dir.GetSize()))
    assert not inside or no_dir.GetPixel(idx2) != 900.0


def _expect(files: list[Path], fragment: str, exc=SeriesGeometryError) -> str:
    with pytest.raises(exc) as info:
        load_series(_record(files))
    assert fragment in str(info.value), str(info.value)
    return str(info.value)


def test_missing_slice(tmp_path: Path) -> None:
    spec = SeriesSpec(volume=_volume(), spacing=(1, 1, 2.0))
    files = write_series(spec, tmp_path, skip_slices=(4,))
    msg = _expect(files, "missing slice(s)")
    assert "gap of 4.00 mm" in msg and "1 slice(s) missing" in msg


def test_duplicate_positions(tmp_path: Path) -> None:
    files = write_series(SeriesSpec(volume=_volume()), tmp_path)
    ds = pydicom.dcmread(files[2])
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    dup = tmp_path / "dup.dcm"
    ds.save_as(dup)
    _expect(files + [dup], "duplicate slice positions")


def test_non_uniform_spacing(tmp_path: Path) -> None:
    files = write_series(SeriesSpec(volume=_volume(), spacing=(1, 1, 2.0)), tmp_path)
    ds = pydicom.dcmread(files[5])
    ipp = [float(v) for v in ds.ImagePositionPatient]
    ds.ImagePositionPatient = [ipp[0], ipp[1], ipp[2] + 0.7]
    ds.save_as(files[5])
    _expect(files, "non-uniform slice spacing")


def test_mixed_orientation_and_single_slice(tmp_path: Path) -> None:
    a = write_series(SeriesSpec(volume=_volume((4, 14, 12))), tmp_path / "a")
    b = write_series(SeriesSpec(volume=_volume((4, 14, 12)), direction=rotation(rx_deg=90),
                                origin=(0, 0, 50)), tmp_path / "b")
    _expect(a + b, "mixed orientations")
    _expect(a[:1], "a single slice")


def test_truncated_pixel_data(tmp_path: Path) -> None:
    files = write_series(SeriesSpec(volume=_volume()), tmp_path)
    truncate(files[3], 0.8)
    _expect(files, "pixel data cannot be decoded", SeriesPixelDataError)


def test_independent_of_file_names(tmp_path: Path) -> None:
    """Same series, different file names/order and no extension: identical image."""
    spec = SeriesSpec(volume=_volume(), direction=rotation(ry_deg=-15), spacing=(0.7, 0.7, 3))
    a = load_series(_record(write_series(spec, tmp_path / "a", shuffle_seed=None)))
    b_files = write_series(spec, tmp_path / "b", shuffle_seed=7, extension="")
    shutil.rmtree(tmp_path / "a")
    b = load_series(_record(b_files))
    assert a.GetOrigin() == b.GetOrigin() and a.GetDirection() == b.GetDirection()
    np.testing.assert_array_equal(sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b))
