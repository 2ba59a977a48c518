"""Header fuzzing: N seeded mutations of a small export, each indexed and assessed.

    .venv/bin/python benchmarks/fuzz_headers.py [N] [--first-seed S] [--work DIR]

N (default 10000) mutations from tests/header_fuzz.py (special floats, wrong types, empty, huge
strings, bad dates, bad UIDs in 1-3 files each). Prints the crash count, the studies accounted
for (found by ingest and assessed) and the files left unaccounted; each failing seed is printed
with its mutations and traceback so that it can be replayed (tests/header_fuzz.py ``run_once``).
About 0.5 s per mutation on one core.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.header_fuzz import base_export, run_once  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("n", nargs="?", type=int, default=10000, help="number of mutations")
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        template = base_export(work / "template")
        crashes = found = assessed = unaccounted = 0
        started = time.perf_counter()
        for seed in range(args.first_seed, args.first_seed + args.n):
            outcome = run_once(template, work / "run", seed)
            found += outcome.studies_found
            assessed += outcome.studies_assessed
            unaccounted += len(outcome.unaccounted)
            if outcome.crash:
                crashes += 1
            if not outcome.ok:
                print(f"seed {seed}: {outcome.mutations}\n{outcome.crash or outcome.unaccounted}", flush=True)
        seconds = time.perf_counter() - started
    print(f"{args.n} mutations in {seconds:.0f} s: {crashes} crashed; studies accounted for {assessed}/{found}; "
          f"files unaccounted for {unaccounted}")
    return 1 if crashes or assessed != found or unaccounted else 0


if __name__ == "__main__":
    sys.exit(main())
