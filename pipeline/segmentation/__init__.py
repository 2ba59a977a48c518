"""Stage 3, segmentation: the ablation zone, its rim and enhancing foci as labels.

Owns the classical segmentation (``classical``) and the pipeline rules applied around the
network's prediction; the network itself (definition, weights, ``predict`` on arrays) lives in
``models``, which never imports ``pipeline``. Label values come from the one registry
(``models.labels.Label``, re-exported by ``pipeline.core.records``).
May import: ``pipeline.core``, ``pipeline.ingest``, ``pipeline.imaging`` and ``models``.
"""
