"""The batch flow over a PACS export, and its nightly deployment.

A thin Prefect wrapper over :func:`pipeline.run.export.run_export`: the index, each patient,
each study's imaging (with a retry on I/O errors) and the review worklist run as Prefect tasks;
``workers`` patients at a time (run_export's threads submit them, so the flow's parameter is
the one limit, also where a deployment run is given another value). Studies already assessed
with the same inputs and config are reused, so the nightly run only does what is new.

Patients run on the task runner of ``execution.engine`` (flows/engine.py): threads in this
process, or Dask worker processes, local or on a cluster (docs/cluster.md).
"""

from __future__ import annotations

import importlib.util
from functools import partial
from pathlib import Path

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from flows.engine import ENGINES, placement, task_runner_for, worker_threads
from pipeline.core.config import ExecutionConfig, PipelineConfig, load_config
from pipeline.core.devices import limit_library_threads, resolve_device, torch_threads
from pipeline.core.records import AssessmentRecord, StudyRecord
from pipeline.ingest.index import IndexResult
from pipeline.longitudinal.timeline import Procedure
from pipeline.run.export import assess_patient_reported, call_redacted, index_run, review_worklist, run_export
from pipeline.run.log import ReportedEvents, RunReporter
from pipeline.run.patient import PatientResult, assess_patient, study_imaging


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
    return index_run(export_dir, catalogue_path, cfg, out_dir)


@task(name="study-imaging", retries=1, retry_delay_seconds=1, retry_condition_fn=_retry_on_io, cache_policy=NO_CACHE)
def study_imaging_task(study: StudyRecord, cfg: PipelineConfig, out_dir: Path, device: str, redactor=None):
    # Prefect logs a failed task's exception text: in a pseudonymised run it is redacted first.
    return call_redacted(study_imaging, redactor, study, cfg, out_dir, device)


@task(name="assess-patient", cache_policy=NO_CACHE)
def patient_task(studies: list[StudyRecord], procedures: list[Procedure] | None, cfg: PipelineConfig,
                 out_dir: Path, device: str, reporter: RunReporter | None = None, redactor=None,
                 torch_threads_per_patient: int | None = None) -> PatientResult:
    """``torch_threads_per_patient``: torch's CPU threads while this patient runs (the threads
    engine's share of the machine; None: as this thread is)."""
    def imaging(study: StudyRecord, cfg: PipelineConfig, out_dir: Path, device: str):
        return study_imaging_task(study, cfg, out_dir, device, redactor)  # its exception text already redacted

    # The count is this thread's (torch_threads): set here, on the thread that runs the patient
    # (its study-imaging tasks are called, so they run on it too).
    with torch_threads(torch_threads_per_patient):
        return assess_patient_reported(studies, procedures, cfg, out_dir, device, reporter, redactor,
                                       imaging_fn=imaging, assess_fn=assess_patient)


def submitted_patient(studies: list[StudyRecord], procedures: list[Procedure] | None, cfg: PipelineConfig,
                      out_dir: Path, device: str, reporter: RunReporter | None = None, redactor=None, *,
                      threads: int | None = None) -> PatientResult:
    """One patient as a task run on the flow's task runner (run_export calls it ``workers`` at a
    time), torch on ``threads`` CPU threads while it runs."""
    return patient_task.submit(studies, procedures, cfg, out_dir, device, reporter, redactor, threads).result()


@task(name="assess-patient-remote", cache_policy=NO_CACHE)
def remote_patient_task(studies: list[StudyRecord], procedures: list[Procedure] | None, cfg: PipelineConfig,
                        out_dir: Path, device: str, redactor=None,
                        threads: int | None = None) -> tuple[PatientResult, ReportedEvents]:
    """One patient on another process (a Dask worker), its libraries on ``threads`` threads
    (None: as the worker is); its progress comes back with its result."""
    if threads:
        limit_library_threads(threads)
    events = ReportedEvents()
    return patient_task.fn(studies, procedures, cfg, out_dir, device, events, redactor), events


