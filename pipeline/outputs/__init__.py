"""Stage 6, outputs: the output contract of DESIGN.md, written atomically.

Owns the folder layout, ``cohort.csv``/``errors.csv`` and ``assessment.json`` (``contract``),
the study store: cache keys and a rerun's reuse of a study's results (``store``), DICOM SEG and
SR (``dicom_seg``, ``dicom_sr``, ``dicom``), the key image, the patient report, the timeline
plot, and the writers of one patient's outputs from its records (``writers``).
May import: ``pipeline.core`` and the stages before it.
"""
