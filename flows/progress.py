"""The run reporter now lives in :mod:`pipeline.run.log` (issue 17: a plain ``run_export()`` uses
it without Prefect); these names stay importable from here."""

from pipeline.run.log import LOGGER_NAME, RUN_LOG_NAME, RunReporter, stage_seconds, study_label

__all__ = ["LOGGER_NAME", "RUN_LOG_NAME", "RunReporter", "stage_seconds", "study_label"]
