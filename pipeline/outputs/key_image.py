"""key_image.png: the study (and its registered baseline) on the slice through the worst finding."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from matplotlib.colors import ListedColormap

# The object-oriented Figure API (not pyplot): no display needed and safe in worker threads.
from matplotlib.figure import Figure

from pipeline.core.files import atomic_write_bytes
from pipeline.core.records import STRUCTURES, Label

# RGBA of each label value (the review page's overlay uses the same colours).
LABEL_COLOURS = {Label.BACKGROUND: (0, 0, 0, 0), Label.ABLATION_ZONE: (0.2, 0.6, 1.0, 0.35),
                 Label.RIM: (1.0, 0.85, 0.1, 0.6), Label.ENHANCING_FOCUS: (1.0, 0.1, 0.1, 0.8)}
_LABEL_COLOURS = ListedColormap([LABEL_COLOURS[label] for label in Label])
_LETTERS = {0: ("R", "L"), 1: ("A", "P"), 2: ("I", "S")}  # LPS: +x left, +y posterior, +z superior


def orientation_letters(image: sitk.Image) -> tuple[str, str, str, str]:
    """Letters (left, right, top, bottom) of an array slice shown with row 0 at the top.

    Columns run along the direction's first column (row cosine), rows along its second.
    """
    direction = np.array(image.GetDirection()).reshape(3, 3)

    def letters(vec: np.ndarray) -> tuple[str, str]:
        axis = int(np.argmax(np.abs(vec)))
        low, high = _LETTERS[axis]
        return (low, high) if vec[axis] > 0 else (high, low)

    left, right = letters(direction[:, 0])
    top, bottom = letters(direction[:, 1])
    return left, right, top, bottom


def _window(a: np.ndarray) -> tuple[float, float]:
    lo, hi = np.percentile(a, [1, 99.5]) if a.size else (0.0, 1.0)
    return float(lo), float(max(hi, lo + 1e-6))


def crop_box(labels: sitk.Image, k: int, margin_mm: float = 35.0) -> tuple[slice, slice] | None:
    """Rows/columns around the labelled findings of slice ``k`` (None: show the whole slice)."""
    lab = sitk.GetArrayFromImage(labels)
    k = int(np.clip(k, 0, lab.shape[0] - 1))
    rows, cols = np.nonzero(lab[k]) if lab[k].any() else np.nonzero(lab.any(axis=0))
    if rows.size == 0:
        return None
    sx, sy = labels.GetSpacing()[:2]
    mr, mc = int(margin_mm / sy), int(margin_mm / sx)
    return (slice(max(rows.min() - mr, 0), rows.max() + mr + 1), slice(max(cols.min() - mc, 0), cols.max() + mc + 1))


def _panel(ax, image: sitk.Image, k: int, title: str, labels: sitk.Image | None = None, cmap: str = "gray",
           symmetric: bool = False, box: tuple[slice, slice] | None = None) -> None:
    arr = sitk.GetArrayFromImage(image)
    k = int(np.clip(k, 0, arr.shape[0] - 1))
    box = box or (slice(None), slice(None))
    sl = arr[k][box]
    sx, sy = image.GetSpacing()[:2]
    if symmetric:
        v = float(np.percentile(np.abs(sl), 99.5)) or 1.0
        ax.imshow(sl, cmap=cmap, vmin=-v, vmax=v, aspect=sy / sx, interpolation="nearest")
    else:
        lo, hi = _window(sl)
        ax.imshow(sl, cmap=cmap, vmin=lo, vmax=hi, aspect=sy / sx, interpolation="nearest")
    if labels is not None:
        lab = sitk.GetArrayFromImage(labels)[k][box]
        ax.imshow(np.ma.masked_equal(lab, 0), cmap=_LABEL_COLOURS, vmin=0, vmax=int(max(Label)), aspect=sy / sx,
                  interpolation="nearest")
    left, right, top, bottom = orientation_letters(image)
    h, w = sl.shape
    style = dict(color="yellow", fontsize=8, ha="center", va="center")
    ax.text(4, h / 2, left, **style)
    ax.text(w - 5, h / 2, right, **style)
    ax.text(w / 2, 4, top, **style)
    ax.text(w / 2, h - 5, bottom, **style)
    bar_mm = scale_bar_mm(w * sx)
    bar_px = bar_mm / sx
    ax.plot([w - 4 - bar_px, w - 4], [h - 4, h - 4], color="white", lw=2)
    ax.text(w - 4 - bar_px / 2, h - 7, f"{bar_mm:g} mm", color="white", fontsize=6, ha="center")
    ax.set_title(title, fontsize=8)
    ax.axis("off")


def scale_bar_mm(width_mm: float) -> float:
    """20 mm (the README's scale bar), 10 mm where the panel is under 50 mm wide."""
    return 20.0 if width_mm >= 50.0 else 10.0


def slice_position(image: sitk.Image, k: int) -> str:
    """``slice 13/64, S 34.5 mm``: the slice number and the patient-axis position of its centre."""
    nx, ny, nz = image.GetSize()
    k = int(np.clip(k, 0, nz - 1))
    centre = np.array(image.TransformContinuousIndexToPhysicalPoint(((nx - 1) / 2, (ny - 1) / 2, float(k))))
    normal = np.array(image.GetDirection()).reshape(3, 3)[:, 2]
    axis = int(np.argmax(np.abs(normal)))
    low, high = _LETTERS[axis]
    value = float(centre[axis])
    return f"slice {k + 1}/{nz}, {high if value >= 0 else low} {abs(value):.1f} mm"


def days_text(days_since_ablation: int | None) -> str:
    if days_since_ablation is None:
        return "no ablation date"
    if days_since_ablation < 0:
        return f"{-days_since_ablation} days before ablation"
    return f"day {days_since_ablation} after ablation"


LEGEND = tuple((label.text, int(label)) for label in STRUCTURES)


def key_image_figure(
    current: dict[str, sitk.Image],
    key_slice: int,
    title: str,
    baseline: dict[str, sitk.Image] | None = None,
) -> Figure:
    """Pre, post, subtraction+labels of the study, and of the baseline when given.

    ``current``/``baseline`` map "pre", "post", "subtraction", "labels" to images on the
    current study's post grid (the baseline already resampled through the registration). The
    title gets the slice's number and position; a legend names the label colours. With
    "above_surroundings" in ``current`` (a zone inside enhancing parenchyma) a fourth column
    shows the enhancement above the surroundings, largest over the phases read, with the labels:
    what the foci were judged on, where a nodule iso to the liver in the phase segmented shows
    (its arterial phase); a baseline without that map leaves its panel empty.
    """
    from matplotlib.patches import Patch

    rows = 2 if baseline else 1
    columns = 4 if "above_surroundings" in current else 3
    fig = Figure(figsize=(3 * columns, 3.2 * rows + 0.4))
    axes = fig.subplots(rows, columns, squeeze=False)
    box = crop_box(current["labels"], key_slice) if "labels" in current else None
    for row, (name, imgs) in enumerate([("this study", current), ("baseline (registered)", baseline)][:rows]):
        _panel(axes[row, 0], imgs["pre"], key_slice, f"{name}: T1 pre", box=box)
        _panel(axes[row, 1], imgs["post"], key_slice, f"{name}: T1 post", box=box)
        _panel(axes[row, 2], imgs["subtraction"], key_slice, f"{name}: subtraction + labels",
               labels=imgs.get("labels"), symmetric=True, box=box)
        if columns == 4:
            if "above_surroundings" in imgs:
                _panel(axes[row, 3], imgs["above_surroundings"], key_slice,
                       f"{name}: RE above surroundings\n(largest over phases) + labels",
                       labels=imgs.get("labels"), symmetric=True, box=box)
            else:
                axes[row, 3].axis("off")
    fig.suptitle(f"{title}\n{slice_position(current['post'], key_slice)}", fontsize=9)
    handles = [Patch(facecolor=_LABEL_COLOURS(value)[:3], alpha=max(_LABEL_COLOURS(value)[3], 0.6), label=name)
               for name, value in LEGEND]
    fig.legend(handles=handles, loc="lower center", ncol=3, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return fig


def render_key_image(
    path: Path,
    current: dict[str, sitk.Image],
    key_slice: int,
    title: str,
    baseline: dict[str, sitk.Image] | None = None,
    dpi: int = 100,
) -> None:
    """Write :func:`key_image_figure` as a PNG (atomically)."""
    buffer = io.BytesIO()
    key_image_figure(current, key_slice, title, baseline).savefig(buffer, format="png", dpi=dpi)
    atomic_write_bytes(path, buffer.getvalue())
