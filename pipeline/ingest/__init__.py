"""Stage 1, ingest: from a PACS export directory to a catalogue of studies and series.

Owns, in the order data flows: walking the export (``walk``), reading headers (``headers``,
``header_values``), grouping files into studies and series (``grouping``), checking each series'
geometry (``series_geometry``), assigning series roles (``series_roles``: T1 pre/post, T2,
DWI...; the rules file: ``role_rules``), the SQLite catalogue (``catalogue``,
``catalogue_view``), the driver ``index_export`` (``index``) and pseudonymised runs
(``pseudonym``).
May import: ``pipeline.core`` only.
"""
