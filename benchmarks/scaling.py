"""Studies per hour on the threads engine and on 1 and 2 Dask worker processes (issue 20).

    .venv/bin/python benchmarks/scaling.py --patients 4 --seed 7 --profile default \
        --runs threads:2,dask:1x1,dask:2x1,dask:1

Generates one cohort, then assesses it from scratch once per run (``engine:workers``, or
``dask:NxT`` for N worker processes of T SimpleITK/torch threads each; plain ``dask:N`` shares
the CPUs out, ``execution.threads_per_worker`` null; a fresh output folder each, so nothing is
reused), with the real flow on the CPU. Prints per run: wall seconds of the flow, studies per
hour and the summed per-study seconds of every step (``stage_seconds`` of every
assessment.json: the work, whichever process did it), then the speedup from ``dask:1`` to each
``dask:N`` run of the same thread setting (efficiency = speedup / N). Also checks that every
run made the same calls (the engine changes no result). Wall time includes the start of the
flow's Prefect server and of the local Dask cluster.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import time
from pathlib import Path


def _study_seconds(results: Path) -> float:
    total = 0.0
    for path in results.rglob("assessment.json"):
        timings = json.loads(path.read_text()).get("stage_seconds", {}) or {}
        total += sum(float(v) for v in timings.values())
    return total


def _parse_run(item: str) -> tuple[str, int, int | None]:
    engine, _, spec = item.partition(":")
    workers, _, threads = spec.partition("x")
    return engine, int(workers), int(threads) if threads else None


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

    runs = [_parse_run(item) for item in args.runs.split(",")]
    if args.out.exists():
        shutil.rmtree(args.out)
    data = args.out / "data"
    generate_export(data, args.patients, args.seed, profile=args.profile)
    rows = []
    for engine, workers, threads in runs:
        name = f"{engine}:{workers}" + (f"x{threads}" if threads else "")
        results = args.out / name.replace(":", "-")
        config = None
        if threads:
            config = args.out / f"threads-{threads}.yaml"
            config.write_text(f"execution:\n  threads_per_worker: {threads}\n")
        t0 = time.perf_counter()
        summary = run_assessment(data / "export", results, data / "procedures.csv", config=config, workers=workers,
                                 device="cpu", engine=engine)
        wall = time.perf_counter() - t0
        rows.append({"name": name, "engine": engine, "workers": workers, "threads": threads,
                     "studies": summary["studies"], "wall_s": wall, "study_s": _study_seconds(results),
                     "calls": _calls(results)})

    print(f"cohort: {args.patients} patients, profile {args.profile}, seed {args.seed}; device cpu")
    print(f"{'run':<10} {'studies':>7} {'wall s':>8} {'studies/h':>10} {'study steps s (sum)':>20}")
    for r in rows:
        print(f"{r['name']:<10} {r['studies']:>7} {r['wall_s']:>8.1f} "
              f"{3600 * r['studies'] / r['wall_s']:>10.1f} {r['study_s']:>20.1f}")
    for r in rows:
        if r["engine"] != "dask" or r["workers"] == 1:
            continue
        # Against one process of the same thread setting (dask:2 shares 2 cores out as 1 thread
        # each; dask:1 gives its one process both): the same thread count, or both shared out.
        base = next((b for b in rows if b["engine"] == "dask" and b["workers"] == 1 and b["threads"] == r["threads"]),
                    None)
        if base is not None:
            speedup = base["wall_s"] / r["wall_s"]
            print(f"{base['name']} -> {r['name']}: speedup {speedup:.2f}x, efficiency {speedup / r['workers']:.2f}")
    same = all(r["calls"] == rows[0]["calls"] for r in rows)
    print(f"same calls in every run: {'yes' if same else 'NO'}")


if __name__ == "__main__":  # the local Dask cluster spawns its workers: they import this file again
    main()
