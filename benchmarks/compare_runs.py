"""Are two runs' outputs the same? (issue 17: a change of structure must not change a result)

    .venv/bin/python benchmarks/compare_runs.py RESULTS_BEFORE RESULTS_AFTER

Compares what a change of code layout must leave alone, ignoring only what says when and how
fast (timings, seconds, the pipeline version):
- cohort.csv and errors.csv, row by row (the ``pipeline_version`` column left out);
- every ``assessment.json`` and ``timeline.json``, key by key (``timings_s``, ``stage_seconds``,
  ``seconds`` and ``pipeline_version`` left out);
- every ``labels.nii.gz`` and ``subtraction.nii.gz``: voxel values (exactly, or within
  ``--atol``), size, spacing, origin and direction.
Text that says where a run was or how long a step took is neutralised before comparing: the
run's own folder (the parent of RESULTS) becomes ``<run>`` and durations such as ``3.26 s``
become ``<t> s``. The cache keys hash the input files' paths, so they agree only between runs
made in the same folder: run the second where the first ran (move the first aside).
Prints one line per difference and a summary; exits 1 when anything differs or a file is
missing on one side.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

IGNORED_KEYS = {"timings_s", "stage_seconds", "seconds", "pipeline_version"}
IMAGES = ("labels.nii.gz", "subtraction.nii.gz")
JSONS = ("assessment.json", "timeline.json")
TABLES = ("cohort.csv", "errors.csv")
DURATION = re.compile(r"\b\d+(\.\d+)? s\b")


def _neutral(value: Any, run_root: str) -> Any:
    """``value`` without the ignored keys, the run's folder and durations (see the module doc)."""
    if isinstance(value, dict):
        return {k: _neutral(v, run_root) for k, v in value.items() if k not in IGNORED_KEYS}
    if isinstance(value, list):
        return [_neutral(v, run_root) for v in value]
    if isinstance(value, str):
        return DURATION.sub("<t> s", value.replace(run_root, "<run>"))
    return value


def _differences(a: Any, b: Any, where: str) -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b)):
            if key not in a or key not in b:
                out.append(f"{where}.{key}: only in {'after' if key in b else 'before'}")
            else:
                out.extend(_differences(a[key], b[key], f"{where}.{key}"))
        return out
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{where}: {len(a)} items before, {len(b)} after"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _differences(x, y, f"{where}[{i}]")]
    return [] if a == b else [f"{where}: {a!r} before, {b!r} after"]


def _rows(path: Path, run_root: str) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return _neutral(list(csv.DictReader(handle)), run_root)


def _image_differences(a: Path, b: Path, where: str, atol: float) -> list[str]:
    ia, ib = sitk.ReadImage(str(a)), sitk.ReadImage(str(b))
    out = []
    for name in ("GetSize", "GetSpacing", "GetOrigin", "GetDirection"):
        if not np.allclose(getattr(ia, name)(), getattr(ib, name)(), rtol=0, atol=1e-9):
            out.append(f"{where}: {name[3:].lower()} {getattr(ia, name)()} before, {getattr(ib, name)()} after")
    if not out:
        va, vb = sitk.GetArrayFromImage(ia), sitk.GetArrayFromImage(ib)
        changed = int(np.count_nonzero(np.abs(va.astype(np.float64) - vb) > atol))
        if changed:
            out.append(f"{where}: {changed} voxels differ (max |d| {float(np.abs(va.astype(float) - vb).max()):.4g})")
    return out


def compare(before: Path, after: Path, atol: float = 0.0) -> tuple[list[str], int]:
    """(differences, number of files compared)."""
    root_a, root_b = str(before.resolve().parent), str(after.resolve().parent)
    differences: list[str] = []
    compared = 0
    for name in TABLES:
        a, b = before / name, after / name
        if a.exists() != b.exists():
            differences.append(f"{name}: only {'after' if b.exists() else 'before'}")
        elif a.exists():
            compared += 1
            differences.extend(_differences(_rows(a, root_a), _rows(b, root_b), name))
    names = {p.relative_to(before) for pattern in (*JSONS, *IMAGES) for p in before.rglob(pattern)}
    names |= {p.relative_to(after) for pattern in (*JSONS, *IMAGES) for p in after.rglob(pattern)}
    for rel in sorted(names):
        a, b = before / rel, after / rel
        if not (a.exists() and b.exists()):
            differences.append(f"{rel}: only {'after' if b.exists() else 'before'}")
            continue
        compared += 1
        if rel.name in IMAGES:
            differences.extend(_image_differences(a, b, str(rel), atol))
        else:
            differences.extend(_differences(_neutral(json.loads(a.read_text()), root_a),
                                            _neutral(json.loads(b.read_text()), root_b), str(rel)))
    return differences, compared


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", type=Path, help="results folder of the first run")
    parser.add_argument("after", type=Path, help="results folder of the second run")
    parser.add_argument("--atol", type=float, default=0.0,
                        help="largest voxel difference taken as equal (default 0: exactly equal)")
    args = parser.parse_args()
    for folder in (args.before, args.after):
        if not (folder / "cohort.csv").is_file():
            sys.exit(f"error: {folder} holds no cohort.csv: not a results folder")
    differences, compared = compare(args.before, args.after, args.atol)
    for line in differences:
        print(line)
    print(f"{compared} files compared, {len(differences)} difference(s)")
    sys.exit(1 if differences else 0)


if __name__ == "__main__":
    main()
