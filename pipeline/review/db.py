"""Worklist, verdicts and audit trail (SQLAlchemy 2; SQLite by default, PostgreSQL by URL).

Three tables:

- ``worklist_items``: one row per flagged study (the machine's call, its confidence and flag
  reasons, where its outputs are, and the review status ``pending | confirmed | overridden``);
- ``verdicts``: append-only rows of what a radiologist did (``confirm``, ``override`` with a
  category, or ``comment``), with the reason, the comment, the user and the time;
- ``audit_events``: who did what when, with the state before and after (JSON), for every
  change, including the pipeline's own (``worklist_add``, ``machine_update``).

The rule that matters: a pipeline rerun adds new flagged studies and refreshes the machine's
call of items still ``pending``, but never touches an item a radiologist has adjudicated, nor
any verdict.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import (
    DateTime,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    create_engine,
    event,
    select,
)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship

from pipeline.core.files import atomic_write_text, csv_text
from pipeline.core.records import Category

DEFAULT_DB_NAME = "review.sqlite"
PIPELINE_USER = "pipeline"  # the audit trail's "who" for changes made by the batch flow

PENDING, CONFIRMED, OVERRIDDEN = "pending", "confirmed", "overridden"
ACTIONS = ("confirm", "override", "comment")
CATEGORIES = [c.value for c in Category]

EXPORT_COLUMNS = [
    "study_instance_uid", "patient_id", "study_date", "timepoint", "machine_category", "confidence",
    "flag_reasons", "status", "reviewed_category", "verdict", "reason", "comment", "reviewer", "reviewed_at",
]


class ReviewError(ValueError):
    """A verdict that cannot be recorded (unknown item, bad category, missing reason)."""


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class Base(DeclarativeBase):
    pass


class WorklistItem(Base):
    __tablename__ = "worklist_items"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(String(128), unique=True, index=True)
    patient_id: Mapped[str] = mapped_column(String(128), index=True)
    study_date: Mapped[str | None] = mapped_column(String(10), index=True)
    timepoint: Mapped[str] = mapped_column(String(32))
    days_since_ablation: Mapped[int | None] = mapped_column(Integer)
    baseline_study_instance_uid: Mapped[str | None] = mapped_column(String(128))
    # Output folders relative to the run's OUT folder, written by the pipeline (never taken
    # from a request); the app resolves them under OUT and refuses anything outside it.
    study_folder: Mapped[str] = mapped_column(Text)
    baseline_folder: Mapped[str | None] = mapped_column(Text)
    # The post-contrast series used (looked up in the catalogue to show the post image).
    post_series_uid: Mapped[str | None] = mapped_column(String(128))
    baseline_post_series_uid: Mapped[str | None] = mapped_column(String(128))
    machine_category: Mapped[str] = mapped_column(String(64), index=True)
    confidence: Mapped[float] = mapped_column(Float, index=True)
    flag_reasons: Mapped[str] = mapped_column(Text, default="")  # ';'-separated, as in cohort.csv
    rule_id: Mapped[str] = mapped_column(String(64), default="")
    status: Mapped[str] = mapped_column(String(16), default=PENDING, index=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=_now)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=_now)

    verdicts: Mapped[list[Verdict]] = relationship(back_populates="item", order_by="Verdict.id")

    def machine_state(self) -> dict[str, Any]:
        return {"machine_category": self.machine_category, "confidence": self.confidence,
                "flag_reasons": self.flag_reasons, "rule_id": self.rule_id, "status": self.status}

    def current_verdict(self) -> Verdict | None:
        """The latest confirm/override (comments do not decide)."""
        decided = [v for v in self.verdicts if v.action in ("confirm", "override")]
        return decided[-1] if decided else None


class Verdict(Base):
    __tablename__ = "verdicts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("worklist_items.id"), index=True)
    action: Mapped[str] = mapped_column(String(16))  # confirm | override | comment
    category: Mapped[str | None] = mapped_column(String(64))  # the radiologist's category
    machine_category: Mapped[str] = mapped_column(String(64))  # the call they saw
    reason: Mapped[str] = mapped_column(Text, default="")
    comment: Mapped[str] = mapped_column(Text, default="")
    username: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=_now)

    item: Mapped[WorklistItem] = relationship(back_populates="verdicts")


class AuditEvent(Base):
    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=_now, index=True)
    username: Mapped[str] = mapped_column(String(128))
    action: Mapped[str] = mapped_column(String(32))
    study_instance_uid: Mapped[str | None] = mapped_column(String(128), index=True)
    before: Mapped[str] = mapped_column(Text, default="")  # JSON
    after: Mapped[str] = mapped_column(Text, default="")  # JSON


# --------------------------------------------------------------------------- engine
def database_url(out_dir: Path | str, url: str | None = None) -> str:
    """``url`` when given, else the SQLite file ``OUT/review.sqlite``."""
    if url:
        return url
    return f"sqlite:///{(Path(out_dir) / DEFAULT_DB_NAME).resolve()}"


def open_engine(url: str) -> Engine:
    """An engine with the tables created (idempotent)."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 60, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection, _record):  # noqa: ANN001
            # WAL: the web app reads while a nightly run writes; foreign keys are off by default.
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()
    else:
        engine = create_engine(url, pool_pre_ping=True)
    Base.metadata.create_all(engine)
    return engine


