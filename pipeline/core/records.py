"""Typed records passed between the stages.

Internal records (what ingest finds) are dataclasses; everything that is written to
``assessment.json`` and read back on a resumed run is a pydantic model.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from pydantic import BaseModel, Field

from models.labels import STRUCTURES, Label, label_map  # noqa: F401 - re-exported

# The label registry (values of labels.nii.gz, SEG segment numbers, the network's classes):
# defined beside the network, which never imports pipeline; the stages take it from here.
from pipeline import SCHEMA_VERSION, __version__


# --------------------------------------------------------------------------- ingest
class SeriesRole(str, Enum):
    T1_PRE = "t1_pre"
    T1_POST = "t1_post"
    T2 = "t2"
    SUBTRACTION = "subtraction"
    DWI = "dwi"
    ADC = "adc"
    LOCALIZER = "localizer"
    OTHER = "other"


@dataclass
class SeriesRecord:
    """One DICOM series as found in the export (headers only, no pixels)."""

    patient_id: str
    study_instance_uid: str
    series_instance_uid: str
    series_number: int | None
    series_description: str
    modality: str
    manufacturer: str
    files: list[Path]
    role: SeriesRole = SeriesRole.OTHER
    role_reason: str = ""
    # 1-based order of a post-contrast phase within its study (None for other roles).
    phase_index: int | None = None
    contrast_agent: str = ""
    acquisition_time: str = ""
    echo_time_ms: float | None = None
    # How sure the role rules are of ``role`` (0..1; configs/series_roles.yaml "confidence").
    role_confidence: float | None = None


@dataclass
class StudyRecord:
    """One imaging study (StudyInstanceUID) with its series."""

    patient_id: str
    study_instance_uid: str
    study_date: dt.date | None
    study_description: str
    series: list[SeriesRecord] = field(default_factory=list)
    # Study-level flags found at ingest (e.g. series_roles_ambiguous); they reach the decision.
    flags: list[str] = field(default_factory=list)

    def with_role(self, role: SeriesRole) -> list[SeriesRecord]:
        found = [s for s in self.series if s.role == role]
        if role == SeriesRole.T1_POST:
            found.sort(key=lambda s: (s.phase_index or 0))
        return found


@dataclass
class ErrorRecord:
    """A file, series or study that was skipped or failed; one row of errors.csv."""

    path: str
    patient_id: str
    study_instance_uid: str
    series_instance_uid: str
    stage: str
    reason: str

    @classmethod
    def from_exception(cls, exc: BaseException, stage: str, context: str = "", *, path: str = "",
                       patient_id: str = "", study_instance_uid: str = "",
                       series_instance_uid: str = "") -> "ErrorRecord":
        """The one way to build an error row from an exception: the reason is
        ``<context>: <ExceptionType>: <message>`` (``<ExceptionType>: <message>`` without a context)."""
        what = f"{type(exc).__name__}: {exc}"
        return cls(path, patient_id, study_instance_uid, series_instance_uid, stage,
                   f"{context}: {what}" if context else what)


# --------------------------------------------------------------------------- timeline
class Timepoint(str, Enum):
    PRE_ABLATION = "pre_ablation"
    BASELINE = "baseline"
    FOLLOW_UP = "follow_up"


@dataclass
class TimelineEntry:
    """Where one study sits in its patient's treatment history."""

    study: StudyRecord
    timepoint: Timepoint
    session: int | None  # 1-based ablation session, None before the first
    ablation_date: dt.date | None
    days_since_ablation: int | None
    baseline_study_instance_uid: str | None
    flags: list[str] = field(default_factory=list)
    organ: str = ""  # from the procedures file when given


# --------------------------------------------------------------------------- imaging results
class Category(str, Enum):
    PRE_ABLATION = "pre_ablation"
    COMPLETE_ABLATION = "complete_ablation"
    RESIDUAL_UNABLATED_TUMOUR = "residual_unablated_tumour"
    NO_EVIDENCE_OF_LTP = "no_evidence_of_ltp"
    LOCAL_TUMOUR_PROGRESSION = "local_tumour_progression"
    SUSPECTED_LOCAL_TUMOUR_PROGRESSION = "suspected_local_tumour_progression"
    INDETERMINATE = "indeterminate"


