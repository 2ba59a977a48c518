"""Training and inference inputs of the segmentation network, built exactly as the pipeline does.

The network sees what ``pipeline.measurement.study.analyse_study`` produces at inference: the pre-contrast
T1 registered onto the post-contrast grid and the subtraction ``post_norm - pre`` (post scaled
onto the pre's intensities, pipeline/imaging/subtraction.py), both divided by the body median of the
pre-contrast (vendors' intensity scales differ, so only ratios travel between studies), then
resampled onto a fixed working spacing with the post grid's direction (so an oblique or flipped
acquisition stays in its own voxel order; flips are a training augmentation and the test-time
augmentation of models/infer.py).

Case folders (one per study) hold the pipeline's own per-study outputs
(``pre_registered.nii.gz``, ``subtraction.nii.gz``: pipeline/outputs/store.py IMAGE_FILES) plus
``labels.nii.gz`` (values of models/labels.py ``Label``, 0 the background) on the same grid:
the layout ``--data DIR`` fine-tunes on, and the layout ``phantom.training_cases.build_synthetic_cohort``
writes from the phantom generator (outside ``models``: it runs the pipeline).

The body mask that scales the input comes from the caller (the pipeline's
``pipeline.imaging.registration.body_mask``): ``models`` never imports the pipeline.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import SimpleITK as sitk

from models.labels import Label

log = logging.getLogger(__name__)

CHANNELS = ("pre_contrast", "subtraction")
N_CLASSES = len(Label)  # class index = label value (models/labels.py), 0 the background
CLASS_NAMES = tuple(label.key for label in Label)
PRE_FILE, SUB_FILE, LABEL_FILE = "pre_registered.nii.gz", "subtraction.nii.gz", "labels.nii.gz"
CLASSICAL_FILE = "classical_labels.nii.gz"


@dataclass
class Case:
    """One study prepared for the network: arrays in SimpleITK (z, y, x) order, channel first."""

    name: str
    image: np.ndarray  # float32 (len(CHANNELS), z, y, x) on the working grid
    label: np.ndarray | None  # uint8 (z, y, x) on the working grid
    working: sitk.Image  # reference image of the working grid (geometry only)
    source: sitk.Image  # reference image of the study's post grid (geometry only)


def working_grid(reference: sitk.Image, spacing_xyz: tuple[float, float, float]) -> sitk.Image:
    """Grid covering ``reference``'s field of view at ``spacing_xyz`` with its direction.

    The outer voxel corners coincide with the reference's, so nothing of the FOV is cut.
    """
    size = np.asarray(reference.GetSize(), float)
    spacing = np.asarray(reference.GetSpacing(), float)
    new_spacing = np.asarray(spacing_xyz, float)
    new_size = np.maximum(np.round(size * spacing / new_spacing), 1).astype(int)
    direction = np.asarray(reference.GetDirection(), float).reshape(3, 3)
    # First voxel centre: half a new voxel inside the reference's first voxel corner.
    corner = np.asarray(reference.GetOrigin(), float) - direction @ (spacing / 2)
    origin = corner + direction @ (new_spacing / 2)
    grid = sitk.Image([int(v) for v in new_size], sitk.sitkUInt8)
    grid.SetSpacing(tuple(float(v) for v in new_spacing))
    grid.SetOrigin(tuple(float(v) for v in origin))
    grid.SetDirection(reference.GetDirection())
    return grid


def resample_onto(image: sitk.Image, grid: sitk.Image, interpolator: int, default: float = 0.0) -> sitk.Image:
    """``image`` on ``grid`` (physical space, identity transform)."""
    return sitk.Resample(image, grid, sitk.Transform(), interpolator, default, image.GetPixelID())


def geometry_of(image: sitk.Image) -> sitk.Image:
    """An empty image carrying only ``image``'s grid (keeps references light)."""
    ref = sitk.Image(image.GetSize(), sitk.sitkUInt8)
    ref.CopyInformation(image)
    return ref


# A function giving the body mask of an image on its grid (uint8 image, 1 = body): the
# pipeline's ``pipeline.imaging.registration.body_mask``, passed in by the caller.
BodyMask = Callable[[sitk.Image], sitk.Image]


