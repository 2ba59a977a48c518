"""Train the segmentation network on prepared cases (models/data.py); plain function, no Prefect.

Augmentation is MONAI's (dictionary transforms on channel-first arrays); the domain
randomisation is what the phantom does not vary enough on its own: per-channel intensity scale
and offset (scanner gain left after normalisation, contrast dose), Gaussian noise, blur
(resolution), a smooth multiplicative bias field, in-plane rotations by 90 deg and flips on all
three axes (oblique, flipped and coronal-ordered acquisitions keep their voxel order, see
models/data.py). Loss: Dice + cross-entropy (MONAI ``DiceCELoss``), Dice over the batch so that
a patch without rim or focus does not dominate; the cross-entropy is class-weighted
(``ce_weights``). Patch centres are drawn per class (``crop_ratios``, MONAI
``RandCropByLabelClassesd``) so that the thin rim and the rare foci are seen often.

Determinism: ``monai.utils.set_determinism`` seeds torch, numpy and Python; the transform chain
gets its own seeded random state; data loading is in-process. On CPU two runs with one seed give
the same weights; on CUDA cuDNN's autotuning is disabled by set_determinism but some kernels
stay non-deterministic (documented in models/README.md).
"""

from __future__ import annotations

import io
import logging
import os
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from models.data import CHANNELS, CLASS_NAMES, N_CLASSES, Case
from models.network import build_network, count_parameters, default_network_config

log = logging.getLogger(__name__)
CHECKPOINT_FORMAT = 1


@dataclass
class TrainSettings:
    seed: int = 0
    # Working grid (x, y, z mm): close to the acquisitions' 1.4-1.9 mm pixels and 3 mm slices, so
    # a 1-2.5 mm rim is not averaged away.
    spacing_xyz: tuple[float, float, float] = (1.6, 1.6, 3.0)
    # Patch (z, y, x voxels): 96 x 128 x 128 mm, one AZ with its rim and surroundings.
    roi_zyx: tuple[int, int, int] = (32, 80, 80)
    patches_per_case: int = 2
    # Patch centres drawn per class (background, AZ, rim, focus): MONAI RandCropByLabelClassesd.
    # The rim (1-2 voxels thick) and the foci are a small fraction of the lesion voxels, so they
    # get their own share of patch centres; a class absent from a case is skipped for it.
    crop_ratios: tuple[float, float, float, float] = (1.0, 1.0, 2.0, 2.0)
    # Cross-entropy class weights (same order); the Dice term is unweighted.
    ce_weights: tuple[float, float, float, float] = (1.0, 1.0, 3.0, 3.0)
    max_iterations: int = 1000
    max_minutes: float | None = None  # stop at whichever of iterations / minutes comes first
    # Stop at this iteration while the learning-rate schedule still spans max_iterations: what
    # reproduces a run that was cut short (the shipped weights, models/README.md).
    stop_after: int | None = None
    learning_rate: float = 2e-3
    weight_decay: float = 1e-5
    validate_every: int = 100
    network: dict[str, Any] = field(default_factory=lambda: default_network_config(len(CHANNELS), N_CLASSES))
    threads: int = 2


@dataclass
class TrainResult:
    checkpoint: Path  # best validation Dice (last iteration when no validation cases)
    last_checkpoint: Path
    iterations: int
    seconds: float
    losses: list[float]
    validation: list[dict[str, Any]]
    device: str
    n_parameters: int


