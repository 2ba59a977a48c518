"""Synthetic cohort generator: realistic post-ablation MRI PACS exports with ground truth.

The demo, the test data and the training data of the project (DESIGN.md "Synthetic cohort").
Entry point: :func:`generate_export`. Modules: ``geometry`` (grids, poses, deformation),
``anatomy`` (shapes, partial volume, intensities), ``scenarios`` (timelines and truth
categories), ``vendors`` (naming), ``dicom_writer`` (files), ``export`` (orchestration).
"""

from .export import generate_export
from .profiles import PROFILES, Profile, get_profile
from .scenarios import SCENARIOS

__all__ = ["generate_export", "PROFILES", "Profile", "get_profile", "SCENARIOS"]
