"""The batch flow over a PACS export, and its nightly deployment.

Tasks wrap one stage call each; patients run in parallel on a thread pool (``workers``);
each study's imaging is its own task run with a retry on I/O errors. Studies already assessed
with the same inputs and config are reused, so the nightly run only does what is new.
"""

from __future__ import annotations

import shutil
import time
from collections import defaultdict
from pathlib import Path

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed
from prefect.task_runners import ThreadPoolTaskRunner

from flows.progress import RunReporter
from pipeline.assess import PatientResult, assess_patient, study_imaging
from pipeline.config import PipelineConfig, load_config
from pipeline.devices import resolve_device
from pipeline.ingest import IndexResult, index_export
from pipeline.outputs import AssessmentRecord, write_cohort_csv, write_errors_csv, write_json
from pipeline.records import indeterminate_records
from pipeline.timeline import Procedure, read_procedures
from pipeline.types import ErrorRecord, StudyRecord

# The incremental catalogue lives beside the outputs it describes (a pseudonymised run keeps it
# in its private folder, see _private_places).
CATALOGUE_NAME = "catalogue.sqlite"


def _retry_on_io(task, task_run, state) -> bool:
    """Retry only what a retry can fix: I/O errors (a file being copied, a network share)."""
    try:
        state.result()
    except OSError:
        return True
    except Exception:  # noqa: BLE001
        return False
    return False


@task(name="index-export", retries=2, retry_delay_seconds=2, retry_condition_fn=_retry_on_io, cache_policy=NO_CACHE)
def index_task(export_dir: Path, catalogue_path: Path, cfg: PipelineConfig, out_dir: Path) -> IndexResult:
    # The outputs (catalogue, SEG/SR) are never inputs, even where the folder lies inside the export.
    return index_export(export_dir, catalogue_path, cfg.ingest, skip_dirs=[out_dir, catalogue_path.parent])


def _redacted_failure(exc: Exception, redactor) -> Exception:
    """The exception to raise from a task: Prefect logs a failed task's exception text, so in a
    pseudonymised run that text is redacted first (an OSError stays one: it is retried)."""
    if redactor is None:
        return exc
    return (OSError if isinstance(exc, OSError) else RuntimeError)(redactor.text(f"{type(exc).__name__}: {exc}"))


@task(name="study-imaging", retries=1, retry_delay_seconds=1, retry_condition_fn=_retry_on_io, cache_policy=NO_CACHE)
def study_imaging_task(study: StudyRecord, cfg: PipelineConfig, out_dir: Path, device: str, redactor=None):
    try:
        return study_imaging(study, cfg, out_dir, device)
    except Exception as exc:  # noqa: BLE001 - re-raised, its text redacted in pseudonymised runs
        failure = _redacted_failure(exc, redactor)
        if failure is exc:
            raise
        raise failure from None


@task(name="assess-patient", cache_policy=NO_CACHE)
def patient_task(studies: list[StudyRecord], procedures: list[Procedure] | None, cfg: PipelineConfig,
                 out_dir: Path, device: str, reporter: RunReporter | None = None, redactor=None) -> PatientResult:
    imaging_seconds = 0.0

    def imaging(study: StudyRecord, cfg: PipelineConfig, out_dir: Path, device: str):
        nonlocal imaging_seconds
        started = time.perf_counter()
        try:
            # In a pseudonymised run the task's exception text is already redacted.
            state, errors = study_imaging_task(study, cfg, out_dir, device, redactor)
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
    try:
        result = assess_patient(studies, procedures, cfg, out_dir, device, imaging_fn=imaging, redactor=redactor)
    except Exception as exc:  # noqa: BLE001 - re-raised, its text redacted in pseudonymised runs
        failure = _redacted_failure(exc, redactor)
        if failure is exc:
            raise
        raise failure from None
    if reporter is not None:
        reporter.patient_done(result.patient_id, len(studies), time.perf_counter() - started - imaging_seconds)
    return result


