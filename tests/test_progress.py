"""What a run tells its user: log lines off a terminal, a bar per study on one, run.log (issue 18)."""

from __future__ import annotations

import datetime as dt
import io

from pipeline.core.records import StudyRecord
from pipeline.run.log import RUN_LOG_NAME, RunReporter


def _study(uid: str, patient: str = "P1") -> StudyRecord:
    return StudyRecord(patient, uid, dt.date(2024, 3, 1), "")


def test_off_a_terminal_each_study_and_stage_is_a_line_with_its_seconds(tmp_path):
    stream = io.StringIO()  # not a TTY
    with RunReporter(tmp_path, stream=stream) as log:
        assert not log.interactive
        log.stage("index", 1.26, "12 files")
        log.start_studies(3)
        log.study_done(_study("1.2.3.4444"), 12.34, timings={"load": 0.4, "register_intra": 5.06})
        log.study_done(_study("1.2.3.5555"), 0.01, reused=True)
        log.patient_done("P1", 3, 2.5)
    lines = stream.getvalue().splitlines()
    assert any(line.endswith("index: 1.3 s (12 files)") for line in lines)
    assert any("study P1 2024-03-01_1234444: imaging 12.3 s (load 0.4 s, register_intra 5.1 s)" in line
               for line in lines), lines
    assert any("2024-03-01_1235555: reused from an earlier run" in line for line in lines)
    assert any("patient P1: 3 studies; registration to the baseline, calls and outputs 2.5 s" in line for line in lines)
    # The same lines are in the output folder's run log.
    assert (tmp_path / RUN_LOG_NAME).read_text().splitlines() == lines


def test_on_a_terminal_a_bar_counts_studies_with_the_time_left(tmp_path):
    from rich.progress import TimeRemainingColumn

    stream = io.StringIO()
    with RunReporter(tmp_path, stream=stream, interactive=True) as log:
        log.start_studies(5)
        assert any(isinstance(column, TimeRemainingColumn) for column in log._progress.columns)
        log.study_done(_study("1.1", "P1"), 3.0, timings={"load": 1.0})
        log.study_done(_study("2.1", "P2"), 3.0, timings={"load": 1.0})
        assert log._progress.tasks[0].completed == 2 and log._progress.tasks[0].total == 5
        # A patient whose assessment failed: its studies never reported count as done.
        log.patient_done("P2", 3, failed="RuntimeError: boom")
        assert log._progress.tasks[0].completed == 4
    assert "study P1" not in stream.getvalue().replace("warning", "")  # no per-study lines under the bar
    assert "study P1 2024-03-01_11: imaging 3.0 s" in (tmp_path / RUN_LOG_NAME).read_text()
    assert "patient P2: assessment failed" in (tmp_path / RUN_LOG_NAME).read_text()


def test_the_run_log_is_appended_run_after_run(tmp_path):
    for n in (1, 2):
        with RunReporter(tmp_path, echo=False) as log:
            log.info(f"run {n}")
    text = (tmp_path / RUN_LOG_NAME).read_text()
    assert "run 1" in text and "run 2" in text
    import logging

    assert not [name for name in logging.Logger.manager.loggerDict if name.startswith("ablation_response.run.")]
