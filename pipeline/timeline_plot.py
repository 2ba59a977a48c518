"""timeline.png: ablation-zone axes and volume over time, each study's category marked."""

from __future__ import annotations

import datetime as dt
import io
from pathlib import Path

from matplotlib.figure import Figure  # object-oriented API: no display, safe in worker threads

from pipeline.outputs import TimelinePoint, atomic_write_bytes

CATEGORY_STYLE = {
    "pre_ablation": ("#7f7f7f", "s"),
    "complete_ablation": ("#2ca02c", "o"),
    "no_evidence_of_ltp": ("#2ca02c", "o"),
    "residual_unablated_tumour": ("#d62728", "X"),
    "local_tumour_progression": ("#d62728", "X"),
    "suspected_local_tumour_progression": ("#ff7f0e", "D"),
    "indeterminate": ("#9467bd", "?"),
}


def render_timeline_plot(path: Path, patient_id: str, points: list[TimelinePoint], dpi: int = 100) -> None:
    """Long/short axis (mm) and volume (mL) against the study date, categories as markers.

    Dates, not days since ablation, on the x axis: a re-ablation restarts the day count, while
    the radiologist reads one history. Sessions' baselines are marked with dashed lines.
    """
    dated = [p for p in points if p.study_date]
    fig = Figure(figsize=(8, 5))
    ax_axes, ax_vol = fig.subplots(2, 1, sharex=True)
    dates = [dt.date.fromisoformat(p.study_date) for p in dated]
    for attr, style, label in (("az_long_axis_mm", "-", "long axis"), ("az_short_axis_mm", "--", "short axis")):
        xs = [d for d, p in zip(dates, dated) if getattr(p, attr) is not None]
        ys = [getattr(p, attr) for p in dated if getattr(p, attr) is not None]
        ax_axes.plot(xs, ys, style, color="#1f77b4", label=label, lw=1)
    xs = [d for d, p in zip(dates, dated) if p.az_volume_ml is not None]
    ax_vol.plot(xs, [p.az_volume_ml for p in dated if p.az_volume_ml is not None], "-", color="#1f77b4", lw=1)
    seen = set()
    for d, p in zip(dates, dated):
        colour, marker = CATEGORY_STYLE.get(p.category, ("k", "o"))
        label = p.category if p.category not in seen else None
        seen.add(p.category)
        y = p.az_long_axis_mm if p.az_long_axis_mm is not None else 0.0
        if marker == "?":
            ax_axes.text(d, y, "?", color=colour, ha="center", va="center", fontsize=12, fontweight="bold")
            ax_axes.plot([], [], "s", color=colour, label=label)
        else:
            ax_axes.plot([d], [y], marker, color=colour, ms=8, label=label, linestyle="none")
        if p.az_volume_ml is not None:
            ax_vol.plot([d], [p.az_volume_ml], marker if marker != "?" else "s", color=colour, ms=6, linestyle="none")
        if p.timepoint == "baseline":
            for ax in (ax_axes, ax_vol):
                ax.axvline(d, color="#999999", ls=":", lw=1)
    ax_axes.set_ylabel("ablation zone (mm)")
    ax_vol.set_ylabel("volume (mL)")
    ax_axes.set_title(f"{patient_id}: ablation zone over time (dotted: session baselines)", fontsize=9)
    ax_axes.legend(fontsize=7, loc="best")
    ax_axes.grid(alpha=0.3)
    ax_vol.grid(alpha=0.3)
    fig.autofmt_xdate()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    atomic_write_bytes(path, buffer.getvalue())
