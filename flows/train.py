"""Prefect flow: build (or reuse) the synthetic training and validation cohorts, train, keep the best weights.

Thin orchestration over phantom/training_cases.py, models/data.py and models/train.py (no logic
of its own): cohorts come from the phantom generator with two different seeds (validation never
sees a training patient), or from ``--data DIR`` (case folders with the pipeline's per-study images and
corrected labels) for fine-tuning; the best checkpoint by validation Dice is copied to
``weights_out`` when given.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE


@task(name="synthetic-cohort", cache_policy=NO_CACHE)
def cohort_task(root: Path, n_patients: int, seed: int, profile: str) -> Path:
    from phantom.training_cases import build_synthetic_cohort

    return build_synthetic_cohort(root, n_patients, seed, profile)


@task(name="train-network", cache_policy=NO_CACHE)
def train_task(train_dirs: list[Path], val_dirs: list[Path], settings: dict, out_dir: Path, device: str,
               init_checkpoint: Path | None, provenance: dict):
    from models.data import load_cases
    from models.train import TrainSettings, train
    from pipeline.core.geometry import body_mask

    cfg = TrainSettings(**settings)
    logger = get_run_logger()
    # The input is scaled within the pipeline's body mask, as at inference (models/data.py).
    train_cases = [c for d in train_dirs for c in load_cases(d, cfg.spacing_xyz, body_mask)]
    val_cases = [c for d in val_dirs for c in load_cases(d, cfg.spacing_xyz, body_mask)]
    logger.info("training on %d cases, validating on %d", len(train_cases), len(val_cases))
    provenance = {**provenance, "train_cases": len(train_cases), "val_cases": len(val_cases)}
    return train(train_cases, val_cases, cfg, out_dir, device, init_checkpoint, provenance, progress=logger.info)


@flow(name="train-segmentation")
def train_segmentation(
    out_dir: str,
    work_dir: str,
    settings: dict,
    train_patients: int = 6,
    train_seed: int = 101,
    val_patients: int = 2,
    val_seed: int = 202,
    data: str | None = None,
    init_checkpoint: str | None = None,
    device: str = "auto",
    weights_out: str | None = None,
    train_profiles: tuple[str, ...] = ("default",),
    val_profile: str = "default",
) -> dict:
    """Train the segmentation network; returns a summary (iterations, losses, validation, paths).

    ``data``: fine-tune (or train) on these case folders instead of the synthetic training
    cohort; the synthetic validation cohort still measures the result unless ``val_patients`` is 0.
    ``train_profiles``: one training cohort of ``train_patients`` per phantom profile (same seed).
    """
    from pipeline.core.devices import resolve_device

    resolved = resolve_device(device)
    work = Path(work_dir)
    if data:
        train_dirs = [Path(data)]
    else:
        # The default profile keeps its former cache folder name (existing caches stay valid).
        train_dirs = [cohort_task(work / f"train{'' if p == 'default' else '_' + p}_seed{train_seed}_n{train_patients}",
                                  train_patients, train_seed, p) for p in train_profiles]
    val_name = f"val{'' if val_profile == 'default' else '_' + val_profile}_seed{val_seed}_n{val_patients}"
    val_dirs = [cohort_task(work / val_name, val_patients, val_seed, val_profile)] if val_patients > 0 else []
    provenance = {"data": data or (f"phantom profile(s) {', '.join(train_profiles)}, seed {train_seed}, "
                                   f"{train_patients} patients each"),
                  "validation": (f"phantom profile {val_profile}, seed {val_seed}, {val_patients} patients"
                                 if val_dirs else ""),
                  "init_checkpoint": init_checkpoint or ""}
    result = train_task(train_dirs, val_dirs, settings, Path(out_dir), resolved,
                        Path(init_checkpoint) if init_checkpoint else None, provenance)
    if weights_out:
        from pipeline.core.files import atomic_write_bytes

        atomic_write_bytes(Path(weights_out), Path(result.checkpoint).read_bytes())
    return {"device": resolved, "iterations": result.iterations, "seconds": round(result.seconds, 1),
            "first_loss": result.losses[0], "last_loss": result.losses[-1],
            "validation": result.validation, "checkpoint": str(result.checkpoint),
            "last_checkpoint": str(result.last_checkpoint), "weights_out": weights_out,
            "n_parameters": result.n_parameters}
