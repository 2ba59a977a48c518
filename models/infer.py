"""Network inference: load the weights, sliding window with flip test-time augmentation.

Two levels, neither with a rule of the pipeline's (those are pipeline/segmentation/network.py):

- ``predict``: on the network's input array (``models.data.network_input``: channels on the
  working grid), the TTA mean of the class probabilities, its labels and the uncertainty, on
  that grid; numpy in, numpy out.
- ``predict_study``: on a study's images as the pipeline builds them (pre-contrast on the
  post-contrast grid, subtraction, the body mask array), the same on the post grid (its origin,
  spacing and direction): ``network_input``, ``predict``, then back onto the post grid.

Test-time augmentation: the network is run on the input and on its flip along all three array
axes at once (``TTA_VIEWS[2]``, the default) or on the input and its flip along each axis
(``TTA_VIEWS[4]``; flips are training augmentations, so each view is in-distribution); the
probability maps are flipped back and averaged. Per-voxel uncertainty = variance of the views'
probabilities summed over the classes (0 when all views agree; at most 1 - 1/C ~ 0.75 for 4
classes); per-case uncertainty = its mean over the voxels that any view labels as lesion (the
``segmentation_uncertain`` review flag above ``segmentation.network_review_uncertainty``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch

from models.data import N_CLASSES, network_input, resample_onto
from models.network import build_network

log = logging.getLogger(__name__)
# Flip views of the TTA by number of views (array axes of a (batch, channel, z, y, x) tensor;
# () = the input itself). Two views: the flip along all three axes differs from the input on
# every axis, so the pair is the cheapest that still varies every direction (on the validation
# cohort as accurate as the four views, models/README.md).
TTA_VIEWS: dict[int, tuple[tuple[int, ...], ...]] = {2: ((), (2, 3, 4)), 4: ((), (2,), (3,), (4,))}


class WeightsError(RuntimeError):
    """The configured weights cannot be used (missing file, wrong format, wrong channels)."""


@dataclass
class LoadedModel:
    net: torch.nn.Module
    meta: dict[str, Any]
    device: str
    path: Path


@dataclass
class TTAPrediction:
    """``predict``'s answer, on the working grid of its input, arrays in (z, y, x) order."""

    probabilities: np.ndarray  # float64 (classes, z, y, x), mean over the TTA views
    uncertainty: np.ndarray  # float64 (z, y, x), the views' variance summed over the classes
    case_uncertainty: float
    n_views: int

    @property
    def labels(self) -> np.ndarray:
        """uint8 argmax of the mean probabilities (values of :class:`models.labels.Label`)."""
        return self.probabilities.argmax(0).astype(np.uint8)


@dataclass
class NetworkPrediction:
    """``predict_study``'s answer: on the post grid, arrays in SimpleITK (z, y, x) order."""

    labels: np.ndarray  # uint8 argmax of the mean probabilities
    probabilities: np.ndarray  # float32 (classes, z, y, x), TTA mean
    uncertainty: np.ndarray  # float32 per-voxel TTA variance summed over classes
    case_uncertainty: float
    device: str
    n_views: int


_CACHE: dict[tuple[str, float, str], LoadedModel] = {}


def resolve_weights(path: Path | str) -> Path:
    """``segmentation.network_weights`` as a file path: absolute as given, else relative to the
    folder holding the installed ``models`` package.

    That folder is the repository root in a checkout or an editable install, and the
    site-packages folder of a wheel, where ``models/weights/*.pt`` is package data: the default
    ``models/weights/segresnet_synthetic.pt`` is found either way.
    """
    path = Path(path)
    if path.is_absolute():
        return path
    return Path(str(files("models"))).resolve().parent / path


