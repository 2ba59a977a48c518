"""Decide what each series of a study is: T1 pre-contrast, post-contrast phases, T2, subtraction.

Rules (tags first, descriptions second; keywords come from ``IngestConfig``, matched
case-insensitively at the start of a word so that "art" matches "arterial" but not "part"):

1. localisers, diffusion/ADC, MIP/MPR reformats and ignore keywords -> OTHER;
2. ImageType contains SUB, or a subtraction keyword -> SUBTRACTION;
3. EchoTime >= ``t2_min_echo_time_ms`` or a T2 keyword -> T2;
4. ContrastBolusAgent present or a post keyword -> T1_POST (unless the description
   explicitly says pre and nothing says post: dynamic series often carry the agent on the
   mask phase too);
5. T1-like (T1 keyword, pre keyword, or short TE and TR) without contrast -> T1_PRE candidate.

Post phases are ordered by AcquisitionTime (fallbacks ContentTime, SeriesTime,
TemporalPositionIdentifier, SeriesNumber: the first field every phase has) and numbered 1..n.
Among several pre-contrast candidates the one with the post phases' geometry, acquired
before the first phase, wins; the others become OTHER with the reason.

Hand-written because no library classifies vendor series names; the rules are the ones a
radiographer applies reading the series list.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from pipeline.config import IngestConfig
from pipeline.types import ErrorRecord, SeriesRecord, SeriesRole, StudyRecord

# ImageType values (any position) that mark series never used for enhancement.
_IGNORE_IMAGE_TYPES = {
    "LOCALIZER", "DIFFUSION", "ADC", "TRACEW", "EADC", "FA", "MIP", "MNIP", "MPR",
    "PROJECTION IMAGE", "REFORMATTED", "CPR", "SCREENSHOT",
}
# Dixon components as vendors flag them in ImageType (Siemens W/F/IP/OP, GE WATER/FAT/...).
_DIXON_TYPES = {
    "W": "water", "WATER": "water", "F": "fat", "FAT": "fat",
    "IP": "in_phase", "IN_PHASE": "in_phase", "OP": "out_phase", "OUT_PHASE": "out_phase",
    "OPP_PHASE": "out_phase",
}
# Dixon phrases whose "phase" is not a contrast phase.
_DIXON_PHRASES = re.compile(r"\b(in|opp(osed)?|out)[-_ ]?(of[-_ ]?)?phase\b")
# Short TE and TR: a T1-weighted (spoiled) gradient echo or spin echo.
_T1_MAX_TE_MS = 15.0
_T1_MAX_TR_MS = 1000.0
# Two orientations agree when their cosines differ by less than this (about 0.3 deg).
_IOP_TOL = 5e-3


@dataclass
class SeriesHeaders:
    """What the role rules read from one series' headers (summarised over its files)."""

    series_instance_uid: str
    series_description: str = ""
    series_number: int | None = None
    image_type: tuple[str, ...] = ()  # union over the files, upper case
    contrast_agent: str = ""
    acquisition_time: str = ""  # earliest over the files, DICOM TM
    content_time: str = ""
    series_time: str = ""
    temporal_position: int | None = None
    echo_time_ms: float | None = None
    repetition_time_ms: float | None = None
    inversion_time_ms: float | None = None
    scan_options: str = ""
    scanning_sequence: str = ""
    iop: tuple[float, ...] | None = None  # of the first file
    rows: int | None = None
    columns: int | None = None
    n_files: int = 0
    n_frames: int = 1
    extra: dict[str, str] = field(default_factory=dict)


def tm_seconds(value: str) -> float | None:
    """DICOM TM (``HHMMSS.ffffff``, also ``HH:MM:SS`` of old exports) -> seconds, or None."""
    text = (value or "").strip().replace(":", "")
    if not text:
        return None
    try:
        main, _, frac = text.partition(".")
        hh, mm, ss = int(main[0:2]), int(main[2:4] or 0), int(main[4:6] or 0)
        return hh * 3600 + mm * 60 + ss + (float("0." + frac) if frac else 0.0)
    except ValueError:
        return None


def _keyword_hits(text: str, keywords: list[str]) -> list[tuple[str, bool]]:
    """Keywords found in ``text`` at the start of a word: ``[(keyword, whole_word)]``.

    ``whole_word`` is True when the match is not followed by a letter or digit: an exact
    token ("pre") is stronger evidence than a prefix ("vibe_fs_tra_p" inside "..._pre").
    """
    hits = []
    for kw in keywords:
        k = kw.lower()
        if not k:
            continue
        start = 0
        while (i := text.find(k, start)) >= 0:
            start = i + 1
            if k[0].isalnum() and i > 0 and text[i - 1].isalnum():
                continue
            end = i + len(k)
            whole = not (k[-1].isalnum() and end < len(text) and text[end].isalnum())
            hits.append((kw, whole))
            break
    return hits


