"""Stage 6, outputs: the output contract of DESIGN.md, written atomically.

Owns the folder layout, ``cohort.csv``/``errors.csv`` and ``assessment.json`` (``contract``),
DICOM SEG and SR (``dicom_seg``, ``dicom_sr``, ``dicom``), the key image, the patient report and
the timeline plot.
May import: ``pipeline.core`` and the stages before it.
"""
