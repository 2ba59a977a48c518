"""Time to build and write one study's seg.dcm and sr.dcm (figures for docs/dicom-outputs.md).

    .venv/bin/python benchmarks/dicom_outputs.py --studies 5

A 256 x 256 x 64 oblique MR series (the size of the phantom's post-contrast series) with a
spherical ablation zone, rim and a focus; prints the one-time cost of the first SEG in a
process (highdicom loads its tables of the standard), then the median per study of: reading
the source headers, building the SEG, writing it, decoding it back (the check the tests do),
building and writing the SR, and the file sizes.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

# The series is built with the tests' DICOM factory (tests/dicom_factory.py) from the repo root.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=5)
    args = parser.parse_args()

    import numpy as np
    import pydicom
    import SimpleITK as sitk

    from pipeline.core.records import AssessmentRecord, Category, Decision, SeriesRecord
    from pipeline.imaging.volumes import load_series
    from pipeline.outputs.dicom_seg import (
        build_segmentation,
        labels_from_segmentation,
        read_source_datasets,
        write_segmentation,
    )
    from pipeline.outputs.dicom_sr import build_measurement_report, write_report_sr
    from tests.dicom_factory import SeriesSpec, rotation, write_series
    from tests.helpers import imaging

    tmp = Path(tempfile.mkdtemp(prefix="bench_dicom_outputs_"))
    shape = (64, 256, 256)
    volume = np.random.default_rng(0).uniform(100, 200, shape)
    spec = SeriesSpec(volume=volume, spacing=(1.5, 1.5, 3.0), direction=rotation(0, 10, 0),
                      extra={"FrameOfReferenceUID": pydicom.uid.generate_uid()})
    files = write_series(spec, tmp / "post")
    grid = load_series(SeriesRecord("P", spec.study_uid, spec.series_uid, 1, "post", "MR", "X", files))
    z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    r = np.sqrt(((z - 32) * 3.0) ** 2 + ((y - 128) * 1.5) ** 2 + ((x - 128) * 1.5) ** 2)
    lab = np.zeros(shape, np.uint8)
    lab[r < 15] = 1
    lab[(r >= 15) & (r < 17)] = 2
    lab[(r >= 17) & (r < 21) & (x > 140)] = 3
    labels = sitk.GetImageFromArray(lab)
    labels.CopyInformation(grid)
    record = AssessmentRecord(
        patient_id="P", study_instance_uid=spec.study_uid, study_date="2024-06-01", timepoint="follow_up", session=1,
        ablation_date="2024-03-01", days_since_ablation=92, baseline_study_instance_uid="1.2", imaging=imaging(30.0),
        decision=Decision(category=Category.NO_EVIDENCE_OF_LTP, rule_id="R2-no-suspicious-focus", rule="none",
                          confidence=0.9, flagged=False))

    t0 = time.perf_counter()
    build_segmentation(read_source_datasets(files), labels, "P", 1)
    first = time.perf_counter() - t0
    timings: dict[str, list[float]] = {k: [] for k in ("headers", "seg_build", "seg_write", "seg_decode",
                                                        "sr_build_write")}
    for i in range(args.studies):
        t = time.perf_counter()
        source = read_source_datasets(files)
        timings["headers"].append(time.perf_counter() - t)
        t = time.perf_counter()
        seg = build_segmentation(source, labels, "P", 1)
        timings["seg_build"].append(time.perf_counter() - t)
        t = time.perf_counter()
        write_segmentation(tmp / f"seg{i}.dcm", seg)
        timings["seg_write"].append(time.perf_counter() - t)
        t = time.perf_counter()
        back = labels_from_segmentation(pydicom.dcmread(tmp / f"seg{i}.dcm"), labels)
        timings["seg_decode"].append(time.perf_counter() - t)
        assert (back == lab).all()
        t = time.perf_counter()
        write_report_sr(tmp / f"sr{i}.dcm", build_measurement_report(record, source, seg))
        timings["sr_build_write"].append(time.perf_counter() - t)
    print(f"series {shape[2]}x{shape[1]}x{shape[0]}, {len(files)} files; SEG frames {seg.NumberOfFrames}")
    print(f"first SEG in a process (highdicom loads its standard tables): {first:.2f} s")
    for name, values in timings.items():
        print(f"{name:>15}: median {statistics.median(values):.3f} s over {len(values)}")
    print(f"seg.dcm {(tmp / 'seg0.dcm').stat().st_size / 1e3:.0f} kB, sr.dcm {(tmp / 'sr0.dcm').stat().st_size / 1e3:.0f} kB")


if __name__ == "__main__":
    main()