def _audit(session: Session, username: str, action: str, uid: str | None, before: Any, after: Any) -> None:
    session.add(AuditEvent(username=username, action=action, study_instance_uid=uid,
                           before=json.dumps(before, sort_keys=True, default=str) if before is not None else "",
                           after=json.dumps(after, sort_keys=True, default=str) if after is not None else ""))


# --------------------------------------------------------------------------- pipeline side
@dataclass(frozen=True)
class FlaggedStudy:
    """What the worklist needs of one flagged study (built from its ``assessment.json``)."""

    study_instance_uid: str
    patient_id: str
    study_date: str | None
    timepoint: str
    days_since_ablation: int | None
    baseline_study_instance_uid: str | None
    study_folder: str
    baseline_folder: str | None
    post_series_uid: str | None
    baseline_post_series_uid: str | None
    machine_category: str
    confidence: float
    flag_reasons: str
    rule_id: str

    def machine_state(self, status: str) -> dict[str, Any]:
        return {"machine_category": self.machine_category, "confidence": self.confidence,
                "flag_reasons": self.flag_reasons, "rule_id": self.rule_id, "status": status}


@dataclass
class SyncResult:
    added: int = 0
    updated: int = 0
    kept_adjudicated: int = 0


_MACHINE_FIELDS = ("machine_category", "confidence", "flag_reasons", "rule_id", "timepoint", "days_since_ablation",
                   "baseline_study_instance_uid", "study_folder", "baseline_folder", "post_series_uid",
                   "baseline_post_series_uid", "study_date", "patient_id")


def sync_worklist(engine: Engine, flagged: Iterable[FlaggedStudy]) -> SyncResult:
    """Add new flagged studies; refresh the machine's call of pending items; never touch a verdict.

    One transaction: a failure leaves the worklist as it was.
    """
    result = SyncResult()
    with Session(engine) as session, session.begin():
        for study in flagged:
            item = session.scalar(select(WorklistItem).where(WorklistItem.study_instance_uid == study.study_instance_uid))
            if item is None:
                session.add(WorklistItem(**{f: getattr(study, f) for f in _MACHINE_FIELDS},
                                         study_instance_uid=study.study_instance_uid, status=PENDING))
                _audit(session, PIPELINE_USER, "worklist_add", study.study_instance_uid, None, study.machine_state(PENDING))
                result.added += 1
            elif item.status != PENDING:
                # Adjudicated: the radiologist's call stands, whatever the machine says now. A
                # changed machine call is recorded in the audit trail (once per change), not applied.
                result.kept_adjudicated += 1
                now = study.machine_state(item.status)
                if now != item.machine_state():
                    last = session.scalar(select(AuditEvent).where(
                        AuditEvent.study_instance_uid == item.study_instance_uid,
                        AuditEvent.action == "machine_changed_after_verdict").order_by(AuditEvent.id.desc()))
                    if last is None or json.loads(last.after) != json.loads(json.dumps(now, default=str)):
                        _audit(session, PIPELINE_USER, "machine_changed_after_verdict", item.study_instance_uid,
                               item.machine_state(), now)
            elif any(getattr(item, f) != getattr(study, f) for f in _MACHINE_FIELDS):
                before = item.machine_state()
                for f in _MACHINE_FIELDS:
                    setattr(item, f, getattr(study, f))
                item.updated_at = _now()
                _audit(session, PIPELINE_USER, "machine_update", item.study_instance_uid, before, item.machine_state())
                result.updated += 1
    return result


