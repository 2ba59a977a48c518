"""PNG slices of a flagged study and its baseline, side by side on the follow-up's grid.

The current study's images are on the native grid of its post-contrast series
(``labels.nii.gz``, ``subtraction.nii.gz``, ``pre_registered.nii.gz``, and for a zone read above
enhancing surroundings ``above_surroundings.nii.gz``, the panel "above"); the post-contrast
itself is read from its DICOM series (found in the run's catalogue). The baseline's images are
brought onto that grid with the inverse of ``to_baseline.tfm`` exactly as ``key_image.png``
does (``pipeline.outputs.writers.render_study_key_image``): the file maps a baseline point to the follow-up point,
and resampling onto the follow-up grid needs the follow-up -> baseline map.

Every path comes from the pipeline's own records (the worklist row, the catalogue) and is
resolved under its root (OUT, the export folder): anything that points outside is refused.
Volumes of the last few cases and the rendered PNGs are kept in memory (LRU caches keyed by the
files' modification times, so a rerun that rewrites a study is never served stale).
"""

from __future__ import annotations

import io
import json
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from threading import Lock

import numpy as np
import SimpleITK as sitk
from PIL import Image

from pipeline.core.geometry import resample_to
from pipeline.core.records import Label, SeriesRecord
from pipeline.imaging.volumes import load_series
from pipeline.ingest.catalogue import CatalogueLocation, is_database_url, series_paths
from pipeline.outputs.key_image import orientation_letters
from pipeline.outputs.store import ABOVE_SURROUNDINGS_NAME

VIEWS = ("baseline", "current")
PANELS = ("pre", "post", "subtraction", "above", "overlay")
# Panels windowed symmetrically about 0 and shared by both studies (signed differences).
SIGNED_PANELS = ("subtraction", "above")
CATALOGUE_NAME = "catalogue.sqlite"
NIFTI = {"pre": "pre_registered.nii.gz", "subtraction": "subtraction.nii.gz", "labels": "labels.nii.gz"}
# Written only for a zone read above enhancing surroundings (the relative enhancement above them).
OPTIONAL_NIFTI = {"above": ABOVE_SURROUNDINGS_NAME}
# RGBA (0-255) of each structure's label value (the colours of key_image.png).
LABEL_RGBA = {int(Label.ABLATION_ZONE): (51, 153, 255, 90), int(Label.RIM): (255, 217, 26, 150),
              int(Label.ENHANCING_FOCUS): (255, 26, 26, 200)}
CASE_CACHE_SIZE = 4  # ~8 volumes of ~16 MB per case
PNG_CACHE_SIZE = 4096  # ~10-40 kB each


class UnsafePathError(ValueError):
    """A stored path resolves outside the folder it must live in."""


def resolve_under(root: Path, relative: str) -> Path:
    """``root/relative`` resolved, refusing anything that leaves ``root`` (``..``, absolute, links)."""
    root = Path(root).resolve()
    target = (root / relative).resolve()
    if not target.is_relative_to(root):
        raise UnsafePathError(f"{relative!r} is outside {root}")
    return target


@dataclass(frozen=True)
class CaseKey:
    """What a rendered case depends on (hashable; mtimes make a rewritten study a new key)."""

    out_dir: str
    study_folder: str
    baseline_folder: str | None
    post_series_uid: str | None
    baseline_post_series_uid: str | None
    baseline_registration_ok: bool
    mtimes: tuple[int, ...]


@dataclass
class CaseVolumes:
    """Arrays (k, rows, cols) of every panel that could be made, on the current study's grid."""

    n_slices: int
    spacing: tuple[float, float, float]
    letters: tuple[str, str, str, str]  # left, right, top, bottom of a displayed slice
    arrays: dict[tuple[str, str], np.ndarray] = field(default_factory=dict)
    windows: dict[tuple[str, str], tuple[float, float]] = field(default_factory=dict)
    labels: dict[str, np.ndarray] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def available(self, view: str, panel: str) -> bool:
        return (view, panel) in self.arrays


def case_key(out_dir: Path, study_folder: str, baseline_folder: str | None, post_series_uid: str | None,
             baseline_post_series_uid: str | None, baseline_registration_ok: bool) -> CaseKey:
    out_dir = Path(out_dir).resolve()
    folders = [resolve_under(out_dir, study_folder)]
    if baseline_folder:
        folders.append(resolve_under(out_dir, baseline_folder))
    mtimes = []
    for folder in folders:
        for name in (*NIFTI.values(), *OPTIONAL_NIFTI.values(), "to_baseline.tfm"):
            p = folder / name
            mtimes.append(p.stat().st_mtime_ns if p.exists() else 0)
    return CaseKey(str(out_dir), study_folder, baseline_folder, post_series_uid, baseline_post_series_uid,
                   baseline_registration_ok, tuple(mtimes))


