"""Every transfer syntax and multi-frame objects, from the real DICOM files bundled in pydicom.

pydicom 3 ships a few test files inside its package (the rest it downloads on demand, which
is impossible here): ``MR_small.dcm`` and its Implicit VR, Big Endian, RLE, JPEG-LS and
JPEG 2000 variants are bundled. The variants that are not (deflated, JPEG lossless, JPEG
baseline) are re-encoded from MR_small by ``phantom.transcode`` (library encoders).
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from phantom.enhanced import to_enhanced
from phantom.transcode import LOSSY, SYNTAXES, save, transcode
from pipeline.core.config import load_config
from pipeline.core.records import SeriesRecord
from pipeline.imaging.volumes import SeriesGeometryError, load_series
from pipeline.ingest.headers import read_header
from pipeline.ingest.index import index_export
from tests.dicom_factory import truncate

BUNDLED = {
    "explicit_le": "MR_small.dcm",
    "implicit_le": "MR_small_implicit.dcm",
    "explicit_be": "MR_small_bigendian.dcm",
    "rle": "MR_small_RLE.dcm",
    "jpeg_ls": "MR_small_jpeg_ls_lossless.dcm",
    "jpeg_2000": "MR_small_jp2klossless.dcm",
}
N_SLICES = 4


def _read(name: str) -> pydicom.Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom.dcmread(get_testdata_file(name))


@pytest.fixture(scope="module")
def reference() -> np.ndarray:
    """MR_small's stored values (int16), the truth every lossless variant must decode to."""
    return _read("MR_small.dcm").pixel_array.astype(np.float32)


def _stack(source: pydicom.Dataset, out_dir: Path, syntax: str | None, *, series_uid: str | None = None,
           spacing_mm: float = 5.0, extension: str = ".dcm") -> list[Path]:
    """N_SLICES copies of one slice along its normal, as one series in ``syntax``
    (None: keep the source's encoding byte for byte, only the geometry tags change)."""
    iop = np.asarray([float(v) for v in source.ImageOrientationPatient])
    normal = np.cross(iop[:3], iop[3:])
    ipp0 = np.asarray([float(v) for v in source.ImagePositionPatient])
    series_uid = series_uid or generate_uid()
    paths = []
    for k in range(N_SLICES):
        ds = transcode(source, syntax) if syntax else pydicom.Dataset(source)
        if syntax is None:
            ds.file_meta = pydicom.dataset.FileMetaDataset(source.file_meta)
            ds.preamble = source.preamble
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.SeriesInstanceUID = series_uid
        ds.ImagePositionPatient = [f"{v:.4f}" for v in ipp0 + k * spacing_mm * normal]
        ds.InstanceNumber = k + 1
        paths.append(save(ds, out_dir / f"slice{k}{extension}"))
    return paths


def _record(files: list[Path]) -> SeriesRecord:
    return SeriesRecord("P", "1.2", "1.2.3", 1, "MR_small stack", "MR", "TOSHIBA", files)


@pytest.mark.parametrize("syntax", sorted(SYNTAXES))
def test_every_transfer_syntax_decodes_to_the_same_volume(syntax: str, tmp_path: Path, reference) -> None:
    """Bundled variants are used as they are (their own bytes); the others re-encoded."""
    if syntax in BUNDLED:
        source = _read(BUNDLED[syntax])
        assert source.file_meta.TransferSyntaxUID == SYNTAXES[syntax]
        files = _stack(source, tmp_path, None)
    else:
        files = _stack(_read("MR_small.dcm"), tmp_path, syntax)
    assert pydicom.dcmread(files[0], stop_before_pixels=True).file_meta.TransferSyntaxUID == SYNTAXES[syntax]
    img = load_series(_record(files))
    import SimpleITK as sitk

    arr = sitk.GetArrayFromImage(img)
    assert arr.shape == (N_SLICES, 64, 64)
    np.testing.assert_allclose(img.GetSpacing()[2], 5.0, atol=1e-3)
    if syntax in LOSSY:
        # Lossy 8-bit JPEG of a 12-bit image: within two 8-bit steps on average, same picture.
        step = (reference.max() - reference.min()) / 255
        assert np.abs(arr[0] - reference).mean() < 2 * step
        assert np.corrcoef(arr[0].ravel(), reference.ravel())[0, 1] > 0.99
    else:
        for k in range(N_SLICES):
            np.testing.assert_array_equal(arr[k], reference)
    # The header reader catalogues it as an image, whatever the syntax.
    row = read_header(str(files[0]))
    assert row["status"] == "ok", row["reason"]
    assert row["transfer_syntax"] == SYNTAXES[syntax]


