"""Target registration error and seconds per pair of the configured registration path on a generated cohort.

    .venv/bin/python benchmarks/registration_tre.py --patients 8 --seed 2026 --profile heldout

Uses the generator's landmarks (the same 20 anatomical points in every study's pre- and
post-contrast pose, truth.json) and the pipeline's registration functions:
- intra-study: post-contrast (fixed) <- pre-contrast (moving), as the pipeline registers it;
  TRE_i = |T(landmark_post_i) - landmark_pre_i|;
- inter-study: baseline pre-contrast (fixed) <- follow-up pre-contrast (moving), without the
  ablation-zone hint the pipeline adds (a harder test of the initialisation);
  TRE_i = |T(landmark_baseline_i) - landmark_followup_i|.
The truth includes a smooth deformation of up to ~1.5 mm, which a rigid/affine map cannot follow.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np


def _tre(transform, fixed_points, moving_points) -> np.ndarray:
    mapped = np.array([transform.TransformPoint([float(v) for v in p]) for p in fixed_points])
    return np.linalg.norm(mapped - np.asarray(moving_points), axis=1)


def _print_peak_offsets(name: str, fixed, moving, tx, tre: np.ndarray, probe_mm: float) -> None:
    """The QC's peak test on one registered pair: at the found pose and moved 3/5/10 mm along
    each axis (the lowest of the six directions: a gate must reject every direction)."""
    import SimpleITK as sitk

    from pipeline.core.geometry import body_mask
    from pipeline.imaging.registration.metric import interior_mask, similarity_peak_offsets_mm

    inner = interior_mask(body_mask(fixed), 1)

    def worst_axis(transform) -> float:
        return min(float(np.abs(similarity_peak_offsets_mm(fixed, moving, transform, inner, probe_mm)[1]).max()), 99.0)

    moved = {}
    for d in (3.0, 5.0, 10.0):
        moved[d] = min(worst_axis(sitk.CompositeTransform([tx, sitk.TranslationTransform(
            3, [sign * d if k == axis else 0.0 for k in range(3)])])) for axis in range(3) for sign in (-1.0, 1.0))
    print(f"  peak offset {name}: TRE mean {tre.mean():.2f} mm; found {worst_axis(tx):.2f} mm; "
          + "; ".join(f"moved {d:g} mm {v:.2f}" for d, v in moved.items()), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=8)
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--profile", default="heldout")
    parser.add_argument("--config", type=Path, default=None)
    parser.add_argument("--peak-offsets", action="store_true",
                        help="also print, per intra-study pair that passed QC, how far its gradient NCC peaks "
                             "from the found pose and from the same pose moved 3/5/10 mm (the QC's peak test)")
    args = parser.parse_args()

    from phantom import generate_export
    from pipeline.core.config import load_config
    from pipeline.core.records import SeriesRole
    from pipeline.imaging.registration import register_intra_study, register_to_baseline
    from pipeline.imaging.volumes import load_series
    from pipeline.ingest.index import index_export

    cfg = load_config(args.config)
    work = Path(tempfile.mkdtemp(prefix="tre_"))
    try:
        truth = generate_export(work, args.patients, args.seed, profile=args.profile)
        studies = {s.study_instance_uid: s for s in index_export(work / "export", work / "c.sqlite", cfg.ingest).studies}
        rows = {"intra": [], "inter": []}
        for patient in truth["patients"]:
            pres = {}
            for st in patient["studies"]:
                study = studies[st["study_instance_uid"]]
                pres[st["study_instance_uid"]] = load_series(study.with_role(SeriesRole.T1_PRE)[0])
                posts = study.with_role(SeriesRole.T1_POST)
                if posts and st["landmarks_post_lps"]:
                    post = load_series(posts[-1])
                    t0 = time.perf_counter()
                    tx, qc = register_intra_study(post, pres[st["study_instance_uid"]], cfg.registration)
                    rows["intra"].append((qc.ok, _tre(tx, st["landmarks_post_lps"], st["landmarks_pre_lps"]),
                                          time.perf_counter() - t0))
                    if args.peak_offsets and qc.ok:
                        _print_peak_offsets(f"{patient['patient_id']} {st['study_date']}", post,
                                            pres[st["study_instance_uid"]], tx, rows["intra"][-1][1],
                                            cfg.registration.intra_study.peak_probe_mm)
            for st in patient["studies"]:
                if st["timepoint"] != "follow_up":
                    continue
                base = next(b for b in patient["studies"] if b["timepoint"] == "baseline" and b["session"] == st["session"])
                t0 = time.perf_counter()
                tx, qc = register_to_baseline(pres[base["study_instance_uid"]], pres[st["study_instance_uid"]],
                                              cfg.registration)
                rows["inter"].append((qc.ok, _tre(tx, base["landmarks_pre_lps"], st["landmarks_pre_lps"]),
                                      time.perf_counter() - t0))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    report = {}
    for kind, results in rows.items():
        ok = [r for r in results if r[0]]
        tre = np.concatenate([r[1] for r in ok]) if ok else np.array([np.nan])
        report[kind] = {
            "pairs": len(results), "passed_qc": len(ok),
            "tre_median_mm": round(float(np.median(tre)), 2), "tre_p90_mm": round(float(np.percentile(tre, 90)), 2),
            "worst_pair_mean_tre_mm": round(max((float(r[1].mean()) for r in ok), default=float("nan")), 2),
            "seconds_median": round(float(np.median([r[2] for r in results])), 2),
        }
        print(f"{kind:<6} {report[kind]['passed_qc']}/{report[kind]['pairs']} passed QC; TRE median "
              f"{report[kind]['tre_median_mm']} mm, p90 {report[kind]['tre_p90_mm']} mm, worst pair mean "
              f"{report[kind]['worst_pair_mean_tre_mm']} mm; {report[kind]['seconds_median']} s/pair")
    print(json.dumps({"patients": args.patients, "seed": args.seed, "profile": args.profile, **report}))


if __name__ == "__main__":
    main()