class RegistrationQC(BaseModel):
    """Quality of one registration (post->pre within a study, or follow-up->baseline)."""

    name: str
    method: str
    metric: str
    metric_before: float
    metric_after: float
    iterations: int
    stop_condition: str
    # Mean displacement (mm) the found transform applies over the body: the motion corrected.
    motion_corrected_mm: float
    ok: bool
    reason: str = ""
    seconds: float = 0.0
    # Optional QC figures (None when not measured): inverse-consistency residual, the mean
    # round-trip displacement |T_back(T(x)) - x| over the body (mm); NCC of the body interior
    # before/after; Jacobian determinant range of a deformable transform over the body and the
    # largest displacement its deformable part adds to the affine (mm); how far from the pose
    # the pair's gradient NCC peaks along the worst grid axis (peak_offset_mm, mm; 99: beyond
    # the probed neighbour);
    # the fraction of the fixed body interior that overlaps the moving image (overlap) and, when
    # that is low, of the ablation zone's region (zone_coverage): another field of view.
    residual_mm: float | None = None
    ncc_before: float | None = None
    ncc_after: float | None = None
    jacobian_min: float | None = None
    jacobian_max: float | None = None
    deformation_max_mm: float | None = None
    peak_offset_mm: float | None = None
    overlap: float | None = None
    zone_coverage: float | None = None


class AxisMeasurement(BaseModel):
    """Size of the ablation zone per DESIGN.md "Measurement conventions" (mm, mL, LPS)."""

    long_axis_mm: float
    short_axis_mm: float
    max_3d_diameter_mm: float
    volume_ml: float
    slice_index: int  # slice (of the measured grid) holding the long axis
    long_axis_endpoints_lps: list[list[float]]
    short_axis_endpoints_lps: list[list[float]]
    centroid_lps: list[float]
    measured_on: str  # "acquired_axial" or "axial_reformat"
    in_plane_spacing_mm: list[float]


class RimMetrics(BaseModel):
    """Enhancing rim around the AZ, thickness along surface normals (rule 7)."""

    present: bool
    median_thickness_mm: float
    max_thickness_mm: float
    coverage_deg: float
    cv: float
    volume_ml: float
    benign_pattern: bool
    reason: str = ""


class Focus(BaseModel):
    """One enhancing focus outside the benign-rim pattern."""

    centroid_lps: list[float]
    volume_ml: float
    diameter_mm: float
    # The thickness rule 9 compared: along the margin normals searched to
    # foci.local_max_distance_mm (10 mm) from the zone, so never above it for a local focus.
    max_thickness_mm: float
    distance_to_az_surface_mm: float
    mean_relative_enhancement: float
    angular_extent_deg: float
    pattern: str  # focal | crescentic | circumferential | distant
    local: bool
    suspicious: bool
    reason: str
    # Length (mm) of the organ-scale enhancing structure this candidate touched (issue 15): the
    # part of the candidate within the organ's contact margin was discounted as anatomy. None:
    # no organ touched.
    organ_extent_mm: float | None = None
    # The focus's whole thickness, the same rays followed beyond the rule's search limit (issue
    # 18): what a reader is told. ``thickness_search_stopped``: still a lower bound. None in
    # records written before it existed.
    measured_thickness_mm: float | None = None
    thickness_search_stopped: bool = False
    # Supporting signals (suspicious foci only; never decide the category): mean RE per
    # post-contrast phase index, and T2 signal relative to the AZ and to the body's median.
    enhancement_by_phase: dict[str, float] = Field(default_factory=dict)
    t2_ratio_to_az: float | None = None
    t2_ratio_to_body: float | None = None
    # Follow-ups, suspicious foci only (issue 15): the fraction of the focus's volume whose
    # position at the registered baseline enhanced there already, outside the baseline's zone, rim
    # and foci (pipeline/measurement/baseline_comparison.py). None: not measured (no usable
    # registration, not a follow-up, the focus mostly outside the baseline's slab).
    seen_at_baseline_fraction: float | None = None

    @property
    def thickness_text(self) -> str:
        """The thickness for a reader: measured, "at least" where the search stopped."""
        value = self.max_thickness_mm if self.measured_thickness_mm is None else self.measured_thickness_mm
        return f"at least {value:.1f} mm" if self.thickness_search_stopped else f"{value:.1f} mm"


class StudyImaging(BaseModel):
    """Everything the per-study imaging stages found; reloaded on a resumed run."""

    ok: bool
    reason: str = ""
    series_used: dict[str, str] = Field(default_factory=dict)  # role -> SeriesInstanceUID
    post_phase_used: int | None = None
    registration: list[RegistrationQC] = Field(default_factory=list)
    az_found: bool = False
    ablation_zone: AxisMeasurement | None = None
    rim: RimMetrics | None = None
    foci: list[Focus] = Field(default_factory=list)
    segmentation_method: str = ""
    # Why the configured method did not segment (e.g. network weights missing -> classical).
    segmentation_note: str = ""
    # Network only: mean flip-TTA variance over the voxels labelled as lesion (models/infer.py).
    segmentation_uncertainty: float | None = None
    device: str = "cpu"
    key_slice_index: int | None = None
    timings_s: dict[str, float] = Field(default_factory=dict)
    # Median relative enhancement of the body 10-25 mm around the zone, by phase index
    # (enhancement.surroundings_shell_mm); when it reaches rule 6's threshold (a zone inside
    # enhancing parenchyma) rim and foci were read above it (``enhancement_above_surroundings``).
    surroundings_re: dict[str, float] = Field(default_factory=dict)
    enhancement_above_surroundings: bool = False
    # Above the surroundings: a phase read caught the parenchyma before its portal enhancement
    # (enhancement.arterial_max_fraction); None when not read above the surroundings.
    arterial_phase_read: bool | None = None