def submitted_patient_remote(studies: list[StudyRecord], procedures: list[Procedure] | None, cfg: PipelineConfig,
                             out_dir: Path, device: str, reporter: RunReporter | None = None,
                             redactor=None, *, runner, gpu_resource: str | None = None,
                             threads: int | None = None) -> PatientResult:
    """One patient as a task on ``runner`` (the run's DaskTaskRunner: a worker process; placed on a
    GPU worker when it runs on CUDA); its progress is written to the run's log when it returns."""
    parameters = {"studies": studies, "procedures": procedures, "cfg": cfg, "out_dir": out_dir, "device": device,
                  "redactor": redactor, "threads": threads}
    with placement(gpu_resource, device):
        future = runner.submit(remote_patient_task, parameters)
    result, events = future.result()
    events.replay(reporter)
    return result


@task(name="review-worklist", cache_policy=NO_CACHE)
def review_task(out_dir: Path, records: list[AssessmentRecord], cfg: PipelineConfig) -> list[AssessmentRecord]:
    """Fill reviewed_category from the verdicts; put the flagged studies on the worklist."""
    return review_worklist(out_dir, records, cfg)


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
    engine: str | None = None,
    scheduler_address: str | None = None,
) -> dict:
    """Assess every study of ``export_dir`` into ``out_dir`` (the output contract of DESIGN.md):
    :func:`pipeline.run.export.run_export` with its stages as Prefect tasks, ``workers``
    patients at a time. ``engine`` and ``scheduler_address`` override the config's
    ``execution`` section; on ``dask`` each patient is a task on the run's DaskTaskRunner (a
    local cluster of ``workers`` processes, or the scheduler's), opened here, inside the flow, so
    that a served or a work-pool deployment runs on it too. Returns the run's summary."""
    execution = execution_settings(config, engine, scheduler_address)
    if execution.engine != "dask":
        # Torch's threads only: SimpleITK's filters keep their process-wide default (the
        # registrations set their own, registration.threads).
        patient_fn = partial(submitted_patient, threads=worker_threads(execution, workers))
        return run_export(export_dir, out_dir, procedures, config, workers, device, show_progress,
                          defer_recent_seconds, patient_fn=patient_fn, index_fn=index_task,
                          review_fn=review_task)
    with task_runner_for(execution, workers, resolve_device(device)) as runner:
        patient_fn = partial(submitted_patient_remote, runner=runner, gpu_resource=execution.gpu_resource,
                             threads=worker_threads(execution, workers))
        return run_export(export_dir, out_dir, procedures, config, workers, device, show_progress,
                          defer_recent_seconds, patient_fn=patient_fn, index_fn=index_task, review_fn=review_task)


def execution_settings(config: Path | str | None, engine: str | None = None,
                       scheduler_address: str | None = None) -> ExecutionConfig:
    """The ``execution`` section of ``config``, with the command line's ``--engine`` and
    ``--scheduler`` over it (a scheduler address implies the dask engine)."""
    execution = load_config(config).execution
    update: dict = {}
    if engine is not None:
        if engine not in ENGINES:
            raise ValueError(f"engine {engine!r}: choose from {', '.join(ENGINES)}")
        update["engine"] = engine
    if scheduler_address:
        update.update(engine="dask", scheduler_address=scheduler_address)
    return execution.model_copy(update=update)


def run_assessment(export_dir: Path, out_dir: Path, procedures: Path | None = None, config: Path | None = None,
                   workers: int = 1, device: str = "auto", show_progress: bool = False,
                   engine: str | None = None, scheduler_address: str | None = None) -> dict:
    """Run the flow with ``workers`` parallel patients on ``engine`` (default: the config's
    ``execution.engine``; ``scheduler_address`` joins an existing Dask cluster)."""
    return assess_export(str(export_dir), str(out_dir), str(procedures) if procedures else None,
                         str(config) if config else None, workers, device, show_progress,
                         engine=engine, scheduler_address=scheduler_address)


