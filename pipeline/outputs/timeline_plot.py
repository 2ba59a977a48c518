"""timeline.png: ablation-zone axes and volume over time, each study's category marked."""

from __future__ import annotations

import datetime as dt
import io
from pathlib import Path

from matplotlib.figure import Figure  # object-oriented API: no display, safe in worker threads

from pipeline.core.files import atomic_write_bytes
from pipeline.core.records import TimelinePoint

# Colour and marker per category: every category its own marker (complete ablation and no
# evidence of LTP are both good news, but they are different calls).
CATEGORY_STYLE = {
    "pre_ablation": ("#7f7f7f", "|"),
    "complete_ablation": ("#2ca02c", "o"),
    "no_evidence_of_ltp": ("#2ca02c", "^"),
    "residual_unablated_tumour": ("#d62728", "X"),
    "local_tumour_progression": ("#d62728", "P"),
    "suspected_local_tumour_progression": ("#ff7f0e", "D"),
    "indeterminate": ("#9467bd", "?"),
}
CATEGORY_WORDS = {
    "pre_ablation": "pre-ablation",
    "complete_ablation": "complete ablation",
    "no_evidence_of_ltp": "no evidence of LTP",
    "residual_unablated_tumour": "residual unablated tumour",
    "local_tumour_progression": "local tumour progression",
    "suspected_local_tumour_progression": "suspected local tumour progression",
    "indeterminate": "indeterminate",
}


def nadir_steps(points: list[TimelinePoint], min_abs_mm: float, min_pct: float) -> list[tuple[str, float, float]]:
    """``(date, nadir so far, growth threshold)`` after each measured study of a session (rule 14).

    The nadir is the smallest long axis of the session so far (as ``classify`` keeps it); a later
    study of the session is suspected progression from ``max(min_abs_mm, min_pct % of the nadir)``
    above it. Pre-ablation studies and studies without a long axis do not count.
    """
    out: list[tuple[str, float, float]] = []
    nadir: dict[int | None, float] = {}
    for p in points:
        if p.timepoint == "pre_ablation" or p.az_long_axis_mm is None or not p.study_date:
            continue
        nadir[p.session] = min(nadir.get(p.session, p.az_long_axis_mm), p.az_long_axis_mm)
        n = nadir[p.session]
        out.append((p.study_date, n, n + max(min_abs_mm, min_pct / 100.0 * n)))
    return out


def timeline_figure(patient_id: str, points: list[TimelinePoint], growth_rule: tuple[float, float] | None = (5.0, 20.0)) -> Figure:
    """Long/short axis (mm) and volume (mL) against the study date, categories as markers.

    Dates, not days since ablation, on the x axis: a re-ablation restarts the day count, while
    the radiologist reads one history. Sessions' baselines are marked with dotted lines. Studies
    without a measurement (pre-ablation, indeterminate) sit on the bottom edge of the axes, not
    at 0 mm. ``growth_rule``: (min mm, min %) of rule 14, drawn as the nadir and the growth
    threshold over each session (None: not drawn).
    """
    dated = sorted((p for p in points if p.study_date), key=lambda p: p.study_date)
    measured = [p for p in dated if p.timepoint != "pre_ablation"]
    fig = Figure(figsize=(10.5, 5))
    ax_axes, ax_vol = fig.subplots(2, 1, sharex=True)
    when = {p.study_instance_uid: dt.date.fromisoformat(p.study_date) for p in dated}
    for session in sorted({p.session for p in measured}, key=lambda s: (s is None, s)):
        in_session = [p for p in measured if p.session == session]
        for attr, style, label in (("az_long_axis_mm", "-", "long axis"), ("az_short_axis_mm", "--", "short axis")):
            have = [p for p in in_session if getattr(p, attr) is not None]
            ax_axes.plot([when[p.study_instance_uid] for p in have], [getattr(p, attr) for p in have], style,
                         color="#1f77b4", lw=1,
                         label=None if any(line.get_label() == label for line in ax_axes.lines) else label)
        have = [p for p in in_session if p.az_volume_ml is not None]
        ax_vol.plot([when[p.study_instance_uid] for p in have], [p.az_volume_ml for p in have], "-",
                    color="#1f77b4", lw=1)
        if growth_rule is not None:
            steps = nadir_steps(in_session, *growth_rule)
            if steps:
                xs = [dt.date.fromisoformat(d) for d, _, _ in steps]
                ax_axes.plot(xs, [n for _, n, _ in steps], drawstyle="steps-post", color="#555555", lw=1,
                             ls=(0, (4, 2)), label=None if any(line.get_label() == "nadir" for line in ax_axes.lines)
                             else "nadir")
                ax_axes.plot(xs, [t for _, _, t in steps], drawstyle="steps-post", color="#ff7f0e", lw=1, ls=":",
                             label=None if any(line.get_label().startswith("growth") for line in ax_axes.lines)
                             else f"growth threshold (nadir + max({growth_rule[0]:g} mm, {growth_rule[1]:g} %))")
    bottom = ax_axes.get_xaxis_transform()  # x in dates, y in axes fraction
    seen = set()
    for p in dated:
        d = when[p.study_instance_uid]
        colour, marker = CATEGORY_STYLE.get(p.category, ("k", "o"))
        label = CATEGORY_WORDS.get(p.category, p.category) if p.category not in seen else None
        seen.add(p.category)
        value = None if p.timepoint == "pre_ablation" else p.az_long_axis_mm
        if value is None:
            label = f"{label} (not measured)" if label else None
            if marker == "?":
                ax_axes.text(d, 0.04, "?", color=colour, ha="center", va="center", fontsize=12, fontweight="bold",
                             transform=bottom)
                ax_axes.plot([], [], "s", color=colour, label=label)
            else:
                ax_axes.plot([d], [0.04], marker, color=colour, ms=10, mew=2, label=label, linestyle="none",
                             transform=bottom)
        elif marker == "?":
            ax_axes.text(d, value, "?", color=colour, ha="center", va="center", fontsize=12, fontweight="bold")
            ax_axes.plot([], [], "s", color=colour, label=label)
        else:
            ax_axes.plot([d], [value], marker, color=colour, ms=8, label=label, linestyle="none")
        if p.az_volume_ml is not None and p.timepoint != "pre_ablation":
            ax_vol.plot([d], [p.az_volume_ml], marker if marker != "?" else "s", color=colour, ms=6, linestyle="none")
        if p.timepoint == "baseline":
            for ax in (ax_axes, ax_vol):
                ax.axvline(d, color="#999999", ls=":", lw=1)
    ax_axes.set_ylabel("ablation zone axes (mm)")
    ax_vol.set_ylabel("ablation zone volume (mL)")
    ax_axes.set_title(f"{patient_id}: ablation zone over time (dotted: session baselines)", fontsize=9)
    ax_axes.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    ax_axes.grid(alpha=0.3)
    ax_vol.grid(alpha=0.3)
    fig.autofmt_xdate()
    fig.tight_layout()
    return fig


def render_timeline_plot(path: Path, patient_id: str, points: list[TimelinePoint], dpi: int = 100,
                         growth_rule: tuple[float, float] | None = (5.0, 20.0)) -> None:
    """Write :func:`timeline_figure` as a PNG (atomically)."""
    buffer = io.BytesIO()
    timeline_figure(patient_id, points, growth_rule).savefig(buffer, format="png", dpi=dpi)
    atomic_write_bytes(path, buffer.getvalue())