def network_input(pre_on_post: sitk.Image, subtraction: sitk.Image, spacing_xyz: tuple[float, float, float],
                  body: np.ndarray) -> tuple[np.ndarray, sitk.Image]:
    """The network's input channels on the working grid, and that grid.

    ``pre_on_post`` / ``subtraction``: as ``analyse_study`` builds them (post grid). Both are
    divided by the body median of the pre-contrast: the pipeline's relative enhancement is the
    same ratio voxel-wise, and the scale no longer depends on the vendor's gain. ``body``: the
    body mask array of ``pre_on_post`` ((z, y, x), nonzero = body), as the pipeline computes it.
    """
    if pre_on_post.GetSize() != subtraction.GetSize():
        raise ValueError(f"pre-contrast {pre_on_post.GetSize()} and subtraction {subtraction.GetSize()} "
                         "are not on one grid")
    pre_a = sitk.GetArrayFromImage(pre_on_post)
    inside = (np.asarray(body) > 0) & np.isfinite(pre_a)
    if not inside.any():
        raise ValueError("no body found on the pre-contrast image")
    scale = float(np.median(pre_a[inside]))
    if not scale > 0:
        raise ValueError("body median of the pre-contrast image is not positive")
    grid = working_grid(pre_on_post, spacing_xyz)
    channels = []
    for image in (pre_on_post, subtraction):
        moved = resample_onto(sitk.Cast(image, sitk.sitkFloat32), grid, sitk.sitkLinear)
        arr = sitk.GetArrayFromImage(moved) / np.float32(scale)
        channels.append(np.nan_to_num(arr, nan=0.0, posinf=0.0, neginf=0.0))
    return np.stack(channels).astype(np.float32), grid


def load_case(folder: Path, spacing_xyz: tuple[float, float, float], body_mask: BodyMask,
              with_label: bool = True) -> Case:
    """A case folder (see module docstring) as a :class:`Case`, its input scaled by the body median
    within ``body_mask`` of the pre-contrast. Raises ``ValueError`` when incomplete."""
    folder = Path(folder)
    missing = [f for f in (PRE_FILE, SUB_FILE) + ((LABEL_FILE,) if with_label else ()) if not (folder / f).is_file()]
    if missing:
        raise ValueError(f"case {folder}: missing {', '.join(missing)}")
    pre = sitk.ReadImage(str(folder / PRE_FILE), sitk.sitkFloat32)
    sub = sitk.ReadImage(str(folder / SUB_FILE), sitk.sitkFloat32)
    image, grid = network_input(pre, sub, spacing_xyz, sitk.GetArrayFromImage(body_mask(pre)))
    label = None
    if with_label:
        lab = sitk.ReadImage(str(folder / LABEL_FILE))
        if lab.GetSize() != pre.GetSize():
            raise ValueError(f"case {folder}: labels {lab.GetSize()} not on the image grid {pre.GetSize()}")
        lab = sitk.Cast(lab, sitk.sitkUInt8)
        lab.CopyInformation(pre)  # same grid by contract; float noise in the headers is not a reason to fail
        label = sitk.GetArrayFromImage(resample_onto(lab, grid, sitk.sitkNearestNeighbor)).astype(np.uint8)
        if label.max(initial=0) >= N_CLASSES:
            raise ValueError(f"case {folder}: label values {np.unique(label).tolist()} outside 0..{N_CLASSES - 1}")
    return Case(folder.name, image, label, grid, geometry_of(pre))


def case_folders(root: Path) -> list[Path]:
    """Case folders under ``root`` (any depth), sorted: each holds pre_registered + subtraction + labels."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"data folder not found: {root}")
    return sorted(p.parent for p in root.rglob(PRE_FILE) if (p.parent / SUB_FILE).is_file()
                  and (p.parent / LABEL_FILE).is_file())


def load_cases(root: Path, spacing_xyz: tuple[float, float, float], body_mask: BodyMask) -> list[Case]:
    """Every case under ``root`` (``load_case``); a broken case is logged and skipped (never kills the batch)."""
    cases = []
    for folder in case_folders(root):
        try:
            cases.append(load_case(folder, spacing_xyz, body_mask))
        except (ValueError, RuntimeError, OSError) as exc:
            log.warning("case skipped: %s", exc)
    if not cases:
        raise ValueError(f"no usable case folder (with {PRE_FILE}, {SUB_FILE}, {LABEL_FILE}) under {root}")
    return cases