def nightly_deployment(export_dir: Path, out_dir: Path, cron: str, procedures: Path | None = None,
                       config: Path | None = None, workers: int = 1, device: str = "auto",
                       defer_recent_seconds: float = 300.0, engine: str | None = None,
                       scheduler_address: str | None = None):
    """The scheduled deployment of the batch flow (a Prefect RunnerDeployment, not yet served);
    ``engine``/``scheduler_address`` None: the config's ``execution`` section, read at each run."""
    return assess_export.to_deployment(
        name="nightly",
        cron=cron,
        parameters=_nightly_parameters(export_dir, out_dir, procedures, config, workers, device,
                                       defer_recent_seconds, engine, scheduler_address),
        description="Nightly re-read of a PACS export: only new or changed studies are processed.",
    )


def _nightly_parameters(export_dir: Path, out_dir: Path, procedures: Path | None, config: Path | None,
                        workers: int, device: str, defer_recent_seconds: float, engine: str | None,
                        scheduler_address: str | None) -> dict:
    return {"export_dir": str(export_dir), "out_dir": str(out_dir),
            "procedures": str(procedures) if procedures else None,
            "config": str(config) if config else None, "workers": workers, "device": device,
            "defer_recent_seconds": defer_recent_seconds, "engine": engine,
            "scheduler_address": scheduler_address}


def deploy_nightly(export_dir: Path, out_dir: Path, cron: str, work_pool: str, procedures: Path | None = None,
                   config: Path | None = None, workers: int = 1, device: str = "auto",
                   defer_recent_seconds: float = 300.0, engine: str | None = None,
                   scheduler_address: str | None = None):
    """Register the nightly deployment with the Prefect server at ``PREFECT_API_URL``, for the
    workers of ``work_pool`` (``prefect worker start --pool NAME``) to run: the server's
    scheduler creates a run at each ``cron`` time and the UI shows each run, its tasks and their
    failures (docs/operations.md). Returns the deployment's id.

    The flow's code is taken from the folder that holds this package (a checkout or the
    installed package): a process worker on the same machine (or one that mounts the same
    installation) runs it, on the engine of ``engine``/``scheduler_address`` or of the config.
    """
    # The folder the flows package was imported from (a checkout, or site-packages of an
    # installed wheel): the worker loads flows/assess.py from there.
    source = Path(importlib.util.find_spec("flows").submodule_search_locations[0]).resolve().parent
    deployable = assess_export.from_source(source=str(source), entrypoint="flows/assess.py:assess_export")
    return deployable.deploy(
        name="nightly", work_pool_name=work_pool, cron=cron, print_next_steps=False,
        parameters=_nightly_parameters(export_dir, out_dir, procedures, config, workers, device,
                                       defer_recent_seconds, engine, scheduler_address),
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
                  defer_recent_seconds: float = 300.0, engine: str | None = None,
                  scheduler_address: str | None = None) -> None:
    """Serve the nightly deployment (blocks; Ctrl-C or SIGTERM stops it, exit status 0)."""
    import asyncio

    deployment = nightly_deployment(export_dir, out_dir, cron, procedures, config, workers, device,
                                    defer_recent_seconds, engine, scheduler_address)
    runner = graceful_runner(pause_on_shutdown=True)
    runner.add_deployment(deployment)
    print(f"serving deployment 'assess-export/nightly' on cron {cron!r}: export {export_dir}, output {out_dir}; "
          f"each run logs to {Path(out_dir) / 'run.log'}. Next runs: prefect deployment inspect "
          "'assess-export/nightly' (docs/operations.md)", flush=True)
    try:
        asyncio.run(runner.start())
    except KeyboardInterrupt:
        print("stopped", flush=True)
