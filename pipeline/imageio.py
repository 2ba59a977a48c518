"""Load one DICOM series as a float32 SimpleITK volume with exact physical geometry (LPS mm).

Why not ``sitk.ImageSeriesReader``: it sorts and stacks whatever it is given and says
nothing when a slice is missing, duplicated or from another orientation; here each of those
is a :class:`SeriesGeometryError` with a precise reason, because a silently wrong geometry
would corrupt every measurement downstream. Pixels are decoded by pydicom (its pixel
handlers decode compressed transfer syntaxes when pylibjpeg / GDCM are installed).

Conventions (DICOM PS3.3 C.7.6.2): ImageOrientationPatient = row cosine r (direction of
increasing column index) then column cosine c; PixelSpacing = (row spacing, column
spacing); slices are sorted by their position along n = r x c. The SimpleITK image has
index (i, j, k) = (column, row, slice), spacing (PixelSpacing[1], PixelSpacing[0], dz),
direction columns (r, c, n) and origin = ImagePositionPatient of the first sorted slice.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk

from pipeline.types import SeriesRecord

# Orientation cosines written with ~6-8 digits agree within this.
_IOP_TOL = 1e-4
# Relative tolerance on PixelSpacing between slices.
_PIXEL_SPACING_TOL = 1e-3
# Two slices closer than this along the normal are at the same position (mm).
_DUPLICATE_TOL_MM = 0.01
# Slice-spacing uniformity: a gap is accepted within max(1 % of the spacing, 0.05 mm).
_SPACING_REL_TOL = 0.01
_SPACING_ABS_TOL_MM = 0.05


class SeriesGeometryError(ValueError):
    """The series cannot be loaded as one regular 3D volume; the message says exactly why."""


class SeriesPixelDataError(SeriesGeometryError):
    """A slice's pixel data cannot be decoded (truncated file, missing decoder, ...)."""


def _label(series: SeriesRecord) -> str:
    return f"series {series.series_number} '{series.series_description}'"


def _floats(ds: pydicom.Dataset, keyword: str, n: int, path: Path, label: str) -> np.ndarray:
    value = ds.get(keyword)
    try:
        arr = np.asarray([float(v) for v in value], dtype=float)
    except (TypeError, ValueError):
        arr = np.empty(0)
    if arr.size != n:
        raise SeriesGeometryError(f"{label}: {path.name}: {keyword} missing or malformed ({value!r})")
    return arr


def _orthonormal(r: np.ndarray, c: np.ndarray, label: str) -> np.ndarray:
    """Direction matrix with columns (r, c, r x c), made exactly orthonormal.

    IOP strings are rounded; ITK's resampling inverts the direction, so the nearest
    rotation (polar decomposition by SVD) is used instead of the rounded cosines.
    """
    if abs(np.linalg.norm(r) - 1) > 1e-3 or abs(np.linalg.norm(c) - 1) > 1e-3 or abs(r @ c) > 1e-3:
        raise SeriesGeometryError(
            f"{label}: ImageOrientationPatient is not two orthogonal unit vectors "
            f"(|r|={np.linalg.norm(r):.4f}, |c|={np.linalg.norm(c):.4f}, r.c={r @ c:.4f})"
        )
    m = np.column_stack([r, c, np.cross(r, c)])
    u, _, vt = np.linalg.svd(m)
    return u @ vt


