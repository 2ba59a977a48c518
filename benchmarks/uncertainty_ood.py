"""Per-case network uncertainty on studies as the pipeline prepares them and on corrupted copies.

    .venv/bin/python benchmarks/uncertainty_ood.py --cohort-dir train_cache/val_seed202_n2 --patients 2 \
        --seed 202 --profile default --threads 1

The figures behind ``segmentation.network_review_uncertainty`` (models/README.md, "Uncertainty
and the review flag"). Each study of a synthetic cohort (``phantom.training_cases.build_synthetic_cohort``,
cached) is predicted as is and with one corruption at a time: the pre-contrast inverted (a series
of another contrast taken for the T1), the pre-contrast shifted 6 mm + 3 mm in-plane against the
post-contrast (misregistration), the subtraction zeroed (no contrast given), Gaussian noise of
25 % of the tissue level added to the pre-contrast. Prints one line per study and, per input,
the range and how many studies exceed the configured threshold.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models.data import CLASSICAL_FILE, PRE_FILE, SUB_FILE  # noqa: E402
from models.infer import load_model, predict_study  # noqa: E402
from phantom.training_cases import build_synthetic_cohort  # noqa: E402
from pipeline.core.config import load_config  # noqa: E402
from pipeline.core.geometry import body_mask  # noqa: E402


def corrupted_inputs(pre: sitk.Image, sub: sitk.Image, rng: np.random.Generator) -> dict[str, tuple]:
    """(pre-contrast, subtraction) pairs: as given and with each corruption (module docstring)."""
    post = sitk.Add(pre, sub)
    pre_a = sitk.GetArrayFromImage(pre)
    tissue = float(np.median(pre_a[pre_a > np.percentile(pre_a, 30)]))
    shifted = sitk.Resample(pre, pre, sitk.TranslationTransform(3, (6.0, 3.0, 0.0)), sitk.sitkLinear, 0.0)
    noise = sitk.GetImageFromArray(rng.normal(0.0, 0.25 * tissue, pre_a.shape).astype(np.float32))
    noise.CopyInformation(pre)
    inverted = sitk.Subtract(float(np.percentile(pre_a, 99)), pre)
    return {"as_prepared": (pre, sub),
            "pre_inverted": (inverted, sitk.Subtract(post, inverted)),
            "misregistered_6mm": (shifted, sitk.Subtract(post, shifted)),
            "no_contrast": (pre, sitk.Multiply(sub, 0.0)),
            "noise_25pct": (sitk.Add(pre, noise), sitk.Subtract(sub, noise))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--weights", type=Path, default=None, help="default: segmentation.network_weights")
    ap.add_argument("--cohort-dir", type=Path, default=Path("train_cache/val_seed202_n2"))
    ap.add_argument("--patients", type=int, default=2)
    ap.add_argument("--seed", type=int, default=202)
    ap.add_argument("--profile", default="default")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config()
    weights = args.weights or Path(__file__).resolve().parent.parent / cfg.segmentation.network_weights
    model = load_model(weights, "cpu")
    cases = build_synthetic_cohort(args.cohort_dir, args.patients, args.seed, args.profile)
    rng = np.random.default_rng(0)
    rows = {}
    for folder in sorted(p for p in cases.iterdir() if (p / CLASSICAL_FILE).is_file()):
        pre = sitk.ReadImage(str(folder / PRE_FILE), sitk.sitkFloat32)
        sub = sitk.ReadImage(str(folder / SUB_FILE), sitk.sitkFloat32)
        # The body mask of each input's own pre-contrast, as predict computed it before issue 17.
        rows[folder.name] = {name: predict_study(model, p, s, sitk.GetArrayFromImage(body_mask(p)),
                                                 tta=cfg.segmentation.network_tta,
                                                 tta_views=cfg.segmentation.network_tta_views).case_uncertainty
                             for name, (p, s) in corrupted_inputs(pre, sub, rng).items()}
        print(folder.name, json.dumps(rows[folder.name]), flush=True)
    limit = cfg.segmentation.network_review_uncertainty
    for name in next(iter(rows.values())):
        values = [r[name] for r in rows.values()]
        above = "-" if limit is None else f"{sum(v > limit for v in values)}/{len(values)} above {limit}"
        print(f"{name:20s} {min(values):.3f}-{max(values):.3f}  {above}")
    if args.json:
        args.json.write_text(json.dumps({"threshold": limit, "per_case": rows}, indent=1))


if __name__ == "__main__":
    main()
