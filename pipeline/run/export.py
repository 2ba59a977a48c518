"""One batch run over a PACS export, as a plain function: ``run_export()``.

Index the export, pseudonymise (when configured), group the studies by patient, assess the
patients ``workers`` at a time, turn a patient whose assessment raised into indeterminate
records and rows of errors.csv (the batch goes on), update the review worklist, write
``cohort.csv``, ``errors.csv`` and ``run_summary.json``, and log every step to ``run.log``.

No orchestrator here: the stage calls are parameters. The Prefect flow (flows/assess.py) passes
versions that run each call as a Prefect task; tests and scripts use the plain defaults below.
"""

from __future__ import annotations

import shutil
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextvars import copy_context
from dataclasses import replace
from pathlib import Path
from typing import Callable

from pipeline.core.config import PipelineConfig, load_config
from pipeline.core.devices import resolve_device
from pipeline.core.records import AssessmentRecord, ErrorRecord, StudyRecord
from pipeline.ingest.catalogue import CatalogueLocation, display_location, is_database_url
from pipeline.ingest.index import IndexResult, index_export
from pipeline.longitudinal.indeterminate import indeterminate_records
from pipeline.longitudinal.timeline import Procedure, read_procedures
from pipeline.outputs.contract import write_cohort_csv, write_errors_csv, write_json
from pipeline.run.log import RunReporter
from pipeline.run.patient import PatientResult, assess_patient, study_imaging

# The incremental catalogue lives beside the outputs it describes (a pseudonymised run keeps it
# in its private folder, see private_places).
CATALOGUE_NAME = "catalogue.sqlite"

# (studies of one patient, its sessions, config, output folder, device, reporter, redactor) -> result
PatientFn = Callable[[list[StudyRecord], "list[Procedure] | None", PipelineConfig, Path, str,
                      "RunReporter | None", object], PatientResult]
# (export folder, catalogue file or URL, config, output folder) -> the index of the export
IndexFn = Callable[[Path, CatalogueLocation, PipelineConfig, Path], IndexResult]
# (output folder, records, config) -> the records with reviewed_category filled
ReviewFn = Callable[[Path, list[AssessmentRecord], PipelineConfig], list[AssessmentRecord]]


def index_run(export_dir: Path, catalogue: CatalogueLocation, cfg: PipelineConfig, out_dir: Path) -> IndexResult:
    """Index the export; the outputs (catalogue, SEG/SR) are never inputs, even where the output
    folder lies inside the export."""
    skip = [out_dir] if is_database_url(catalogue) else [out_dir, Path(catalogue).parent]
    return index_export(export_dir, catalogue, cfg.ingest, skip_dirs=skip)


def review_worklist(out_dir: Path, records: list[AssessmentRecord], cfg: PipelineConfig) -> list[AssessmentRecord]:
    """Fill reviewed_category from the verdicts; put the flagged studies on the worklist."""
    from pipeline.review.sync import review_after_run

    return review_after_run(out_dir, records, cfg.review.database_url)[0]


def redacted_failure(exc: Exception, redactor) -> Exception:
    """The exception to raise in place of ``exc``: in a pseudonymised run (``redactor`` given) its
    text is redacted first, since whoever runs the call may log it (Prefect logs a failed task's
    exception); an OSError stays one (it is retried). Without a redactor, ``exc`` itself."""
    if redactor is None:
        return exc
    return (OSError if isinstance(exc, OSError) else RuntimeError)(redactor.text(f"{type(exc).__name__}: {exc}"))