def reviewed_categories(engine: Engine) -> dict[str, str]:
    """``{study uid: the radiologist's category}`` for every adjudicated item."""
    with Session(engine) as session:
        items = session.scalars(select(WorklistItem).where(WorklistItem.status != PENDING)).all()
        out = {}
        for item in items:
            verdict = item.current_verdict()
            if verdict is not None and verdict.category:
                out[item.study_instance_uid] = verdict.category
        return out


# --------------------------------------------------------------------------- radiologist side
def record_verdict(engine: Engine, item_id: int, username: str, action: str, category: str | None = None,
                   reason: str = "", comment: str = "") -> Verdict:
    """Record a confirm / override / comment on one worklist item (and its audit row).

    ``confirm`` takes the machine's category; ``override`` needs a category of the contract's
    vocabulary different from the machine's and a reason; ``comment`` needs a comment and
    leaves the status as it is. Raises :class:`ReviewError` otherwise.
    """
    reason, comment = (reason or "").strip(), (comment or "").strip()
    if action not in ACTIONS:
        raise ReviewError(f"unknown action {action!r} (expected one of {', '.join(ACTIONS)})")
    with Session(engine, expire_on_commit=False) as session, session.begin():
        item = session.get(WorklistItem, item_id)
        if item is None:
            raise ReviewError(f"no worklist item {item_id}")
        if action == "confirm":
            category = item.machine_category
        elif action == "override":
            if category not in CATEGORIES:
                raise ReviewError(f"unknown category {category!r} (expected one of {', '.join(CATEGORIES)})")
            if category == item.machine_category:
                raise ReviewError("an override must choose a category other than the machine's (use confirm)")
            if not reason:
                raise ReviewError("an override needs a reason")
        else:
            category = None
            if not comment:
                raise ReviewError("a comment cannot be empty")
        before = item.machine_state()
        current = item.current_verdict()
        before["reviewed_category"] = current.category if current else None
        verdict = Verdict(item=item, action=action, category=category, machine_category=item.machine_category,
                          reason=reason, comment=comment, username=username)
        session.add(verdict)
        if action != "comment":
            item.status = CONFIRMED if action == "confirm" else OVERRIDDEN
            item.updated_at = _now()
        after = item.machine_state()
        after["reviewed_category"] = category if action != "comment" else before["reviewed_category"]
        after.update(reason=reason, comment=comment)
        _audit(session, username, action, item.study_instance_uid, before, after)
    return verdict


def audit_sign_in(engine: Engine, username: str, ok: bool, locked: bool = False) -> None:
    """Sign-in attempts belong to the audit trail too (failed ones name the user tried; an
    attempt refused unchecked during a lockout is ``sign_in_locked``)."""
    action = "sign_in_locked" if locked else "sign_in" if ok else "sign_in_refused"
    with Session(engine) as session, session.begin():
        _audit(session, username, action, None, None, None)


def export_csv_text(engine: Engine) -> str:
    """Every worklist item with its current verdict (the adjudicated results) as CSV text
    (every cell made inert for spreadsheets by :func:`pipeline.core.files.csv_text`)."""
    rows = []
    with Session(engine) as session:
        items = session.scalars(select(WorklistItem).order_by(WorklistItem.patient_id, WorklistItem.study_date,
                                                              WorklistItem.study_instance_uid)).all()
        for item in items:
            v = item.current_verdict()
            comments = [c.comment for c in item.verdicts if c.comment]
            rows.append({
                "study_instance_uid": item.study_instance_uid, "patient_id": item.patient_id,
                "study_date": item.study_date or "", "timepoint": item.timepoint,
                "machine_category": item.machine_category, "confidence": f"{item.confidence:.2f}",
                "flag_reasons": item.flag_reasons, "status": item.status,
                "reviewed_category": v.category if v else "", "verdict": v.action if v else "",
                "reason": v.reason if v else "", "comment": " | ".join(comments),
                "reviewer": v.username if v else "",
                "reviewed_at": v.created_at.isoformat(timespec="seconds") if v else "",
            })
    return csv_text(EXPORT_COLUMNS, rows)


def export_csv(engine: Engine, path: Path) -> Path:
    """Write :func:`export_csv_text` atomically to ``path``."""
    atomic_write_text(Path(path), export_csv_text(engine))
    return Path(path)
