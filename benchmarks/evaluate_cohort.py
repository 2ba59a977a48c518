"""Accuracy and speed of the whole pipeline on a freshly generated cohort (figures for the README).

    .venv/bin/python benchmarks/evaluate_cohort.py --patients 8 --seed 2026 --profile heldout --workers 1

Generates a cohort with a seed and settings the tests do not use, runs the real flow, compares
cohort.csv with truth.json and prints category accuracy, viable-tumour sensitivity/specificity,
axis errors, follow-up -> baseline TRE and seconds per study (wall clock of the flow / number of studies).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=8)
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--profile", default="heldout")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("bench_out/evaluate"))
    parser.add_argument("--config", type=Path, default=None,
                        help="pipeline config overriding configs/default.yaml (e.g. segmentation.method: network)")
    args = parser.parse_args()

    from flows.assess import run_assessment
    from phantom import generate_export
    from phantom.evaluation import evaluate_run

    if args.out.exists():
        shutil.rmtree(args.out)
    t0 = time.perf_counter()
    generate_export(args.out / "data", args.patients, args.seed, profile=args.profile)
    t_gen = time.perf_counter() - t0
    summary = run_assessment(args.out / "data" / "export", args.out / "results", args.out / "data" / "procedures.csv",
                             config=args.config, workers=args.workers, device="cpu")
    report = evaluate_run(args.out / "results", args.out / "data" / "truth.json")
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    report.update({"patients": args.patients, "seed": args.seed, "profile": args.profile, "workers": args.workers,
                   "generate_s": round(t_gen, 1), "flow_s": summary["seconds"],
                   "seconds_per_study": round(summary["seconds"] / max(summary["studies"], 1), 2),
                   "peak_rss_mb": round(peak_mb)})
    (args.out / "evaluation.json").write_text(json.dumps(report, indent=2))
    vt = report["viable_tumour"]
    print(f"cohort: {args.patients} patients, seed {args.seed}, profile {args.profile}; "
          f"{report['studies_in_truth']} studies, {len(report['missing_from_cohort'])} missing from cohort.csv")
    print(f"category accuracy   {report['category_accuracy']:.3f}")
    print(f"viable tumour       sensitivity {vt['sensitivity']}  specificity {vt['specificity']}  "
          f"(tp {vt['tp']} fn {vt['fn']} tn {vt['tn']} fp {vt['fp']})")
    ac = report["actionable"]
    print(f"residual+LTP+susp.  sensitivity {ac['sensitivity']}  specificity {ac['specificity']}  "
          f"(tp {ac['tp']} fn {ac['fn']} tn {ac['tn']} fp {ac['fp']})")
    for key in ("long_axis_error_mm", "short_axis_error_mm", "volume_error_pct"):
        s = report[key]
        print(f"{key:<20}n {s['n']}  mean|e| {s['mean_abs']}  median|e| {s['median_abs']}  max|e| {s['max_abs']}  "
              f"mean e {s['mean_signed']}")
    cf = report["clean_studies_flagged"]
    print(f"clean flagged       {cf['flagged']}/{cf['n']}  false new lesions {report['false_new_lesions']}")
    print(f"  clean flagged by flag: {cf['by_flag']}")
    tre = report["follow_up_tre"]
    print(f"follow-up TRE       {tre['with_transform']}/{tre['pairs']} pairs with a transform; median "
          f"{tre['median_mm']} mm, p90 {tre['p90_mm']} mm, worst pair mean {tre['worst_pair_mean_mm']} mm")
    for group, g in report["accuracy_by_group"].items():
        print(f"  {group:<28}{g['correct']}/{g['n']}")
    print(f"time                {report['seconds_per_study']} s/study (flow {summary['seconds']} s, "
          f"{args.workers} worker(s)); peak RSS {report['peak_rss_mb']} MB")
    for w in report["wrong"]:
        print(f"  wrong: {w['patient_id']} ({w['scenario']}) {w['study_date']}: truth {w['truth']}, "
              f"predicted {w['predicted']}  [{w['flag_reasons']}]")


if __name__ == "__main__":
    main()