# --------------------------------------------------------------------------- loading
def _series_files(out_dir: Path, series_uid: str) -> list[Path]:
    """The catalogued files of one series (read-only: the catalogue belongs to the batch flow)."""
    catalogue: CatalogueLocation = Path(out_dir) / CATALOGUE_NAME
    if not Path(catalogue).exists():
        # A pseudonymised run keeps it in its private folder, a shared one is a database URL
        # (its password never written: libpq's ~/.pgpass or PGPASSWORD supplies it).
        try:
            recorded = json.loads((Path(out_dir) / "run_summary.json").read_text())["catalogue"]
            catalogue = recorded if is_database_url(recorded) else Path(recorded)
        except (OSError, ValueError, KeyError):
            pass
    if not is_database_url(catalogue) and not Path(catalogue).exists():
        raise FileNotFoundError(f"no catalogue at {catalogue}")
    export_dir, rels = series_paths(catalogue, series_uid)
    if not rels:
        raise FileNotFoundError(f"series {series_uid} is not in the catalogue")
    return [resolve_under(export_dir, rel) for rel in rels]


def load_post(out_dir: Path, series_uid: str | None, reference: sitk.Image) -> sitk.Image:
    """The post-contrast series used, on ``reference``'s grid (its own grid, normally)."""
    if not series_uid:
        raise FileNotFoundError("the study used no post-contrast series")
    files = _series_files(out_dir, series_uid)
    record = SeriesRecord(patient_id="", study_instance_uid="", series_instance_uid=series_uid, series_number=None,
                          series_description="post-contrast", modality="MR", manufacturer="", files=files)
    post = load_series(record)
    same_grid = (post.GetSize() == reference.GetSize()
                 and np.allclose(post.GetOrigin(), reference.GetOrigin(), atol=1e-3)
                 and np.allclose(post.GetSpacing(), reference.GetSpacing(), atol=1e-4)
                 and np.allclose(post.GetDirection(), reference.GetDirection(), atol=1e-5))
    return post if same_grid else resample_to(post, reference, sitk.Transform())


