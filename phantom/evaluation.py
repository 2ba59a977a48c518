"""Compare a run's cohort.csv with the generator's truth.json (accuracy figures of the README)."""

from __future__ import annotations

import csv
import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np

VIABLE = {"residual_unablated_tumour", "local_tumour_progression"}
# Issue 3's wider positive class: anything a radiologist must act on at the ablation site.
ACTIONABLE = VIABLE | {"suspected_local_tumour_progression"}


def _rate(num: int, den: int) -> float | None:
    return None if den == 0 else num / den


class FollowUpPair(NamedTuple):
    """A follow-up of the truth with its session's baseline and their output folders (None: absent)."""

    name: str  # "patient_id study_date"
    baseline: dict  # the baseline study of truth.json
    follow_up: dict  # the follow-up study of truth.json
    baseline_dir: Path | None
    follow_up_dir: Path | None


def follow_up_pairs(out_dir: Path, truth: dict) -> Iterator[FollowUpPair]:
    """Every follow-up of ``truth`` with a baseline in its session, in truth order."""
    folders = {}
    for path in (Path(out_dir) / "patients").glob("*/*/assessment.json"):
        folders[json.loads(path.read_text())["study_instance_uid"]] = path.parent
    for patient in truth["patients"]:
        baselines = {s["session"]: s for s in patient["studies"] if s["timepoint"] == "baseline"}
        for study in patient["studies"]:
            base = baselines.get(study["session"])
            if study["timepoint"] == "follow_up" and base is not None:
                yield FollowUpPair(f"{patient['patient_id']} {study['study_date']}", base, study,
                                   folders.get(base["study_instance_uid"]), folders.get(study["study_instance_uid"]))


def landmark_tre_mm(transform, pair: FollowUpPair) -> np.ndarray:
    """TRE_i = |T(baseline_i) - follow_up_i| (mm) of a follow-up -> baseline transform.

    ``to_baseline.tfm`` (+ field) maps a baseline point to the follow-up point, both in the pose
    of their post-contrast series (the pipeline registers the pre-contrast resampled onto the
    post-contrast grid, ``pre_registered``): the generator's 20 landmarks in that pose.
    """
    mapped = np.array([transform.TransformPoint([float(v) for v in p]) for p in pair.baseline["landmarks_post_lps"]])
    return np.linalg.norm(mapped - np.asarray(pair.follow_up["landmarks_post_lps"]), axis=1)


def follow_up_tre(out_dir: Path, truth: dict) -> dict:
    """Target registration error of the pipeline's own follow-up -> baseline transforms.

    Over the pairs whose registration passed QC (a failed one has no transform: it is counted,
    its study is `indeterminate`). Not the same as ``benchmarks/registration_tre.py``, which
    registers without the ablation-zone hint the pipeline gives.
    """
    from pipeline.imaging.registration.files import TRANSFORM_FILE, read_to_baseline

    tre, pair_means, failed = [], [], []
    for pair in follow_up_pairs(out_dir, truth):
        if not pair.follow_up.get("landmarks_post_lps"):
            continue
        if pair.follow_up_dir is None or not (pair.follow_up_dir / TRANSFORM_FILE).exists():
            failed.append(pair.name)
            continue
        errors = landmark_tre_mm(read_to_baseline(pair.follow_up_dir), pair)
        tre.extend(errors.tolist())
        pair_means.append(float(errors.mean()))
    a = np.asarray(tre, float)
    return {"pairs": len(pair_means) + len(failed), "with_transform": len(pair_means), "without": failed,
            "median_mm": round(float(np.median(a)), 2) if len(a) else None,
            "p90_mm": round(float(np.percentile(a, 90)), 2) if len(a) else None,
            "worst_pair_mean_mm": round(max(pair_means), 2) if pair_means else None}


def evaluate_run(out_dir: Path, truth_path: Path) -> dict:
    """Category accuracy, viable-tumour sensitivity/specificity, axis errors, registration TRE, missing studies."""
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
    # Issue 15's measures: clean studies flagged, false new lesions, accuracy per scenario and
    # per organ beside the zone (profiles that place one).
    clean_n = clean_flagged = false_new = 0
    clean_flags: Counter[str] = Counter()  # which flags the flagged clean studies carry
    by_group: dict[str, Counter[str]] = {}
    for patient, study, row in pairs:
        t, p = study["category"], row["category"]
        confusion[(t, p)] += 1
        if t in ("complete_ablation", "no_evidence_of_ltp"):
            clean_n += 1
            clean_flagged += row["flagged"] == "true"
            if row["flagged"] == "true":
                clean_flags.update({r.split(":", 1)[0].strip() for r in row["flag_reasons"].split(";") if r.strip()})
        false_new += row["new_lesion"] == "true"  # the generator draws no new lesion
        groups = [f"scenario:{patient.get('scenario')}"]
        groups += [f"organ:{o}" for o in sorted(set(patient.get("organs_beside_zone") or []))]
        if patient.get("zone_site", "muscle") != "muscle":
            groups.append(f"site:{patient['zone_site']}")
        for g in groups:
            by_group.setdefault(g, Counter())["n"] += 1
            by_group[g]["correct"] += t == p
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
        "clean_studies_flagged": {"n": clean_n, "flagged": clean_flagged, "rate": _rate(clean_flagged, clean_n),
                                  "by_flag": dict(sorted(clean_flags.items()))},
        "false_new_lesions": false_new,
        "follow_up_tre": follow_up_tre(out_dir, truth),
        "accuracy_by_group": {g: {"n": c["n"], "correct": c["correct"], "accuracy": _rate(c["correct"], c["n"])}
                              for g, c in sorted(by_group.items())},
        "confusion": {f"{t} -> {p}": n for (t, p), n in sorted(confusion.items())},
        "wrong": wrong,
    }
