"""Network inference on one study: sliding window, flip test-time augmentation, back to the post grid.

``predict`` returns class probabilities, labels and a per-voxel uncertainty on the study's
post-contrast grid (its origin, spacing and direction); ``segment_network`` turns them into the
``SegmentationResult`` the classical method returns, so the measurement, rim and focus stages
downstream are the same whichever method segmented.

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
from models.labels import Label, label_map
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
class NetworkPrediction:
    """On the post grid, arrays in SimpleITK (z, y, x) order."""

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


def predict(model: LoadedModel, pre_on_post: sitk.Image, subtraction: sitk.Image, body: sitk.Image | None = None,
            tta: bool = True, sw_batch_size: int | None = None, overlap: float = 0.25,
            tta_views: int = 2) -> NetworkPrediction:
    """Probabilities, labels and uncertainty on ``pre_on_post``'s grid (see module docstring).

    ``tta_views``: a key of ``TTA_VIEWS`` (ignored without ``tta``); ``sw_batch_size``: windows
    per forward pass, by default ``windows_per_batch`` of the model's device.
    """
    from monai.inferers import sliding_window_inference

    spacing = tuple(float(v) for v in model.meta["spacing_xyz"])
    roi = tuple(int(v) for v in model.meta["roi_zyx"])
    image, grid = network_input(pre_on_post, subtraction, spacing, body)
    sw_batch_size = sw_batch_size or windows_per_batch(model.device, roi)
    x = torch.from_numpy(image[None]).to(model.device)
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
            any_lesion |= prob.argmax(0) > 0
    mean = total / len(views)
    variance = (total_sq / len(views) - mean * mean).clamp_min(0).sum(0)
    # Rounded: torch's CPU kernels are not bit-reproducible across thread schedules (the 11th
    # digit moved between a run and its resume), and the figure is stored in assessment.json.
    case_unc = round(float(variance[any_lesion].mean()), 6) if bool(any_lesion.any()) else 0.0

    # Back to the post grid: each class probability by linear interpolation; outside the
    # working grid (it covers the same FOV, so only at the border) it is background.
    probs_post = []
    for c in range(N_CLASSES):
        img = sitk.GetImageFromArray(mean[c].float().numpy())
        img.CopyInformation(grid)
        probs_post.append(sitk.GetArrayFromImage(
            resample_onto(img, pre_on_post, sitk.sitkLinear, default=1.0 if c == 0 else 0.0)))
    probabilities = np.stack(probs_post).astype(np.float32)
    unc_img = sitk.GetImageFromArray(variance.float().numpy())
    unc_img.CopyInformation(grid)
    uncertainty = sitk.GetArrayFromImage(resample_onto(unc_img, pre_on_post, sitk.sitkLinear)).astype(np.float32)
    labels = probabilities.argmax(0).astype(np.uint8)
    return NetworkPrediction(labels, probabilities, uncertainty, case_unc, model.device, len(views))


@dataclass
class CleanedPrediction:
    """The network's labels as the pipeline uses them (``clean_prediction``), on the post grid."""

    az: np.ndarray  # bool: the ablation-zone component kept, holes filled
    az_soft: np.ndarray  # float32: its probability within one voxel of it
    rim: np.ndarray  # bool: rim voxels outside the AZ and within rim_search_mm of it
    foci: list[np.ndarray]  # bool masks: focus components of at least the minimum size

    def labels(self) -> np.ndarray:
        """uint8 label map, values of :class:`models.labels.Label`."""
        return label_map(self.az, self.rim, self.foci)