def load_series(series: SeriesRecord) -> sitk.Image:
    """Read ``series.files`` into a float32 image in LPS physical space.

    Rescale slope/intercept are applied per slice. Raises :class:`SeriesGeometryError`
    (or its subclass :class:`SeriesPixelDataError`) for: multi-frame files (not supported
    yet), a single slice, mixed orientations, matrix sizes or pixel spacings, duplicate
    slice positions, slices not stacked along the normal, missing slices or non-uniform
    spacing, and undecodable pixel data.
    """
    label = _label(series)
    files = [Path(p) for p in series.files]
    if not files:
        raise SeriesGeometryError(f"{label}: no files")
    datasets: list[tuple[Path, pydicom.Dataset]] = []
    for path in files:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = pydicom.dcmread(path, force=True)
        except Exception as exc:  # noqa: BLE001 - re-raised with the file named
            raise SeriesPixelDataError(f"{label}: {path.name}: unreadable DICOM: {exc}") from exc
        frames = int(ds.get("NumberOfFrames") or 1)
        if frames > 1:
            raise SeriesGeometryError(
                f"{label}: {path.name}: multi-frame image (NumberOfFrames={frames}) "
                "is not supported yet (enhanced/multi-frame MR arrives with a later issue)"
            )
        datasets.append((path, ds))
    if len(datasets) < 2:
        raise SeriesGeometryError(f"{label}: a single slice ({files[0].name}) is not a volume")

    # ---- one orientation, one matrix, one pixel spacing
    path0, ds0 = datasets[0]
    iop0 = _floats(ds0, "ImageOrientationPatient", 6, path0, label)
    ps0 = _floats(ds0, "PixelSpacing", 2, path0, label)
    shape0 = (int(ds0.Rows), int(ds0.Columns))
    for path, ds in datasets[1:]:
        iop = _floats(ds, "ImageOrientationPatient", 6, path, label)
        if np.max(np.abs(iop - iop0)) > _IOP_TOL:
            n_iops = len({tuple(np.round(_floats(d, "ImageOrientationPatient", 6, p, label), 3))
                          for p, d in datasets})
            raise SeriesGeometryError(
                f"{label}: mixed orientations: {n_iops} different ImageOrientationPatient values "
                f"(e.g. {path0.name}: {np.round(iop0, 4).tolist()} vs {path.name}: "
                f"{np.round(iop, 4).tolist()})"
            )
        if (int(ds.Rows), int(ds.Columns)) != shape0:
            raise SeriesGeometryError(
                f"{label}: mixed matrix sizes: {path0.name} is {shape0[0]}x{shape0[1]}, "
                f"{path.name} is {int(ds.Rows)}x{int(ds.Columns)} (rows x columns)"
            )
        ps = _floats(ds, "PixelSpacing", 2, path, label)
        if np.max(np.abs(ps - ps0) / ps0) > _PIXEL_SPACING_TOL:
            raise SeriesGeometryError(
                f"{label}: mixed pixel spacings: {path0.name} {ps0.tolist()} mm, "
                f"{path.name} {ps.tolist()} mm"
            )
    if np.any(ps0 <= 0):
        raise SeriesGeometryError(f"{label}: non-positive PixelSpacing {ps0.tolist()}")
    direction = _orthonormal(iop0[:3], iop0[3:], label)
    normal = direction[:, 2]

    # ---- sort along the normal; check duplicates, stacking and uniform spacing
    ipps = np.array([_floats(ds, "ImagePositionPatient", 3, p, label) for p, ds in datasets])
    dist = ipps @ normal
    order = np.argsort(dist, kind="stable")
    dist, ipps = dist[order], ipps[order]
    datasets = [datasets[i] for i in order]
    gaps = np.diff(dist)
    dup = np.flatnonzero(gaps < _DUPLICATE_TOL_MM)
    if dup.size:
        i = dup[0]
        raise SeriesGeometryError(
            f"{label}: duplicate slice positions: {dup.size + 0} pair(s), e.g. "
            f"{datasets[i][0].name} and {datasets[i + 1][0].name} both at {dist[i]:.2f} mm "
            "along the slice normal (several echoes, phases or repeated exports in one series?)"
        )
    lateral = (ipps - ipps[0]) - np.outer(dist - dist[0], normal)
    shift = np.linalg.norm(lateral, axis=1).max()
    if shift > max(_SPACING_ABS_TOL_MM, 0.1 * ps0.min()):
        raise SeriesGeometryError(
            f"{label}: slices are not stacked along the slice normal (in-plane shift up to "
            f"{shift:.2f} mm: sheared or tilted stack)"
        )
    ref = float(np.median(gaps))
    tol = max(_SPACING_REL_TOL * ref, _SPACING_ABS_TOL_MM)
    bad = np.flatnonzero(np.abs(gaps - ref) > tol)
    if bad.size:
        i = bad[0]
        ratio = gaps[i] / ref
        missing = round(ratio) - 1
        if missing >= 1 and abs(gaps[i] - round(ratio) * ref) <= tol * round(ratio):
            n_missing = int(sum(round(g / ref) - 1 for g in gaps[bad] if g > ref))
            raise SeriesGeometryError(
                f"{label}: missing slice(s): gap of {gaps[i]:.2f} mm between "
                f"{datasets[i][0].name} ({dist[i]:.2f} mm) and {datasets[i + 1][0].name} "
                f"({dist[i + 1]:.2f} mm) where the spacing is {ref:.2f} mm "
                f"({n_missing} slice(s) missing in all)"
            )
        raise SeriesGeometryError(
            f"{label}: non-uniform slice spacing: gap of {gaps[i]:.3f} mm between "
            f"{datasets[i][0].name} and {datasets[i + 1][0].name}, median {ref:.3f} mm "
            f"(tolerance {tol:.3f} mm)"
        )

    # ---- pixels
    volume = np.empty((len(datasets), *shape0), dtype=np.float32)
    for k, (path, ds) in enumerate(datasets):
        if int(ds.get("SamplesPerPixel") or 1) != 1:
            raise SeriesGeometryError(f"{label}: {path.name}: colour image (SamplesPerPixel > 1)")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                pixels = ds.pixel_array
        except Exception as exc:  # noqa: BLE001 - decoder and truncation errors vary by handler
            raise SeriesPixelDataError(
                f"{label}: {path.name}: pixel data cannot be decoded "
                f"(transfer syntax {ds.file_meta.get('TransferSyntaxUID', 'unknown')}): {exc}"
            ) from exc
        if pixels.shape != shape0:
            raise SeriesPixelDataError(
                f"{label}: {path.name}: decoded pixel array {pixels.shape} != {shape0}"
            )
        slope = float(ds.get("RescaleSlope") or 1.0)
        intercept = float(ds.get("RescaleIntercept") or 0.0)
        volume[k] = pixels.astype(np.float32) * np.float32(slope) + np.float32(intercept)

    image = sitk.GetImageFromArray(volume)  # array [k, j, i] -> index (i, j, k)
    image.SetOrigin(tuple(float(v) for v in ipps[0]))
    spacing_z = (dist[-1] - dist[0]) / (len(dist) - 1)
    image.SetSpacing((float(ps0[1]), float(ps0[0]), float(spacing_z)))
    image.SetDirection(tuple(float(v) for v in direction.ravel()))  # row-major, columns r, c, n
    return image
