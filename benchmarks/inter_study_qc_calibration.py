"""How well the follow-up -> baseline QC tells a right registration from a wrong one.

    .venv/bin/python benchmarks/inter_study_qc_calibration.py bench_out/ab61 bench_out/ab62

For every follow-up of finished ``evaluate_cohort.py`` runs whose registration passed QC, the
QC's measures on the N4-corrected images without the resampler's fill (as the driver computes them) at the pipeline's
transform, then at the same transform moved by 3, 5 and 10 mm along each axis (both signs):
- absolute: the body-interior NCC and gradient NCC (the highest of the six moved poses is kept:
  a gate must reject every direction);
- relative (``similarity_peak_offsets_mm``): how far from the pose each measure peaks (the
  largest of the three axes, mm; 99 beyond the probed neighbour), from the pose and its
  neighbours ``--probe-mm`` away; the lowest of the six moved poses is kept (a gate on it must
  reject every direction).
A gate separates right from wrong where the aligned values stay above it and the moved ones fall
below. Development cohorts only: a gate is calibrated on them and checked once on held-out runs.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

OFFSETS_MM = (3.0, 5.0, 10.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, nargs="+", help="--out folders of benchmarks/evaluate_cohort.py")
    parser.add_argument("--probe-mm", type=float, nargs="+", default=[4.0],
                        help="neighbour distances of the relative test (mm)")
    args = parser.parse_args()

    import SimpleITK as sitk

    from phantom.evaluation import follow_up_pairs
    from pipeline.core.files import read_image
    from pipeline.core.geometry import body_mask
    from pipeline.imaging.registration.common import without_resampling_fill
    from pipeline.imaging.registration.files import TRANSFORM_FILE, read_to_baseline
    from pipeline.imaging.registration.metric import (
        bias_corrected,
        interior_mask,
        registration_ncc,
        similarity_peak_offsets_mm,
    )
    from pipeline.outputs.store import IMAGE_FILES

    def measures(fixed, moving, tx, inner) -> np.ndarray:
        """(ncc, gradient ncc, then the NCC and gradient NCC peak offsets (mm) per probe)."""
        values = list(registration_ncc(fixed, moving, tx, inner)[:2])
        for probe in args.probe_mm:
            offsets = np.abs(similarity_peak_offsets_mm(fixed, moving, tx, inner, probe)).max(axis=1)
            values += np.minimum(offsets, 99.0).tolist()
        return np.array(values)

    rows = []
    for run in args.runs:
        truth = json.loads((run / "data" / "truth.json").read_text())
        for pair in follow_up_pairs(run / "results", truth):
            if pair.baseline_dir is None or pair.follow_up_dir is None \
                    or not (pair.follow_up_dir / TRANSFORM_FILE).exists():
                continue
            # As the driver sees them: without the resampler's fill (register_to_baseline).
            fixed = without_resampling_fill(read_image(pair.baseline_dir / IMAGE_FILES["pre_registered"],
                                                       sitk.sitkFloat32))
            moving = without_resampling_fill(read_image(pair.follow_up_dir / IMAGE_FILES["pre_registered"],
                                                        sitk.sitkFloat32))
            fixed_body = body_mask(fixed)
            fixed = bias_corrected(fixed, fixed_body, 1)
            moving = bias_corrected(moving, body_mask(moving), 1)
            inner = interior_mask(fixed_body, 1)
            tx = read_to_baseline(pair.follow_up_dir)
            aligned = measures(fixed, moving, tx, inner)
            moved = {}
            for d in OFFSETS_MM:
                values = []
                for axis in range(3):
                    for sign in (-1.0, 1.0):
                        shift = sitk.TranslationTransform(3, [sign * d if k == axis else 0.0 for k in range(3)])
                        values.append(measures(fixed, moving, sitk.CompositeTransform([tx, shift]), inner))
                values = np.array(values)
                # The highest correlation (a gate must reject every direction); the lowest offset.
                moved[d] = np.concatenate([values[:, :2].max(axis=0), values[:, 2:].min(axis=0)])
            rows.append((f"{run.name} {pair.name}", aligned, moved))
            print(f"{rows[-1][0]:<34} aligned " + " ".join(f"{v:.3f}" for v in aligned) + "  " + "  ".join(
                f"{d:g} mm: " + " ".join(f"{v:.3f}" for v in m) for d, m in moved.items()), flush=True)
    if not rows:
        raise SystemExit("no registered follow-up found")
    names = ["NCC", "gradient NCC"] + [f"{what} peak offset (probe {p:g} mm)" for p in args.probe_mm
                                       for what in ("NCC", "gradient NCC")]
    a = np.array([r[1] for r in rows])
    print(f"\n{len(rows)} registered follow-ups (columns: {', '.join(names)})")
    print("aligned:                            " + "  ".join(
        f"{a[:, k].min():+.3f}..{a[:, k].max():+.3f}" for k in range(len(names))))
    for d in OFFSETS_MM:
        m = np.array([r[2][d] for r in rows])
        print(f"moved {d:>4g} mm (worst of 6 directions):   " + "  ".join(
            f"{m[:, k].min():+.3f}..{m[:, k].max():+.3f}" for k in range(len(names))))


if __name__ == "__main__":
    main()
