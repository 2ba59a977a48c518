"""The study store: a run's output folder as the cache of each study's results (issue 17).

Owns what a rerun reads back from a study's folder (``contract.study_dir``) and what the run
keeps there for it: the file names of the cached images, of the registration to the baseline,
of the temporal difference and of ``assessment.json``; the cache keys (the one place that
computes them and compares them with a stored record's ``cache_keys``); and the questions a
rerun asks: is this study's imaging reusable, its registration to the baseline, its whole
stored assessment?

Keys: ``imaging`` = the study's input files (path, size, mtime of each, series roles), the config
digest with the network weights' content (:func:`analysis_digest`) and the pipeline version; ``to_baseline`` = the follow-up's and its baseline's imaging keys.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import SimpleITK as sitk

from pipeline import __version__
from pipeline.core.config import SegmentationConfig
from pipeline.core.files import atomic_write_image, read_image
from pipeline.core.records import AssessmentRecord, ErrorRecord, RegistrationQC, StudyImaging, StudyRecord, TimelineEntry
from pipeline.imaging.registration import TRANSFORM_FILE, read_to_baseline, write_to_baseline
from pipeline.imaging.volumes import load_series
from pipeline.measurement.study import StudyImages
from pipeline.outputs.contract import read_assessment, study_dir, write_assessment

ASSESSMENT_NAME = "assessment.json"
TEMPORAL_DIFFERENCE_NAME = "temporal_difference.nii.gz"
# The per-study images a later run (and the patient-level steps) read back instead of recomputing.
IMAGE_FILES = {"labels": "labels.nii.gz", "subtraction": "subtraction.nii.gz", "pre_registered": "pre_registered.nii.gz"}
# Kept only for a zone read above enhancing surroundings (imaging.enhancement_above_surroundings).
ABOVE_SURROUNDINGS_NAME = "above_surroundings.nii.gz"
# Stages of errors.csv rows that per-study imaging produces (kept with a reused result).
IMAGING_STAGES = {"select_series", "load", "register_intra", "imaging"}


# --------------------------------------------------------------------------- cache keys
def files_digest(study: StudyRecord) -> str:
    """Content key of a study's inputs: every file's path, size and modification time."""
    h = hashlib.sha256()
    for series in sorted(study.series, key=lambda s: s.series_instance_uid):
        h.update(f"{series.series_instance_uid}|{series.role.value}|{series.phase_index}".encode())
        for path in sorted(series.files):
            try:
                st = path.stat()
                h.update(f"{path}|{st.st_size}|{st.st_mtime_ns}".encode())
            except OSError:
                h.update(f"{path}|missing".encode())
    return h.hexdigest()[:16]


def analysis_digest(config_digest: str, segmentation: SegmentationConfig) -> str:
    """``config_digest`` (``PipelineConfig.digest()``), and with ``segmentation.method: network``
    the weights file's content: retrained weights under the same path must not leave a rerun with
    the old network's results."""
    if segmentation.method != "network":
        return config_digest
    from pipeline.segmentation.network import resolve_weights  # torch only where the network runs

    try:
        weights = hashlib.sha256(resolve_weights(segmentation.network_weights).read_bytes()).hexdigest()[:16]
    except OSError:
        weights = "absent"  # the classical fallback runs; the key says so
    return hashlib.sha256(f"{config_digest}|{weights}".encode()).hexdigest()[:16]


def imaging_key(study: StudyRecord, config_digest: str) -> str:
    """Key of a study's per-study imaging: its inputs, the whole config (``PipelineConfig.digest()``),
    the pipeline version."""
    return hashlib.sha256(f"{files_digest(study)}|{config_digest}|{__version__}".encode()).hexdigest()[:16]


def to_baseline_key(study_imaging_key: str, baseline_imaging_key: str) -> str:
    """Key of a follow-up's registration to its baseline: both studies' imaging keys."""
    return hashlib.sha256(f"{study_imaging_key}|{baseline_imaging_key}".encode()).hexdigest()[:16]


def cache_keys(study_imaging_key: str, study_to_baseline_key: str) -> dict[str, str]:
    """The ``cache_keys`` field of an assessment record ("" where a key was not computed)."""
    return {"imaging": study_imaging_key, "to_baseline": study_to_baseline_key}


# --------------------------------------------------------------------------- cached results
def read_cached_images(folder: Path, study: StudyRecord, imaging: StudyImaging) -> StudyImages | None:
    """A study's images as an earlier run kept them in ``folder`` (None when unreadable)."""
    try:
        post_uid = imaging.series_used.get("t1_post")
        post_series = next(s for s in study.series if s.series_instance_uid == post_uid)
        loaded = {name: read_image(Path(folder) / fname) for name, fname in IMAGE_FILES.items()}
        above = read_image(Path(folder) / ABOVE_SURROUNDINGS_NAME) if imaging.enhancement_above_surroundings else None
        return StudyImages(post=load_series(post_series), pre_registered=loaded["pre_registered"],
                           subtraction=loaded["subtraction"], labels=loaded["labels"], above_surroundings=above)
    except (StopIteration, RuntimeError, OSError, ValueError):
        return None


