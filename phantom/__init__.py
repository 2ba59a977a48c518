"""Synthetic cohort generator: realistic post-ablation MRI PACS exports with ground truth.

The demo, the test data and the training data of the project (DESIGN.md "Synthetic cohort").
Entry point: :func:`generate_export`. Modules: ``geometry`` (grids, poses, deformation),
``body`` (the patient's fixed anatomy), ``lesion`` (ablation zone, rim, nodule),
``zone_contact`` (a vessel and organs against the zone), ``partial_volume`` (signed distances,
voxel fractions), ``render`` (fractions, texture and labels on a grid), ``intensities``
(tissue values by sequence and contrast phase), ``scenarios`` (timelines and truth
categories), ``vendors`` (naming), ``dicom_writer`` (files), ``acquisition`` (poses, grids, bias,
noise, stored values), ``layout`` (UIDs, folder and file names), ``patient`` (one patient's
series and truth), ``export`` (the cohort: orchestration, junk, truth files),
``evaluation`` (a run's outputs against the truth it wrote).
Outside ``pipeline`` (issue 17): a test, demo and training tool, not part of the product path. It
may import ``pipeline`` and ``models``; ``pipeline`` imports it only in the CLI's ``demo``.
"""

from .export import generate_export
from .profiles import PROFILES, Profile, get_profile
from .scenarios import SCENARIOS

__all__ = ["generate_export", "PROFILES", "Profile", "get_profile", "SCENARIOS"]
