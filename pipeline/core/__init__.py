"""The shared core every stage may import: config, records, files, devices and geometry.

Owns the one validated config schema (``config``: ``PipelineConfig`` and its per-stage
sections), the typed records passed between stages and written to ``assessment.json``
(``records``: enums for series role, time point and category, ``Decision``, ``AssessmentRecord``,
``ErrorRecord``; the label registry re-exported from ``models.labels``), atomic file writing and
CSV cells (``files``), the choice of compute device (``devices``) and the image geometry every
stage uses (``geometry``: the body mask, resampling onto another grid).
May import: the standard library, third-party libraries, ``pipeline`` (version) and
``models.labels``; never a stage.
"""
