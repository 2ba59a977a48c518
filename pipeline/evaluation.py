"""Compare a run's cohort.csv with the generator's truth.json (accuracy figures of the README)."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import numpy as np

VIABLE = {"residual_unablated_tumour", "local_tumour_progression"}
# Issue 3's wider positive class: anything a radiologist must act on at the ablation site.
ACTIONABLE = VIABLE | {"suspected_local_tumour_progression"}


def _rate(num: int, den: int) -> float | None:
    return None if den == 0 else num / den


def evaluate_run(out_dir: Path, truth_path: Path) -> dict:
    """Category accuracy, viable-tumour sensitivity/specificity, axis errors, missing studies."""
    with (Path(out_dir) / "cohort.csv").open() as handle:
        rows = {r["study_instance_uid"]: r for r in csv.DictReader(handle)}
    truth = json.loads(Path(truth_path).read_text())
    pairs, missing = [], []
    for patient in truth["patients"]:
        for study in patient["studies"]:
            row = rows.get(study["study_instance_uid"])
            if row is None:
                missing.append(study["study_instance_uid"])
            else:
                pairs.append((patient, study, row))
    confusion: Counter[tuple[str, str]] = Counter()
    tp = fn = tn = fp = 0
    atp = afn = atn = afp = 0
    long_err, short_err, vol_err = [], [], []
    wrong = []
    for patient, study, row in pairs:
        t, p = study["category"], row["category"]
        confusion[(t, p)] += 1
        if t != p:
            wrong.append({"patient_id": patient["patient_id"], "scenario": patient.get("scenario"),
                          "study_date": study["study_date"], "truth": t, "predicted": p,
                          "flag_reasons": row["flag_reasons"]})
        if t in VIABLE:
            tp, fn = tp + (p in VIABLE), fn + (p not in VIABLE)
        elif t != "pre_ablation":
            tn, fp = tn + (p not in VIABLE), fp + (p in VIABLE)
        if t in ACTIONABLE:
            atp, afn = atp + (p in ACTIONABLE), afn + (p not in ACTIONABLE)
        elif t != "pre_ablation":
            atn, afp = atn + (p not in ACTIONABLE), afp + (p in ACTIONABLE)
        az = study.get("az")
        if az and row["az_long_axis_mm"]:
            long_err.append(float(row["az_long_axis_mm"]) - az["long_axis_mm"])
            short_err.append(float(row["az_short_axis_mm"]) - az["short_axis_mm"])
            vol_err.append(100 * (float(row["az_volume_ml"]) - az["volume_ml"]) / az["volume_ml"])

    def stats(values: list[float]) -> dict:
        a = np.abs(np.asarray(values, float))
        return {"n": len(values), "mean_abs": round(float(a.mean()), 2) if len(a) else None,
                "median_abs": round(float(np.median(a)), 2) if len(a) else None,
                "max_abs": round(float(a.max()), 2) if len(a) else None,
                "mean_signed": round(float(np.mean(values)), 2) if len(values) else None}

    n_correct = sum(1 for _, s, r in pairs if s["category"] == r["category"])
    return {
        "studies_in_truth": len(pairs) + len(missing),
        "studies_in_cohort": len(rows),
        "missing_from_cohort": missing,
        "category_accuracy": _rate(n_correct, len(pairs)),
        "viable_tumour": {"tp": tp, "fn": fn, "tn": tn, "fp": fp,
                          "sensitivity": _rate(tp, tp + fn), "specificity": _rate(tn, tn + fp)},
        "actionable": {"tp": atp, "fn": afn, "tn": atn, "fp": afp,
                       "sensitivity": _rate(atp, atp + afn), "specificity": _rate(atn, atn + afp)},
        "long_axis_error_mm": stats(long_err),
        "short_axis_error_mm": stats(short_err),
        "volume_error_pct": stats(vol_err),
        "confusion": {f"{t} -> {p}": n for (t, p), n in sorted(confusion.items())},
        "wrong": wrong,
    }
