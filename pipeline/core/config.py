"""One validated configuration schema for the whole pipeline (configs/*.yaml).

The values live only in ``configs/default.yaml`` (with their sources); the schema here
fixes names, types and bounds. A site's config file may override any subset: it is
merged over the default file before validation.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from importlib.resources import files
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


def _config_dir() -> Path:
    """The folder of the ``configs`` package (its YAML files are package data)."""
    try:
        return Path(str(files("configs"))).resolve()
    except ModuleNotFoundError as exc:  # an environment installed before configs/ was a package
        raise ModuleNotFoundError(
            "package 'configs' not found: this environment was installed from an older version of "
            "ablation-response; reinstall it (bash scripts/setup.sh, or pip install -e .)", name="configs"
        ) from exc


# configs/default.yaml and configs/series_roles.yaml, found from the installed package (a
# wheel, an editable install or a checkout alike), not from the repository root.
CONFIG_DIR = _config_dir()
DEFAULT_CONFIG_PATH = CONFIG_DIR / "default.yaml"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class IngestConfig(_Section):
    defer_recent_seconds: float = Field(ge=0)
    workers: int | None = Field(ge=1)
    # Series role rules YAML (keywords, vendor additions, confidences): a path, or a file name
    # in configs/ (pipeline/ingest/series_roles.py, docs/ingest.md).
    series_roles_file: str
    # Outputs carry HMAC-SHA256 pseudonyms of PatientID (pipeline/ingest/pseudonym.py).
    pseudonymise_patient_ids: bool
    # The secret key of the pseudonyms; None: $XDG_CONFIG_HOME/ablation-response/pseudonym.key.
    pseudonym_key_file: str | None = None
    # Catalogue and pseudonym mapping of a pseudonymised run (they hold raw IDs, so never in
    # the output folder); None: "<output folder>.private" beside it.
    private_dir: str | None = None
    # The catalogue's database when several machines or flows share it
    # (postgresql+psycopg://user@host/db; docs/cluster.md); None: OUT/catalogue.sqlite.
    catalogue_url: str | None = None


class RegistrationStageConfig(_Section):
    transforms: list[Literal["rigid", "affine"]]
    shrink_factors: list[int]
    smoothing_sigmas_mm: list[float]
    sampling_fraction: float = Field(gt=0, le=1)
    iterations: int = Field(gt=0)
    min_ncc_after: float = Field(ge=-1, le=1)
    # A pair under min_ncc_after passes that check all the same when its gradient-magnitude
    # correlation reaches this (enhancement changes intensities, not edges); None: NCC only.
    min_gradient_ncc_after: float | None = Field(default=None, ge=-1, le=1)
    # ... or when its gradient-magnitude correlation at the pose stands at least this far above
    # its mean at the six neighbours peak_probe_mm away (registration.metric.SimilarityPeak):
    # edges that line up at the pose, whatever the pair's contrast; None: not used.
    min_gradient_ncc_prominence: float | None = Field(default=None, gt=0, le=1)
    # The pair's own edge agreement (gradient NCC) must peak within max_peak_offset_mm of the
    # registered pose along every grid axis, estimated from the pose and its neighbours
    # peak_probe_mm away (registration.metric.similarity_peak_offsets_mm); None: not checked.
    max_peak_offset_mm: float | None = Field(default=None, gt=0)
    peak_probe_mm: float = Field(default=4.0, gt=0)
    # Sanity bounds (not clinical thresholds): None disables the check for that stage.
    max_motion_mm: float | None = Field(default=None, gt=0)
    max_scale_change: float | None = Field(default=None, gt=0, lt=1)
    # Inverse-consistency residual (mm) above which the registration fails QC; None: not measured.
    max_residual_mm: float | None = Field(default=None, gt=0)
    # Optional deformable stage after the affine: "field" (smooth displacement field, torch
    # backend) or "bspline" (B-spline free-form deformation, simpleitk backend).
    deformable: Literal["none", "field", "bspline"] = "none"
    # Intensity bias correction of both images before registering: "n4" (SimpleITK N4 on a
    # ~8 mm copy, pipeline.imaging.registration.metric.bias_corrected) or "none".
    bias_correction: Literal["none", "n4"] = "none"
    deformable_grid_spacing_mm: float = Field(default=40.0, gt=5)
    deformable_iterations: int = Field(default=60, gt=0)
    # Sanity bound: a rotation larger than this (deg) fails QC; None: not checked.
    max_rotation_deg: float | None = Field(default=None, gt=0, le=180)
    # Sanity bound: a deformable part moving a body point farther than this (mm) beyond the
    # affine fails QC; None: not checked.
    max_deformation_mm: float | None = Field(default=None, gt=0)
    # This stage's backend when it differs from registration.backend (None: that one). Why per
    # stage: the rigid intra-study pairs are fast on either, while the inter-study chain is where
    # the torch backend's displacement field earns its keep (docs/registration.md).
    backend: Literal["simpleitk", "torch"] | None = None


class RegistrationConfig(_Section):
    backend: Literal["simpleitk", "torch"]
    # Where the torch backend runs (pipeline.core.devices.resolve_device); simpleitk is CPU only.
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int = Field(ge=1)
    intra_study: RegistrationStageConfig
    inter_study: RegistrationStageConfig

    def backend_of(self, stage: RegistrationStageConfig) -> str:
        """The backend that runs ``stage``: its own override, else ``backend``."""
        return stage.backend or self.backend

    @model_validator(mode="after")
    def _deformable_matches_backend(self) -> "RegistrationConfig":
        for name in ("intra_study", "inter_study"):
            stage = getattr(self, name)
            backend = self.backend_of(stage)
            supported = {"simpleitk": {"none", "bspline"}, "torch": {"none", "field"}}[backend]
            if stage.deformable not in supported:
                raise ValueError(f"registration.{name}.deformable={stage.deformable!r} is not available with "
                                 f"backend {backend!r} (choose from {sorted(supported)})")
        return self


class EnhancementConfig(_Section):
    relative_enhancement_threshold: float = Field(gt=0, lt=5)
    min_component_mm: float = Field(ge=0)
    phase: Literal["latest"] | int
    # Inner and outer distance (mm) from the zone of the shell whose median RE is the zone's
    # surroundings (pipeline/segmentation/surroundings.py); None: rule 6 alone.
    surroundings_shell_mm: tuple[float, float] | None = None
    # Above the surroundings, a phase counts as arterial when its surroundings enhance at most
    # this fraction of the most enhanced phase read; without one the study is flagged
    # "arterial_phase_not_assessed" (pipeline/segmentation/surroundings.py).
    arterial_max_fraction: float = Field(default=0.5, gt=0, lt=1)

    @field_validator("surroundings_shell_mm")
    @classmethod
    def _shell_ordered(cls, v: tuple[float, float] | None) -> tuple[float, float] | None:
        if v is not None and not 0 <= v[0] < v[1]:
            raise ValueError(f"surroundings_shell_mm must be [inner, outer] with 0 <= inner < outer, got {list(v)}")
        return v


class SegmentationConfig(_Section):
    method: Literal["classical", "network"]
    az_min_pre_ratio: float = Field(gt=1)
    az_min_volume_ml: float = Field(gt=0)
    rim_search_mm: float = Field(gt=0)
    # models/ (method network): checkpoint of models/train.py, a path or relative to the folder
    # holding the installed ``models`` package (the repository root in a checkout;
    # models.infer.resolve_weights); when it cannot be loaded the classical method segments
    # and says why.
    network_weights: str = "models/weights/segresnet_synthetic.pt"
    # Flip test-time augmentation: mean of the views, their variance is the uncertainty.
    network_tta: bool = True
    # Views of the TTA (models/infer.py TTA_VIEWS): 2 = the input and its flip along all three
    # axes (the default: half the CPU time of 4, as accurate on validation), 4 = the input and
    # its flip along each axis.
    network_tta_views: Literal[2, 4] = 2
    # Review flag "segmentation_uncertain" when the network segmented and its per-case uncertainty
    # (StudyImaging.segmentation_uncertainty) exceeds this; None: never (models/README.md).
    network_review_uncertainty: float | None = Field(default=None, gt=0)
    # A network rim whose voxels do not enhance on average (mean relative enhancement below this)
    # is dropped: the rim is enhancing tissue by definition (pipeline/segmentation/network.py
    # clean_prediction).
    network_rim_min_mean_re: float = Field(default=0.05, ge=0)
    # Edge of the network's ablation zone: "half_max" (placed at the half-way pre-contrast level,
    # pipeline/segmentation/network.py place_az_edge) or "network" (the network's own argmax edge).
    network_az_edge: Literal["half_max", "network"] = "half_max"


class RimConfig(_Section):
    benign_max_thickness_mm: float = Field(gt=0)
    benign_min_coverage_deg: float = Field(ge=0, le=360)
    benign_max_cv: float = Field(gt=0)


class FociConfig(_Section):
    min_thickness_mm: float = Field(gt=0)
    min_thickness_ratio_to_rim: float = Field(gt=0)
    strongly_suspicious_diameter_mm: float = Field(gt=0)
    local_max_distance_mm: float = Field(ge=0)
    new_lesion_search_mm: float = Field(gt=0)
    new_lesion_min_relative_enhancement: float = Field(gt=0)
    vessel_min_elongation: float = Field(gt=1)
    vessel_min_length_mm: float = Field(gt=0)
    vessel_residual_margin_mm: float | None = Field(default=None, gt=0)
    vessel_tube_leaving_zone: bool = False
    focal_max_deg: float
    crescentic_max_deg: float
    # Organ-scale enhancing structures (pipeline/measurement/focus_context.py); organ_min_radius_mm null: off.
    organ_min_radius_mm: float | None = Field(default=None, gt=0)
    organ_min_extent_mm: float = Field(default=40.0, gt=0)
    organ_contact_margin_mm: float = Field(default=2.5, ge=0)
    # Organ bodies are cut into lobes at saddles organ_lobe_depth_mm shallower than a lobe's
    # centre; a lobe shorter than organ_lobe_max_mm is no organ's (a nodule against it); null: off.
    organ_lobe_depth_mm: float | None = Field(default=None, gt=0)
    organ_lobe_max_mm: float | None = Field(default=None, gt=0)
    # Within local_max_distance_mm of the zone, what of a solid organ body lies farther than the
    # contact margin from the body's opening by a ball of this radius is no organ's (a nodule
    # sunk into it); null: off.
    organ_core_radius_mm: float | None = Field(default=None, gt=0)
    # Enclosed non-enhancing contents that make a hollow organ solid (bowel loop); null: off.
    hollow_min_content_ml: float | None = Field(default=None, ge=0)
    # Enhancing tissue this close to enclosed contents is a hollow organ's wall; null: off.
    hollow_wall_max_mm: float | None = Field(default=None, gt=0)
    # Rule 9's thickness is at most the diameter of the largest disc the focus's half-maximum
    # core holds on one slice (pipeline/measurement/focus_context.py inscribed_disc_mm); false: normals only.
    thickness_holds_ball: bool = False
    # What protrudes from an organ body this many times as wide as thick is its fringe; null: off.
    organ_fringe_min_aspect: float | None = Field(default=None, gt=1)


class RulesConfig(_Section):
    baseline_min_days: int
    baseline_max_days: int
    growth_min_days: int
    growth_min_abs_mm: float
    growth_min_pct: float
    review_confidence_below: float = Field(ge=0, le=1)
    expected_rim_days: dict[str, int]
    rim_min_coverage_deg: float = Field(ge=0, le=360)
    rim_increase_pct: float = Field(ge=0)
    rim_increase_ml: float = Field(ge=0)
    rim_thickness_increase_mm: float = Field(ge=0)
    schedule_days: dict[str, list[int]]
    schedule_tolerance_days: int = Field(ge=0)
    focus_seen_at_baseline_min_fraction: float | None = Field(default=None, gt=0, le=1)

    def for_organ(self, table: dict, organ: str):
        """The organ's entry of a per-organ table, else its ``default``."""
        return table.get((organ or "").strip().lower(), table["default"])


