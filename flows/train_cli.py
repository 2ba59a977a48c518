"""``ablation-response train``: the command's body (registered on the app of pipeline/cli.py).

In ``flows``, not ``models``: it starts the training flow (flows/train.py) on phantom cohorts,
and the network package never imports ``flows`` or ``phantom`` (issue 17).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer


def register(app: typer.Typer, console) -> None:
    @app.command()
    def train(
        out: Annotated[Path, typer.Option(help="folder for best.pt / last.pt checkpoints")] = Path("train_out"),
        work_dir: Annotated[Path, typer.Option(help="cache of the generated synthetic cohorts")] = Path("train_cache"),
        weights_out: Annotated[Optional[Path], typer.Option(help="copy the best checkpoint here (e.g. models/weights/...)")] = None,
        data: Annotated[Optional[Path], typer.Option(exists=True, file_okay=False,
                                                     help="case folders (pre_registered, subtraction, labels .nii.gz) to train or fine-tune on")] = None,
        init: Annotated[Optional[Path], typer.Option(exists=True, dir_okay=False, help="checkpoint to fine-tune from")] = None,
        train_patients: Annotated[int, typer.Option(min=1)] = 6,
        train_seed: Annotated[int, typer.Option()] = 101,
        train_profile: Annotated[str, typer.Option(help="phantom profile(s) of the training cohorts, comma-separated")] = "default",
        val_profile: Annotated[str, typer.Option(help="phantom profile of the validation cohort")] = "default",
        val_patients: Annotated[int, typer.Option(min=0, help="synthetic validation patients (0: none)")] = 2,
        val_seed: Annotated[int, typer.Option()] = 202,
        iterations: Annotated[int, typer.Option(min=1)] = 1000,
        minutes: Annotated[Optional[float], typer.Option(min=0.01, help="stop after this long (whichever first)")] = None,
        validate_every: Annotated[int, typer.Option(min=1)] = 100,
        stop_after: Annotated[Optional[int], typer.Option(
            min=1, help="stop at this iteration; the learning-rate schedule still spans --iterations")] = None,
        seed: Annotated[int, typer.Option(help="seed of weights init, patches and augmentation")] = 0,
        network: Annotated[str, typer.Option(help="segresnet | basicunet | dynunet")] = "segresnet",
        init_filters: Annotated[int, typer.Option(min=4)] = 16,
        device: Annotated[str, typer.Option(help="auto | cpu | cuda (AMP on cuda)")] = "auto",
        threads: Annotated[int, typer.Option(min=1, help="torch CPU threads")] = 2,
        patch: Annotated[str, typer.Option(help="patch z,y,x voxels")] = "32,80,80",
        crop_ratios: Annotated[str, typer.Option(help="patch-centre ratios bg,AZ,rim,focus")] = "1,1,2,2",
        ce_weights: Annotated[str, typer.Option(help="cross-entropy weights bg,AZ,rim,focus")] = "1,1,3,3",
        learning_rate: Annotated[float, typer.Option(min=1e-6)] = 2e-3,
    ) -> None:
        """Train the MONAI segmentation network on the synthetic cohort (or fine-tune on --data)."""
        from dataclasses import asdict

        from flows.train import train_segmentation
        from models.data import CHANNELS, N_CLASSES
        from models.network import NETWORK_NAMES, default_network_config
        from models.train import TrainSettings

        if network not in NETWORK_NAMES:
            console.print(f"[red]error:[/red] unknown network {network!r}; choose from {', '.join(NETWORK_NAMES)}")
            raise typer.Exit(code=2)
        net_cfg = {**default_network_config(len(CHANNELS), N_CLASSES), "name": network, "init_filters": init_filters}
        try:
            roi = tuple(int(v) for v in patch.split(","))
            ratios = tuple(float(v) for v in crop_ratios.split(","))
            weights = tuple(float(v) for v in ce_weights.split(","))
            if len(roi) != 3 or len(ratios) != N_CLASSES or len(weights) != N_CLASSES:
                raise ValueError
            profiles = tuple(p.strip() for p in train_profile.split(",") if p.strip())
            from phantom.profiles import get_profile

            for name in (*profiles, val_profile):
                get_profile(name)
        except ValueError:
            console.print(f"[red]error:[/red] --patch needs 3 integers, --crop-ratios and --ce-weights {N_CLASSES} "
                          "numbers, --train-profile and --val-profile known phantom profiles")
            raise typer.Exit(code=2) from None
        settings = asdict(TrainSettings(seed=seed, max_iterations=iterations, max_minutes=minutes, stop_after=stop_after,
                                        validate_every=validate_every, network=net_cfg, threads=threads,
                                        roi_zyx=roi, crop_ratios=ratios, ce_weights=weights,
                                        learning_rate=learning_rate))
        try:
            summary = train_segmentation(str(out), str(work_dir), settings, train_patients, train_seed, val_patients,
                                         val_seed, str(data) if data else None, str(init) if init else None, device,
                                         str(weights_out) if weights_out else None, profiles or ("default",), val_profile)
        except ValueError as exc:
            console.print(f"[red]error:[/red] {exc}")
            raise typer.Exit(code=2) from None
        best = summary["validation"][-1] if summary["validation"] else None
        console.print(f"{summary['iterations']} iterations on {summary['device']} in {summary['seconds']} s; "
                      f"loss {summary['first_loss']:.3f} -> {summary['last_loss']:.3f}; "
                      f"last validation {best}; best checkpoint {summary['checkpoint']}")