def call_redacted(fn: Callable, redactor, /, *args, **kwargs):
    """``fn(*args, **kwargs)``; what it raises is re-raised with its text redacted (``redacted_failure``)."""
    try:
        return fn(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - re-raised, its text redacted in pseudonymised runs
        failure = redacted_failure(exc, redactor)
        if failure is exc:
            raise
        raise failure from None


def assess_patient_reported(studies: list[StudyRecord], procedures: list[Procedure] | None, cfg: PipelineConfig,
                            out_dir: Path, device: str, reporter: RunReporter | None = None, redactor=None, *,
                            imaging_fn: Callable | None = None, assess_fn: Callable = assess_patient) -> PatientResult:
    """One patient (``assess_fn``, default :func:`pipeline.run.patient.assess_patient`), each study's
    imaging timed and reported to ``reporter`` as it finishes, the patient's remaining time when
    it is done. What it raises carries a redacted text in a pseudonymised run.

    ``imaging_fn(study, cfg, out_dir, device) -> (StudyState, errors)``: the per-study imaging;
    by default :func:`pipeline.run.patient.study_imaging` with its failures redacted (the flow passes
    one that runs it as a Prefect task, which redacts them itself).
    """
    if imaging_fn is None:
        def imaging_fn(study, cfg, out_dir, device):
            return call_redacted(study_imaging, redactor, study, cfg, out_dir, device)

    imaging_seconds = 0.0

    def imaging(study: StudyRecord, cfg: PipelineConfig, out_dir: Path, device: str):
        nonlocal imaging_seconds
        started = time.perf_counter()
        try:
            state, errors = imaging_fn(study, cfg, out_dir, device)
        except Exception as exc:
            if reporter is not None:
                reporter.study_done(study, time.perf_counter() - started, failed=f"{type(exc).__name__}: {exc}")
            raise
        seconds = time.perf_counter() - started
        imaging_seconds += seconds
        if reporter is not None:
            reporter.study_done(study, seconds, reused=state.reused, timings=state.imaging.timings_s)
        return state, errors

    started = time.perf_counter()
    result = call_redacted(assess_fn, redactor, studies, procedures, cfg, out_dir, device, imaging_fn=imaging,
                           redactor=redactor)
    if reporter is not None:
        reporter.patient_done(result.patient_id, len(studies), time.perf_counter() - started - imaging_seconds)
    return result


def run_export(
    export_dir: str | Path,
    out_dir: str | Path,
    procedures: str | Path | None = None,
    config: str | Path | None = None,
    workers: int = 1,
    device: str = "auto",
    show_progress: bool = False,
    defer_recent_seconds: float | None = None,
    *,
    patient_fn: PatientFn = assess_patient_reported,
    index_fn: IndexFn = index_run,
    review_fn: ReviewFn = review_worklist,
) -> dict:
    """Assess every study of ``export_dir`` into ``out_dir`` (the output contract of DESIGN.md).

    ``workers``: patients assessed at the same time (threads; each ``patient_fn`` call runs in
    a copy of the caller's context, so a Prefect flow's context reaches it).
    ``defer_recent_seconds`` overrides ``ingest.defer_recent_seconds`` (the nightly run defers
    studies whose files changed in the last minutes: an export still being written).
    ``patient_fn``, ``index_fn``, ``review_fn``: the stage calls (see PatientFn, IndexFn,
    ReviewFn); a ``patient_fn`` that raises makes that patient's studies indeterminate, with a
    row of errors.csv each, and the batch goes on; so does a failing ``review_fn`` (one row).
    Returns the summary also written to ``run_summary.json`` (counts and seconds);
    ``cohort.csv`` and ``errors.csv`` are written last.
    """
    started = time.perf_counter()
    cfg = load_config(config)
    if defer_recent_seconds is not None:
        cfg = cfg.model_copy(update={"ingest": cfg.ingest.model_copy(update={"defer_recent_seconds": defer_recent_seconds})})
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    resolved_device = resolve_device(device)
    catalogue, key_file = private_places(out, cfg)
    with RunReporter(out, echo=show_progress) as log:
        log.info(f"run started: export {export_dir}, output {out}, device {resolved_device}, workers {workers}")
        t0 = time.perf_counter()
        index = index_fn(Path(export_dir), catalogue, cfg, out)
        log.stage("index", time.perf_counter() - t0,
                  f"{index.n_files_seen} files, {index.n_files_read} read, {len(index.studies)} studies, "
                  f"{index.n_deferred} deferred (still being written)")
        sessions = read_procedures(Path(procedures)) if procedures else None
        redactor = None
        if cfg.ingest.pseudonymise_patient_ids:
            # Before anything is written: every output below only ever sees pseudonyms.
            from pipeline.ingest.pseudonym import pseudonymise_run

            index, sessions, redactor = pseudonymise_run(index, sessions, catalogue, key_file, Path(export_dir))

        by_patient: dict[str, list[StudyRecord]] = defaultdict(list)
        for study in index.studies:
            by_patient[study.patient_id].append(study)

        records: list[AssessmentRecord] = []
        errors: list[ErrorRecord] = list(index.errors)
        n_reused = 0
        log.start_studies(sum(len(v) for v in by_patient.values()))
        if not index.studies:
            # The nightly run keeps going on a still-empty export; the CLI refuses one beforehand.
            log.warning(f"no MR study found in {export_dir} ({index.n_files_seen} files, "
                        f"{len(index.errors)} skipped: see errors.csv)")
        with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="patient") as pool:
            futures = {
                pool.submit(copy_context().run, patient_fn, studies, (sessions or {}).get(pid), cfg, out,
                            resolved_device, log, redactor): pid
                for pid, studies in sorted(by_patient.items())
            }
            for future in as_completed(futures):
                pid = futures[future]
                try:
                    result: PatientResult = future.result()
                    records.extend(result.records)
                    errors.extend(result.errors)
                    n_reused += result.n_reused
                except Exception as exc:  # noqa: BLE001 - one patient's failure never kills the batch
                    row = ErrorRecord.from_exception(exc, "assess", "patient assessment failed", patient_id=pid)
                    records.extend(indeterminate_records(by_patient[pid], row.reason, cfg.rules,
                                                         (sessions or {}).get(pid)))
                    errors.extend(replace(row, study_instance_uid=s.study_instance_uid) for s in by_patient[pid])
                    log.patient_done(pid, len(by_patient[pid]), failed=f"{type(exc).__name__}: {exc}")

        t0 = time.perf_counter()
        try:
            records = review_fn(out, records, cfg)
        except Exception as exc:  # noqa: BLE001 - the review database must never stop the batch
            errors.append(ErrorRecord.from_exception(exc, "review", "review worklist not updated"))
        if redactor is not None:  # the run's own reasons (exceptions) may quote paths too
            errors = [redactor.error(e) for e in errors]
        write_cohort_csv(out, records)
        write_errors_csv(out, errors)
        log.stage("review worklist and cohort tables", time.perf_counter() - t0)
        summary = {
            "export_dir": str(export_dir), "out_dir": str(out), "catalogue": display_location(catalogue), "device": resolved_device,
            "patients": len(by_patient), "studies": len(records), "studies_reused": n_reused,
            "flagged": sum(r.decision.flagged for r in records), "errors": len(errors),
            "files_seen": index.n_files_seen, "files_read": index.n_files_read, "files_cached": index.n_files_cached,
            "files_deferred": index.n_deferred, "studies_deferred": len(index.deferred_studies), "seconds": round(time.perf_counter() - started, 2),
        }
        log.info(f"run finished: {summary['studies']} studies ({n_reused} reused), {summary['flagged']} flagged, "
                 f"{summary['errors']} rows in errors.csv, {summary['seconds']} s")
    write_json(out / "run_summary.json", summary)
    return summary