# --------------------------------------------------------------------------- decisions and records
class Changes(BaseModel):
    """Change of the AZ against the session's baseline and the nadir (smallest so far)."""

    baseline_long_axis_mm: float | None = None
    nadir_long_axis_mm: float | None = None
    long_axis_change_pct: float | None = None
    long_axis_change_mm: float | None = None
    short_axis_change_pct: float | None = None
    short_axis_change_mm: float | None = None
    volume_change_pct: float | None = None
    long_axis_change_vs_nadir_pct: float | None = None
    long_axis_change_vs_nadir_mm: float | None = None
    volume_change_vs_nadir_pct: float | None = None


class Decision(BaseModel):
    """The category of one study and why."""

    category: Category
    rule_id: str
    rule: str
    values: dict[str, float | int | str | bool | None] = Field(default_factory=dict)
    thresholds: dict[str, float | int | str] = Field(default_factory=dict)
    confidence: float
    flagged: bool
    flag_reasons: list[str] = Field(default_factory=list)
    new_lesion: bool = False
    changes: Changes = Field(default_factory=Changes)
    # Facts worth recording that need no image review (e.g. a missed follow-up time point).
    notes: list[str] = Field(default_factory=list)

    @classmethod
    def indeterminate(cls, reason: str, *, rule_id: str = "R5-not-evaluable", flags: list[str] | None = None,
                      new_lesion: bool = False, changes: Changes | None = None) -> "Decision":
        """The one way to build an ``indeterminate`` decision (rule 5: the study cannot be assessed).

        Always flagged, confidence 0; ``reason`` is said in the rule (``not evaluable: <reason>``)
        and as the last flag reason (``indeterminate: <reason>``), after the study's other
        ``flags``. ``rule_id``: ``R5-not-evaluable`` unless a more precise R5 rule applies.
        """
        return cls(category=Category.INDETERMINATE, rule_id=rule_id, rule=f"not evaluable: {reason}",
                   confidence=0.0, flagged=True, flag_reasons=[*(flags or []), f"indeterminate: {reason}"],
                   new_lesion=new_lesion, changes=changes if changes is not None else Changes())


class SeriesUsed(BaseModel):
    role: str
    series_instance_uid: str
    series_number: int | None
    series_description: str
    phase_index: int | None
    role_reason: str
    n_files: int
    role_confidence: float | None = None  # 0..1, from the role rules (configs/series_roles.yaml)


class TimelinePoint(BaseModel):
    study_instance_uid: str
    study_date: str | None
    timepoint: str
    session: int | None
    category: str
    az_long_axis_mm: float | None
    days_since_ablation: int | None = None
    az_short_axis_mm: float | None = None
    az_volume_ml: float | None = None


class AssessmentRecord(BaseModel):
    """Full record of one study: ``assessment.json``."""

    schema_version: int = SCHEMA_VERSION
    pipeline_version: str = __version__
    patient_id: str
    study_instance_uid: str
    study_date: str | None
    timepoint: str
    session: int | None
    ablation_date: str | None
    days_since_ablation: int | None
    baseline_study_instance_uid: str | None
    timeline_flags: list[str] = Field(default_factory=list)
    series: list[SeriesUsed] = Field(default_factory=list)
    imaging: StudyImaging
    registration_to_baseline: RegistrationQC | None = None
    decision: Decision
    patient_timeline: list[TimelinePoint] = Field(default_factory=list)
    reviewed_category: str | None = None
    # This study's rows of errors.csv from the stages after ingest (re-emitted when reused).
    errors: list[dict[str, str]] = Field(default_factory=list)
    # What the cached imaging results depend on; a rerun reuses them only when these match.
    cache_keys: dict[str, str] = Field(default_factory=dict)
    # Seconds of every step the run that wrote this file spent on the study
    # (docs/output-contract.md): the imaging steps of ``imaging.timings_s`` when computed in that
    # run (else ``read_cache``), the writes of the cached images, the registration to the
    # baseline, the temporal difference, the key image and the DICOM SEG/SR.
    # ``assessment.json``'s own write is the one step not in it.
    stage_seconds: dict[str, float] = Field(default_factory=dict)