class OutputsConfig(_Section):
    write_key_image: bool
    key_image_dpi: int = Field(gt=10)
    write_dicom_seg: bool
    write_dicom_sr: bool
    write_report: bool


class ReviewConfig(_Section):
    # SQLAlchemy URL of the review database; None: sqlite OUT/review.sqlite.
    database_url: str | None = None


class ExecutionConfig(_Section):
    # Where patients run (flows/engine.py, docs/cluster.md): "threads" in the flow's process, or
    # "dask": Prefect's DaskTaskRunner, each patient a task on a Dask worker process.
    engine: Literal["threads", "dask"] = "threads"
    # dask: the scheduler of an existing cluster (tcp://host:8786); null: a local cluster of
    # ``workers`` processes, started and stopped with the run.
    scheduler_address: str | None = None
    # dask: the worker resource a patient asks for when it runs on CUDA (workers started with
    # ``dask worker --resources GPU=1``); null: no placement constraint.
    gpu_resource: str | None = "GPU"
    # Two runs sharing an output folder: the second waits this long for a patient the first is
    # assessing (pipeline/outputs/locks.py), then lists it indeterminate.
    patient_lock_timeout_s: float = Field(default=7200.0, ge=0)
    # dask: SimpleITK and torch threads of each worker process; threads: torch threads of each
    # patient's thread (since 0.3.4). null: the CPUs this process may use shared out between the
    # --workers patients (2 on 2 cores: 1 each; their libraries would otherwise each take every
    # core and contend); on an existing Dask cluster what the worker was started with
    # (docs/cluster.md).
    threads_per_worker: int | None = Field(default=None, ge=1)