def test_files_without_meta_or_truncated_are_reported() -> None:
    """Bundled odd files: no File Meta (old exports), truncated pixel data, non-image objects."""
    assert read_header(get_testdata_file("no_meta.dcm"))["status"] in ("ok", "error")
    truncated = read_header(get_testdata_file("MR_truncated.dcm"))
    assert truncated["status"] == "error" and truncated["reason"].startswith("truncated DICOM: pixel data has")
    for name, what in [("rtplan.dcm", "RT Plan Storage"), ("rtstruct.dcm", "RT Structure Set Storage"),
                       ("rtdose.dcm", "RT Dose Storage"), ("reportsi.dcm", "Basic Text SR Storage"),
                       ("test-SR.dcm", "Comprehensive SR Storage"),
                       ("waveform_ecg.dcm", "12-lead ECG Waveform Storage")]:
        row = read_header(get_testdata_file(name))
        assert row["status"] == "error" and row["reason"] == f"non-image object ({what}) skipped", (name, row)
    lit = read_header(get_testdata_file("ExplVR_LitEndNoMeta.dcm"))  # an RT Plan, no preamble nor meta
    assert lit["status"] == "error" and "Plan Storage) skipped" in lit["reason"], lit


def _enhanced(tmp_path: Path, echoes: list[float] | None = None) -> tuple[Path, list[Path]]:
    """An Enhanced MR file built from a single-frame stack of MR_small (same geometry)."""
    singles = _stack(_read("MR_small.dcm"), tmp_path / "single", "explicit_le")
    slices = [pydicom.dcmread(p) for p in singles]
    slices[1].RescaleSlope, slices[1].RescaleIntercept = 1.0, 0.0
    if echoes:
        slices = slices + slices  # the same positions twice, one per echo
    mf = to_enhanced(slices[::-1], generate_uid(), per_frame_echo=echoes)  # frames out of order
    return save(mf, tmp_path / "multi" / "ENHANCED"), singles


def test_enhanced_multiframe_matches_single_frame(tmp_path: Path) -> None:
    multi, singles = _enhanced(tmp_path)
    import SimpleITK as sitk

    a, b = load_series(_record([multi])), load_series(_record(singles))
    assert a.GetSize() == b.GetSize() == (64, 64, N_SLICES)
    np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), atol=1e-6)
    np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), atol=1e-4)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b))
    # Per-frame rescale comes from the functional groups.
    ds = pydicom.dcmread(multi)
    ds.SharedFunctionalGroupsSequence[0].PixelValueTransformationSequence[0].RescaleSlope = 2.0
    ds.SharedFunctionalGroupsSequence[0].PixelValueTransformationSequence[0].RescaleIntercept = -5.0
    ds.save_as(multi)
    c = load_series(_record([multi]))
    np.testing.assert_allclose(sitk.GetArrayFromImage(c), sitk.GetArrayFromImage(b) * 2 - 5)
    # Ingest catalogues the enhanced file with the geometry of its functional groups.
    row = read_header(str(multi))
    assert row["status"] == "ok" and row["n_frames"] == N_SLICES
    assert row["iop"] and row["pixel_spacing"] and row["echo_time"] is not None


def test_multi_echo_enhanced_is_several_stacks(tmp_path: Path) -> None:
    multi, _ = _enhanced(tmp_path, echoes=[4.0] * N_SLICES + [9.0] * N_SLICES)
    with pytest.raises(SeriesGeometryError) as info:
        load_series(_record([multi]))
    assert "several stacks in one series: 2 stacks by EchoTime: 4.0 (4 slices), 9.0 (4 slices)" in str(info.value)


