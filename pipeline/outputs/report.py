"""patients/<patient>/report.html: one self-contained page per patient (images inlined as base64).

It shows what the pipeline already wrote, it draws nothing itself: the timeline table (from
each study's ``assessment.json`` record), ``timeline.png`` (pipeline/outputs/timeline_plot.py), each
study's ``key_image.png`` (pipeline/outputs/key_image.py), the evidence of each call (rule, values and
thresholds of ``decision``) and the flags. Rendered by jinja2 with autoescaping on: every text
field (patient ID, reasons, flags) comes from the export or the pipeline and is escaped.
"""

from __future__ import annotations

import base64
import datetime as dt
from dataclasses import dataclass
from pathlib import Path

import jinja2

from pipeline import __version__
from pipeline.core.files import atomic_write_text
from pipeline.core.records import AssessmentRecord, AxisMeasurement, Focus

TEMPLATE_NAME = "patient_report.html.j2"
_ENV = jinja2.Environment(
    loader=jinja2.FileSystemLoader(Path(__file__).resolve().parent / "templates"),
    # The template is HTML whatever its suffix: escape everything, always.
    autoescape=True,
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)
# What a radiologist reads instead of the code names of assessment.json (issue 18).
WORDS = {
    # categories and time points
    "pre_ablation": "pre-ablation",
    "baseline": "baseline",
    "follow_up": "follow-up",
    "complete_ablation": "complete ablation",
    "residual_unablated_tumour": "residual unablated tumour",
    "no_evidence_of_ltp": "no evidence of local tumour progression",
    "local_tumour_progression": "local tumour progression",
    "suspected_local_tumour_progression": "suspected local tumour progression",
    "indeterminate": "indeterminate",
    # values a rule compared
    "az_long_axis_mm": "ablation zone long axis (mm)",
    "days_since_ablation": "days since ablation",
    "study_date": "study date",
    "rim_max_thickness_mm": "rim, thickest point (mm)",
    "rim_benign_pattern": "rim thin, smooth and covering the margin (benign pattern)",
    "n_suspicious_local_foci": "suspicious foci at the margin",
    "largest_focus_mm": "largest suspicious focus, across (mm)",
    "focus_max_thickness_mm": "its thickness within 10 mm of the zone, as rule 9 compares it (mm)",
    "focus_distance_to_az_mm": "its distance to the ablation zone (mm)",
    "focus_pattern": "its pattern around the margin",
    "focus_reason": "why it is suspicious",
    "nadir_long_axis_mm": "smallest long axis so far, the nadir (mm)",
    "growth_vs_nadir_mm": "growth over the nadir (mm)",
    "growth_vs_nadir_pct": "growth over the nadir (%)",
    "growth_needed_mm": "growth that would count (mm)",
    # thresholds
    "min_thickness_mm": "a nodule is at least this thick (mm)",
    "min_thickness_ratio_to_rim": "and at least this many times the rim's median thickness",
    "strongly_suspicious_diameter_mm": "strongly suspicious above, across (mm)",
    "local_max_distance_mm": "at the margin: within this distance of the zone (mm)",
    "growth_min_abs_mm": "growth counts from (mm)",
    "growth_min_pct": "or from (% of the nadir), whichever is larger",
    "growth_min_days": "growth counts from day",
}
_UNITS = {"_mm": " (mm)", "_ml": " (mL)", "_pct": " (%)", "_deg": " (deg)", "_days": " (days)"}


def words(code: str) -> str:
    """A code name (category, time point, value or threshold key) in words."""
    if code in WORDS:
        return WORDS[code]
    for suffix, unit in _UNITS.items():
        if code.endswith(suffix):
            return code[: -len(suffix)].replace("az_", "ablation zone ").replace("_", " ") + unit
    return code.replace("az_", "ablation zone ").replace("_", " ")


_TENTHS = ("_mm", "_pct", "_deg")  # measured to a tenth: mm on the sub-voxel boundary, % of mm


def value_words(value, key: str = "") -> str:
    """A value for a reader: yes/no for booleans; mm, % and degrees to 0.1 (what was measured),
    other floats to 3 significant digits; category codes in words."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.1f}" if key.endswith(_TENTHS) else f"{value:.3g}"
    return WORDS.get(value, str(value)) if isinstance(value, str) else str(value)


def flag_words(flag: str) -> str:
    """``residual_unablated_tumour: nodular ...`` -> ``residual unablated tumour: nodular ...``."""
    code, sep, rest = flag.partition(":")
    return f"{words(code.strip())}{sep}{rest}" if sep and " " not in code.strip() else flag


_ENV.filters["num"] = lambda v, digits=2: "" if v is None else f"{v:.{digits}f}"
_ENV.filters["pct"] = lambda v: "" if v is None else f"{v:+.1f} %"
_ENV.filters["val"] = value_words
_ENV.filters["words"] = words
_ENV.filters["flag_words"] = flag_words


@dataclass
class StudyView:
    """What the template shows of one study."""

    record: AssessmentRecord
    az: AxisMeasurement | dict
    key_image_png: str  # base64, "" when absent
    suspicious_foci: list[Focus]


def _png_base64(path: Path) -> str:
    try:
        return base64.b64encode(Path(path).read_bytes()).decode("ascii")
    except OSError:
        return ""


_NO_AZ = {"long_axis_mm": None, "short_axis_mm": None, "volume_ml": None}


def render_patient_report(patient_id: str, studies: list[tuple[AssessmentRecord, Path]], patient_folder: Path,
                          generated: str | None = None) -> str:
    """The report's HTML. ``studies``: (record, study folder) pairs, in timeline order."""
    views = [StudyView(record=rec, az=rec.imaging.ablation_zone or _NO_AZ,
                       key_image_png=_png_base64(Path(folder) / "key_image.png"),
                       suspicious_foci=[f for f in rec.imaging.foci if f.suspicious])
             for rec, folder in studies]
    dates = {rec.study_instance_uid: rec.study_date or "no date" for rec, _ in studies}
    return _ENV.get_template(TEMPLATE_NAME).render(
        patient_id=patient_id, studies=views, dates=dates, timeline_png=_png_base64(Path(patient_folder) / "timeline.png"),
        pipeline_version=__version__,
        generated=generated or dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))


def write_patient_report(path: Path, patient_id: str, studies: list[tuple[AssessmentRecord, Path]]) -> None:
    """Render and write ``report.html`` atomically (its folder holds timeline.png)."""
    path = Path(path)
    atomic_write_text(path, render_patient_report(patient_id, studies, path.parent))
