"""Registration layer 4: the quality checks of one registration result (the failure policy).

:func:`quality` turns a backend's result into ``(transform, RegistrationQC)``: the metric must
not get worse, the body interior must overlap (or, for another field of view, image the
ablation zone's region) and correlate (NCC, or its edges: gradient NCC), the pair's own edge
agreement must peak near the pose (not a few mm beside it), the affine must stay plausible
(scaling, rotation, motion bounds) and a deformable part must neither fold nor move the body
too far; the identity transform when any check fails.
:func:`check_inverse_consistency` registers the pair the other way and bounds the round trip.
:class:`PairContext` holds what every check of one pair needs. Imports ``pipeline.core`` and the
layers before (``common``, ``transforms``, ``metric``); a backend is passed in, never imported.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from pipeline.core.config import RegistrationStageConfig
from pipeline.core.geometry import body_mask
from pipeline.core.records import RegistrationQC
from pipeline.imaging.registration.common import Backend, BackendResult, mask_centroid_lps
from pipeline.imaging.registration.metric import (
    METRIC_NAME,
    covered_fraction,
    evaluate_metric,
    interior_mask,
    metric_mask,
    registration_ncc,
    similarity_peak,
    warped_pair,
)
from pipeline.imaging.registration.transforms import (
    deformation_max_mm,
    identity,
    inverse_consistency_residual_mm,
    jacobian_determinant_range,
    motion_magnitude_mm,
    rotation_angle_deg,
    scale_factors,
)

# Fraction of the fixed body interior that must map inside the moving image for the QC
# correlation to mean anything (studies cover different slabs; a pair that barely overlaps
# cannot be checked).
MIN_OVERLAP = 0.5
# Studies of another field of view (a shorter slab, another station) overlap less, and that is
# not a failure when the ablation zone's region is imaged in both: with the zone known, the pair
# passes on MIN_ZONE_COVERAGE of that region mapping inside the follow-up and at least
# MIN_OVERLAP_WITH_ZONE of the body interior to check the correlations on (ENG-DEFAULT: a
# few slices of overlap cannot be checked).
MIN_ZONE_COVERAGE = 0.95
MIN_OVERLAP_WITH_ZONE = 0.2
# What qc.peak_offset_mm reads when the pair's similarity is not concave about the pose along
# an axis (its peak lies beyond the probed neighbour): a finite stand-in for infinity in JSON.
PEAK_BEYOND_PROBE_MM = 99.0
# Tolerance when comparing the metric before/after (Mattes MI is negative, lower is better).
_METRIC_WORSE_TOL = 1e-4


@dataclass(frozen=True, eq=False)
class PairContext:
    """What the checks of one registered pair need besides the result: the same for every start
    and chain the driver tries on that pair.

    ``fixed``/``moving``: the images as registered (bias-corrected when the stage asks for it);
    ``fixed_eval``/``moving_eval``/``eval_frac``: the pyramid level and sampling fraction the
    metric is compared on, ``metric_before`` its value under the identity; ``max_scale_change``
    (unitless) and ``max_motion_mm`` (mm): plausibility bounds, None when unchecked; ``t0``:
    ``time.perf_counter()`` when the registration of the pair began (for ``qc.seconds``);
    ``zone_region``: a mask on the fixed grid of the ablation zone and its margin, None when
    unknown (then a pair that overlaps too little cannot be told from a failure); ``interior``:
    ``metric.interior_mask`` of ``fixed_body`` and ``fixed_side``: ``metric.fixed_arrays`` of
    ``fixed``, computed once for the pair (or once for a baseline and all its follow-ups); the
    checks compute them when None.
    """

    name: str
    fixed: sitk.Image
    moving: sitk.Image
    fixed_body: sitk.Image
    metric_mask: sitk.Image
    fixed_eval: sitk.Image
    moving_eval: sitk.Image
    eval_frac: float
    metric_before: float
    max_scale_change: float | None
    max_motion_mm: float | None
    threads: int
    t0: float
    zone_region: sitk.Image | None = None
    interior: sitk.Image | None = None
    fixed_side: tuple[np.ndarray, np.ndarray] | None = None


def quality(res: BackendResult, init_name: str, stage: RegistrationStageConfig, method: str,
            pair: PairContext) -> tuple[sitk.Transform, RegistrationQC]:
    """QC of one optimisation result; the identity transform when it fails."""
    threads = pair.threads
    tx = res.transform
    stop = f"init={init_name}; {res.stop_condition}"
    if not res.converged:
        # Not a failure by itself (the NCC check decides) but worth seeing in the QC record.
        stop += "; NOT CONVERGED: the finest level hit its iteration cap"
    metric_before = pair.metric_before
    metric_after = evaluate_metric(pair.fixed_eval, pair.moving_eval, pair.metric_mask, tx, pair.eval_frac, threads)
    motion = motion_magnitude_mm(tx, pair.fixed_body)
    interior = pair.interior if pair.interior is not None else interior_mask(pair.fixed_body, threads)
    warped = warped_pair(pair.fixed, pair.moving, tx, pair.fixed_side)  # read by the NCC check and the peak test
    ncc, gncc, overlap = registration_ncc(pair.fixed, pair.moving, tx, interior, warped)
    scales = scale_factors(tx)

    reasons = []
    if not np.isfinite(metric_after) or metric_after > metric_before + _METRIC_WORSE_TOL:
        reasons.append(f"metric got worse ({metric_before:.4f} -> {metric_after:.4f})")
    zone_coverage = None
    if overlap < MIN_OVERLAP:
        if pair.zone_region is None:
            reasons.append(f"only {overlap:.0%} of the body interior overlaps after registration "
                           f"(< {MIN_OVERLAP:.0%}; with no ablation zone to check, another field of view "
                           "cannot be told from a failed registration)")
        else:
            zone_coverage = covered_fraction(pair.moving, tx, pair.zone_region)
            if zone_coverage < MIN_ZONE_COVERAGE or overlap < MIN_OVERLAP_WITH_ZONE:
                reasons.append(f"the follow-up images {zone_coverage:.0%} of the ablation zone's region "
                               f"(needs {MIN_ZONE_COVERAGE:.0%}) and {overlap:.0%} of the body interior "
                               f"(needs {MIN_OVERLAP_WITH_ZONE:.0%} with the zone covered): another "
                               "field of view, or a failed registration")
            else:
                stop += (f"; another field of view: {overlap:.0%} of the body interior overlaps, the "
                         f"ablation zone's region is imaged ({zone_coverage:.0%}), checked on the overlap")
    probed = None  # the pair's similarity about the pose, read by the prominence and the peak test
    if (stage.max_peak_offset_mm is not None or stage.min_gradient_ncc_prominence is not None) and overlap > 0:
        probed = similarity_peak(pair.fixed, pair.moving, tx, interior, stage.peak_probe_mm, warped)
    prominence = None if probed is None else float(probed.prominence[1])
    edges_agree = ((stage.min_gradient_ncc_after is not None and gncc >= stage.min_gradient_ncc_after)
                   or (stage.min_gradient_ncc_prominence is not None and prominence is not None
                       and prominence >= stage.min_gradient_ncc_prominence))
    if ncc < stage.min_ncc_after and not edges_agree:
        gate = "" if stage.min_gradient_ncc_after is None else f" < {stage.min_gradient_ncc_after}"
        stands = ("" if stage.min_gradient_ncc_prominence is None else
                  f"; it stands {prominence if prominence is not None else 0.0:.3f} above its shifted copies "
                  f"< {stage.min_gradient_ncc_prominence}")
        reasons.append(f"ncc of the body interior {ncc:.3f} < {stage.min_ncc_after} "
                       f"(gradient ncc {gncc:.3f}{gate}{stands})")
    peak = None
    if stage.max_peak_offset_mm is not None and probed is not None:
        offsets = probed.offsets_mm[1]
        axis = int(np.argmax(np.abs(offsets)))
        peak = min(float(np.abs(offsets[axis])), PEAK_BEYOND_PROBE_MM)
        if peak > stage.max_peak_offset_mm:
            where = "beyond its neighbour" if peak == PEAK_BEYOND_PROBE_MM else f"{peak:.1f} mm away"
            reasons.append(f"the pair's edges agree best {where} along {'xyz'[axis]} "
                           f"(> {stage.max_peak_offset_mm} mm from the registered pose)")
    max_scale_change, max_motion_mm = pair.max_scale_change, pair.max_motion_mm
    if max_scale_change is not None and np.abs(scales - 1.0).max() > max_scale_change:
        reasons.append(f"implausible affine scaling {np.round(scales, 3).tolist()} "
                       f"(bound +-{max_scale_change:.0%})")
    if max_motion_mm is not None and motion > max_motion_mm:
        reasons.append(f"motion corrected {motion:.1f} mm > {max_motion_mm} mm sanity bound")
    angle = rotation_angle_deg(tx)
    if stage.max_rotation_deg is not None and angle > stage.max_rotation_deg:
        reasons.append(f"rotation {angle:.0f} deg > {stage.max_rotation_deg} deg sanity bound")
    jac_min = jac_max = deform_max = None
    if tx.GetName() == "CompositeTransform":  # a deformable stage ran: check it does not fold
        jac_min, jac_max = jacobian_determinant_range(tx, pair.fixed_body)
        if jac_min <= 0:
            reasons.append(f"deformable transform folds (Jacobian determinant min {jac_min:.3f} <= 0)")
        deform_max = deformation_max_mm(tx, pair.fixed_body)
        if stage.max_deformation_mm is not None and deform_max > stage.max_deformation_mm:
            reasons.append(f"deformable part moves the body up to {deform_max:.1f} mm beyond the affine "
                           f"(> {stage.max_deformation_mm} mm sanity bound)")
    ok = not reasons
    qc = RegistrationQC(
        name=pair.name, method=method, metric=METRIC_NAME, metric_before=round(metric_before, 5),
        metric_after=round(metric_after, 5), iterations=res.iterations,
        stop_condition=f"{stop}; ncc_interior={ncc:.3f}; gradient_ncc_interior={gncc:.3f}; "
                       + ("" if prominence is None else f"gradient_ncc_prominence={prominence:.3f}; ")
                       + f"overlap={overlap:.2f}; "
                       f"scales={np.round(scales, 3).tolist()}; rotation_deg={angle:.1f}",
        motion_corrected_mm=round(motion, 3), ok=ok, reason="; ".join(reasons),
        seconds=round(time.perf_counter() - pair.t0, 3), ncc_after=round(ncc, 4),
        jacobian_min=None if jac_min is None else round(jac_min, 4),
        jacobian_max=None if jac_max is None else round(jac_max, 4),
        deformation_max_mm=None if deform_max is None else round(deform_max, 3),
        peak_offset_mm=None if peak is None else round(peak, 2), overlap=round(overlap, 3),
        zone_coverage=None if zone_coverage is None else round(zone_coverage, 3))
    if not ok:
        return identity(), qc
    return tx, qc


def check_inverse_consistency(outcome: tuple[sitk.Transform, RegistrationQC], pair: PairContext,
                              init: sitk.Transform, chain: RegistrationStageConfig, backend: Backend,
                              intra: bool, max_step_mm: float, device: str,
                              max_residual_mm: float) -> tuple[sitk.Transform, RegistrationQC]:
    """Register the pair the other way and fail the QC when the round trip exceeds the bound.

    The backward run is independent: it starts from the identity rotating about the moving
    body's centre (intra-study, same FrameOfReference), or from the inverse of the start the
    forward run used (between studies), never from the forward result, which would make the
    check agree with itself. ``max_step_mm``: the first step the forward run was given.
    """
    fixed, moving, fixed_body, threads = pair.fixed, pair.moving, pair.fixed_body, pair.threads
    tx, qc = outcome
    try:
        moving_body = body_mask(moving, threads=threads)
        if intra:
            start = sitk.Euler3DTransform()
            start.SetCenter(mask_centroid_lps(moving_body).tolist())
        else:
            start = sitk.Euler3DTransform(init.GetInverse())
        res = backend(moving, fixed, metric_mask(moving_body, threads), start, chain,
                      max_step_mm, threads, device=device)
        residual = inverse_consistency_residual_mm(tx, res.transform, fixed_body)
    except RuntimeError as exc:
        residual, why = float("nan"), f"backward registration failed: {str(exc).strip().splitlines()[-1][:200]}"
    else:
        why = f"inverse-consistency residual {residual:.2f} mm > {max_residual_mm} mm"
    update = {"residual_mm": round(residual, 3) if np.isfinite(residual) else None,
              "seconds": round(time.perf_counter() - pair.t0, 3)}
    if np.isfinite(residual) and residual <= max_residual_mm:
        return tx, qc.model_copy(update=update)
    update.update(ok=False, reason=why)
    return identity(), qc.model_copy(update=update)


__all__ = ["MIN_OVERLAP", "MIN_OVERLAP_WITH_ZONE", "MIN_ZONE_COVERAGE", "PEAK_BEYOND_PROBE_MM", "PairContext",
           "check_inverse_consistency", "quality"]