def test_multi_frame_without_functional_groups(tmp_path: Path) -> None:
    multi, _ = _enhanced(tmp_path)
    ds = pydicom.dcmread(multi)
    del ds.PerFrameFunctionalGroupsSequence
    ds.save_as(multi)
    with pytest.raises(SeriesGeometryError, match="without a per-frame functional group per frame"):
        load_series(_record([multi]))


def test_dicomdir_is_honoured(tmp_path: Path) -> None:
    """pydicom's bundled DICOMDIR test set: the index is read, every file it lists is found,
    and a listed file that is missing from the export is reported."""
    root = Path(pydicom.data.get_testdata_file("dicomdirtests/DICOMDIR")).parent
    export = tmp_path / "export"
    shutil.copytree(root, export, ignore=shutil.ignore_patterns("DICOMDIR-*", "*.txt"))
    missing = export / "77654033" / "CR1" / "6154"
    missing.unlink()
    res = index_export(export, tmp_path / "cat.db", load_config().ingest)
    reasons = [(e.path, e.reason) for e in res.errors]
    assert not any(p == str(export / "DICOMDIR") for p, _ in reasons), reasons  # the index is no error
    listed_missing = [r for p, r in reasons if p == str(missing)]
    assert listed_missing == ["listed in DICOMDIR but missing from the export"]
    assert res.dicomdir_files > 10  # records read from the index


def test_header_longer_than_the_in_memory_prefix(tmp_path: Path) -> None:
    """A Siemens CSA-like private element of 100 kB before the pixel data: the header is read
    past the in-memory prefix, and a cut inside that element is still a truncation."""
    ds = _read("MR_small.dcm")
    ds.add_new(0x00290010, "LO", "SIEMENS CSA HEADER")
    ds.add_new(0x00291010, "OB", bytes(range(256)) * 400)
    path = save(ds, tmp_path / "csa.dcm")
    row = read_header(str(path))
    assert row["status"] == "ok" and row["rows"] == 64 and row["series_uid"] == ds.SeriesInstanceUID
    data = path.read_bytes()
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(data[: 80_000])  # inside the private element, beyond the 64 KiB prefix
    assert read_header(str(cut))["reason"].startswith("truncated DICOM")


@pytest.mark.parametrize("syntax", sorted(k for k, uid in SYNTAXES.items() if pydicom.uid.UID(uid).is_compressed))
def test_compressed_pixel_data_cut_short_is_a_file_error_at_ingest(syntax: str, tmp_path: Path) -> None:
    """Issue 16: a compressed file cut short was only found when its series was decoded, so in a
    series no stage uses it went unreported. Ingest now walks the fragments (no decoding)."""
    files = _stack(_read("MR_small.dcm"), tmp_path / syntax, syntax)
    assert all(read_header(str(f))["status"] == "ok" for f in files)  # intact files pass
    truncate(files[1], 0.8)
    row = read_header(str(files[1]))
    assert row["status"] == "error" and row["reason"].startswith("truncated DICOM: compressed pixel data"), row
    data = bytearray(files[2].read_bytes())
    at = data.rindex(b"\xfe\xff\x00\xe0")  # the last fragment's item tag, overwritten
    data[at:at + 4] = b"\x08\x00\x20\x00"
    files[2].write_bytes(bytes(data))
    row = read_header(str(files[2]))
    assert row["status"] == "error" and row["reason"].startswith("corrupt DICOM: compressed pixel data"), row


@pytest.mark.parametrize("syntax", ["rle", "jpeg_ls", "jpeg_2000", "jpeg_lossless"])
def test_a_lossless_transcoding_keeps_the_instance_uid(syntax: str) -> None:
    # The same seed gives the same export: pydicom's encoders would otherwise draw a new UID.
    source = _read("MR_small.dcm")
    uid = str(source.SOPInstanceUID)
    assert transcode(source, syntax).SOPInstanceUID == uid
