"""Every suspicious follow-up focus of a finished cohort run, measured against its registered baseline.

    .venv/bin/python benchmarks/evaluate_cohort.py --patients 6 --seed 63 --profile abdomen --out bench_out/ab63
    .venv/bin/python benchmarks/seen_at_baseline.py bench_out/ab63

Replays ``pipeline.measurement.baseline_comparison.foci_seen_at_baseline`` on the run's outputs
(labels, subtraction, pre-contrast, ``above_surroundings`` and ``to_baseline`` of each follow-up
and its baseline, as the pipeline wrote them) and prints one line per suspicious focus: the
generator's category for the study, the run's call, the focus (local or distant, size) and the
fraction of it that enhanced at the baseline. A run of a version without the rule shows what the
rule would discount (``rules.focus_seen_at_baseline_min_fraction``, default 0.5) before any
cohort is rerun; a run with it shows the fractions its calls used.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="the --out folder of benchmarks/evaluate_cohort.py")
    args = parser.parse_args()

    from pipeline.core.config import load_config
    from pipeline.core.files import read_image
    from pipeline.core.records import Focus
    from pipeline.measurement.baseline_comparison import foci_seen_at_baseline
    from pipeline.measurement.study import StudyImages
    from pipeline.outputs.store import ABOVE_SURROUNDINGS_NAME, IMAGE_FILES, read_to_baseline

    cfg = load_config()
    truth = json.loads((args.run / "data" / "truth.json").read_text())
    truth_category = {s["study_instance_uid"]: s["category"] for p in truth["patients"] for s in p["studies"]}
    records = {}
    for path in (args.run / "results" / "patients").glob("*/*/assessment.json"):
        record = json.loads(path.read_text())
        records[record["study_instance_uid"]] = (path.parent, record)

    def images(folder: Path) -> StudyImages:
        loaded = {name: read_image(folder / fname) for name, fname in IMAGE_FILES.items()}
        above = folder / ABOVE_SURROUNDINGS_NAME
        # ``post`` is not read by the comparison; the label map stands in for it.
        return StudyImages(post=loaded["labels"], pre_registered=loaded["pre_registered"],
                           subtraction=loaded["subtraction"], labels=loaded["labels"],
                           above_surroundings=read_image(above) if above.exists() else None)

    min_fraction = cfg.rules.focus_seen_at_baseline_min_fraction or 0.5
    for uid, (folder, record) in sorted(records.items(), key=lambda kv: (kv[1][1]["patient_id"], kv[1][1]["study_date"])):
        foci = [Focus(**f) for f in record["imaging"]["foci"]]
        if record["timepoint"] != "follow_up" or not any(f.suspicious for f in foci):
            continue
        base = records.get(record["baseline_study_instance_uid"] or "")
        transform = read_to_baseline(folder) if (folder / "to_baseline.tfm").exists() else None
        if base is None:
            continue
        measured = foci_seen_at_baseline(foci, images(folder), images(base[0]), transform,
                                         bool(record["imaging"].get("enhancement_above_surroundings")),
                                         cfg.enhancement.relative_enhancement_threshold)
        for focus in (f for f in measured if f.suspicious):
            fraction = focus.seen_at_baseline_fraction
            print(f"{record['patient_id']} {record['study_date']} truth {truth_category.get(uid, '?'):<37} "
                  f"call {record['decision']['category']:<37} {'local' if focus.local else 'distant':<7} "
                  f"{focus.diameter_mm:5.1f} mm  seen at baseline "
                  f"{'-' if fraction is None else f'{fraction:.2f}'}"
                  f"{'  <- discounted' if fraction is not None and fraction >= min_fraction else ''}")


if __name__ == "__main__":
    main()
