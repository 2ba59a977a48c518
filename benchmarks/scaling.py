"""Studies per hour on the threads engine and on 1 and 2 Dask worker processes (issue 20).

    .venv/bin/python benchmarks/scaling.py --patients 4 --seed 7 --profile default --runs threads:2,dask:1,dask:2

Generates one cohort, then assesses it from scratch once per run (``engine:workers``; a fresh
output folder each, so nothing is reused), with the real flow on the CPU. Prints per run: wall
seconds of the flow, studies per hour, the summed per-study imaging seconds
(``imaging.timings_s`` of every assessment.json: CPU-bound work, whichever process did it) and
its rate, then the speedup from the first ``dask:1`` to each ``dask:N`` run (efficiency =
speedup / N). Also checks that every run made the same calls (the engine changes no result).
Wall time includes the start of the flow's Prefect server and of the local Dask cluster.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import time
from pathlib import Path


def _imaging_seconds(results: Path) -> float:
    total = 0.0
    for path in results.rglob("assessment.json"):
        timings = json.loads(path.read_text()).get("imaging", {}).get("timings_s", {}) or {}
        total += sum(float(v) for v in timings.values())
    return total


def _calls(results: Path) -> dict[str, str]:
    with (results / "cohort.csv").open(newline="") as fh:
        return {row["study_instance_uid"]: row["category"] for row in csv.DictReader(fh)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=4)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--profile", default="default")
    parser.add_argument("--runs", default="threads:2,dask:1,dask:2", help="engine:workers, comma-separated")
    parser.add_argument("--out", type=Path, default=Path("bench_out/scaling"))
    args = parser.parse_args()

    from flows.assess import run_assessment
    from phantom import generate_export

    runs = [(engine, int(n)) for engine, n in (item.split(":") for item in args.runs.split(","))]
    if args.out.exists():
        shutil.rmtree(args.out)
    data = args.out / "data"
    generate_export(data, args.patients, args.seed, profile=args.profile)
    rows = []
    for engine, workers in runs:
        results = args.out / f"{engine}-{workers}"
        t0 = time.perf_counter()
        summary = run_assessment(data / "export", results, data / "procedures.csv", workers=workers, device="cpu",
                                 engine=engine)
        wall = time.perf_counter() - t0
        rows.append({"engine": engine, "workers": workers, "studies": summary["studies"], "wall_s": wall,
                     "imaging_s": _imaging_seconds(results), "calls": _calls(results)})

    print(f"cohort: {args.patients} patients, profile {args.profile}, seed {args.seed}; device cpu")
    print(f"{'run':<10} {'studies':>7} {'wall s':>8} {'studies/h':>10} {'imaging s (sum)':>16}")
    for r in rows:
        print(f"{r['engine'] + ':' + str(r['workers']):<10} {r['studies']:>7} {r['wall_s']:>8.1f} "
              f"{3600 * r['studies'] / r['wall_s']:>10.1f} {r['imaging_s']:>16.1f}")
    base = next((r for r in rows if r["engine"] == "dask" and r["workers"] == 1), None)
    if base is not None:
        for r in rows:
            if r["engine"] == "dask" and r["workers"] > 1:
                speedup = base["wall_s"] / r["wall_s"]
                print(f"dask 1 -> {r['workers']} worker processes: speedup {speedup:.2f}x, "
                      f"efficiency {speedup / r['workers']:.2f}")
    same = all(r["calls"] == rows[0]["calls"] for r in rows)
    print(f"same calls in every run: {'yes' if same else 'NO'}")


if __name__ == "__main__":  # the local Dask cluster spawns its workers: they import this file again
    main()
