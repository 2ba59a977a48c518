"""Dice and HD95 per class, network vs classical, on a held-out synthetic cohort.

    .venv/bin/python benchmarks/segmentation_eval.py --weights models/weights/segresnet_synthetic.pt \
        --cohort-dir eval_cache/heldout --patients 3 --seed 303 --profile heldout

The cohort (phantom ``heldout`` profile: other sizes, noise, poses and contrast than training)
is built once by the real pipeline (phantom/training_cases.py: ingest, registration, subtraction and the
classical segmentation, whose labels are stored beside the truth) and reused. Network labels are
the TTA argmax of models/infer.py (``predict_study``) on the study's post grid, cleaned as the
pipeline cleans them (``pipeline.segmentation.network.clean_prediction``: one AZ component, rim near it and enhancing, foci of the
minimum size; the AZ edge by ``place_az_edge`` when ``segmentation.network_az_edge`` is
``half_max``; the classical labels went through the same kind of rules);
``network_own_edge`` is the cleaned labels with the network's own AZ edge, ``network_raw`` the
bare argmax. The focus candidates the pipeline hands on (the network's foci merged with rule
6's thick enhancing regions, ``pipeline.segmentation.network.pipeline_foci``) are not scored here: before the
foci stage judges them they hold every thick enhancing region of the body; the judged foci are
scored through the whole pipeline (benchmarks/evaluate_cohort.py).
Per class, Dice is over the studies
where the truth or the prediction holds the class (both empty: not counted); HD95 (mm, MONAI)
over the studies where both hold it. Prints a table and, with --json, writes the figures.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models.data import CLASS_NAMES, CLASSICAL_FILE, LABEL_FILE, PRE_FILE, SUB_FILE  # noqa: E402
from models.infer import load_model, predict_study  # noqa: E402
from models.train import case_dice  # noqa: E402
from phantom.training_cases import build_synthetic_cohort  # noqa: E402
from pipeline.core.config import load_config  # noqa: E402
from pipeline.core.geometry import body_mask  # noqa: E402
from pipeline.imaging.subtraction import relative_enhancement  # noqa: E402
from pipeline.segmentation.classical import enhancing_tissue  # noqa: E402
from pipeline.segmentation.network import clean_prediction, place_az_edge  # noqa: E402


def _scores(pred: np.ndarray, truth: np.ndarray, spacing_zyx: np.ndarray) -> dict[str, dict]:
    from monai.metrics import compute_hausdorff_distance

    out = {}
    dice = case_dice(pred, truth)  # the validation's Dice: nan only where neither holds the class
    for c, name in enumerate(CLASS_NAMES[1:], 1):
        p, t = pred == c, truth == c
        entry = {"dice": None if np.isnan(dice[c - 1]) else dice[c - 1], "hd95_mm": None,
                 "truth_voxels": int(t.sum()), "pred_voxels": int(p.sum())}
        if p.any() and t.any():
            hd = compute_hausdorff_distance(torch.from_numpy(p[None, None]), torch.from_numpy(t[None, None]),
                                            percentile=95, spacing=[float(s) for s in spacing_zyx])
            entry["hd95_mm"] = float(hd.item())
        out[name] = entry
    return out


def _summary(per_case: list[dict], method: str) -> dict[str, dict]:
    out = {}
    for name in CLASS_NAMES[1:]:
        d = [c[method][name]["dice"] for c in per_case if c[method][name]["dice"] is not None]
        h = [c[method][name]["hd95_mm"] for c in per_case if c[method][name]["hd95_mm"] is not None]
        out[name] = {"dice_mean": float(np.mean(d)) if d else None, "dice_n": len(d),
                     "hd95_median_mm": float(np.median(h)) if h else None, "hd95_n": len(h)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--weights", type=Path, required=True)
    ap.add_argument("--cohort-dir", type=Path, default=Path("eval_cache/heldout"))
    ap.add_argument("--patients", type=int, default=3)
    ap.add_argument("--seed", type=int, default=303)
    ap.add_argument("--profile", default="heldout")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-tta", action="store_true")
    ap.add_argument("--tta-views", type=int, choices=(2, 4), default=None,
                    help="TTA views (default: segmentation.network_tta_views of the config)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    cases_dir = build_synthetic_cohort(args.cohort_dir, args.patients, args.seed, args.profile)
    model = load_model(args.weights, args.device)
    cfg = load_config()
    tta_views = args.tta_views or cfg.segmentation.network_tta_views
    per_case, seconds = [], []
    for folder in sorted(p for p in cases_dir.iterdir() if (p / CLASSICAL_FILE).is_file()):
        pre = sitk.ReadImage(str(folder / PRE_FILE), sitk.sitkFloat32)
        sub = sitk.ReadImage(str(folder / SUB_FILE), sitk.sitkFloat32)
        truth = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / LABEL_FILE)))
        classical = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / CLASSICAL_FILE)))
        t0 = time.perf_counter()
        body = body_mask(pre)  # timed with the prediction, as when predict computed it itself
        body_a = sitk.GetArrayFromImage(body) > 0
        pred = predict_study(model, pre, sub, body_a, tta=not args.no_tta, tta_views=tta_views)
        seconds.append(time.perf_counter() - t0)
        spacing = np.array(pre.GetSpacing()[::-1])
        # The pipeline's RE map: the subtraction is post_norm - pre (pipeline/imaging/subtraction.py).
        rel = relative_enhancement(pre, sitk.Add(pre, sub), body)
        cleaned = clean_prediction(pred, body_a, spacing, cfg.segmentation, cfg.enhancement,
                                   relative_enhancement=sitk.GetArrayFromImage(rel))
        own_edge = cleaned.labels() if cleaned is not None else np.zeros_like(pred.labels)
        network = own_edge
        if cleaned is not None and cfg.segmentation.network_az_edge == "half_max":
            network = place_az_edge(cleaned, sitk.GetArrayFromImage(pre), sitk.GetArrayFromImage(rel),
                                    enhancing_tissue(rel, body, cfg.enhancement), body_a, spacing,
                                    cfg.segmentation, cfg.enhancement).labels()
        per_case.append({"case": folder.name, "network": _scores(network, truth, spacing),
                         "network_own_edge": _scores(own_edge, truth, spacing),
                         "network_raw": _scores(pred.labels, truth, spacing),
                         "classical": _scores(classical, truth, spacing), "uncertainty": pred.case_uncertainty})
    result = {"weights": str(args.weights), "cohort": {"patients": args.patients, "seed": args.seed,
                                                       "profile": args.profile, "studies": len(per_case)},
              "device": args.device, "tta": not args.no_tta, "tta_views": tta_views,
              "seconds_per_study_median": float(np.median(seconds)) if seconds else None,
              # The whole benchmark process (cohort arrays, both methods' labels, MONAI metrics):
              # an upper bound of what inference needs.
              "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
              "network_az_edge": cfg.segmentation.network_az_edge,
              "network": _summary(per_case, "network"),
              "network_own_edge": _summary(per_case, "network_own_edge"),
              "network_raw": _summary(per_case, "network_raw"),
              "classical": _summary(per_case, "classical"),
              "per_case": per_case}
    print(f"{len(per_case)} studies, {args.profile} profile seed {args.seed}; network "
          f"{result['seconds_per_study_median']:.1f} s/study on {args.device} (TTA {not args.no_tta}, "
          f"{tta_views} views, {args.threads} thread(s)); peak RSS of this process {result['peak_rss_mb']} MB")
    print(f"{'class':18s} {'method':16s} {'Dice':>7s} {'n':>3s} {'HD95 mm':>8s} {'n':>3s}")
    for name in CLASS_NAMES[1:]:
        for method in ("network", "network_own_edge", "network_raw", "classical"):
            s = result[method][name]
            dice = f"{s['dice_mean']:.4f}" if s["dice_mean"] is not None else "-"
            hd = f"{s['hd95_median_mm']:.1f}" if s["hd95_median_mm"] is not None else "-"
            print(f"{name:18s} {method:16s} {dice:>7s} {s['dice_n']:>3d} {hd:>8s} {s['hd95_n']:>3d}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
