"""Relative enhancement of another post-contrast phase of a study, on the grid of the phase used.

The study is segmented on one phase (``enhancement.phase``); other phases are read against it
for the enhancement by phase of a focus (``pipeline.measurement.supporting``) and for the
arterial phase of a zone inside enhancing parenchyma (``pipeline.segmentation.surroundings``).
Each is registered to the pre-contrast like the chosen one (rule 5, same QC) and its RE map
brought onto the chosen grid through chosen -> pre -> that phase.
"""

from __future__ import annotations

import SimpleITK as sitk

from pipeline.core.config import RegistrationConfig
from pipeline.core.geometry import body_mask, resample_to
from pipeline.core.records import SeriesRecord
from pipeline.imaging.registration import register_intra_study
from pipeline.imaging.subtraction import normalise_post_to_pre, relative_enhancement
from pipeline.imaging.volumes import SeriesGeometryError, load_series


def relative_enhancement_on_grid(series: SeriesRecord, pre: sitk.Image, chosen_grid: sitk.Image,
                                 chosen_to_pre: sitk.Transform, registration: RegistrationConfig) -> sitk.Image | None:
    """RE map of ``series`` on ``chosen_grid``; None when it cannot be read or fails rule 5's QC."""
    try:
        post = load_series(series)
    except (SeriesGeometryError, OSError, ValueError):
        return None
    to_pre, qc = register_intra_study(post, pre, registration, name=f"pre_to_post_phase{series.phase_index}")
    if not qc.ok:
        return None
    pre_here = resample_to(pre, post, to_pre)
    body = body_mask(pre_here)
    post_norm, _ = normalise_post_to_pre(pre_here, post, body)
    re_here = relative_enhancement(pre_here, post_norm, body)
    # ITK applies the last transform added first: chosen grid -> pre -> this phase.
    chain = sitk.CompositeTransform(3)
    chain.AddTransform(to_pre.GetInverse())
    chain.AddTransform(chosen_to_pre)
    return resample_to(re_here, chosen_grid, chain)
