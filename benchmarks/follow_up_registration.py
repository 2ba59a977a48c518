"""Follow-up -> baseline registration of a finished cohort run, redone with another config.

    .venv/bin/python benchmarks/evaluate_cohort.py --patients 6 --seed 61 --profile abdomen --out bench_out/ab61
    .venv/bin/python benchmarks/follow_up_registration.py bench_out/ab61 --config my_registration.yaml

Re-registers every follow-up of an ``evaluate_cohort.py`` run exactly as the pipeline does
(its ``pre_registered.nii.gz`` onto the baseline's, with the ablation-zone hint and region from
the two ``assessment.json``) and scores the transforms with the generator's landmarks, like the
``follow-up TRE`` line of ``evaluate_cohort.py``: a registration change is compared on the same
images in minutes instead of a whole cohort run. Prints one line per pair that fails QC or has a
mean TRE above 2 mm, then the summary (QC passes, TRE median / p90, worst pair, s/pair).
``--per-pair`` prints every pair: QC, the inter-study peak offset, the mean TRE over all 20
landmarks and over the 8 the generator places 15-40 mm from the zone, and that near error's mean
vector (LPS, mm). To see what a gate rejects, loosen it in ``--config`` (e.g.
``registration: {inter_study: {max_peak_offset_mm: 99}}``): the peak offset is still computed.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="the --out folder of benchmarks/evaluate_cohort.py")
    parser.add_argument("--config", type=Path, default=None, help="config merged over configs/default.yaml")
    parser.add_argument("--per-pair", action="store_true", help="one line per pair (see above)")
    args = parser.parse_args()

    import SimpleITK as sitk

    from phantom.evaluation import follow_up_pairs, landmark_tre_mm
    from pipeline.core.config import load_config
    from pipeline.core.files import read_image
    from pipeline.core.records import AxisMeasurement
    from pipeline.imaging.registration import register_to_baseline
    from pipeline.run.patient import zone_guidance
    from pipeline.outputs.store import IMAGE_FILES

    cfg = load_config(args.config)
    truth = json.loads((args.run / "data" / "truth.json").read_text())

    def zone(folder: Path) -> AxisMeasurement | None:
        found = json.loads((folder / "assessment.json").read_text())["imaging"].get("ablation_zone")
        return None if found is None else AxisMeasurement.model_validate(found)

    tre, pair_means, passed, seconds, pairs = [], [], 0, [], 0
    for pair in follow_up_pairs(args.run / "results", truth):
        folders = (pair.baseline_dir, pair.follow_up_dir)
        if None in folders or not all((f / IMAGE_FILES["pre_registered"]).exists() for f in folders):
            continue
        pairs += 1
        hint, region = zone_guidance(zone(pair.baseline_dir), zone(pair.follow_up_dir),
                                     cfg.foci.local_max_distance_mm)
        fixed, moving = (read_image(f / IMAGE_FILES["pre_registered"], sitk.sitkFloat32) for f in folders)
        t0 = time.perf_counter()
        tx, qc = register_to_baseline(fixed, moving, cfg.registration, hint_shift_lps=hint, zone_region_lps=region)
        seconds.append(time.perf_counter() - t0)
        if not qc.ok:
            print(f"  failed QC  {pair.name}: {qc.reason}", flush=True)
            continue
        passed += 1
        errors = landmark_tre_mm(tx, pair)
        if args.per_pair:
            # The generator's first 8 landmarks lie 15-40 mm from the zone (phantom.patient._landmarks).
            near = np.array([tx.TransformPoint([float(v) for v in p])
                             for p in pair.baseline["landmarks_post_lps"][:8]]) - np.asarray(
                pair.follow_up["landmarks_post_lps"][:8])
            print(f"  {pair.name}: peak {qc.peak_offset_mm} mm; TRE {errors.mean():.2f} mm, near zone "
                  f"{np.linalg.norm(near, axis=1).mean():.2f} mm, near mean error LPS "
                  f"{np.round(near.mean(axis=0), 2).tolist()}", flush=True)
        tre.extend(errors.tolist())
        pair_means.append(float(errors.mean()))
        if errors.mean() > 2.0:
            print(f"  TRE {errors.mean():.2f} mm  {pair.name}: {qc.method}; {qc.stop_condition[-120:]}")
    a = np.asarray(tre, float)
    summary = {"run": str(args.run), "config": str(args.config), "pairs": pairs, "passed_qc": passed,
               "tre_median_mm": round(float(np.median(a)), 2) if len(a) else None,
               "tre_p90_mm": round(float(np.percentile(a, 90)), 2) if len(a) else None,
               "worst_pair_mean_mm": round(max(pair_means), 2) if pair_means else None,
               "seconds_median": round(float(np.median(seconds)), 2) if seconds else None}
    print(f"{passed}/{pairs} passed QC; TRE median {summary['tre_median_mm']} mm, p90 {summary['tre_p90_mm']} mm, "
          f"worst pair mean {summary['worst_pair_mean_mm']} mm; {summary['seconds_median']} s/pair")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
