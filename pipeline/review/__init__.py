"""The radiologist's review: worklist and verdict database, sign-in, slice rendering, web app.

``db`` (SQLAlchemy tables and the operations on them), ``auth`` (user file with scrypt hashes,
CSRF tokens), ``slices`` (PNG slices of a study and its baseline on the follow-up grid),
``app`` (the FastAPI application), ``sync`` (what the batch flow calls after each run).
May import: ``pipeline.core`` and the stages before it (it reads the outputs of a run and the
series they were computed from); ``pipeline.run`` calls it, never the reverse.
"""
