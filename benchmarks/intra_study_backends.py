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

import json
import sys
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
    run = Path(sys.argv[1])  # an evaluate_cohort.py --out folder; sys.argv[2]: STEP
    truth = json.loads((run / "data" / "truth.json").read_text())
    lm = {s["study_instance_uid"]: s for p in truth["patients"] for s in p["studies"]}
    base = load_config()
    cfgs = {"sitk": base.registration,
            "torch": base.registration.model_copy(update={"intra_study": base.registration.intra_study.model_copy(update={"backend": "torch"})})}
    studies = index_export(run / "data" / "export", Path(tempfile.mkdtemp()) / "c.sqlite", base.ingest).studies
    tot = {k: [] for k in cfgs}; tre = {k: [] for k in cfgs}
    for st in studies[:: int(sys.argv[2])]:
        t = lm[st.study_instance_uid]
        posts = st.with_role(SeriesRole.T1_POST)
        if not posts or not t["landmarks_post_lps"]:
            continue
        pre = load_series(st.with_role(SeriesRole.T1_PRE)[0]); post = load_series(posts[-1])
        for k, c in cfgs.items():
            t0 = time.perf_counter(); tx, qc = register_intra_study(post, pre, c); dt = time.perf_counter() - t0
            e = np.linalg.norm(np.array([tx.TransformPoint(p) for p in t["landmarks_post_lps"]]) - np.array(t["landmarks_pre_lps"]), axis=1)
            tot[k].append(dt); tre[k].append(e.mean())
            print(k, st.study_date, qc.ok, round(dt, 2), "s TRE", round(float(e.mean()), 2), qc.reason[:60], flush=True)
    for k in cfgs:
        print(k, "median s", round(float(np.median(tot[k])), 2), "TRE median of pair means", round(float(np.median(tre[k])), 2), "max", round(float(np.max(tre[k])), 2))


if __name__ == "__main__":
    main()