def clean_prediction(pred: NetworkPrediction, body_a: np.ndarray, spacing_zyx: np.ndarray, cfg,
                     hint_zyx: np.ndarray | None = None,
                     relative_enhancement: np.ndarray | None = None) -> CleanedPrediction | None:
    """The argmax turned into one ablation zone, its rim and the foci; None without an AZ.

    Why each rule (the same as the classical method's, pipeline/segmentation/classical.py): one
    treated lesion per study, so the AZ is the component nearest the target hint (else the
    largest) of at least ``az_min_volume_ml``; the rim is the benign margin of that zone, so rim
    voxels farther than ``rim_search_mm`` from it are not rim (they measured as false rim on
    rim-free held-out studies); focus components under rule 6's minimum size are specks
    (single stray voxels set the focus HD95 to tens of mm before this filter).
    """
    from scipy import ndimage as ndi

    from pipeline.segmentation.classical import component_nearest

    spacing = np.asarray(spacing_zyx, float)
    lab, n = ndi.label(pred.labels == Label.ABLATION_ZONE)
    min_az_vox = int(cfg.segmentation.az_min_volume_ml / (float(np.prod(spacing)) / 1000.0))
    keep = component_nearest(lab, n, hint_zyx, spacing, min_az_vox) if n else 0
    if keep == 0:
        return None
    az = ndi.binary_fill_holes(lab == keep) & body_a
    soft = pred.probabilities[Label.ABLATION_ZONE].copy()
    soft[~ndi.binary_dilation(az, iterations=1)] = 0.0
    near_az = ndi.distance_transform_edt(~az, sampling=spacing) <= cfg.segmentation.rim_search_mm
    rim = (pred.labels == Label.RIM) & ~az & body_a & near_az
    if (relative_enhancement is not None and rim.any()
            and float(relative_enhancement[rim].mean()) < cfg.segmentation.network_rim_min_mean_re):
        rim = np.zeros_like(rim)
    focus = (pred.labels == Label.ENHANCING_FOCUS) & ~az & body_a
    flab, nf = ndi.label(focus)
    min_vox = max(1, int(np.ceil((np.pi / 6 * cfg.enhancement.min_component_mm ** 3) / np.prod(spacing))))
    sizes = ndi.sum_labels(np.ones_like(flab), flab, index=np.arange(1, nf + 1)) if nf else []
    foci = [flab == i for i, size in zip(range(1, nf + 1), sizes) if int(size) >= min_vox]
    return CleanedPrediction(az, soft.astype(np.float32), rim, foci)


def place_az_edge(cleaned: CleanedPrediction, pre_a: np.ndarray, relative_enhancement: np.ndarray,
                  enhancing: np.ndarray, body_a: np.ndarray, spacing_zyx: np.ndarray, cfg) -> CleanedPrediction:
    """The network's zone with its edge at the half-way pre-contrast level (``segmentation.network_az_edge``).

    The network decides which zone is the ablation zone and where its rim and foci are; the edge
    of the zone is then placed where the pre-contrast signal crosses half-way between the zone's
    core and its surroundings, the partial-volume convention the classical method measures on
    (``pipeline.segmentation.classical.half_max_edge``, shared). Why: the network sees the study on a
    1.6 mm working grid and is trained on labels resampled to it by nearest neighbour, so its edge
    jitters by a fraction of a voxel (held-out AZ Dice 0.967 with its own edge; models/README.md
    gives both figures).

    The core the edge grows from is the network's zone joined with the T1-bright non-enhancing
    region it overlaps most (``t1_bright_components``, the classical method's zone candidates):
    the half-way rule measures the core's own signal 2 mm inside it and the surroundings' 2-6 mm
    outside it, and where the network's zone falls short of the bright region the edge would
    otherwise be searched from too far inside. Chosen on the validation cohort over the network's
    zone alone (AZ Dice 0.9886 against 0.9882) and checked on the held-out one (0.9818 against
    0.9812; the classical method 0.9885 and 0.9817). Without an overlapping bright region the
    core is the network's zone. Rim and foci keep the network's voxels outside the new zone.
    """
    from scipy import ndimage as ndi

    from pipeline.segmentation.classical import (
        half_max_edge,
        smooth_relative_enhancement,
        t1_bright_components,
        tissue_reference_level,
    )

    spacing = np.asarray(spacing_zyx, float)
    core = cleaned.az
    ref = tissue_reference_level(pre_a, body_a)
    if ref is not None:
        bright, n = t1_bright_components(pre_a, smooth_relative_enhancement(relative_enhancement), body_a, spacing,
                                         ref, cfg)
        if n:
            overlap = ndi.sum_labels(cleaned.az, bright, index=np.arange(1, n + 1))
            if overlap.max() > 0:
                core = cleaned.az | (bright == 1 + int(np.argmax(overlap)))
    inside = body_a & np.isfinite(pre_a)
    az, soft = half_max_edge(core, pre_a, enhancing, body_a, spacing, float(np.median(pre_a[inside])))
    if not az.any():
        return cleaned
    return CleanedPrediction(az, soft, cleaned.rim & ~az, [m & ~az for m in cleaned.foci if (m & ~az).any()])


