"""Checks that a set of 2D images forms one regular 3D volume, with a precise reason if not.

Shared by the header-level check at ingest (from the catalogue, before any pixel is read) and
by :func:`pipeline.imaging.volumes.load_series` (from the files), so that both give the same reason.
Hand-written because no library reports *why* slices do not stack: ITK's series reader sorts
and stacks whatever it is given.

Conventions (DICOM PS3.3 C.7.6.2): ImageOrientationPatient = row cosine r then column cosine
c; slices are sorted by their position along n = r x c.
"""

from __future__ import annotations

from typing import Protocol, Sequence, TypeVar

import numpy as np

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


# Plausible bounds of the geometry tags. Why bounds and not only finiteness: a finite but huge
# position (1e308) overflows every later product (position / tolerance, r x c, ITK's origin).
# 1e5 mm (100 m) is far beyond any scanner's field; cosines are in [-1, 1] up to rounding.
_GEOMETRY_TAGS: dict[str, tuple[int, float, float]] = {
    # keyword: (number of values, smallest allowed, largest allowed)
    "ImagePositionPatient": (3, -1e5, 1e5),
    "ImageOrientationPatient": (6, -1.001, 1.001),
    "PixelSpacing": (2, 1e-6, 1e3),
}


def parse_geometry_tag(keyword: str, value: object) -> tuple[np.ndarray | None, str]:
    """The values of a geometry tag (ImagePositionPatient, ImageOrientationPatient,
    PixelSpacing) as floats, checked: right count, numbers, finite, within plausible bounds.

    ``value`` is a backslash-joined string, a sequence or None. Returns (array, "") when
    valid, (None, "") when absent, (None, reason) when invalid; the reason names the tag and
    quotes the value (shortened), so that with a file name it says exactly what is wrong.
    """
    n, lo, hi = _GEOMETRY_TAGS[keyword]
    if value is None or value == "":
        return None, ""
    parts = value.split("\\") if isinstance(value, str) else list(value)  # type: ignore[arg-type]
    shown = repr(value if isinstance(value, str) else "\\".join(str(v) for v in parts))
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    try:
        arr = np.asarray([float(v) for v in parts], dtype=float)
    except (TypeError, ValueError, OverflowError):
        return None, f"{keyword} {shown} is not {n} numbers"
    if arr.size != n:
        return None, f"{keyword} {shown} has {arr.size} values, {n} expected"
    if not np.all(np.isfinite(arr)):
        return None, f"{keyword} {shown} is not finite"
    if np.any(arr < lo) or np.any(arr > hi):
        return None, f"{keyword} {shown} is out of range [{lo:g}, {hi:g}]"
    return arr, ""



class SliceLike(Protocol):
    """What the checks read of one 2D image (a file, or a frame of a multi-frame file)."""

    name: str
    ipp: np.ndarray  # ImagePositionPatient (3,)
    iop: np.ndarray  # ImageOrientationPatient (6,)
    pixel_spacing: np.ndarray  # (row spacing, column spacing) mm
    shape: tuple[int, int]  # (rows, columns)
    stack_keys: dict[str, str]


S = TypeVar("S", bound=SliceLike)


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


def describe_stacks(keys: list[dict[str, str]], positions: list[float]) -> tuple[str, dict[str, int]] | None:
    """The first attribute that splits the slices into several stacks, or None.

    ``keys[i]`` holds the stack attributes of slice i and ``positions[i]`` its position along
    the slice normal (mm). An attribute splits the series when it takes at least two values,
    each value holding two or more slices at distinct positions (a per-slice acquisition time
    of a 2D series takes one value per slice and so does not). Returns (keyword, {value:
    number of slices}).
    """
    if not keys:
        return None
    for keyword in keys[0]:
        groups: dict[str, list[float]] = {}
        for k, pos in zip(keys, positions):
            groups.setdefault(k.get(keyword, ""), []).append(round(pos / _DUPLICATE_TOL_MM))
        if len(groups) < 2 or "" in groups:
            continue
        if all(len(g) >= 2 and len(set(g)) == len(g) for g in groups.values()):
            return keyword, {v: len(g) for v, g in sorted(groups.items())}
    return None


