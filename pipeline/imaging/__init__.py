"""Stage 2, per-study imaging: volumes, registration and subtraction.

Owns reading a series into a volume (``volumes``), registration (post-contrast to
pre-contrast within a study, follow-up to baseline; SimpleITK on the CPU, PyTorch on the GPU;
its quality checks and transform files) and the subtraction images.
May import: ``pipeline.core`` and ``pipeline.ingest``.
"""
