"""Ingest speed: headers indexed per second, unchanged nightly rerun, pixel decode throughput.

    .venv/bin/python benchmarks/ingest_speed.py [--files 10000] [--cores 2] [--work DIR]

Prints three figures against the DESIGN.md targets:
1. headers/s of a first ``index_export`` over an export of ``--files`` single-frame MR files
   (100 slices per series, real header content written by the phantom's DICOM writer), with
   ``--cores`` worker processes pinned to that many CPUs (goal >= 2,000/s on 2 cores);
2. seconds of a rerun over the same, unchanged export (goal <= 10 s for 10,000 files);
3. pixel decode throughput of ``load_series`` on a 256x256x64 series against a raw read of the
   same file bytes, for uncompressed data (goal >= 50 %) and, for information, each compressed
   transfer syntax.
Run it on an otherwise idle machine for comparable figures; the README says under what load
its figures were taken.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom
from pydicom.pixels import get_decoder
from pydicom.uid import generate_uid

from phantom.dicom_writer import SeriesHeader, study_dataset, write_series
from phantom.geometry import axial_direction, make_grid
from phantom.transcode import SYNTAXES, save, transcode
from pipeline.core.config import load_config
from pipeline.core.records import SeriesRecord
from pipeline.imaging.volumes import load_series
from pipeline.ingest.headers import read_header
from pipeline.ingest.index import index_export

SLICES_PER_SERIES = 100


def _study_ds(patient: int, study_uid: str):
    return study_dataset({
        "SpecificCharacterSet": "ISO_IR 100", "PatientID": f"BENCH{patient:05d}", "PatientName": "BENCH^PATIENT",
        "StudyInstanceUID": study_uid, "StudyDate": "20240102", "SeriesDate": "20240102",
        "StudyTime": "101010", "StudyDescription": "MR soft tissue w/wo contrast", "AccessionNumber": "A1",
        "Manufacturer": "SIEMENS", "ManufacturerModelName": "MAGNETOM Aera", "InstitutionName": "BENCH",
        "FrameOfReferenceUID": generate_uid(), "PatientPosition": "HFS", "BodyPartExamined": "EXTREMITY",
    })


def write_export(root: Path, n_files: int, matrix: int = 64) -> None:
    """``n_files`` files, 4 series (pre, two posts, T2) of SLICES_PER_SERIES per study."""
    grid = make_grid(np.zeros(3), axial_direction(0.0), (matrix, matrix, SLICES_PER_SERIES), (1.5, 1.5, 3.0), 3.0)
    stored = np.random.default_rng(0).integers(0, 4000, grid.shape, dtype=np.uint16)
    names = [("t1_vibe_fs_tra_pre", None, 2.0), ("t1_vibe_fs_tra_post_70s", "DOTAREM", 2.0),
             ("t1_vibe_fs_tra_post_180s", "DOTAREM", 2.0), ("t2_tse_fs_tra", None, 90.0)]
    n_series = n_files // SLICES_PER_SERIES
    for s in range(n_series):
        study = s // len(names)
        if s % len(names) == 0:
            study_uid = generate_uid()
            ds = _study_ds(study // 2, study_uid)
        desc, agent, te = names[s % len(names)]
        header = SeriesHeader(generate_uid(), s % len(names) + 1, desc, f"10{s % len(names):02d}00.000000", te, 4.2,
                              "GR", "SP", "FS", "3D", ["ORIGINAL", "PRIMARY", "M", "ND"], contrast_agent=agent)
        folder = root / f"P{study // 2:04d}" / f"ST{study:05d}" / f"SE{s:06d}"
        paths = [folder / f"IM{k:05d}" for k in range(SLICES_PER_SERIES)]
        write_series(ds, header, grid, stored, paths, [generate_uid() for _ in paths])


def _median_time(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def decode_throughput(work: Path) -> list[tuple[str, float, float, float, float]]:
    """(syntax, MB/s through load_series, MB/s of pixel decoding alone, MB/s raw read, decode/raw)
    for a 256x256x64 series. MB are decoded pixel megabytes (stored uint16)."""
    grid = make_grid(np.zeros(3), axial_direction(0.0), (256, 256, 64), (1.2, 1.2, 3.0), 3.0)
    stored = np.random.default_rng(1).normal(1500, 300, grid.shape).clip(0, 4095).astype(np.uint16)
    src = work / "decode" / "explicit_le"
    paths = [src / f"IM{k:03d}" for k in range(grid.size[2])]
    write_series(_study_ds(0, generate_uid()), SeriesHeader(generate_uid(), 1, "t1", "100000.000000", 2.0, 4.2,
                 "GR", "SP", "FS", "3D", ["ORIGINAL", "PRIMARY", "M", "ND"]), grid, stored, paths,
                 [generate_uid() for _ in paths])
    pixel_mb = stored.nbytes / 1e6
    out = []
    for syntax in ("explicit_le", "implicit_le", "explicit_be", "deflated", "rle", "jpeg_ls", "jpeg_2000",
                   "jpeg_lossless"):
        folder = work / "decode" / syntax
        if syntax != "explicit_le":
            folder.mkdir(parents=True, exist_ok=True)
            files = [save(transcode(pydicom.dcmread(p), syntax), folder / p.name) for p in paths]
        else:
            files = paths
        record = SeriesRecord("B", "1", "1.1", 1, syntax, "MR", "SIEMENS", files)
        load_series(record)  # warm the page cache and the decoder plugins

        def raw_read() -> None:
            for f in files:
                with open(f, "rb") as fh:
                    np.frombuffer(fh.read(), dtype=np.uint8)

        datasets = [pydicom.dcmread(f) for f in files]
        decoder = get_decoder(SYNTAXES[syntax])

        def decode_only() -> None:  # pydicom's decoder on parsed datasets (no cache), rescaled
            for ds in datasets:
                arr, _ = decoder.as_array(ds)
                arr.astype(np.float32)

        t_load = _median_time(lambda: load_series(record))
        t_decode = _median_time(decode_only)
        t_raw = _median_time(raw_read)
        out.append((SYNTAXES[syntax].name, pixel_mb / t_load, pixel_mb / t_decode, pixel_mb / t_raw, t_raw / t_decode))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        cpus = sorted(os.sched_getaffinity(0))[: args.cores]
        os.sched_setaffinity(0, cpus)  # worker processes inherit the affinity
    work = args.work or Path(tempfile.mkdtemp(prefix="ingest_bench_"))
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    print(f"machine: {os.cpu_count()} CPUs, benchmark pinned to {args.cores}; load average {load[0]:.1f} "
          f"at start (other processes share the CPUs when this is above 0)")
    try:
        export = work / "export"
        t0 = time.perf_counter()
        write_export(export, args.files)
        print(f"wrote {args.files} files in {time.perf_counter() - t0:.1f} s -> {export}")
        cfg = load_config().ingest
        cat = work / "catalogue.sqlite"
        first = index_export(export, cat, cfg, workers=args.cores)
        assert first.n_files_read == args.files, first.n_files_read
        print(f"1. first index: {first.n_files_read} headers in {first.seconds:.2f} s = "
              f"{first.n_files_read / first.seconds:,.0f} headers/s on {args.cores} cores (goal >= 2,000/s); "
              f"{len(first.studies)} studies, {len(first.errors)} errors")
        # CPU cost per header in this process: what the wall figure would be per core on an
        # idle machine (the wall figure above shares the CPUs with whatever else runs).
        sample = sorted(str(p) for p in export.rglob("IM*"))[:2000]
        cpu0 = time.process_time()
        for f in sample:
            read_header(f)
        per_cpu_s = len(sample) / (time.process_time() - cpu0)
        print(f"   header parsing CPU cost: {per_cpu_s:,.0f} headers per CPU-second in one process "
              f"(x{args.cores} cores = {per_cpu_s * args.cores:,.0f}/s if the cores were free)")
        rerun = index_export(export, cat, cfg, workers=args.cores)
        assert rerun.n_files_read == 0
        print(f"2. unchanged rerun: {rerun.n_files_cached} files in {rerun.seconds:.2f} s (goal <= 10 s for 10,000)")
        print("3. pixel decode, 256x256x64 uint16 series, load_series vs raw read of the same files:")
        print(f"   {'transfer syntax':<44} {'load_series':>12} {'decode only':>12} {'raw read':>10} {'decode/raw':>10}")
        for name, mbs, dec, raw, ratio in decode_throughput(work):
            print(f"   {name[:44]:<44} {mbs:7.1f} MB/s {dec:7.1f} MB/s {raw:6.0f} MB/s {100 * ratio:9.1f} %")
        print("   (goal >= 50 % decode/raw for uncompressed data; load_series adds header parsing and checks)")
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