def load_model(path: Path | str, device: str = "cpu") -> LoadedModel:
    """Load a checkpoint of models/train.py; cached per (path, mtime, device). Raises ``WeightsError``."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"network weights not found: {path}")
    key = (str(path.resolve()), path.stat().st_mtime, device)
    if key in _CACHE:
        return _CACHE[key]
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        net = build_network(ckpt["network"])
        net.load_state_dict(ckpt["state_dict"])
    except Exception as exc:  # noqa: BLE001 - any unreadable checkpoint means "fall back", with the reason
        raise WeightsError(f"network weights {path} unusable: {type(exc).__name__}: {exc}") from exc
    if int(ckpt["network"]["out_channels"]) != N_CLASSES:
        raise WeightsError(f"network weights {path} predict {ckpt['network']['out_channels']} classes, not {N_CLASSES}")
    net.to(device).eval()
    if not device.startswith("cuda"):
        # oneDNN's 3D convolutions run ~30 % faster channels-last on the CPU (issue 19: a batch of
        # two windows 0.47 -> 0.33 s on one thread; 7 studies of the liver development seed 82,
        # predict_study 68 -> 56 s, labels identical but one voxel, case uncertainty within
        # 5e-5: another summation order, logits within 2e-3).
        net.to(memory_format=torch.channels_last_3d)
    meta = {k: v for k, v in ckpt.items() if k != "state_dict"}
    model = LoadedModel(net, meta, device, path)
    _CACHE[key] = model
    return model


def _autocast(device: str):
    from contextlib import nullcontext

    return torch.autocast("cuda", dtype=torch.float16) if device.startswith("cuda") else nullcontext()


# Memory of one window in a forward pass without gradients: peak RSS +161 MB for one 24 x 64 x 64
# window of the shipped 8-filter SegResNet on CPU in float32 (float16 on CUDA needs less), the
# budget per window when the batch of windows is sized to a GPU's free memory.
WINDOW_BYTES = 160 * 2**20
WINDOW_BYTES_ROI = 24 * 64 * 64
MAX_WINDOWS_PER_BATCH = 32  # one TTA view of a typical study is ~32 windows


def windows_per_batch(device: str, roi_zyx: tuple[int, ...]) -> int:
    """Windows per forward pass of the sliding window on ``device``.

    CPU: 2 (larger batches do not run faster on a few cores). CUDA: as many as half the free
    device memory holds at ``WINDOW_BYTES`` per window (scaled to the window's voxels), 1 to
    ``MAX_WINDOWS_PER_BATCH``: the other half is left to the resampling and to other workers.
    """
    if not device.startswith("cuda"):
        return 2
    free, _total = torch.cuda.mem_get_info(torch.device(device))
    per_window = WINDOW_BYTES * float(np.prod(roi_zyx)) / WINDOW_BYTES_ROI
    return int(np.clip((0.5 * free) // per_window, 1, MAX_WINDOWS_PER_BATCH))


def predict(model: LoadedModel, image: np.ndarray, tta: bool = True, sw_batch_size: int | None = None,
            overlap: float = 0.25, tta_views: int = 2) -> TTAPrediction:
    """Class probabilities and uncertainty of ``image`` (float32 (channels, z, y, x), the network's
    input on its working grid: ``models.data.network_input``), on that grid (module docstring).

    ``tta_views``: a key of ``TTA_VIEWS`` (ignored without ``tta``); ``sw_batch_size``: windows
    per forward pass, by default ``windows_per_batch`` of the model's device.
    """
    from monai.inferers import sliding_window_inference

    roi = tuple(int(v) for v in model.meta["roi_zyx"])
    sw_batch_size = sw_batch_size or windows_per_batch(model.device, roi)
    x = torch.from_numpy(image[None]).to(model.device)
    if not model.device.startswith("cuda"):
        x = x.contiguous(memory_format=torch.channels_last_3d)  # as load_model laid out the weights
    views = TTA_VIEWS[tta_views] if tta else ((),)
    total = torch.zeros((N_CLASSES, *image.shape[1:]), dtype=torch.float64)
    total_sq = torch.zeros_like(total)
    any_lesion = torch.zeros(image.shape[1:], dtype=torch.bool)
    with torch.no_grad(), _autocast(model.device):
        for axes in views:
            view = torch.flip(x, axes) if axes else x
            logits = sliding_window_inference(view, roi, sw_batch_size, model.net, overlap=overlap, mode="gaussian")
            prob = torch.softmax(logits.float(), dim=1)
            prob = (torch.flip(prob, axes) if axes else prob)[0].cpu().double()
            total += prob
            total_sq += prob * prob
            # Lesion where some lesion class beats the background: argmax(0) > 0 with the same
            # tie rule, ~30x faster (torch's argmax over the class axis took ~0.2 s a view on
            # the CPU, issue 19).
            any_lesion |= prob[1:].amax(0) > prob[0]
    mean = total / len(views)
    variance = (total_sq / len(views) - mean * mean).clamp_min(0).sum(0)
    # Rounded: torch's CPU kernels are not bit-reproducible across thread schedules (the 11th
    # digit moved between a run and its resume), and the figure is stored in assessment.json.
    case_unc = round(float(variance[any_lesion].mean()), 6) if bool(any_lesion.any()) else 0.0
    return TTAPrediction(mean.numpy(), variance.numpy(), case_unc, len(views))


# Air kept around the body's bounding box when the input is cropped to it (``body_box``): the
# skin edge is seen with air beyond it, as in the training patches that reach the body's edge.
BODY_MARGIN_MM = 5.0


def body_box(body_on_grid: np.ndarray, spacing_zyx: tuple[float, ...], roi_zyx: tuple[int, ...],
             overlap: float) -> tuple[slice, ...] | None:
    """The part of the working grid the sliding window needs: the body's bounding box plus
    ``BODY_MARGIN_MM``, then grown (within the grid, about its centre) to what the windows that
    box needs cover anyway (more context at no cost). None when there is no body.

    Why: an MRI's field of view holds air around the body (the phase-encoding FOV, the corners),
    and on the development and held-out cohorts the body's box needs 42 % fewer windows than the
    whole grid (802 -> 462 windows over 40 studies; issue 19). Nothing outside the body is read
    by the pipeline.
    """
    found = np.argwhere(body_on_grid)
    if not len(found):
        return None
    box = []
    for axis, n in enumerate(body_on_grid.shape):
        margin = int(np.ceil(BODY_MARGIN_MM / spacing_zyx[axis]))
        lo, hi = max(0, int(found[:, axis].min()) - margin), min(n, int(found[:, axis].max()) + 1 + margin)
        roi, step = roi_zyx[axis], max(1, int(roi_zyx[axis] * (1 - overlap)))
        windows = 1 if hi - lo <= roi else int(np.ceil((hi - lo - roi) / step)) + 1
        length = min(n, roi + step * (windows - 1))
        lo = int(np.clip((lo + hi - length) // 2, 0, n - length))
        box.append(slice(lo, lo + length))
    return tuple(box)


def predict_study(model: LoadedModel, pre_on_post: sitk.Image, subtraction: sitk.Image, body: np.ndarray,
                  tta: bool = True, sw_batch_size: int | None = None, overlap: float = 0.25,
                  tta_views: int = 2, crop_to_body: bool = True) -> NetworkPrediction:
    """``predict`` on a study, on ``pre_on_post``'s grid (module docstring).

    ``body``: the body mask array of ``pre_on_post`` ((z, y, x), nonzero = body; the pipeline's
    ``body_mask``), whose median pre-contrast signal scales the input (``network_input``).
    ``crop_to_body``: the network runs on ``body_box`` of the working grid only (background with
    no uncertainty beyond it); False: on the whole grid.
    """
    spacing = tuple(float(v) for v in model.meta["spacing_xyz"])
    image, grid = network_input(pre_on_post, subtraction, spacing, body)
    box = None
    if crop_to_body:
        body_img = sitk.GetImageFromArray((np.asarray(body) > 0).astype(np.uint8))
        body_img.CopyInformation(pre_on_post)
        body_on_grid = sitk.GetArrayFromImage(resample_onto(body_img, grid, sitk.sitkNearestNeighbor)) > 0
        box = body_box(body_on_grid, spacing[::-1], tuple(int(v) for v in model.meta["roi_zyx"]), overlap)
    if box is None:
        working = predict(model, image, tta, sw_batch_size, overlap, tta_views)
    else:
        part = predict(model, np.ascontiguousarray(image[(slice(None), *box)]), tta, sw_batch_size, overlap,
                       tta_views)
        probabilities = np.zeros((N_CLASSES, *image.shape[1:]))
        probabilities[0] = 1.0
        probabilities[(slice(None), *box)] = part.probabilities
        uncertainty = np.zeros(image.shape[1:])
        uncertainty[box] = part.uncertainty
        working = TTAPrediction(probabilities, uncertainty, part.case_uncertainty, part.n_views)

    # Back to the post grid: each class probability by linear interpolation; outside the
    # working grid (it covers the same FOV, so only at the border) it is background.
    probs_post = []
    for c in range(N_CLASSES):
        img = sitk.GetImageFromArray(working.probabilities[c].astype(np.float32))
        img.CopyInformation(grid)
        probs_post.append(sitk.GetArrayFromImage(
            resample_onto(img, pre_on_post, sitk.sitkLinear, default=1.0 if c == 0 else 0.0)))
    probabilities = np.stack(probs_post).astype(np.float32)
    unc_img = sitk.GetImageFromArray(working.uncertainty.astype(np.float32))
    unc_img.CopyInformation(grid)
    uncertainty = sitk.GetArrayFromImage(resample_onto(unc_img, pre_on_post, sitk.sitkLinear)).astype(np.float32)
    labels = probabilities.argmax(0).astype(np.uint8)
    return NetworkPrediction(labels, probabilities, uncertainty, working.case_uncertainty, model.device,
                             working.n_views)