def check_volume(slices: Sequence[S], label: str) -> tuple[list[S], np.ndarray, np.ndarray]:
    """Sort ``slices`` along the slice normal and check they form one regular volume.

    Returns (sorted slices, their positions along the normal in mm, the orthonormal
    direction matrix with columns r, c, n). Raises :class:`SeriesGeometryError` for: a single
    slice, mixed orientations, matrix sizes or pixel spacings, several stacks in one series,
    duplicate positions, slices not stacked along the normal, missing slices, non-uniform
    spacing. ``label`` names the series in the messages.
    """
    if len(slices) < 2:
        raise SeriesGeometryError(f"{label}: a single slice ({slices[0].name}) is not a volume")
    # ---- one orientation, one matrix, one pixel spacing
    s0 = slices[0]
    iop0, ps0, shape0 = s0.iop, s0.pixel_spacing, s0.shape
    for s in slices[1:]:
        if np.max(np.abs(s.iop - iop0)) > _IOP_TOL:
            n_iops = len({tuple(np.round(x.iop, 3)) for x in slices})
            raise SeriesGeometryError(
                f"{label}: mixed orientations: {n_iops} different ImageOrientationPatient values "
                f"(e.g. {s0.name}: {np.round(iop0, 4).tolist()} vs {s.name}: "
                f"{np.round(s.iop, 4).tolist()})"
            )
        if s.shape != shape0:
            raise SeriesGeometryError(
                f"{label}: mixed matrix sizes: {s0.name} is {shape0[0]}x{shape0[1]}, "
                f"{s.name} is {s.shape[0]}x{s.shape[1]} (rows x columns)"
            )
        if np.max(np.abs(s.pixel_spacing - ps0) / ps0) > _PIXEL_SPACING_TOL:
            raise SeriesGeometryError(
                f"{label}: mixed pixel spacings: {s0.name} {ps0.tolist()} mm, "
                f"{s.name} {s.pixel_spacing.tolist()} mm"
            )
    if np.any(ps0 <= 0):
        raise SeriesGeometryError(f"{label}: non-positive PixelSpacing {ps0.tolist()}")
    direction = _orthonormal(iop0[:3], iop0[3:], label)
    normal = direction[:, 2]

    # ---- sort along the normal; check stacks, duplicates, stacking and uniform spacing
    dist = np.array([s.ipp @ normal for s in slices])
    order = np.argsort(dist, kind="stable")
    dist = dist[order]
    slices = [slices[i] for i in order]
    ipps = np.array([s.ipp for s in slices])
    gaps = np.diff(dist)
    dup = np.flatnonzero(gaps < _DUPLICATE_TOL_MM)
    if dup.size:
        stacks = describe_stacks([s.stack_keys for s in slices], dist.tolist())
        if stacks is not None:
            keyword, counts = stacks
            listed = ", ".join(f"{v or 'none'} ({n} slices)" for v, n in counts.items())
            raise SeriesGeometryError(
                f"{label}: several stacks in one series: {len(counts)} stacks by {keyword}: {listed}"
            )
        i = dup[0]
        raise SeriesGeometryError(
            f"{label}: duplicate slice positions: {dup.size + 0} pair(s), e.g. "
            f"{slices[i].name} and {slices[i + 1].name} both at {dist[i]:.2f} mm "
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
                f"{slices[i].name} ({dist[i]:.2f} mm) and {slices[i + 1].name} "
                f"({dist[i + 1]:.2f} mm) where the spacing is {ref:.2f} mm "
                f"({n_missing} slice(s) missing in all)"
            )
        raise SeriesGeometryError(
            f"{label}: non-uniform slice spacing: gap of {gaps[i]:.3f} mm between "
            f"{slices[i].name} and {slices[i + 1].name}, median {ref:.3f} mm "
            f"(tolerance {tol:.3f} mm)"
        )

    return list(slices), dist, direction
