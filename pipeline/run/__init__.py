"""Running a whole export: the stages in order, one patient at a time, nothing lost.

Owns the orchestration of one patient's assessment (``patient``), the batch (``export.run_export``: index, group,
assess each patient, failures to indeterminate, CSVs, summary), the checks of a run's inputs
before any work (``inputs``) and the run log and progress (``log``). The Prefect flows of
``flows/`` are thin wrappers around these plain functions.
May import: every stage (it is the last).
"""