class PipelineConfig(_Section):
    ingest: IngestConfig
    registration: RegistrationConfig
    enhancement: EnhancementConfig
    segmentation: SegmentationConfig
    rim: RimConfig
    foci: FociConfig
    rules: RulesConfig
    outputs: OutputsConfig
    review: ReviewConfig
    execution: ExecutionConfig = Field(default_factory=ExecutionConfig)

    def digest(self) -> str:
        """Stable hash of the settings: a change invalidates cached study results."""
        # Where verdicts and the catalogue are stored, where patients run, how long a run waits for files still
        # being copied and how many processes read headers change no study result: moving the
        # database or the run to a cluster, or the nightly run's deferral (300 s, where a manual
        # run uses 0), must not make the next run recompute everything.
        operational = {"review": True, "execution": True,
                       "ingest": {"defer_recent_seconds", "workers", "catalogue_url"}}
        blob = json.dumps(self.model_dump(mode="json", exclude=operational), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


class ConfigFileError(ValueError):
    """A config file that is not YAML, or not a mapping; the message names the file and line."""


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise ConfigFileError(f"config file {path} is not valid YAML{where}: {problem}") from None
    if not isinstance(data, dict):
        raise ConfigFileError(f"config file {path} must hold a mapping at the top level")
    return data


def describe_config_error(exc: ValidationError, path: Path | str | None) -> str:
    """One line for a user: the first wrong key (dotted) and the file, plus how many more.

    An unknown key (a typo) gets the closest valid key of its section as a suggestion.
    """
    source = f"config file {path}" if path is not None else f"the default config {DEFAULT_CONFIG_PATH}"
    errors = exc.errors()
    first = errors[0]
    loc = [str(part) for part in first["loc"]]
    key = ".".join(loc)
    if first["type"] == "extra_forbidden":
        section: Any = PipelineConfig
        for part in loc[:-1]:
            field = section.model_fields.get(part) if isinstance(section, type) and issubclass(section, BaseModel) else None
            section = field.annotation if field is not None else None
        known = list(section.model_fields) if isinstance(section, type) and issubclass(section, BaseModel) else []
        close = difflib.get_close_matches(loc[-1], known, n=1)
        hint = f" (did you mean '{'.'.join([*loc[:-1], close[0]])}'?)" if close else ""
        line = f"unknown config key '{key}' in {source}{hint}"
    else:
        value = first.get("input")
        shown = f" = {value!r}" if not isinstance(value, (dict, list)) else ""
        line = f"invalid config value '{key}'{shown} in {source}: {first['msg']}"
    if len(errors) > 1:
        line += f" (and {len(errors) - 1} more)"
    return line


def load_config(path: Path | str | None = None) -> PipelineConfig:
    """Load ``configs/default.yaml``, merge ``path`` over it, validate.

    Raises ``pydantic.ValidationError`` naming each wrong field (``describe_config_error``
    makes it one line), ``ConfigFileError`` (not YAML, not a mapping) or ``FileNotFoundError``.
    """
    raw = _read_yaml(DEFAULT_CONFIG_PATH)
    if path is not None and Path(path).resolve() != DEFAULT_CONFIG_PATH:
        raw = _merge(raw, _read_yaml(Path(path)))
    return PipelineConfig.model_validate(raw)
