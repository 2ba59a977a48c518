"""How well the follow-up -> baseline QC gate tells a right registration from a wrong one.

    .venv/bin/python benchmarks/inter_study_qc_calibration.py bench_out/ab61 bench_out/ab62

For every follow-up of finished ``evaluate_cohort.py`` runs whose registration passed QC, the
body-interior NCC and gradient NCC (the QC's own measures, on the N4-corrected images as the
driver computes them) of the pipeline's transform, then of the same transform moved by 3, 5 and
10 mm along each axis (both signs; the worst, i.e. highest, of the six is kept: a gate must
reject every direction). A gate separates right from wrong where the aligned values stay above
it and the moved ones fall below. Development cohorts only: a gate is calibrated on them and
checked once on held-out runs.
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
    args = parser.parse_args()

    import SimpleITK as sitk

    from phantom.evaluation import follow_up_pairs
    from pipeline.core.files import read_image
    from pipeline.core.geometry import body_mask
    from pipeline.imaging.registration.files import TRANSFORM_FILE, read_to_baseline
    from pipeline.imaging.registration.metric import bias_corrected, interior_mask, registration_ncc
    from pipeline.outputs.store import IMAGE_FILES

    rows = []
    for run in args.runs:
        truth = json.loads((run / "data" / "truth.json").read_text())
        for pair in follow_up_pairs(run / "results", truth):
            if pair.baseline_dir is None or pair.follow_up_dir is None \
                    or not (pair.follow_up_dir / TRANSFORM_FILE).exists():
                continue
            fixed = read_image(pair.baseline_dir / IMAGE_FILES["pre_registered"], sitk.sitkFloat32)
            moving = read_image(pair.follow_up_dir / IMAGE_FILES["pre_registered"], sitk.sitkFloat32)
            fixed_body = body_mask(fixed)
            fixed = bias_corrected(fixed, fixed_body, 1)
            moving = bias_corrected(moving, body_mask(moving), 1)
            inner = interior_mask(fixed_body, 1)
            tx = read_to_baseline(pair.follow_up_dir)
            aligned = registration_ncc(fixed, moving, tx, inner)[:2]
            moved = {}
            for d in OFFSETS_MM:
                values = []
                for axis in range(3):
                    for sign in (-1.0, 1.0):
                        shift = sitk.TranslationTransform(3, [sign * d if k == axis else 0.0 for k in range(3)])
                        values.append(registration_ncc(fixed, moving, sitk.CompositeTransform([tx, shift]), inner)[:2])
                moved[d] = (max(v[0] for v in values), max(v[1] for v in values))
            rows.append((f"{run.name} {pair.name}", aligned, moved))
            print(f"{rows[-1][0]:<34} aligned ncc {aligned[0]:.3f} gncc {aligned[1]:.3f}  " + "  ".join(
                f"{d:g} mm: {m[0]:.3f} / {m[1]:.3f}" for d, m in moved.items()), flush=True)
    if not rows:
        raise SystemExit("no registered follow-up found")
    a = np.array([r[1] for r in rows])
    print(f"\n{len(rows)} registered follow-ups; aligned NCC {a[:, 0].min():.3f}-{a[:, 0].max():.3f}, "
          f"gradient NCC {a[:, 1].min():.3f}-{a[:, 1].max():.3f}")
    for d in OFFSETS_MM:
        m = np.array([r[2][d] for r in rows])
        print(f"moved {d:g} mm (highest of 6 directions): NCC {m[:, 0].min():.3f}-{m[:, 0].max():.3f}, "
              f"gradient NCC {m[:, 1].min():.3f}-{m[:, 1].max():.3f}")


if __name__ == "__main__":
    main()
