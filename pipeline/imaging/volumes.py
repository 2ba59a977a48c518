"""Load one DICOM series as a float32 SimpleITK volume with exact physical geometry (LPS mm).

Why not ``sitk.ImageSeriesReader``: it sorts and stacks whatever it is given and says
nothing when a slice is missing, duplicated or from another orientation; here each of those
is a :class:`SeriesGeometryError` with a precise reason, because a silently wrong geometry
would corrupt every measurement downstream; it also reads multi-frame (Enhanced MR) files,
whose per-frame geometry the ITK reader ignores. Pixels are decoded by pydicom: its pixel
decoders handle RLE natively and JPEG baseline/extended/lossless, JPEG-LS and JPEG 2000
through the plugins declared in pyproject.toml (pylibjpeg + pylibjpeg-libjpeg,
pylibjpeg-openjpeg, pylibjpeg-rle; pyjpegls).

Conventions (DICOM PS3.3 C.7.6.2): ImageOrientationPatient = row cosine r (direction of
increasing column index) then column cosine c; PixelSpacing = (row spacing, column
spacing); slices are sorted by their position along n = r x c. The SimpleITK image has
index (i, j, k) = (column, row, slice), spacing (PixelSpacing[1], PixelSpacing[0], dz),
direction columns (r, c, n) and origin = ImagePositionPatient of the first sorted slice.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk

from pipeline.core.records import SeriesRecord
from pipeline.ingest.series_geometry import SeriesGeometryError, SeriesPixelDataError, check_volume, parse_geometry_tag

__all__ = ["SeriesGeometryError", "SeriesPixelDataError", "load_series"]


def _label(series: SeriesRecord) -> str:
    return f"series {series.series_number} '{series.series_description}'"


def _floats(ds: pydicom.Dataset, keyword: str, path: Path, label: str) -> np.ndarray:
    arr, problem = parse_geometry_tag(keyword, ds.get(keyword))
    if arr is None:
        raise SeriesGeometryError(f"{label}: {path.name}: {problem or f'{keyword} missing'}")
    return arr


def _number(value, keyword: str, default: float, where: str) -> float:
    """A numeric attribute (RescaleSlope, NumberOfFrames, ...): finite, else a geometry error
    naming the file and the tag (a nan slope would turn the whole volume into nan)."""
    if value is None or value == "":
        return default
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        number = float("nan")
    if not np.isfinite(number) or abs(number) > 1e12:
        raise SeriesGeometryError(f"{where}: {keyword} {str(value)[:40]!r} is not a finite number")
    return number


@dataclass
class _Slice:
    """One 2D image of the series: a single-frame file, or one frame of a multi-frame file."""

    path: Path
    frame: int | None  # None for a single-frame file
    ds: pydicom.Dataset
    ipp: np.ndarray
    iop: np.ndarray
    pixel_spacing: np.ndarray
    shape: tuple[int, int]
    slope: float
    intercept: float
    # Values that tell stacks apart when several share one SeriesInstanceUID.
    stack_keys: dict[str, str]

    @property
    def name(self) -> str:
        return self.path.name if self.frame is None else f"{self.path.name} frame {self.frame + 1}"


def _first_item(ds: pydicom.Dataset | None, keyword: str) -> pydicom.Dataset | None:
    seq = ds.get(keyword) if ds is not None else None
    return seq[0] if seq else None


def _group_value(per_frame: pydicom.Dataset | None, shared: pydicom.Dataset | None, sequence: str, keyword: str):
    """A functional-group attribute: the per-frame group wins over the shared one (PS3.3 C.7.6.16)."""
    for group in (per_frame, shared):
        item = _first_item(group, sequence)
        if item is not None and keyword in item:
            return item.get(keyword)
    return None


def _stack_value(value) -> str:
    if value is None or value == "":
        return ""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value)
    return str(value)


def _frames_of(path: Path, ds: pydicom.Dataset, label: str) -> list[_Slice]:
    """The 2D images of one file, with their geometry (functional groups for multi-frame)."""
    where = f"{label}: {path.name}"
    frames = int(_number(ds.get("NumberOfFrames"), "NumberOfFrames", 1, where))
    shape = (int(_number(ds.get("Rows"), "Rows", 0, where)), int(_number(ds.get("Columns"), "Columns", 0, where)))
    shared = _first_item(ds, "SharedFunctionalGroupsSequence")
    per_frame_seq = ds.get("PerFrameFunctionalGroupsSequence")
    if frames == 1 and per_frame_seq is None:
        return [_Slice(
            path, None, ds,
            _floats(ds, "ImagePositionPatient", path, label),
            _floats(ds, "ImageOrientationPatient", path, label),
            _floats(ds, "PixelSpacing", path, label), shape,
            _number(ds.get("RescaleSlope"), "RescaleSlope", 1.0, where),
            _number(ds.get("RescaleIntercept"), "RescaleIntercept", 0.0, where),
            {kw: _stack_value(ds.get(kw)) for kw in _SINGLE_FRAME_STACK_KEYS},
        )]
    if per_frame_seq is None or len(per_frame_seq) != frames:
        raise SeriesGeometryError(
            f"{label}: {path.name}: multi-frame image (NumberOfFrames={frames}) without a per-frame "
            f"functional group per frame ({0 if per_frame_seq is None else len(per_frame_seq)} found): "
            "frame positions unknown")
    out = []
    for k, pf in enumerate(per_frame_seq):
        def vec(sequence: str, keyword: str) -> np.ndarray:
            arr, problem = parse_geometry_tag(keyword, _group_value(pf, shared, sequence, keyword))
            if arr is None:
                raise SeriesGeometryError(
                    f"{label}: {path.name} frame {k + 1}: {problem or f'{keyword} missing'} in the functional groups")
            return arr

        slope = _group_value(pf, shared, "PixelValueTransformationSequence", "RescaleSlope")
        intercept = _group_value(pf, shared, "PixelValueTransformationSequence", "RescaleIntercept")
        keys = {
            "EchoTime": _stack_value(_group_value(pf, shared, "MREchoSequence", "EffectiveEchoTime")),
            "TemporalPositionIndex": _stack_value(_group_value(pf, shared, "FrameContentSequence",
                                                               "TemporalPositionIndex")),
            "StackID": _stack_value(_group_value(pf, shared, "FrameContentSequence", "StackID")),
            "DiffusionBValue": _stack_value(_group_value(pf, shared, "MRDiffusionSequence", "DiffusionBValue")),
        }
        out.append(_Slice(
            path, k, ds, vec("PlanePositionSequence", "ImagePositionPatient"),
            vec("PlaneOrientationSequence", "ImageOrientationPatient"),
            vec("PixelMeasuresSequence", "PixelSpacing"), shape,
            _number(slope if slope not in (None, "") else ds.get("RescaleSlope"), "RescaleSlope", 1.0, where),
            _number(intercept if intercept not in (None, "") else ds.get("RescaleIntercept"), "RescaleIntercept",
                    0.0, where),
            keys,
        ))
    return out


# Attributes that differ between stacks sharing a SeriesInstanceUID (multi-echo, dynamic
# phases, diffusion b-values, repeated acquisitions), in the order they are reported.
_SINGLE_FRAME_STACK_KEYS = ("EchoTime", "TemporalPositionIdentifier", "DiffusionBValue", "TriggerTime",
                            "AcquisitionTime", "AcquisitionNumber")


def _decode(sl: list[_Slice], label: str) -> dict[tuple[Path, int | None], np.ndarray]:
    """Pixel arrays per (file, frame), each file decoded once."""
    out: dict[tuple[Path, int | None], np.ndarray] = {}
    for path in dict.fromkeys(s.path for s in sl):
        ds = next(s.ds for s in sl if s.path == path)
        if int(ds.get("SamplesPerPixel") or 1) != 1:
            raise SeriesGeometryError(f"{label}: {path.name}: colour image (SamplesPerPixel > 1)")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                pixels = ds.pixel_array
        except Exception as exc:  # noqa: BLE001 - decoder and truncation errors vary by handler
            ts = ds.file_meta.get("TransferSyntaxUID", "unknown") if hasattr(ds, "file_meta") else "unknown"
            name = getattr(ts, "name", "") or ""
            raise SeriesPixelDataError(
                f"{label}: {path.name}: pixel data cannot be decoded "
                f"(transfer syntax {ts}{f' {name}' if name and name != str(ts) else ''}): {exc}"
            ) from exc
        frames = int(ds.get("NumberOfFrames") or 1)
        shape = (int(ds.Rows), int(ds.Columns))
        if frames == 1 and ds.get("PerFrameFunctionalGroupsSequence") is None:
            if pixels.shape != shape:
                raise SeriesPixelDataError(f"{label}: {path.name}: decoded pixel array {pixels.shape} != {shape}")
            out[(path, None)] = pixels
        else:
            pixels = pixels.reshape(frames, *shape) if pixels.size == frames * shape[0] * shape[1] else pixels
            if pixels.shape != (frames, *shape):
                raise SeriesPixelDataError(
                    f"{label}: {path.name}: decoded pixel array {pixels.shape} != {(frames, *shape)}")
            for k in range(frames):
                out[(path, k)] = pixels[k]
    return out


def load_series(series: SeriesRecord) -> sitk.Image:
    """Read ``series.files`` into a float32 image in LPS physical space.

    Files may be single-frame (one slice each) or multi-frame (Enhanced MR: one file holding
    the slices as frames, their positions in the per-frame functional groups), in any transfer
    syntax pydicom can decode with the installed plugins (pylibjpeg, pylibjpeg-libjpeg,
    pylibjpeg-openjpeg, pylibjpeg-rle, pyjpegls). Rescale slope/intercept are applied per slice
    (per frame). Raises :class:`SeriesGeometryError` (or its subclass
    :class:`SeriesPixelDataError`) for: a single slice, mixed orientations, matrix sizes or
    pixel spacings, several stacks in one series (e.g. echoes or phases at the same positions),
    duplicate slice positions, slices not stacked along the normal, missing slices or
    non-uniform spacing, and undecodable pixel data.
    """
    label = _label(series)
    files = [Path(p) for p in series.files]
    if not files:
        raise SeriesGeometryError(f"{label}: no files")
    slices: list[_Slice] = []
    for path in files:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = pydicom.dcmread(path, force=True)
        except Exception as exc:  # noqa: BLE001 - re-raised with the file named
            raise SeriesPixelDataError(f"{label}: {path.name}: unreadable DICOM: {exc}") from exc
        if "Rows" not in ds or "Columns" not in ds:
            raise SeriesGeometryError(f"{label}: {path.name}: no image (Rows/Columns missing)")
        slices.extend(_frames_of(path, ds, label))
    slices, dist, direction = check_volume(slices, label)
    ipps = np.array([s.ipp for s in slices])
    shape0 = slices[0].shape

    # ---- pixels
    pixels = _decode(slices, label)
    volume = np.empty((len(slices), *shape0), dtype=np.float32)
    for k, s in enumerate(slices):
        volume[k] = pixels[(s.path, s.frame)].astype(np.float32) * np.float32(s.slope) + np.float32(s.intercept)

    image = sitk.GetImageFromArray(volume)  # array [k, j, i] -> index (i, j, k)
    image.SetOrigin(tuple(float(v) for v in ipps[0]))
    spacing_z = (dist[-1] - dist[0]) / (len(dist) - 1)
    ps0 = slices[0].pixel_spacing
    image.SetSpacing((float(ps0[1]), float(ps0[0]), float(spacing_z)))
    image.SetDirection(tuple(float(v) for v in direction.ravel()))  # row-major, columns r, c, n
    return image
