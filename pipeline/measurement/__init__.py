"""Stage 4, measurement: what one study shows, measured.

Owns the ablation zone's axes and volume (``axes``), the benign rim (``rim``), enhancing foci
and the anatomy around them (``foci``, ``focus_context``), supporting signals (``supporting``:
enhancement by phase, T2) and ``study.analyse_study``, which runs stages 2-4 on one study.
May import: ``pipeline.core`` and the stages before it (ingest, imaging, segmentation), and
``models``.
"""