def _transforms(settings: TrainSettings):
    from monai import transforms as mt

    keys = ["image", "label"]
    return mt.Compose([
        mt.SpatialPadd(keys, spatial_size=settings.roi_zyx),
        mt.RandCropByLabelClassesd(keys, label_key="label", spatial_size=settings.roi_zyx,
                                   ratios=list(settings.crop_ratios), num_classes=N_CLASSES,
                                   num_samples=settings.patches_per_case, warn=False),
        mt.RandFlipd(keys, prob=0.5, spatial_axis=0),
        mt.RandFlipd(keys, prob=0.5, spatial_axis=1),
        mt.RandFlipd(keys, prob=0.5, spatial_axis=2),
        mt.RandRotate90d(keys, prob=0.5, max_k=3, spatial_axes=(1, 2)),
        mt.RandScaleIntensityd("image", factors=0.15, prob=0.8, channel_wise=True),
        mt.RandShiftIntensityd("image", offsets=0.05, prob=0.5, channel_wise=True),
        # Domain randomisation (issue 15): coil bias as strong as a body-array's, and acquisitions
        # coarser than the working grid (thick slices, 3-6 mm; low in-plane matrices) simulated by
        # down- and up-sampling, so that the network does not learn one scanner's look.
        mt.RandBiasFieldd("image", coeff_range=(0.0, 0.3), prob=0.4),
        mt.RandSimulateLowResolutiond("image", zoom_range=(0.5, 1.0), prob=0.25),
        mt.RandGaussianSmoothd("image", sigma_x=(0.0, 0.6), sigma_y=(0.3, 1.0), sigma_z=(0.3, 1.0), prob=0.3),
        mt.RandGaussianNoised("image", std=0.04, prob=0.5),
        mt.EnsureTyped(keys, dtype=(torch.float32, torch.long), track_meta=False),
    ])


