"""What a batch run tells its user while it works, and the run log it leaves in the output folder.

On a terminal: a rich progress bar over the studies (not the patients) with the time left. Off
a terminal (a pipe, CI, a service's journal): one log line per study and stage with its seconds,
on stderr. Either way every line also goes to ``OUT/run.log`` (rotated at 5 MB, 3 kept), which is
where the nightly deployment's history lives. Identifiers in the lines are those of the outputs
(pseudonyms when pseudonymisation is on); no name or birth date is ever logged.
"""

from __future__ import annotations

import logging
import logging.handlers
import sys
import threading
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TextIO

from pipeline.core.records import StudyRecord
from pipeline.outputs.contract import study_dir

RUN_LOG_NAME = "run.log"
LOGGER_NAME = "ablation_response.run"
_FORMAT = "%(asctime)s %(levelname)s %(message)s"


def study_label(study: StudyRecord) -> str:
    """``patient date_suffix``: the study's folder under ``patients/<patient>/``, no full UID."""
    return f"{study.patient_id} {study_dir(Path('.'), study).name}"


def stage_seconds(timings: dict[str, float]) -> str:
    """``load 0.4 s, register_intra 5.1 s, ...`` in the order the stages ran."""
    return ", ".join(f"{stage} {seconds:.1f} s" for stage, seconds in timings.items())


class RunReporter(AbstractContextManager):
    """Progress of one run: a bar on a terminal, log lines elsewhere, always ``run.log``.

    ``interactive``: draw the bar (a terminal); ``None`` asks ``stream``. ``echo``: write the
    lines to ``stream`` when there is no bar (the CLI; the nightly deployment logs to the file
    and Prefect's own log). Thread-safe: patients finish on worker threads.
    """

    def __init__(self, out_dir: Path, *, echo: bool = True,
                 interactive: bool | None = None, stream: TextIO | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.interactive = self.stream.isatty() if interactive is None else interactive
        self._lock = threading.Lock()
        self._done_by_patient: dict[str, int] = {}
        self.logger = logging.getLogger(f"{LOGGER_NAME}.{id(self)}")
        self.logger.setLevel(logging.INFO)
        self.logger.propagate = False
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        self._handlers: list[logging.Handler] = [
            logging.handlers.RotatingFileHandler(Path(out_dir) / RUN_LOG_NAME, maxBytes=5_000_000, backupCount=3,
                                                 encoding="utf-8")]
        if echo and not self.interactive:
            self._handlers.append(logging.StreamHandler(self.stream))
        for handler in self._handlers:
            handler.setFormatter(logging.Formatter(_FORMAT, datefmt="%Y-%m-%d %H:%M:%S"))
            self.logger.addHandler(handler)
        self._progress = None
        self._bar = None
        if echo and self.interactive:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._progress = Progress(TextColumn("[bold]studies"), BarColumn(), MofNCompleteColumn(),
                                      TimeElapsedColumn(), TextColumn("left"), TimeRemainingColumn(),
                                      TextColumn("{task.description}"),
                                      console=Console(file=self.stream), transient=False)

    # -- context: close the bar and the log file
    def __enter__(self) -> "RunReporter":
        return self

    def start_studies(self, total: int) -> None:
        """The studies are known (after the index): the bar starts, its time left from here."""
        if self._progress is not None:
            self._progress.start()
            self._bar = self._progress.add_task("", total=total)

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.stop()
        for handler in self._handlers:
            self.logger.removeHandler(handler)
            handler.close()
        # One logger per run: forget it, or a long-lived nightly process would keep them all.
        logging.Logger.manager.loggerDict.pop(self.logger.name, None)

    def info(self, message: str) -> None:
        self.logger.info(message)

    def warning(self, message: str) -> None:
        self.logger.warning(message)
        if self._progress is not None:  # the bar hides nothing: a warning is printed above it
            self._progress.console.print(f"warning: {message}", markup=False, highlight=False)

    def _advance(self, patient_id: str, n: int, description: str = "") -> None:
        with self._lock:
            self._done_by_patient[patient_id] = self._done_by_patient.get(patient_id, 0) + n
        if self._progress is not None and self._bar is not None:
            self._progress.update(self._bar, advance=n, description=description)

    # -- events
    def stage(self, name: str, seconds: float, detail: str = "") -> None:
        """A run-level stage (index, review worklist, cohort tables)."""
        self.info(f"{name}: {seconds:.1f} s" + (f" ({detail})" if detail else ""))

    def study_done(self, study: StudyRecord, seconds: float, *, reused: bool = False,
                   timings: dict[str, float] | None = None, failed: str = "") -> None:
        """One study's imaging finished (computed, reused from an earlier run, or failed)."""
        label = study_label(study)
        if failed:
            self.warning(f"study {label}: imaging failed after {seconds:.1f} s: {failed}")
        elif reused:
            self.info(f"study {label}: reused from an earlier run")
        else:
            detail = stage_seconds(timings or {})
            self.info(f"study {label}: imaging {seconds:.1f} s" + (f" ({detail})" if detail else ""))
        self._advance(study.patient_id, 1, label)

    def patient_done(self, patient_id: str, n_studies: int, seconds: float | None = None, failed: str = "") -> None:
        """A patient's stages after imaging (registration to the baseline, calls, outputs) took
        ``seconds``; its studies never reported (a failure) count as done now."""
        with self._lock:
            missing = max(0, n_studies - self._done_by_patient.get(patient_id, 0))
        if failed:
            self.warning(f"patient {patient_id}: assessment failed: {failed}")
        elif seconds is not None:
            self.info(f"patient {patient_id}: {n_studies} studies; registration to the baseline, calls and "
                      f"outputs {seconds:.1f} s")
        if missing:
            self._advance(patient_id, missing)


class ReportedEvents:
    """A reporter a patient carries to another process (a Dask worker): it records the calls of
    :class:`RunReporter` that ``assess_patient_reported`` makes, as plain values, and
    ``replay`` hands them to the run's reporter once the patient's result is back. Why: the
    run's reporter owns a file handle, a lock and the terminal, none of which cross processes;
    the lines then appear in run.log when the patient returns, not as each study ends."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple, dict]] = []

    def study_done(self, *args, **kwargs) -> None:
        self.calls.append(("study_done", args, kwargs))

    def patient_done(self, *args, **kwargs) -> None:
        self.calls.append(("patient_done", args, kwargs))

    def replay(self, reporter: RunReporter | None) -> None:
        if reporter is None:
            return
        for name, args, kwargs in self.calls:
            getattr(reporter, name)(*args, **kwargs)
