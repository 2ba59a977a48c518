"""Prefect flows: thin wrappers over the plain stage functions of pipeline/."""
