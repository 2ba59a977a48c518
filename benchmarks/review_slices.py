"""How fast the review app shows a case: volumes loaded (cold), PNG slices rendered, cache hits.

    .venv/bin/python benchmarks/review_slices.py demo_out/results

Syncs the worklist of a COPY of the run, then for every flagged case: the time to load its
volumes (NIfTI files, the post-contrast DICOM series, the baseline resampled through
to_baseline.tfm), the median time to render one PNG slice of each of the 8 panels, the
median time of a cached slice, and the memory the case holds.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sqlalchemy import select  # noqa: E402
from sqlalchemy.orm import Session  # noqa: E402

from pipeline.outputs.contract import read_assessment  # noqa: E402
from pipeline.review import slices  # noqa: E402
from pipeline.review.db import WorklistItem, database_url, open_engine  # noqa: E402
from pipeline.review.sync import records_of_run, review_after_run  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        shutil.copytree(args.run, out)
        review_after_run(out, records_of_run(out))
        engine = open_engine(database_url(out))
        with Session(engine) as s:
            items = s.scalars(select(WorklistItem)).all()
        loads, renders, hits, sizes = [], [], [], []
        for item in items:
            record = read_assessment(out / item.study_folder / "assessment.json")
            reg_ok = bool(record and record.registration_to_baseline and record.registration_to_baseline.ok)
            key = slices.case_key(out, item.study_folder, item.baseline_folder, item.post_series_uid,
                                  item.baseline_post_series_uid, reg_ok)
            started = time.perf_counter()
            vol = slices.load_case(key)
            loads.append(time.perf_counter() - started)
            sizes.append(sum(a.nbytes for a in vol.arrays.values()) + sum(a.nbytes for a in vol.labels.values()))
            for k in range(0, vol.n_slices, max(1, vol.n_slices // 5)):
                for view in slices.VIEWS:
                    for panel in slices.PANELS:
                        if not vol.available(view, panel):
                            continue
                        started = time.perf_counter()
                        slices.slice_png(key, view, panel, k)
                        renders.append(time.perf_counter() - started)
                        started = time.perf_counter()
                        slices.slice_png(key, view, panel, k)
                        hits.append(time.perf_counter() - started)
            print(f"{item.patient_id} {item.study_date} {item.machine_category}: case loaded in {loads[-1]:.2f} s, "
                  f"{vol.n_slices} slices, {sum(vol.available(v, p) for v in slices.VIEWS for p in slices.PANELS)}/8 panels"
                  + (f" ({'; '.join(vol.notes)})" if vol.notes else ""))
        engine.dispose()
    if not items:
        print("no flagged study in this run")
        return
    print(f"\n{len(items)} cases: load median {statistics.median(loads):.2f} s (max {max(loads):.2f} s); "
          f"one PNG slice rendered: median {1000 * statistics.median(renders):.1f} ms; "
          f"cached: median {1000 * statistics.median(hits):.3f} ms; "
          f"memory per case: median {statistics.median(sizes) / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