class StudyStore:
    """The per-study folders of one output folder ``out_dir``, read and written as a cache."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = Path(out_dir)

    def folder(self, study: StudyRecord) -> Path:
        return study_dir(self.out_dir, study)

    def patient_folder(self, study: StudyRecord) -> Path:
        return self.folder(study).parent

    def record(self, study: StudyRecord) -> AssessmentRecord | None:
        """The study's stored assessment, or None when absent or unreadable."""
        return read_assessment(self.folder(study) / ASSESSMENT_NAME)

    def write_record(self, study: StudyRecord, record: AssessmentRecord) -> None:
        write_assessment(self.folder(study) / ASSESSMENT_NAME, record)

    # ----------------------------------------------------------------------- imaging
    def cached_imaging(self, study: StudyRecord, key: str) -> tuple[StudyImaging, list[ErrorRecord]] | None:
        """(imaging, its error rows) of an earlier run with the same imaging ``key`` whose images
        are all still there (none needed when its imaging failed), else None."""
        folder = self.folder(study)
        previous = read_assessment(folder / ASSESSMENT_NAME)
        needed = [*IMAGE_FILES.values(), *([ABOVE_SURROUNDINGS_NAME] if previous is not None
                                           and previous.imaging.enhancement_above_surroundings else [])]
        if previous is not None and previous.cache_keys.get("imaging") == key and (
                not previous.imaging.ok or all((folder / name).exists() for name in needed)):
            return previous.imaging, [ErrorRecord(**e) for e in previous.errors if e.get("stage") in IMAGING_STAGES]
        return None

    def keep_images(self, study: StudyRecord, images: StudyImages) -> StudyImages:
        """Write a study's images and return them as written (read back from the folder)."""
        folder = self.folder(study)
        atomic_write_image(images.labels, folder / IMAGE_FILES["labels"])
        atomic_write_image(images.subtraction, folder / IMAGE_FILES["subtraction"])
        atomic_write_image(sitk.Cast(images.pre_registered, sitk.sitkFloat32), folder / IMAGE_FILES["pre_registered"])
        # The later stages (registration to the baseline, temporal difference) use the images as
        # written, float32 with NIfTI's header precision, not the in-memory ones: a rerun after a
        # crash reads them back from disk and must compute exactly what the first run did
        # (tests/test_end_to_end.py::test_resume_after_a_lost_study_recomputes_it_identically).
        loaded = {name: read_image(folder / fname) for name, fname in IMAGE_FILES.items()}
        above = None
        if images.above_surroundings is not None:
            atomic_write_image(sitk.Cast(images.above_surroundings, sitk.sitkFloat32), folder / ABOVE_SURROUNDINGS_NAME)
            above = read_image(folder / ABOVE_SURROUNDINGS_NAME)
        else:  # a file of an earlier run with another config must not outlive it
            (folder / ABOVE_SURROUNDINGS_NAME).unlink(missing_ok=True)
        return StudyImages(post=images.post, pre_registered=loaded["pre_registered"],
                           subtraction=loaded["subtraction"], labels=loaded["labels"], above_surroundings=above)

    # ----------------------------------------------------------------------- registration to the baseline
    def cached_to_baseline(self, study: StudyRecord, key: str) -> RegistrationQC | None:
        """The QC of an earlier registration to the baseline with the same ``key`` whose transform
        is still there (:meth:`read_to_baseline`), else None."""
        folder = self.folder(study)
        previous = read_assessment(folder / ASSESSMENT_NAME)
        if (previous is not None and previous.cache_keys.get("to_baseline") == key
                and (folder / TRANSFORM_FILE).exists() and previous.registration_to_baseline is not None):
            return previous.registration_to_baseline
        return None

    def read_to_baseline(self, study: StudyRecord) -> sitk.Transform:
        """The transform baseline -> study kept by :meth:`keep_to_baseline`."""
        return read_to_baseline(self.folder(study))

    def keep_to_baseline(self, study: StudyRecord, transform: sitk.Transform, baseline_reference: sitk.Image) -> None:
        """Affine in to_baseline.tfm, a deformable part in to_baseline_field.nii.gz."""
        write_to_baseline(transform, self.folder(study), baseline_reference)

    def keep_temporal_difference(self, study: StudyRecord, image: sitk.Image) -> None:
        atomic_write_image(image, self.folder(study) / TEMPORAL_DIFFERENCE_NAME)

    # ----------------------------------------------------------------------- whole assessment
    def unchanged_record(self, entry: TimelineEntry, timeline_uids: list[str],
                         expected_to_baseline_key: str | None) -> AssessmentRecord | None:
        """The stored record of ``entry``'s study when it still holds: the same studies in the
        patient's timeline, the same time point and session, and (``expected_to_baseline_key``
        given) the same registration to the baseline; else None."""
        record = self.record(entry.study)
        if record is None or [p.study_instance_uid for p in record.patient_timeline] != list(timeline_uids):
            return None
        if record.timepoint != entry.timepoint.value or record.session != entry.session:
            return None
        if expected_to_baseline_key is not None and record.cache_keys.get("to_baseline") != expected_to_baseline_key:
            return None
        return record