def private_places(out: Path, cfg: PipelineConfig) -> tuple[CatalogueLocation, Path | None]:
    """(catalogue, pseudonym key file) of a run.

    ``ingest.catalogue_url``, when set, names the catalogue's database (shared by several
    machines or flows; run/inputs.py refuses it with pseudonymisation). Otherwise, without
    pseudonymisation the catalogue lives in the output folder (no key). With it, the
    catalogue (raw IDs and paths) and the mapping go to ``ingest.private_dir`` (default
    ``<out>.private``), the key to ``ingest.pseudonym_key_file``, neither inside the outputs;
    what an earlier run left in the output folder (catalogue, mapping, key) is moved out or
    removed.
    """
    if cfg.ingest.catalogue_url and not cfg.ingest.pseudonymise_patient_ids:
        return cfg.ingest.catalogue_url, None
    if not cfg.ingest.pseudonymise_patient_ids:
        return out / CATALOGUE_NAME, None
    from pipeline.ingest.pseudonym import check_key_place, default_key_file, key_path, mapping_csv_path

    private = Path(cfg.ingest.private_dir) if cfg.ingest.private_dir else out.parent / f"{out.name}.private"
    if private.resolve().is_relative_to(out.resolve()):
        raise ValueError(f"ingest.private_dir {private} lies inside the output folder {out}")
    private.mkdir(mode=0o700, parents=True, exist_ok=True)
    catalogue = private / CATALOGUE_NAME
    key_file = Path(cfg.ingest.pseudonym_key_file) if cfg.ingest.pseudonym_key_file else default_key_file()
    check_key_place(key_file, out, catalogue)
    legacy = out / CATALOGUE_NAME
    if key_path(legacy).exists():
        if not key_file.exists():  # keep the patients' pseudonyms: the same key, moved
            key_file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            shutil.move(key_path(legacy), key_file)
        elif key_path(legacy).read_text().strip() == key_file.read_text().strip():
            key_path(legacy).unlink()
        else:
            raise ValueError(f"{key_path(legacy)} (an earlier run's key) differs from {key_file}: move it out of "
                             "the output folder yourself, keeping the one whose pseudonyms you use")
    for stale in (legacy, legacy.with_name(legacy.name + "-wal"), legacy.with_name(legacy.name + "-shm"),
                  mapping_csv_path(legacy)):
        stale.unlink(missing_ok=True)  # rebuilt in the private folder from the export and the key
    return catalogue, key_file