@task(name="review-worklist", cache_policy=NO_CACHE)
def review_task(out_dir: Path, records: list[AssessmentRecord], cfg: PipelineConfig) -> list[AssessmentRecord]:
    """Fill reviewed_category from the verdicts; put the flagged studies on the worklist."""
    from pipeline.review.sync import review_after_run

    return review_after_run(out_dir, records, cfg.review.database_url)[0]


@flow(name="assess-export")
def assess_export(
    export_dir: str,
    out_dir: str,
    procedures: str | None = None,
    config: str | None = None,
    workers: int = 1,
    device: str = "auto",
    show_progress: bool = False,
    defer_recent_seconds: float | None = None,
) -> dict:
    """Assess every study of ``export_dir`` into ``out_dir`` (the output contract of DESIGN.md).

    ``defer_recent_seconds`` overrides ``ingest.defer_recent_seconds`` (the nightly run defers
    studies whose files changed in the last minutes: an export still being written).
    Returns a summary (counts and seconds); ``cohort.csv`` and ``errors.csv`` are written last.
    """
    started = time.perf_counter()
    cfg = load_config(config)
    if defer_recent_seconds is not None:
        cfg = cfg.model_copy(update={"ingest": cfg.ingest.model_copy(update={"defer_recent_seconds": defer_recent_seconds})})
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    resolved_device = resolve_device(device)
    catalogue, key_file = _private_places(out, cfg)
    with RunReporter(out, echo=show_progress) as log:
        log.info(f"run started: export {export_dir}, output {out}, device {resolved_device}, workers {workers}")
        t0 = time.perf_counter()
        index = index_task(Path(export_dir), catalogue, cfg, out)
        log.stage("index", time.perf_counter() - t0,
                  f"{index.n_files_seen} files, {index.n_files_read} read, {len(index.studies)} studies, "
                  f"{index.n_deferred} deferred (still being written)")
        sessions = read_procedures(Path(procedures)) if procedures else None
        redactor = None
        if cfg.ingest.pseudonymise_patient_ids:
            # Before anything is written: every output below only ever sees pseudonyms.
            from pipeline.pseudonym import pseudonymise_run

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
        futures = {
            patient_task.submit(studies, (sessions or {}).get(pid), cfg, out, resolved_device, log, redactor): pid
            for pid, studies in sorted(by_patient.items())
        }
        for future in as_completed(list(futures)):
            pid = futures[future]
            try:
                result: PatientResult = future.result()
                records.extend(result.records)
                errors.extend(result.errors)
                n_reused += result.n_reused
            except Exception as exc:  # noqa: BLE001 - one patient's failure never kills the batch
                reason = f"patient assessment failed: {type(exc).__name__}: {exc}"
                records.extend(indeterminate_records(by_patient[pid], reason, cfg.rules, (sessions or {}).get(pid)))
                errors.extend(ErrorRecord("", pid, s.study_instance_uid, "", "assess", reason) for s in by_patient[pid])
                log.patient_done(pid, len(by_patient[pid]), failed=f"{type(exc).__name__}: {exc}")

        t0 = time.perf_counter()
        try:
            records = review_task(out, records, cfg)
        except Exception as exc:  # noqa: BLE001 - the review database must never stop the batch
            errors.append(ErrorRecord("", "", "", "", "review", f"review worklist not updated: {type(exc).__name__}: {exc}"))
        if redactor is not None:  # the flow's own reasons (exceptions) may quote paths too
            errors = [redactor.error(e) for e in errors]
        write_cohort_csv(out, records)
        write_errors_csv(out, errors)
        log.stage("review worklist and cohort tables", time.perf_counter() - t0)
        summary = {
            "export_dir": str(export_dir), "out_dir": str(out), "catalogue": str(catalogue), "device": resolved_device,
            "patients": len(by_patient), "studies": len(records), "studies_reused": n_reused,
            "flagged": sum(r.decision.flagged for r in records), "errors": len(errors),
            "files_seen": index.n_files_seen, "files_read": index.n_files_read, "files_cached": index.n_files_cached,
            "files_deferred": index.n_deferred, "studies_deferred": len(index.deferred_studies), "seconds": round(time.perf_counter() - started, 2),
        }
        log.info(f"run finished: {summary['studies']} studies ({n_reused} reused), {summary['flagged']} flagged, "
                 f"{summary['errors']} rows in errors.csv, {summary['seconds']} s")
    write_json(out / "run_summary.json", summary)
    return summary