def _window(arr: np.ndarray, symmetric: bool) -> tuple[float, float]:
    # One window per volume (not per slice), so scrolling does not change the contrast.
    sample = arr[:: max(1, arr.shape[0] // 16)].ravel()
    if symmetric:
        v = float(np.percentile(np.abs(sample), 99.5)) or 1.0
        return -v, v
    lo, hi = np.percentile(sample, [1, 99.5]) if sample.size else (0.0, 1.0)
    return float(lo), float(max(hi, lo + 1e-6))


def _study_images(out_dir: Path, folder: Path, post_uid: str | None, notes: list[str], what: str) -> dict[str, sitk.Image]:
    images = {name: sitk.ReadImage(str(folder / fname)) for name, fname in NIFTI.items()}
    images.update({name: sitk.ReadImage(str(folder / fname)) for name, fname in OPTIONAL_NIFTI.items()
                   if (folder / fname).exists()})
    try:
        images["post"] = load_post(out_dir, post_uid, images["labels"])
    except (OSError, ValueError, RuntimeError) as exc:
        notes.append(f"{what} post-contrast not shown: {exc}")
    return images


def _put(vol: CaseVolumes, view: str, images: dict[str, sitk.Image]) -> None:
    for panel in ("pre", "post", "subtraction", "above"):
        if panel in images:
            arr = sitk.GetArrayFromImage(images[panel]).astype(np.float32, copy=False)
            vol.arrays[(view, panel)] = arr
            vol.windows[(view, panel)] = _window(arr, symmetric=panel in SIGNED_PANELS)
    vol.labels[view] = sitk.GetArrayFromImage(images["labels"]).astype(np.uint8, copy=False)
    base = "post" if (view, "post") in vol.arrays else "pre"
    vol.arrays[(view, "overlay")] = vol.arrays[(view, base)]
    vol.windows[(view, "overlay")] = vol.windows[(view, base)]


def share_subtraction_window(vol: CaseVolumes) -> None:
    """Baseline and follow-up subtractions (and enhancement above the surroundings) on one
    grey-level window each (the wider of the two), so that the same enhancement looks the same in
    both; each was windowed on its own before."""
    for panel in SIGNED_PANELS:
        keys = [(view, panel) for view in VIEWS if (view, panel) in vol.windows]
        if len(keys) < 2:
            continue
        v = max(vol.windows[key][1] for key in keys)
        for key in keys:
            vol.windows[key] = (-v, v)


_case_cache: OrderedDict[CaseKey, CaseVolumes] = OrderedDict()
_png_cache: OrderedDict[tuple, bytes] = OrderedDict()
_lock = Lock()


def load_case(key: CaseKey) -> CaseVolumes:
    """The volumes of a case (cached; raises OSError/RuntimeError when the study's files are gone)."""
    with _lock:
        if key in _case_cache:
            _case_cache.move_to_end(key)
            return _case_cache[key]
    out_dir = Path(key.out_dir)
    folder = resolve_under(out_dir, key.study_folder)
    notes: list[str] = []
    current = _study_images(out_dir, folder, key.post_series_uid, notes, "current")
    ref = current["labels"]
    vol = CaseVolumes(n_slices=ref.GetSize()[2], spacing=ref.GetSpacing(), letters=orientation_letters(ref), notes=notes)
    _put(vol, "current", current)
    if key.baseline_folder:
        base_folder = resolve_under(out_dir, key.baseline_folder)
        tfm_path = folder / "to_baseline.tfm"
        if not key.baseline_registration_ok or not tfm_path.exists():
            notes.append("baseline not shown: the registration to the baseline failed or is missing")
        else:
            try:
                inverse = sitk.ReadTransform(str(tfm_path)).GetInverse()
                base = _study_images(out_dir, base_folder, key.baseline_post_series_uid, notes, "baseline")
                moved = {name: resample_to(img, ref, inverse, interpolator=sitk.sitkNearestNeighbor if name == "labels"
                                           else sitk.sitkLinear) for name, img in base.items()}
                _put(vol, "baseline", moved)
            except (OSError, RuntimeError, ValueError) as exc:
                notes.append(f"baseline not shown: {exc}")
    else:
        notes.append("no baseline to compare with (this study is the baseline or has none)")
    share_subtraction_window(vol)
    with _lock:
        _case_cache[key] = vol
        while len(_case_cache) > CASE_CACHE_SIZE:
            _case_cache.popitem(last=False)
    return vol


# --------------------------------------------------------------------------- rendering
def _to_uint8(sl: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    lo, hi = window
    return (np.clip((sl - lo) / (hi - lo), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def render_slice(vol: CaseVolumes, view: str, panel: str, k: int) -> Image.Image:
    """One slice as an RGB image with square physical pixels (row 0 at the top, as in key_image.png)."""
    if view not in VIEWS or panel not in PANELS:
        raise KeyError(f"unknown view/panel {view}/{panel}")
    if not vol.available(view, panel):
        raise KeyError(f"{view} {panel} is not available")
    k = int(np.clip(k, 0, vol.n_slices - 1))
    gray = _to_uint8(vol.arrays[(view, panel)][k], vol.windows[(view, panel)])
    image = Image.fromarray(gray).convert("RGBA")
    if panel == "overlay":
        lab = vol.labels[view][k]
        overlay = np.zeros((*lab.shape, 4), dtype=np.uint8)
        for value, rgba in LABEL_RGBA.items():
            overlay[lab == value] = rgba
        image = Image.alpha_composite(image, Image.fromarray(overlay))
    sx, sy = vol.spacing[0], vol.spacing[1]
    unit = min(sx, sy)
    size = (max(1, round(image.width * sx / unit)), max(1, round(image.height * sy / unit)))
    if size != image.size:
        image = image.resize(size, Image.Resampling.NEAREST)
    return image.convert("RGB")


def slice_png(key: CaseKey, view: str, panel: str, k: int) -> bytes:
    """PNG bytes of one slice (cached)."""
    cache_key = (key, view, panel, int(k))
    with _lock:
        if cache_key in _png_cache:
            _png_cache.move_to_end(cache_key)
            return _png_cache[cache_key]
    buffer = io.BytesIO()
    render_slice(load_case(key), view, panel, k).save(buffer, format="PNG", optimize=False)
    data = buffer.getvalue()
    with _lock:
        _png_cache[cache_key] = data
        while len(_png_cache) > PNG_CACHE_SIZE:
            _png_cache.popitem(last=False)
    return data
