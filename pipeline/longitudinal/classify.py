"""Longitudinal IWG-IGTA classification of each study (criteria.md §6 rules 2, 4, 9, 14, 18).

A per-session state machine over one patient's timeline:
- baseline (first contrast MRI of a session): a suspicious local focus -> residual unablated
  tumour, else complete ablation (Ahmed et al., Radiology 2014 [S1]);
- follow-up: a suspicious local focus -> local tumour progression if an earlier contrast study
  of the session documented complete ablation [S1], else residual unablated tumour (residual
  that persists stays residual; a clean call of a zone in enhancing parenchyma read without its
  arterial phase documents nothing); otherwise growth of the long axis >= max(5 mm, 20 %) over the
  nadir from 3 months on -> suspected progression [S10][S28]; otherwise no evidence of LTP;
- a study that cannot be read -> indeterminate with the reason; a new session resets all state;
- an enhancing focus farther than 10 mm from the AZ surface is a new lesion [S6]; it does not
  change the local category.
Every call carries the rule that decided it, the values and thresholds compared, a confidence
and the flags a radiologist must check: every label is a proposal (rule 18).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.core.config import FociConfig, RulesConfig
from pipeline.core.records import Category, Changes, Decision, Focus, RimMetrics, StudyImaging, TimelineEntry, Timepoint
from pipeline.measurement.axes import percent_change

FLAGGED_CATEGORIES = {
    Category.RESIDUAL_UNABLATED_TUMOUR,
    Category.LOCAL_TUMOUR_PROGRESSION,
    Category.SUSPECTED_LOCAL_TUMOUR_PROGRESSION,
    Category.INDETERMINATE,
}

# Situations a radiologist should look at even when the category is benign (flag name before
# any ":" detail).
REVIEW_FLAGS = {"early_baseline", "late_baseline", "before_baseline", "residual_no_longer_seen",
                "no_study_date", "rim_persisting", "rim_increasing", "series_roles_ambiguous",
                "segmentation_uncertain", "depends_on_indeterminate", "arterial_phase_not_assessed",
                "focus_seen_at_baseline"}


def _needs_review(flag: str) -> bool:
    return flag.split(":", 1)[0] in REVIEW_FLAGS


@dataclass
class _SessionState:
    documented_complete: bool = False
    residual_open: bool = False
    baseline: StudyImaging | None = None
    nadir_long_mm: float | None = None
    nadir_volume_ml: float | None = None
    seen_contrast_study: bool = False
    previous_rim: RimMetrics | None = None
    # Earlier studies of the session that could not be assessed ("<date> <uid>: <why>"): every
    # later call rests on a state (first contrast study, documented complete, nadir) they left out.
    indeterminate: list[str] = field(default_factory=list)


def _seen_before(focus: Focus, min_fraction: float | None) -> bool:
    """A suspicious focus that enhanced at the registered baseline already (over ``min_fraction``
    of its volume): anatomy seen before, not a new tumour (``rules.focus_seen_at_baseline_min_fraction``)."""
    return (min_fraction is not None and focus.suspicious and focus.seen_at_baseline_fraction is not None
            and focus.seen_at_baseline_fraction >= min_fraction)


def _suspicious_local(foci: list[Focus], min_fraction: float | None) -> list[Focus]:
    return [f for f in foci if f.local and f.suspicious and not _seen_before(f, min_fraction)]


def _seen_before_flag(foci: list[Focus], min_fraction: float | None) -> str | None:
    """The review flag naming the suspicious foci read as anatomy seen at the baseline (None: none)."""
    seen = [f for f in foci if _seen_before(f, min_fraction)]
    if not seen:
        return None
    described = "; ".join(
        f"a {f.diameter_mm:.0f} mm {'local' if f.local else 'distant'} focus enhanced at the registered baseline over "
        f"{100 * f.seen_at_baseline_fraction:.0f} % of its volume" for f in seen)
    return (f"focus_seen_at_baseline: {described} (>= {100 * min_fraction:.0f} %, outside the baseline's zone, rim "
            "and foci): read as anatomy seen before, not as new tumour")


def _changes(imaging: StudyImaging, state: _SessionState) -> Changes:
    az = imaging.ablation_zone
    base = state.baseline.ablation_zone if state.baseline else None
    if az is None:
        return Changes(baseline_long_axis_mm=base.long_axis_mm if base else None,
                       nadir_long_axis_mm=state.nadir_long_mm)
    out = Changes(baseline_long_axis_mm=base.long_axis_mm if base else None, nadir_long_axis_mm=state.nadir_long_mm)
    if base is not None:
        out.long_axis_change_pct = percent_change(az.long_axis_mm, base.long_axis_mm)
        out.long_axis_change_mm = az.long_axis_mm - base.long_axis_mm
        out.short_axis_change_pct = percent_change(az.short_axis_mm, base.short_axis_mm)
        out.short_axis_change_mm = az.short_axis_mm - base.short_axis_mm
        out.volume_change_pct = percent_change(az.volume_ml, base.volume_ml)
    if state.nadir_long_mm is not None:
        out.long_axis_change_vs_nadir_pct = percent_change(az.long_axis_mm, state.nadir_long_mm)
        out.long_axis_change_vs_nadir_mm = az.long_axis_mm - state.nadir_long_mm
    if state.nadir_volume_ml is not None:
        out.volume_change_vs_nadir_pct = percent_change(az.volume_ml, state.nadir_volume_ml)
    return out


def _confidence(imaging: StudyImaging, decisive_margin: float | None, flags: list[str]) -> float:
    """Heuristic confidence in [0, 1] (ENG-DEFAULT; calibrated later against review verdicts).

    Starts high and drops when the deciding value sits near its threshold (relative margin
    under 25 %), when a registration was marginal, or when the timeline is unusual.
    """
    conf = 0.95
    if decisive_margin is not None and decisive_margin < 0.25:
        conf -= 0.3 * (1 - max(decisive_margin, 0.0) / 0.25)
    if any(not qc.ok for qc in imaging.registration):
        conf -= 0.2
    if any(f in flags for f in ("early_baseline", "late_baseline", "session_inferred_from_images")):
        conf -= 0.1
    return round(max(0.05, min(conf, 1.0)), 2)


def _focus_margin(foci: list[Focus], thresholds: FociConfig) -> float:
    """Relative margin by which the weakest suspicious focus passes its thickness threshold."""
    margins = []
    for f in foci:
        margins.append(max((f.max_thickness_mm - thresholds.min_thickness_mm) / thresholds.min_thickness_mm,
                           (f.diameter_mm - thresholds.strongly_suspicious_diameter_mm)
                           / thresholds.strongly_suspicious_diameter_mm))
    return min(margins) if margins else 1.0


def _focus_values(foci: list[Focus]) -> dict[str, float | int | str]:
    worst = max(foci, key=lambda f: f.diameter_mm)
    return {
        "n_suspicious_local_foci": len(foci),
        "largest_focus_mm": round(worst.diameter_mm, 1),
        "focus_max_thickness_mm": round(worst.max_thickness_mm, 1),
        "focus_distance_to_az_mm": round(worst.distance_to_az_surface_mm, 1),
        "focus_pattern": worst.pattern,
        "focus_reason": worst.reason,
    }


def _rim_flags(rim: RimMetrics | None, previous: RimMetrics | None, entry: TimelineEntry,
               rules: RulesConfig) -> list[str]:
    """Rule 10 (rim beyond its expected window) and rule 11 (rim increasing between studies)."""
    flags = []
    present = rim is not None and rim.present and rim.coverage_deg >= rules.rim_min_coverage_deg
    window = rules.for_organ(rules.expected_rim_days, entry.organ) + rules.schedule_tolerance_days
    if present and entry.days_since_ablation is not None and entry.days_since_ablation > window:
        flags.append(f"rim_persisting: enhancing rim over {rim.coverage_deg:.0f} deg on day "
                     f"{entry.days_since_ablation} (expected within {window} days)")
    if rim is not None and previous is not None and rim.present and previous.present:
        grew_ml = rim.volume_ml - previous.volume_ml
        grew_pct = 100.0 * grew_ml / previous.volume_ml if previous.volume_ml > 0 else 0.0
        thicker = rim.max_thickness_mm - previous.max_thickness_mm
        if (grew_pct > rules.rim_increase_pct and grew_ml > rules.rim_increase_ml) or thicker > rules.rim_thickness_increase_mm:
            flags.append(f"rim_increasing: volume {previous.volume_ml:.2f} -> {rim.volume_ml:.2f} mL, "
                         f"max thickness {previous.max_thickness_mm:.1f} -> {rim.max_thickness_mm:.1f} mm")
    return flags


def schedule_notes(entries: list[TimelineEntry], rules: RulesConfig) -> dict[str, list[str]]:
    """Rule 17: expected follow-up time points with no study within the tolerance.

    A time point counts as missed once a later study of the same session exists; the note goes
    on the first study after the missed window. Needs the ablation date (procedures file).
    """
    notes: dict[str, list[str]] = {}
    sessions: dict[int, list[TimelineEntry]] = {}
    for e in entries:
        if e.session is not None and e.days_since_ablation is not None:
            sessions.setdefault(e.session, []).append(e)
    for session, rows in sessions.items():
        days = [e.days_since_ablation for e in rows]
        for expected in rules.for_organ(rules.schedule_days, rows[0].organ):
            if any(abs(d - expected) <= rules.schedule_tolerance_days for d in days):
                continue
            later = [e for e in rows if e.days_since_ablation > expected + rules.schedule_tolerance_days]
            if later:
                notes.setdefault(later[0].study.study_instance_uid, []).append(
                    f"missed_timepoint: no study {expected} +- {rules.schedule_tolerance_days} days after session {session}")
    return notes


def classify_patient(
    entries: list[TimelineEntry], imaging: dict[str, StudyImaging], rules: RulesConfig, foci: FociConfig,
    review_uncertainty: float | None,
) -> dict[str, Decision]:
    """Category of each study of one patient, keyed by StudyInstanceUID.

    ``entries`` is the patient's timeline in date order; ``imaging`` holds the per-study
    results (a missing entry means the study could not be processed at all). ``rules`` is the
    ``rules`` section; ``foci`` the focus thresholds the decisions quote and measure their margin
    against; ``review_uncertainty`` (``segmentation.network_review_uncertainty``): a network
    segmentation more uncertain than this is flagged for review (None: never).
    """
    focus_thresholds = {
        "min_thickness_mm": foci.min_thickness_mm,
        "min_thickness_ratio_to_rim": foci.min_thickness_ratio_to_rim,
        "strongly_suspicious_diameter_mm": foci.strongly_suspicious_diameter_mm,
        "local_max_distance_mm": foci.local_max_distance_mm,
    }
    decisions: dict[str, Decision] = {}
    states: dict[int, _SessionState] = {}
    for entry in entries:
        uid = entry.study.study_instance_uid
        result = imaging.get(uid) or StudyImaging(ok=False, reason="study was not processed")
        flags = list(entry.flags)
        seen_min = rules.focus_seen_at_baseline_min_fraction
        new_lesion = any((not f.local) and f.suspicious and not _seen_before(f, seen_min) for f in result.foci)
        if new_lesion:
            flags.append("new_lesion_distant_from_az")
        seen_flag = _seen_before_flag(result.foci, seen_min)
        if seen_flag:
            flags.append(seen_flag)

        if entry.timepoint == Timepoint.PRE_ABLATION:
            decisions[uid] = Decision(
                category=Category.PRE_ABLATION, rule_id="T0-pre-ablation",
                rule="study dated before the first ablation session", confidence=1.0,
                flagged=new_lesion, flag_reasons=flags if new_lesion else [], new_lesion=new_lesion,
                values={"study_date": str(entry.study.study_date)})
            continue

        state = states.setdefault(entry.session or 0, _SessionState())
        if not result.ok or entry.session is None:
            reason = result.reason or "study could not be placed in a session"
            decisions[uid] = Decision.indeterminate(reason, flags=flags, new_lesion=new_lesion,
                                                    changes=_changes(result, state))
            state.indeterminate.append(f"{entry.study.study_date} {uid}: {reason}")
            continue
        if not result.az_found or result.ablation_zone is None:
            reason = "no ablation zone found where one must be"
            decisions[uid] = Decision.indeterminate(reason, rule_id="R5-no-ablation-zone", flags=flags,
                                                    new_lesion=new_lesion, changes=_changes(result, state))
            state.indeterminate.append(f"{entry.study.study_date} {uid}: {reason}")
            continue

        az = result.ablation_zone
        changes = _changes(result, state)
        suspicious = _suspicious_local(result.foci, seen_min)
        values: dict[str, float | int | str | bool | None] = {
            "az_long_axis_mm": round(az.long_axis_mm, 2),
            "days_since_ablation": entry.days_since_ablation,
        }
        if result.rim is not None:
            values["rim_max_thickness_mm"] = round(result.rim.max_thickness_mm, 2)
            values["rim_benign_pattern"] = result.rim.benign_pattern
        first_contrast = not state.seen_contrast_study
        margin: float | None = None

        if suspicious:
            values.update(_focus_values(suspicious))
            margin = _focus_margin(suspicious, foci)
            if first_contrast:
                category, rule_id = Category.RESIDUAL_UNABLATED_TUMOUR, "R2-residual-first-contrast-study"
                rule = "suspicious enhancing focus at the AZ margin on the first contrast study after the session"
            elif state.documented_complete:
                category, rule_id = Category.LOCAL_TUMOUR_PROGRESSION, "R2-ltp-after-documented-complete"
                rule = ("suspicious enhancing focus at the AZ margin after an earlier contrast study of the "
                        "session documented complete ablation")
            elif not state.residual_open:
                category, rule_id = Category.RESIDUAL_UNABLATED_TUMOUR, "R2-residual-never-documented-complete"
                rule = ("suspicious enhancing focus at the AZ margin; no earlier contrast study of the session "
                        "documented complete ablation (a zone in enhancing parenchyma read without its arterial "
                        "phase documents none: LI-RADS LR-TR nonevaluable by omission), so it is not LTP")
            else:
                category, rule_id = Category.RESIDUAL_UNABLATED_TUMOUR, "R2-residual-persisting"
                rule = "residual unablated tumour still present (no clean contrast study since the session)"
            thresholds = dict(focus_thresholds)
            flags.append(f"{category.value}: {values['focus_reason']}")
        elif first_contrast:
            category, rule_id = Category.COMPLETE_ABLATION, "R2-complete-first-contrast-study"
            rule = "no suspicious enhancing focus at the AZ margin on the first contrast study after the session"
            thresholds = dict(focus_thresholds)
        else:
            growth_mm = changes.long_axis_change_vs_nadir_mm
            growth_pct = changes.long_axis_change_vs_nadir_pct
            days = entry.days_since_ablation
            needed_mm = None
            if state.nadir_long_mm is not None:
                needed_mm = max(rules.growth_min_abs_mm, rules.growth_min_pct / 100.0 * state.nadir_long_mm)
            values.update({"nadir_long_axis_mm": state.nadir_long_mm, "growth_vs_nadir_mm": growth_mm,
                           "growth_vs_nadir_pct": growth_pct, "growth_needed_mm": needed_mm})
            thresholds = {"growth_min_abs_mm": rules.growth_min_abs_mm, "growth_min_pct": rules.growth_min_pct,
                          "growth_min_days": rules.growth_min_days}
            grows = (needed_mm is not None and growth_mm is not None and growth_mm >= needed_mm
                     and (days is None or days >= rules.growth_min_days))
            if grows:
                category, rule_id = Category.SUSPECTED_LOCAL_TUMOUR_PROGRESSION, "R14-serial-growth"
                rule = "AZ long axis grew >= max(5 mm, 20 %) over the nadir without a suspicious focus"
                margin = (growth_mm - needed_mm) / needed_mm
                flags.append(f"az_growth: +{growth_mm:.1f} mm over nadir {state.nadir_long_mm:.1f} mm")
            else:
                category, rule_id = Category.NO_EVIDENCE_OF_LTP, "R2-no-suspicious-focus"
                rule = "no suspicious enhancing focus and no significant growth over the nadir"
                if needed_mm is not None and growth_mm is not None and growth_mm > 0:
                    margin = (needed_mm - growth_mm) / needed_mm
                if state.residual_open:
                    flags.append("residual_no_longer_seen")

        flags.extend(_rim_flags(result.rim, state.previous_rim, entry, rules))
        if state.indeterminate:
            flags.append("depends_on_indeterminate: called without the session's earlier indeterminate "
                         f"stud{'ies' if len(state.indeterminate) > 1 else 'y'} " + "; ".join(state.indeterminate))
        limit = review_uncertainty
        if (limit is not None and result.segmentation_method == "network"
                and result.segmentation_uncertainty is not None and result.segmentation_uncertainty > limit):
            flags.append(f"segmentation_uncertain: network uncertainty {result.segmentation_uncertainty:.3f} "
                         f"> {limit:.3f}")
        if result.enhancement_above_surroundings and result.arterial_phase_read is False:
            read = ", ".join(f"phase {k} {100 * v:+.0f} %" for k, v in result.surroundings_re.items())
            flags.append("arterial_phase_not_assessed: the zone lies in enhancing parenchyma and no phase read shows "
                         f"it before its portal enhancement ({read}): arterial hyper-enhancement not assessed")
        confidence = _confidence(result, margin, flags)
        if confidence < rules.review_confidence_below and category not in FLAGGED_CATEGORIES:
            flags.append(f"low_confidence ({confidence:.2f})")
        flagged = (category in FLAGGED_CATEGORIES or new_lesion or confidence < rules.review_confidence_below
                   or any(_needs_review(f) for f in flags))
        decisions[uid] = Decision(
            category=category, rule_id=rule_id, rule=rule, values=values, thresholds=thresholds,
            confidence=confidence, flagged=flagged, flag_reasons=flags if flagged else [],
            new_lesion=new_lesion, changes=changes)

        # Update the session's state after the call (the nadir excludes the current study).
        state.seen_contrast_study = True
        if category in (Category.COMPLETE_ABLATION, Category.NO_EVIDENCE_OF_LTP):
            # LTP needs a contrast study that documented adequate ablation [S1]. A zone in enhancing
            # parenchyma read without its arterial phase cannot show the arterial hyper-enhancement
            # of viable tumour (LI-RADS v2018 LR-TR: nonevaluable when a phase is omitted): its
            # clean call documents nothing, and a nodule found later is residual, not LTP
            # (development liver seed 82: a residual iso to the liver at a baseline without an
            # arterial phase made its three follow-ups LTP).
            if not (result.enhancement_above_surroundings and result.arterial_phase_read is False):
                state.documented_complete = True
            state.residual_open = False
        if category == Category.RESIDUAL_UNABLATED_TUMOUR:
            state.residual_open = True
        if state.baseline is None:
            state.baseline = result
        state.previous_rim = result.rim
        state.nadir_long_mm = az.long_axis_mm if state.nadir_long_mm is None else min(state.nadir_long_mm, az.long_axis_mm)
        state.nadir_volume_ml = az.volume_ml if state.nadir_volume_ml is None else min(state.nadir_volume_ml, az.volume_ml)
    for uid, notes in schedule_notes(entries, rules).items():
        decisions[uid].notes.extend(notes)
    return decisions
