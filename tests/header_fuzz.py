"""Seeded mutations of DICOM header values, for tests/test_header_fuzz.py and
benchmarks/fuzz_headers.py (issue 16).

One mutation = a small export (3 patients, 4 studies of 8x8x6 slices: tests/test_header_values.py
``small_study``) in which 1-3 files get one header value replaced, in the file's bytes, by a
special value: special floats, wrong types (text in a binary US tag, numbers in a UID), empty,
huge strings, bad dates, bad UIDs, control bytes. :func:`run_once` then indexes the export and
assesses every patient as the batch does, and says whether anything crashed and whether every
study found reached an assessment record and every file is accounted for (in a series used, or
named by a row of errors.csv, itself or its folder).
"""

from __future__ import annotations

import random
import shutil
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from pydicom.uid import generate_uid

from tests.dicom_factory import set_raw

# Tags the factory writes (so each can be found in the bytes), header readers look at all of them.
MUTABLE_TAGS = [
    "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "StudyDate", "SeriesDate",
    "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "PatientID", "SeriesNumber", "InstanceNumber",
    "EchoTime", "RepetitionTime", "SeriesDescription", "StudyDescription", "Modality", "Manufacturer",
    "RescaleSlope", "RescaleIntercept", "AcquisitionTime", "ImageType", "Rows", "Columns", "SliceThickness",
    "BitsAllocated", "SamplesPerPixel",
]
SPECIAL_VALUES = [
    "nan", "NaN", "inf", "-inf", "+inf", "1e308", "-1e308", "1e400", "1e-320", "-0", "nan\\nan\\nan",
    "0\\nan\\0", "1\\0\\0\\0\\nan\\0", "inf\\inf", "0\\0", "-1\\-1", "", " ", "\\", "\\\\\\\\", "abc",
    "1\\2\\3\\4\\5\\6\\7\\8", "99999999999999999999", "-2147483649", "0x10", "1,5", "20231345", "00000000",
    "2023-02-30", "19000101", "99991231", "1.2.abc", "..", "1." + "2" * 70, "0.0.0", "=HYPERLINK(\"x\")",
    "\x00\x01\x02", "line\nbreak", "é\u00ff", "9" * 5000, "A" * 60000,
]
# The geometry tags and the special floats are drawn more often: every value of every slice
# is read there, and one bad value used to stop the whole batch.
GEOMETRY_TAGS = ["ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"]
SPECIAL_FLOATS = ["nan", "inf", "-inf", "1e308", "-1e308", "nan\\nan\\nan", "0\\nan\\0", "0\\0"]
WEIGHTED_TAGS = MUTABLE_TAGS + GEOMETRY_TAGS * 4
WEIGHTED_VALUES = SPECIAL_VALUES + SPECIAL_FLOATS * 4


def base_export(root: Path) -> Path:
    """The export every mutation starts from; returns its folder."""
    from tests.test_header_values import small_study

    export = root / "export"
    small_study(export / "A" / "s1", patient="FZ-A")
    small_study(export / "B" / "s1", patient="FZ-B")
    small_study(export / "B" / "s2", patient="FZ-B", study_uid=generate_uid(),
                extra={"StudyDate": "20240301", "SeriesDate": "20240301"})
    small_study(export / "C" / "s1", patient="FZ-C")
    return export


def mutate(export: Path, rng: random.Random) -> list[tuple[str, str, str]]:
    """Replace one header value in each of 1-3 random files; returns (file, keyword, value)."""
    files = sorted(p for p in export.rglob("*") if p.is_file())
    done = []
    for path in rng.sample(files, rng.randint(1, 3)):
        keyword, value = rng.choice(WEIGHTED_TAGS), rng.choice(WEIGHTED_VALUES)
        try:
            set_raw(path, keyword, value)
        except ValueError:  # the tag is not in this file
            continue
        done.append((str(path.relative_to(export)), keyword, value[:40]))
    return done


@dataclass
class Outcome:
    mutations: list[tuple[str, str, str]]
    crash: str = ""  # traceback of the first exception, "" when none
    studies_found: int = 0
    studies_assessed: int = 0
    unaccounted: list[str] = field(default_factory=list)  # files neither used nor in errors.csv

    @property
    def ok(self) -> bool:
        return not self.crash and self.studies_found == self.studies_assessed and not self.unaccounted


def run_once(template: Path, work: Path, seed: int) -> Outcome:
    """Copy ``template`` (an export) to ``work``, mutate it with ``seed``, index and assess it."""
    from pipeline.core.config import load_config
    from pipeline.ingest.index import index_export
    from pipeline.run.patient import assess_patient

    shutil.rmtree(work, ignore_errors=True)
    export = work / "export"
    shutil.copytree(template, export)
    outcome = Outcome(mutate(export, random.Random(seed)))
    cfg = load_config()
    # The evidence renderers are not header readers; leaving them out keeps a mutation fast.
    cfg = cfg.model_copy(update={"outputs": cfg.outputs.model_copy(update={
        "write_key_image": False, "write_report": False, "write_dicom_seg": False, "write_dicom_sr": False})})
    try:
        index = index_export(export, work / "catalogue.sqlite", cfg.ingest, workers=1)
        outcome.studies_found = len(index.studies)
        errors = list(index.errors)
        by_patient: dict[str, list] = {}
        for study in index.studies:
            by_patient.setdefault(study.patient_id, []).append(study)
        for studies in by_patient.values():
            result = assess_patient(studies, None, cfg, work / "out", "cpu")
            outcome.studies_assessed += len({r.study_instance_uid for r in result.records})
            errors.extend(result.errors)
    except Exception:  # noqa: BLE001 - what the fuzzing looks for
        outcome.crash = traceback.format_exc(limit=8)
        return outcome
    used = {Path(f) for st in index.studies for s in st.series for f in s.files}
    named = {Path(e.path) for e in errors if e.path}
    for path in sorted(p for p in export.rglob("*") if p.is_file()):
        if path not in used and not any(n == path or n in path.parents for n in named):
            outcome.unaccounted.append(str(path.relative_to(export)))
    return outcome