def _dixon_component(h: SeriesHeaders) -> str | None:
    for value in h.image_type:
        if value in _DIXON_TYPES and ("DIXON" in h.image_type or len(value) > 2):
            return _DIXON_TYPES[value]
    desc = h.series_description.lower()
    for token, comp in (("_w", "water"), ("_f", "fat"), ("water", "water"), ("fat_only", "fat")):
        if desc.endswith(token) or f"{token}_" in desc:
            return comp
    return None


@dataclass
class _Decision:
    role: SeriesRole
    reason: str
    pre_explicit: bool = False
    strength: int = 0  # post: 2 tag, 1 keyword


def _classify(h: SeriesHeaders, cfg: IngestConfig) -> _Decision:
    desc = _DIXON_PHRASES.sub(" ", h.series_description.lower())
    itypes = set(h.image_type)
    te = h.echo_time_ms
    ignored = itypes & _IGNORE_IMAGE_TYPES
    if ignored:
        return _Decision(SeriesRole.OTHER, f"ignored: ImageType {'/'.join(sorted(ignored))}")
    if hit := _keyword_hits(desc, cfg.ignore_keywords):
        return _Decision(SeriesRole.OTHER, f"ignored: description keyword '{hit[0][0]}'")
    if h.n_files <= 3 and h.n_frames <= 1:
        return _Decision(SeriesRole.OTHER, f"ignored: only {h.n_files} image(s), not a volume")
    if "SUB" in itypes:
        return _Decision(SeriesRole.SUBTRACTION, "subtraction: ImageType contains SUB")
    if hit := _keyword_hits(desc, cfg.subtraction_keywords):
        return _Decision(SeriesRole.SUBTRACTION, f"subtraction: description keyword '{hit[0][0]}'")
    t1_hits = _keyword_hits(desc, cfg.t1_keywords)
    if te is not None and te >= cfg.t2_min_echo_time_ms:
        return _Decision(SeriesRole.T2, f"T2: EchoTime {te:g} ms >= {cfg.t2_min_echo_time_ms:g} ms")
    if (hit := _keyword_hits(desc, cfg.t2_keywords)) and not t1_hits:
        return _Decision(SeriesRole.T2, f"T2: description keyword '{hit[0][0]}'")

    pre_hits = _keyword_hits(desc, cfg.pre_contrast_keywords)
    post_hits = _keyword_hits(desc, cfg.post_contrast_keywords)
    # Whole-word hits outrank prefix hits when pre and post keywords disagree.
    pre_score = max((2 if whole else 1 for _, whole in pre_hits), default=0)
    post_score = max((2 if whole else 1 for _, whole in post_hits), default=0)
    pre_explicit = pre_score > post_score
    short_te_tr = (
        te is not None and te < _T1_MAX_TE_MS
        and (h.repetition_time_ms is None or h.repetition_time_ms < _T1_MAX_TR_MS)
    )
    t1_evidence = (
        f"T1 keyword '{t1_hits[0][0]}'" if t1_hits
        else f"short TE {te:g} ms" if short_te_tr
        else ""
    )
    if h.contrast_agent and not pre_explicit:
        return _Decision(
            SeriesRole.T1_POST, f"post-contrast: ContrastBolusAgent '{h.contrast_agent}'", strength=2
        )
    if post_score and not pre_explicit:
        return _Decision(
            SeriesRole.T1_POST, f"post-contrast: description keyword '{post_hits[0][0]}'", strength=1
        )
    if pre_explicit or t1_evidence:
        parts = [p for p in (t1_evidence, pre_hits and f"pre keyword '{pre_hits[0][0]}'") if p]
        note = (
            f" (ContrastBolusAgent '{h.contrast_agent}' present, description says pre)"
            if h.contrast_agent else ", no contrast agent"
        )
        return _Decision(SeriesRole.T1_PRE, "pre-contrast: " + ", ".join(parts) + note, pre_explicit)
    return _Decision(SeriesRole.OTHER, "not recognised as T1, T2 or subtraction")


def _same_geometry(a: SeriesHeaders, b: SeriesHeaders) -> bool:
    if a.iop is None or b.iop is None or len(a.iop) != 6 or len(b.iop) != 6:
        return False
    same_iop = max(abs(x - y) for x, y in zip(a.iop, b.iop)) < _IOP_TOL
    return same_iop and (a.rows, a.columns) == (b.rows, b.columns)


def _time_field(h: SeriesHeaders, name: str) -> float | None:
    if name in ("AcquisitionTime", "ContentTime", "SeriesTime"):
        attr = {"AcquisitionTime": "acquisition_time", "ContentTime": "content_time",
                "SeriesTime": "series_time"}[name]
        return tm_seconds(getattr(h, attr))
    if name == "TemporalPositionIdentifier":
        return None if h.temporal_position is None else float(h.temporal_position)
    return None if h.series_number is None else float(h.series_number)


_ORDER_FIELDS = (
    "AcquisitionTime", "ContentTime", "SeriesTime", "TemporalPositionIdentifier", "SeriesNumber",
)


