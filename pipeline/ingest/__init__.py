"""Stage 1, ingest: from a PACS export directory to a catalogue of studies and series.

Owns walking the export and reading headers (``index``), checking each series' geometry
(``series_geometry``), assigning series roles (``series_roles``: T1 pre/post, T2, DWI...), the
SQLite catalogue (``catalogue``, ``catalogue_view``) and pseudonymised runs (``pseudonym``).
May import: ``pipeline.core`` only.
"""
