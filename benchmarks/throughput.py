"""Where a study's time goes, per device, with the accuracy of the same run (issue 19).

    .venv/bin/python benchmarks/throughput.py --patients 4 --seed 2026 --profile heldout --workers 2

Generates one cohort, then runs the real flow end to end on each device of ``--devices``
(default ``cpu,cuda``; ``cuda`` is skipped, saying so, where torch sees no CUDA device), each
into a fresh output folder (nothing reused). Prints per device:
- seconds per study of every step (the mean over studies of ``stage_seconds`` in each
  assessment.json: imaging stages, follow-up -> baseline registration, outputs), their sum, the
  flow's wall seconds per study and studies per hour (wall time includes the flow's start);
- peak resident memory of this process (the flow and its threads; ``ru_maxrss``, so a later
  device's figure is at least the earlier one's) and peak CUDA memory allocated by torch;
- category accuracy and axis errors (``phantom.evaluation.evaluate_run``) and the end-to-end
  follow-up -> baseline TRE: each follow-up's written ``to_baseline.tfm`` (+ field) maps the
  baseline's landmarks (post-contrast pose, truth.json) into the follow-up, compared with the
  follow-up's own landmarks, both in the pose of the last post-contrast phase (truth.json has
  no other post pose). It includes both studies' pre -> post registration error and any
  motion between the last phase and the phase the pipeline registered on, so it compares runs
  and devices with each other, not with ``registration_tre.py``'s pre -> pre figures.

A figure never comes from a timed test; speed never silently costs accuracy: the two are printed
from the same run.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import time
from collections import defaultdict
from pathlib import Path

import numpy as np


def _stage_seconds(results: Path) -> tuple[dict[str, float], int]:
    """Mean seconds per study of each step, and the number of studies with timings."""
    totals: dict[str, float] = defaultdict(float)
    n = 0
    for path in results.rglob("assessment.json"):
        timings = json.loads(path.read_text()).get("stage_seconds") or {}
        if timings:
            n += 1
            for stage, seconds in timings.items():
                totals[stage] += float(seconds)
    return {stage: total / max(n, 1) for stage, total in totals.items()}, n


def _follow_up_tre(results: Path, truth_path: Path) -> list[float]:
    """Per-landmark TRE (mm) of every follow-up's written transform to its baseline."""
    import SimpleITK as sitk

    from pipeline.imaging.registration.files import read_to_baseline

    landmarks = {}
    for patient in json.loads(truth_path.read_text())["patients"]:
        for study in patient["studies"]:
            landmarks[study["study_instance_uid"]] = study.get("landmarks_post_lps") or study.get("landmarks_pre_lps")
    errors: list[float] = []
    for path in results.rglob("assessment.json"):
        record = json.loads(path.read_text())
        base_uid, uid = record.get("baseline_study_instance_uid"), record["study_instance_uid"]
        if not base_uid or base_uid == uid or not (path.parent / "to_baseline.tfm").exists():
            continue
        if landmarks.get(base_uid) is None or landmarks.get(uid) is None:
            continue
        transform: sitk.Transform = read_to_baseline(path.parent)
        mapped = np.array([transform.TransformPoint([float(v) for v in p]) for p in landmarks[base_uid]])
        errors.extend(np.linalg.norm(mapped - np.asarray(landmarks[uid], float), axis=1).tolist())
    return errors


def _devices(requested: str) -> list[str]:
    import torch

    devices = []
    for device in requested.split(","):
        if device == "cuda" and not torch.cuda.is_available():
            print("cuda: no CUDA device here, skipped (CPU figures only)")
            continue
        devices.append(device)
    return devices


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=4)
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--profile", default="heldout")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--devices", default="cpu,cuda")
    parser.add_argument("--config", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=Path("bench_out/throughput"))
    args = parser.parse_args()

    import torch

    from flows.assess import run_assessment
    from phantom import generate_export
    from phantom.evaluation import evaluate_run

    if args.out.exists():
        shutil.rmtree(args.out)
    data = args.out / "data"
    generate_export(data, args.patients, args.seed, profile=args.profile)
    print(f"cohort: {args.patients} patients, profile {args.profile}, seed {args.seed}; {args.workers} patients "
          f"at a time (threads engine)")
    for device in _devices(args.devices):
        results = args.out / device
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        summary = run_assessment(data / "export", results, data / "procedures.csv", config=args.config,
                                 workers=args.workers, device=device)
        wall = time.perf_counter() - t0
        stages, n_timed = _stage_seconds(results)
        report = evaluate_run(results, data / "truth.json")
        tre = np.asarray(_follow_up_tre(results, data / "truth.json"))
        peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        peak_gpu = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else 0.0
        studies = summary["studies"]

        print(f"\n== {device}: {studies} studies ({n_timed} timed), wall {wall:.1f} s = {wall / studies:.2f} s/study, "
              f"{3600 * studies / wall:.0f} studies/h")
        print(f"{'step':<34} {'s/study':>8}")
        for stage, seconds in sorted(stages.items(), key=lambda kv: -kv[1]):
            print(f"{stage:<34} {seconds:>8.2f}")
        print(f"{'sum of steps':<34} {sum(stages.values()):>8.2f}")
        print(f"peak RSS {peak_rss:.0f} MiB; peak CUDA memory {peak_gpu:.0f} MiB")
        vt = report["viable_tumour"]
        print(f"category accuracy {report['category_accuracy']:.3f}; viable tumour sensitivity {vt['sensitivity']} "
              f"specificity {vt['specificity']}; long / short axis error mean {report['long_axis_error_mm']['mean_abs']}"
              f" / {report['short_axis_error_mm']['mean_abs']} mm")
        if len(tre):
            print(f"follow-up -> baseline TRE median {np.median(tre):.2f} mm, p90 {np.percentile(tre, 90):.2f} mm "
                  f"({len(tre)} landmarks)")
        (results / "throughput.json").write_text(json.dumps({
            "device": device, "studies": studies, "wall_s": wall, "stage_seconds_per_study": stages,
            "peak_rss_mib": peak_rss, "peak_cuda_mib": peak_gpu, "evaluation": report,
            "tre_median_mm": float(np.median(tre)) if len(tre) else None,
            "tre_p90_mm": float(np.percentile(tre, 90)) if len(tre) else None}, indent=2))


if __name__ == "__main__":
    main()
