"""The pipeline's configuration files, shipped as package data.

``default.yaml`` (every threshold with its source) and ``series_roles.yaml`` (series role
rules) live here, at the top level of the repository, and are installed with the package so
that a plain ``pip install .`` finds them as an editable install or a checkout does. Read them
through ``importlib.resources`` (``pipeline.core.config.CONFIG_DIR``), never relative to the
repository root. No code lives here.
"""