def segment_network(pre_on_post: sitk.Image, subtraction: sitk.Image, relative_enhancement: sitk.Image,
                    body: sitk.Image, cfg, model: LoadedModel,
                    target_hint_lps: tuple[float, float, float] | None = None):
    """``SegmentationResult`` (pipeline/segmentation/classical.py) from the network, plus the prediction.

    The AZ and rim are ``clean_prediction``'s, its foci merged with rule 6's thick enhancing
    regions (``pipeline_foci``), the AZ's edge placed by ``place_az_edge``
    when ``segmentation.network_az_edge`` is ``half_max``; ``az_soft`` is then the zone's
    partial-volume fraction, else the network's AZ probability (what the measurement refines the
    edge with). ``enhancing`` stays rule 6's
    definition (RE >= threshold, components >= the minimum size; shared with the classical
    method) plus the network's rim and foci, because the foci stage measures new lesions and
    vessels on it, not only what the network labels.
    """
    from pipeline.segmentation.classical import SegmentationResult, enhancing_tissue, spacing_zyx

    pred = predict(model, pre_on_post, subtraction, body, tta=cfg.segmentation.network_tta,
                   tta_views=cfg.segmentation.network_tta_views)
    spacing = spacing_zyx(pre_on_post)
    body_a = sitk.GetArrayFromImage(body) > 0
    enhancing = enhancing_tissue(relative_enhancement, body, cfg)
    hint = None
    if target_hint_lps is not None:
        hint = np.array(pre_on_post.TransformPhysicalPointToContinuousIndex(tuple(float(v) for v in target_hint_lps))[::-1])
    cleaned = clean_prediction(pred, body_a, spacing, cfg, hint, sitk.GetArrayFromImage(relative_enhancement))
    if cleaned is None:
        empty = np.zeros(pred.labels.shape, bool)
        return SegmentationResult(empty, empty.astype(np.float32), enhancing, empty, [], False,
                                  "the network found no ablation zone"), pred
    if cfg.segmentation.network_az_edge == "half_max":
        cleaned = place_az_edge(cleaned, sitk.GetArrayFromImage(pre_on_post).astype(np.float32),
                                sitk.GetArrayFromImage(relative_enhancement), enhancing, body_a, spacing, cfg)
    enhancing, foci = pipeline_foci(cleaned, enhancing, spacing, cfg)
    return SegmentationResult(cleaned.az, cleaned.az_soft, enhancing, cleaned.rim, foci, True, ""), pred


def pipeline_foci(cleaned: CleanedPrediction, enhancing: np.ndarray, spacing_zyx: np.ndarray,
                  cfg) -> tuple[np.ndarray, list[np.ndarray]]:
    """(enhancing tissue, focus candidates) as ``segment_network`` hands them on to the foci stage.

    ``enhancing``: rule 6's enhancing tissue. Returned: it plus the network's rim and foci,
    outside the zone; the candidates are the network's foci merged with rule 6's thick enhancing
    regions (the classical candidates). The network alone under-drew a residual tumour at the
    zone's margin (5.6 mm thick where the classical candidate measured 7.2 mm; default cohort
    seed 2027) and the study read as complete; a missed viable tumour costs more than a
    candidate that the foci rules (thickness, vessel shape, distance) then dismiss.
    """
    from scipy import ndimage as ndi

    from pipeline.segmentation.classical import focus_candidates

    network_enhancing = cleaned.rim.copy()
    for mask in cleaned.foci:
        network_enhancing |= mask
    enhancing = (enhancing | network_enhancing) & ~cleaned.az
    merged = np.zeros(enhancing.shape, bool)
    for mask in cleaned.foci + focus_candidates(enhancing, cleaned.az, np.asarray(spacing_zyx, float),
                                                cfg.foci.min_thickness_mm):
        merged |= mask
    lab, n = ndi.label(merged)
    return enhancing, [lab == i for i in range(1, n + 1)]
