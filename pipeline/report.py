"""patients/<patient>/report.html: one self-contained page per patient (images inlined as base64).

It shows what the pipeline already wrote, it draws nothing itself: the timeline table (from
each study's ``assessment.json`` record), ``timeline.png`` (pipeline/timeline_plot.py), each
study's ``key_image.png`` (pipeline/key_image.py), the evidence of each call (rule, values and
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
from pipeline.outputs import AssessmentRecord, atomic_write_text
from pipeline.types import AxisMeasurement, Focus

TEMPLATE_NAME = "patient_report.html.j2"
_ENV = jinja2.Environment(
    loader=jinja2.FileSystemLoader(Path(__file__).resolve().parent / "templates"),
    # The template is HTML whatever its suffix: escape everything, always.
    autoescape=True,
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)
_ENV.filters["num"] = lambda v, digits=2: "" if v is None else f"{v:.{digits}f}"
_ENV.filters["pct"] = lambda v: "" if v is None else f"{v:+.1f} %"
_ENV.filters["val"] = lambda v: ("" if v is None else f"{v:.3g}" if isinstance(v, float) else str(v))


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
    return _ENV.get_template(TEMPLATE_NAME).render(
        patient_id=patient_id, studies=views, timeline_png=_png_base64(Path(patient_folder) / "timeline.png"),
        pipeline_version=__version__,
        generated=generated or dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))


def write_patient_report(path: Path, patient_id: str, studies: list[tuple[AssessmentRecord, Path]]) -> None:
    """Render and write ``report.html`` atomically (its folder holds timeline.png)."""
    path = Path(path)
    atomic_write_text(path, render_patient_report(patient_id, studies, path.parent))
