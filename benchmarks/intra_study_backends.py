"""Pre -> post registration within a study on each backend: seconds and TRE per pair (issue 19).

    .venv/bin/python benchmarks/evaluate_cohort.py --patients 6 --seed 63 --profile abdomen --out bench_out/a63
    .venv/bin/python benchmarks/intra_study_backends.py bench_out/a63 3

Registers the last post-contrast phase of every STEP-th study of a finished cohort run's export
(``data/export``) onto its pre-contrast, as the pipeline does, once with the configured
intra-study backend (SimpleITK by default) and once with ``intra_study.backend: torch``, and
scores each with the generator's landmarks (truth.json, pre- and post-contrast poses). Prints one
line per pair and backend, then the median seconds and the median / largest pair-mean TRE.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from pipeline.core.config import load_config
from pipeline.core.records import SeriesRole
from pipeline.imaging.registration import register_intra_study
from pipeline.imaging.volumes import load_series
from pipeline.ingest.index import index_export


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="the --out folder of benchmarks/evaluate_cohort.py")
    parser.add_argument("step", type=int, nargs="?", default=1, help="every STEP-th study (default 1)")
    args = parser.parse_args()
    truth = json.loads((args.run / "data" / "truth.json").read_text())
    by_uid = {s["study_instance_uid"]: s for p in truth["patients"] for s in p["studies"]}
    base = load_config()
    torch_intra = base.registration.intra_study.model_copy(update={"backend": "torch"})
    configs = {"simpleitk": base.registration,
               "torch": base.registration.model_copy(update={"intra_study": torch_intra})}
    catalogue = Path(tempfile.mkdtemp()) / "catalogue.sqlite"
    studies = index_export(args.run / "data" / "export", catalogue, base.ingest).studies
    seconds = {name: [] for name in configs}
    tre = {name: [] for name in configs}
    for study in studies[:: max(1, args.step)]:
        truth_study = by_uid[study.study_instance_uid]
        posts = study.with_role(SeriesRole.T1_POST)
        if not posts or not truth_study["landmarks_post_lps"]:
            continue
        pre = load_series(study.with_role(SeriesRole.T1_PRE)[0])
        post = load_series(posts[-1])
        for name, cfg in configs.items():
            t0 = time.perf_counter()
            tx, qc = register_intra_study(post, pre, cfg)
            seconds[name].append(time.perf_counter() - t0)
            mapped = np.array([tx.TransformPoint(p) for p in truth_study["landmarks_post_lps"]])
            tre[name].append(float(np.linalg.norm(mapped - np.array(truth_study["landmarks_pre_lps"]), axis=1).mean()))
            print(f"{name:<9} {study.study_date} QC {'pass' if qc.ok else 'FAIL'} {seconds[name][-1]:.2f} s "
                  f"TRE {tre[name][-1]:.2f} mm {qc.reason[:60]}", flush=True)
    for name in configs:
        print(f"{name:<9} median {np.median(seconds[name]):.2f} s/pair; TRE median of pair means "
              f"{np.median(tre[name]):.2f} mm, largest {np.max(tre[name]):.2f} mm")

if __name__ == "__main__":
    main()
