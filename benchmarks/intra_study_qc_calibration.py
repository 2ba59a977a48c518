"""How well the intra-study QC's correlations tell a right pre/post pair from an unrelated one.

    .venv/bin/python benchmarks/intra_study_qc_calibration.py bench_out/qc --seeds 67 68 69 72 73 74

For each seed, a phantom export (``--profile``, ``--patients``; written once under OUT/s<seed>)
is indexed; the last post-contrast phase of every study is registered onto its pre-contrast as
the pipeline does, with the correlation floors and the peak test switched off so that every
pose is kept, and scored with the generator's landmarks (TRE, mm). Every other study's post is
also registered onto the pre-contrast of a study of another patient (an unrelated pair). For
each pair, on the body interior at the registered pose: the intensity NCC, the gradient NCC, and
the gradient NCC's prominence (``SimilarityPeak.prominence``: at the pose less its mean at the
pose shifted +-``--probe-mm`` along each axis). Prints one line per pair, then the range of each
measure for the right pairs and the unrelated ones: a floor separates them where the right
pairs stay above it and the unrelated ones below. Development seeds only (docs/evaluation.md).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder for the phantom exports")
    parser.add_argument("--seeds", type=int, nargs="+", required=True)
    parser.add_argument("--profile", default="abdomen")
    parser.add_argument("--patients", type=int, default=6)
    parser.add_argument("--probe-mm", type=float, default=4.0)
    args = parser.parse_args()

    from phantom import generate_export
    from pipeline.core.config import load_config
    from pipeline.core.geometry import body_mask
    from pipeline.core.records import SeriesRole
    from pipeline.imaging.registration import register_intra_study
    from pipeline.imaging.registration.metric import interior_mask, similarity_peak
    from pipeline.imaging.volumes import load_series
    from pipeline.ingest.index import index_export

    cfg = load_config()
    loose = cfg.registration.intra_study.model_copy(update={
        "min_ncc_after": -1.0, "min_gradient_ncc_after": None, "min_gradient_ncc_prominence": None,
        "max_peak_offset_mm": None})
    registration = cfg.registration.model_copy(update={"intra_study": loose})
    rows: dict[str, list[np.ndarray]] = {"right": [], "unrelated": []}

    def measure(kind: str, post, pre, label: str, truth_study: dict | None = None) -> None:
        tx, _qc = register_intra_study(post, pre, registration)
        tre = None
        if truth_study is not None:
            mapped = np.array([tx.TransformPoint(p) for p in truth_study["landmarks_post_lps"]])
            tre = float(np.linalg.norm(mapped - np.array(truth_study["landmarks_pre_lps"]), axis=1).mean())
        peak = similarity_peak(post, pre, tx, interior_mask(body_mask(post), int(cfg.registration.threads)),
                               args.probe_mm)
        values = np.array([peak.at_pose[0], peak.at_pose[1], peak.prominence[1]])
        rows[kind].append(values)
        scored = "" if tre is None else f" TRE {tre:.2f} mm"
        print(f"{kind:<9} {label}{scored}: ncc {values[0]:.3f} gradient ncc {values[1]:.3f} "
              f"prominence {values[2]:.3f}", flush=True)

    for seed in args.seeds:
        folder = args.out / f"s{seed}"
        if not (folder / "truth.json").exists():
            generate_export(folder, args.patients, seed, profile=args.profile)
        truth = json.loads((folder / "truth.json").read_text())
        by_uid = {s["study_instance_uid"]: s for p in truth["patients"] for s in p["studies"]}
        studies = index_export(folder / "export", Path(tempfile.mkdtemp()) / "catalogue.sqlite", cfg.ingest).studies
        usable = [s for s in studies if s.with_role(SeriesRole.T1_POST) and s.with_role(SeriesRole.T1_PRE)]
        for i, study in enumerate(usable):
            truth_study = by_uid[study.study_instance_uid]
            if not truth_study["landmarks_post_lps"]:
                continue
            pre = load_series(study.with_role(SeriesRole.T1_PRE)[0])
            post = load_series(study.with_role(SeriesRole.T1_POST)[-1])
            label = f"seed {seed} {study.patient_id} {study.study_date}"
            measure("right", post, pre, label, truth_study)
            others = [o for o in usable if o.patient_id != study.patient_id]
            if others and i % 2 == 0:
                other = others[i % len(others)]
                measure("unrelated", post, load_series(other.with_role(SeriesRole.T1_PRE)[0]),
                        f"{label} with the pre of {other.patient_id} {other.study_date}")
    for kind, values in rows.items():
        if not values:
            continue
        a = np.array(values)
        print(f"{kind}: {len(a)} pairs; " + "; ".join(
            f"{name} {a[:, k].min():.3f}-{a[:, k].max():.3f} (5th percentile {np.percentile(a[:, k], 5):.3f})"
            for k, name in enumerate(("ncc", "gradient ncc", "prominence"))))


if __name__ == "__main__":
    main()