def _private_places(out: Path, cfg: PipelineConfig) -> tuple[Path, Path | None]:
    """(catalogue path, pseudonym key file) of a run.

    Without pseudonymisation the catalogue lives in the output folder (no key). With it, the
    catalogue (raw IDs and paths) and the mapping go to ``ingest.private_dir`` (default
    ``<out>.private``), the key to ``ingest.pseudonym_key_file``, neither inside the outputs;
    what an earlier run left in the output folder (catalogue, mapping, key) is moved out or
    removed.
    """
    if not cfg.ingest.pseudonymise_patient_ids:
        return out / CATALOGUE_NAME, None
    from pipeline.pseudonym import check_key_place, default_key_file, key_path, mapping_csv_path

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


def run_assessment(export_dir: Path, out_dir: Path, procedures: Path | None = None, config: Path | None = None,
                   workers: int = 1, device: str = "auto", show_progress: bool = False) -> dict:
    """Run the flow with ``workers`` parallel patients (the task runner is chosen per call)."""
    configured = assess_export.with_options(task_runner=ThreadPoolTaskRunner(max_workers=max(1, workers)))
    return configured(str(export_dir), str(out_dir), str(procedures) if procedures else None,
                      str(config) if config else None, workers, device, show_progress)


def nightly_deployment(export_dir: Path, out_dir: Path, cron: str, procedures: Path | None = None,
                       config: Path | None = None, workers: int = 1, device: str = "auto",
                       defer_recent_seconds: float = 300.0):
    """The scheduled deployment of the batch flow (a Prefect RunnerDeployment, not yet served)."""
    return assess_export.with_options(task_runner=ThreadPoolTaskRunner(max_workers=max(1, workers))).to_deployment(
        name="nightly",
        cron=cron,
        parameters={"export_dir": str(export_dir), "out_dir": str(out_dir),
                    "procedures": str(procedures) if procedures else None,
                    "config": str(config) if config else None, "workers": workers, "device": device,
                    "defer_recent_seconds": defer_recent_seconds},
        description="Nightly re-read of a PACS export: only new or changed studies are processed.",
    )


def graceful_runner(**kwargs):
    """A Prefect Runner that stops on SIGTERM (systemd's stop) the way it stops on Ctrl-C.

    Prefect's own SIGTERM handler calls ``Runner.stop()`` inside the running event loop, where
    it returns the ``astop`` coroutine unawaited ("RuntimeWarning: coroutine 'Runner.astop' was
    never awaited") and exits from within the loop. Raising KeyboardInterrupt instead unwinds the
    runner like Ctrl-C: its schedules are paused and it exits cleanly.
    """
    from prefect.runner import Runner

    class _GracefulRunner(Runner):
        def handle_sigterm(self, *args, **kwargs) -> None:
            self._logger.info("SIGTERM received, shutting down...")
            raise KeyboardInterrupt

    return _GracefulRunner(**kwargs)


def serve_nightly(export_dir: Path, out_dir: Path, cron: str, procedures: Path | None = None,
                  config: Path | None = None, workers: int = 1, device: str = "auto",
                  defer_recent_seconds: float = 300.0) -> None:
    """Serve the nightly deployment (blocks; Ctrl-C or SIGTERM stops it, exit status 0)."""
    import asyncio

    deployment = nightly_deployment(export_dir, out_dir, cron, procedures, config, workers, device,
                                    defer_recent_seconds)
    runner = graceful_runner(pause_on_shutdown=True)
    runner.add_deployment(deployment)
    print(f"serving deployment 'assess-export/nightly' on cron {cron!r}: export {export_dir}, output {out_dir}; "
          f"each run logs to {Path(out_dir) / 'run.log'}. Next runs: prefect deployment inspect "
          "'assess-export/nightly' (docs/operations.md)", flush=True)
    try:
        asyncio.run(runner.start())
    except KeyboardInterrupt:
        print("stopped", flush=True)