def _order_field(headers: list[SeriesHeaders]) -> str:
    """The first ordering field that every series has (so that one clock orders them all)."""
    for name in _ORDER_FIELDS:
        if all(_time_field(h, name) is not None for h in headers):
            return name
    return "SeriesInstanceUID"


def _best_time(h: SeriesHeaders) -> str:
    return h.acquisition_time or h.content_time or h.series_time


def assign_roles(
    study: StudyRecord, headers: dict[str, SeriesHeaders], cfg: IngestConfig
) -> list[ErrorRecord]:
    """Set ``role``, ``role_reason``, ``phase_index``, ``contrast_agent``, ``acquisition_time``
    and ``echo_time_ms`` of every series of ``study`` in place.

    ``headers`` maps SeriesInstanceUID -> :class:`SeriesHeaders` (series missing from it
    become OTHER). Returns study-level error rows (no post-contrast T1 found), for errors.csv.
    """
    decisions: dict[str, _Decision] = {}
    for s in study.series:
        h = headers.get(s.series_instance_uid)
        if h is None:
            s.role, s.role_reason = SeriesRole.OTHER, "no headers"
            continue
        s.contrast_agent = h.contrast_agent
        s.acquisition_time = _best_time(h)
        s.echo_time_ms = h.echo_time_ms
        s.phase_index = None
        d = decisions[s.series_instance_uid] = _classify(h, cfg)
        s.role, s.role_reason = d.role, d.reason

    def _of(role: SeriesRole) -> list[SeriesRecord]:
        return [s for s in study.series if s.role == role and s.series_instance_uid in headers]

    # Dixon: keep the water image (or a non-Dixon image) per role, drop fat/in/opposed phase.
    for role in (SeriesRole.T1_PRE, SeriesRole.T1_POST):
        members = _of(role)
        comps = {s.series_instance_uid: _dixon_component(headers[s.series_instance_uid]) for s in members}
        has_primary = any(c in (None, "water") for c in comps.values())
        for s in members:
            comp = comps[s.series_instance_uid]
            if comp == "fat" or (comp in ("in_phase", "out_phase") and has_primary):
                s.role = SeriesRole.OTHER
                s.role_reason = f"Dixon {comp} image of a {role.value} series (water image used)"

    # Post phases in acquisition order.
    posts = _of(SeriesRole.T1_POST)
    order = _order_field([headers[s.series_instance_uid] for s in posts])
    posts.sort(key=lambda s: (
        _time_field(headers[s.series_instance_uid], order) or 0.0,
        s.series_number if s.series_number is not None else 0,
        s.series_instance_uid,
    ))
    for i, s in enumerate(posts, start=1):
        s.phase_index = i
        s.role_reason += f"; phase {i} of {len(posts)} by {order}"

    # One pre-contrast series: the post phases' geometry, acquired before the first phase.
    pres = _of(SeriesRole.T1_PRE)
    if len(pres) > 1:
        first_post = headers[posts[0].series_instance_uid] if posts else None
        post_t = tm_seconds(_best_time(first_post)) if first_post else None

        def score(s: SeriesRecord) -> tuple:
            h = headers[s.series_instance_uid]
            t = tm_seconds(_best_time(h))
            same_geo = first_post is not None and _same_geometry(h, first_post)
            before = post_t is not None and t is not None and t <= post_t
            return (same_geo, before, decisions[s.series_instance_uid].pre_explicit,
                    _dixon_component(h) in (None, "water"), t if before else -1.0,
                    -(s.series_number or 0))

        pres.sort(key=score, reverse=True)
        chosen = pres[0]
        chosen_score = score(chosen)
        why = []
        if chosen_score[0]:
            why.append("same geometry as the post phases")
        if chosen_score[1]:
            why.append("acquired before the first post phase")
        chosen.role_reason += "; chosen among %d candidates%s" % (
            len(pres), (" (" + ", ".join(why) + ")") if why else ""
        )
        for s in pres[1:]:
            sc = score(s)
            lacks = []
            if chosen_score[0] and not sc[0]:
                lacks.append("geometry differs from the post phases")
            if chosen_score[1] and not sc[1]:
                lacks.append("not acquired before the first post phase")
            s.role = SeriesRole.OTHER
            s.role_reason = (
                f"pre-contrast candidate not used: {'; '.join(lacks) or 'ranked lower'}; "
                f"series {chosen.series_number} '{chosen.series_description}' chosen"
            )

    errors: list[ErrorRecord] = []
    if not posts:
        names = ", ".join(f"'{s.series_description}'" for s in study.series) or "none"
        dirs = sorted({str(f.parent) for s in study.series for f in s.files})
        try:
            where = os.path.commonpath(dirs) if dirs else ""
        except ValueError:  # different drives
            where = dirs[0]
        errors.append(ErrorRecord(
            path=where, patient_id=study.patient_id, study_instance_uid=study.study_instance_uid,
            series_instance_uid="", stage="series_roles",
            reason=f"no T1 post-contrast series identified among series: {names}",
        ))
    return errors