def _save(checkpoint: dict, path: Path) -> None:
    """Write ``checkpoint`` to ``path`` atomically: a temporary file in the same folder, then
    ``os.replace``, so a crash never leaves a half-written checkpoint under its name.

    Not ``pipeline.core.files.atomic_write_bytes`` (the same steps) because ``models`` never
    imports the pipeline (issue 17). The temporary file is created by ``open`` (exclusive), so
    the checkpoint gets the permissions the umask gives, as the pipeline's helper gives them.
    """
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "xb") as handle:
            handle.write(buffer.getvalue())
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def make_checkpoint(net: torch.nn.Module, settings: TrainSettings, iteration: int, metrics: dict | None,
                    provenance: dict | None) -> dict:
    return {"format": CHECKPOINT_FORMAT, "network": dict(settings.network), "channels": list(CHANNELS),
            "class_names": list(CLASS_NAMES), "spacing_xyz": list(settings.spacing_xyz),
            "roi_zyx": list(settings.roi_zyx), "iteration": iteration, "metrics": metrics or {},
            "settings": asdict(settings), "provenance": provenance or {},
            "state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()}}


def case_dice(pred: np.ndarray, truth: np.ndarray) -> list[float]:
    """Dice per foreground class of one case; nan only where neither holds the class.

    A class predicted on a case whose truth lacks it scores 0 (MONAI's ``ignore_empty`` would drop
    the case): a false rim on a rim-free late follow-up is the error that matters most for the
    rim, and checkpoint selection must see it (benchmarks/segmentation_eval.py counts it alike).
    """
    out = []
    for c in range(1, N_CLASSES):
        p, t = pred == c, truth == c
        total = int(p.sum()) + int(t.sum())
        out.append(2.0 * float((p & t).sum()) / total if total else float("nan"))
    return out


def validate(net: torch.nn.Module, cases: list[Case], roi_zyx, device: str) -> dict[str, Any]:
    """Dice per foreground class on whole validation cases (sliding window, no TTA; ``case_dice``)."""
    from monai.inferers import sliding_window_inference

    net.eval()
    per_case = []
    with torch.no_grad(), _autocast(device):
        for case in cases:
            x = torch.from_numpy(case.image[None]).to(device)
            logits = sliding_window_inference(x, roi_zyx, 2, net, overlap=0.25, mode="gaussian")
            per_case.append(case_dice(logits.argmax(1)[0].cpu().numpy(), case.label))
    net.train()
    scores = np.asarray(per_case, float).reshape(len(cases), N_CLASSES - 1)
    dice = {name: (float(np.nanmean(scores[:, i])) if np.isfinite(scores[:, i]).any() else None)
            for i, name in enumerate(CLASS_NAMES[1:])}
    present = [v for v in dice.values() if v is not None]
    return {"dice": dice, "mean_dice": float(np.mean(present)) if present else 0.0}


def _autocast(device: str):
    from contextlib import nullcontext

    return torch.autocast("cuda", dtype=torch.float16) if device.startswith("cuda") else nullcontext()


def train(train_cases: list[Case], val_cases: list[Case], settings: TrainSettings, out_dir: Path,
          device: str = "cpu", init_checkpoint: Path | None = None, provenance: dict | None = None,
          progress: Callable[[str], None] | None = None) -> TrainResult:
    """Train on ``train_cases``, validate on ``val_cases``; write ``best.pt`` and ``last.pt`` in ``out_dir``.

    ``init_checkpoint``: fine-tune from these weights (their network config and working spacing
    are kept, so the fine-tuned model reads inputs the same way). AMP (float16 autocast and a
    gradient scaler) on CUDA; float32 on CPU.
    """
    from monai.data import DataLoader, Dataset
    from monai.losses import DiceCELoss
    from monai.utils import set_determinism

    if not train_cases:
        raise ValueError("no training case")
    if any(c.label is None for c in train_cases + val_cases):
        raise ValueError("every training and validation case needs labels")
    torch.set_num_threads(max(1, settings.threads))
    set_determinism(seed=settings.seed)
    say = progress or log.info
    start_state = None
    if init_checkpoint is not None:
        ckpt = torch.load(init_checkpoint, map_location="cpu", weights_only=False)
        settings = TrainSettings(**{**asdict(settings), "network": ckpt["network"],
                                    "spacing_xyz": tuple(ckpt["spacing_xyz"])})
        start_state = ckpt["state_dict"]
    net = build_network(settings.network)
    if start_state is not None:
        net.load_state_dict(start_state)
    net.to(device).train()
    transforms = _transforms(settings)
    transforms.set_random_state(seed=settings.seed)
    data = [{"image": c.image, "label": c.label[None]} for c in train_cases]
    loader = DataLoader(Dataset(data, transforms), batch_size=1, shuffle=True, num_workers=0,
                        generator=torch.Generator().manual_seed(settings.seed))
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, batch=True,
                         weight=torch.tensor(settings.ce_weights, dtype=torch.float32, device=device))
    optimiser = torch.optim.AdamW(net.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay)
    total = settings.max_iterations
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda it: (1 - min(it, total) / (total + 1)) ** 0.9)
    scaler = torch.amp.GradScaler("cuda", enabled=device.startswith("cuda"))
    out_dir = Path(out_dir)
    best_path, last_path = out_dir / "best.pt", out_dir / "last.pt"
    losses: list[float] = []
    validation: list[dict[str, Any]] = []
    best = -1.0
    started = time.perf_counter()
    iteration = 0

    def checkpoint_now(metrics):
        return make_checkpoint(net, settings, iteration, metrics,
                               {**(provenance or {}), "device": device, "minutes": (time.perf_counter() - started) / 60})

    last = min(total, settings.stop_after or total)
    done = False
    while not done:
        for batch in loader:
            x, y = batch["image"].to(device), batch["label"].to(device)
            optimiser.zero_grad(set_to_none=True)
            with _autocast(device):
                loss = loss_fn(net(x), y)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"training loss is {loss.item()} at iteration {iteration}")
            scaler.scale(loss).backward()
            scaler.step(optimiser)
            scaler.update()
            scheduler.step()
            iteration += 1
            losses.append(float(loss.item()))
            out_of_time = settings.max_minutes is not None and (time.perf_counter() - started) / 60 >= settings.max_minutes
            done = iteration >= last or out_of_time
            if iteration % 10 == 0:
                say(f"iteration {iteration}: loss {np.mean(losses[-10:]):.4f} "
                    f"({(time.perf_counter() - started) / iteration:.2f} s/it)")
            if val_cases and (iteration % settings.validate_every == 0 or done):
                scores = validate(net, val_cases, settings.roi_zyx, device)
                scores["iteration"] = iteration
                validation.append(scores)
                say(f"validation at {iteration}: {scores}")
                if scores["mean_dice"] > best:
                    best = scores["mean_dice"]
                    _save(checkpoint_now(scores), best_path)
            if done:
                break
    _save(checkpoint_now(validation[-1] if validation else None), last_path)
    if not val_cases:
        _save(checkpoint_now(None), best_path)
    return TrainResult(best_path, last_path, iteration, time.perf_counter() - started, losses, validation, device,
                       count_parameters(net))
