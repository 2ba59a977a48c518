"""Stage 5, longitudinal: each study in its patient's treatment history, classified.

Owns the timeline (``timeline``: ablation sessions, baseline and follow-ups from the
procedures file), the IWG-IGTA classification (``classify``), the pure per-patient assessment
that turns them into records (``assessment``) and the records of studies that could not be
assessed (``indeterminate``).
May import: ``pipeline.core`` and the stages before it.
"""
