"""Registration layer 6, the driver: registration of MRI volumes in physical space.

Two uses (DESIGN.md "Data flow"):

- **intra-study**: post-contrast -> pre-contrast of the same study (same FrameOfReference,
  small patient motion): rigid, Mattes mutual information (the pair differs in contrast
  wherever something enhances);
- **inter-study**: follow-up pre-contrast -> baseline pre-contrast (patient repositioned by up
  to ~15 mm / 5 deg, different grids, orientations and intensity scales): moments-based
  initialisation on body masks, then rigid, then affine, Mattes mutual information.

Conventions
-----------
ITK's convention throughout: a transform maps a point of the FIXED image's physical space
(LPS, mm) to the corresponding point of the MOVING image's space; resampling the moving image
onto the fixed grid with it (``pipeline.core.geometry.resample_to``) brings the moving image onto
the fixed one.
``to_baseline.tfm`` is written with the baseline as the fixed image, so it maps a baseline
point to the corresponding follow-up point.

Backend-neutral interface
-------------------------
Public functions take and return ``SimpleITK`` images and transforms, whatever computes the
registration: the optimisation proper lives behind ``_BACKENDS[cfg.backend_of(stage)]`` (one
function per backend: images, masks, initial transform and stage settings in; a
``common.BackendResult`` out: transform, iterations and stop condition). Initialisation (here),
QC (``checks``: Mattes MI before/after, NCC of the registered pair, motion magnitude,
inverse-consistency residual, Jacobian of a deformable result) and the failure policy are
shared. Backends: ``simpleitk`` (``sitk_backend``: reference, CPU; optional B-spline stage) and
``torch`` (``torch_backend``, imported on first use; CUDA when present; optional smooth
displacement field). This module imports every layer before it, never ``files``.

Failure policy: registration functions never raise on a failed optimisation. They return an
identity transform and ``RegistrationQC(ok=False, reason=...)``; the caller decides (a study
whose registration failed is ``indeterminate``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk

from pipeline.core.config import RegistrationConfig, RegistrationStageConfig
from pipeline.core.devices import resolve_device
from pipeline.core.geometry import body_mask
from pipeline.core.records import RegistrationQC
from pipeline.imaging.registration.checks import PairContext, check_inverse_consistency, quality
from pipeline.imaging.registration.common import (
    Backend,
    BackendResult,
    mask_centroid_lps,
    pyramid_image,
    sampling_fraction,
    without_resampling_fill,
)
from pipeline.imaging.registration.metric import (
    METRIC_NAME,
    bias_corrected,
    evaluate_metric,
    fixed_arrays,
    interior_mask,
    metric_mask,
    registration_ncc,
    sphere_mask,
    warped_pair,
)
from pipeline.imaging.registration.sitk_backend import register_simpleitk
from pipeline.imaging.registration.transforms import identity

# First step of the optimiser, in mm of the largest point shift (scales from physical shift make
# one unit of the scaled parameter space ~ 1 mm): motion within a study is a few mm, between
# studies up to ~15 mm.
_MAX_STEP_MM = {"intra": 2.0, "inter": 4.0}
# Translations (mm) tried around the best initial candidate between studies (26 neighbours).
_SEARCH_OFFSETS_MM = [np.array(o) for o in
                      ((dx, dy, dz) for dx in (-20, 0, 20) for dy in (-20, 0, 20) for dz in (-20, 0, 20))
                      if any(o)]
# Starts (best coarse metric first) the inter-study optimiser tries before giving up.
_MAX_STARTS = 3


def _register_torch(fixed: sitk.Image, moving: sitk.Image, metric_mask: sitk.Image, initial: sitk.Transform,
                    stage: RegistrationStageConfig, max_step_mm: float, threads: int,
                    device: str = "cpu") -> BackendResult:
    """The PyTorch backend (imported on first use: torch is slow to import)."""
    from pipeline.imaging.registration.torch_backend import register_torch

    return register_torch(fixed, moving, metric_mask, initial, stage, max_step_mm, threads, device=device)


# One function per backend (signature: ``common.Backend``); raises RuntimeError on a failed
# optimisation.
_BACKENDS: dict[str, Backend] = {"simpleitk": register_simpleitk, "torch": _register_torch}


def _slice_normal(image: sitk.Image) -> np.ndarray:
    """Unit vector (LPS) along the image's third axis (the slice direction)."""
    d = np.array(image.GetDirection(), dtype=float).reshape(3, 3)
    n = d[:, 2]
    return n / np.linalg.norm(n)


def _initial_candidates_inter(fixed_body: sitk.Image, moving_body: sitk.Image, fixed: sitk.Image,
                              hint_shift_lps: Sequence[float] | None = None,
                              ) -> list[tuple[str, sitk.Euler3DTransform]]:
    """Starting points for the inter-study search, all rotating about the fixed body centroid.

    - ``identity``: scanner coordinates (the patient lies on the same table; often within 15 mm);
    - ``moments``: body-mask centroids matched (CenteredTransformInitializer, MOMENTS);
    - ``moments_in_plane``: the same without the shift along the slice normal, because the two
      studies rarely cover the same body length and a truncated body biases the centroid in z;
    - ``hint``: a translation the caller knows (e.g. matched ablation-zone centroids: the one
      structure both studies are centred on).
    """
    c_fixed = mask_centroid_lps(fixed_body)
    c_moving = mask_centroid_lps(moving_body)
    shift = c_moving - c_fixed
    n = _slice_normal(fixed)
    out = []
    named = [("identity", np.zeros(3)), ("moments", shift), ("moments_in_plane", shift - n * float(shift @ n))]
    if hint_shift_lps is not None:
        named.append(("hint", np.asarray(hint_shift_lps, dtype=float)))
    for name, t in named:
        e = sitk.Euler3DTransform()
        e.SetCenter(c_fixed.tolist())
        e.SetTranslation(t.tolist())
        out.append((name, e))
    return out


@dataclass(frozen=True, eq=False)
class PreparedFixed:
    """The fixed image's side of a registration, computed once: for a patient's baseline it
    serves every follow-up registered onto it (issue 19: N4, body mask, masks and gradients of
    the baseline were computed again for each follow-up, ~1 s of ~5 a registration).

    ``source``: the image the caller passed (checked by identity when used); ``fixed``: the
    image the driver registers onto (``source`` without the resampler's fill between studies);
    ``image``: ``fixed`` as registered (bias-corrected when the stage asks for it); ``body``/
    ``metric_mask``/``interior``: its body mask, metric mask and body interior; ``side``:
    ``metric.fixed_arrays`` of ``image``; ``bias_correction``: the stage setting it was prepared
    for; ``pyramids``: levels of ``image`` by (shrink, sigma), filled on first use.
    """

    source: sitk.Image
    fixed: sitk.Image
    image: sitk.Image
    body: sitk.Image
    metric_mask: sitk.Image
    interior: sitk.Image
    side: tuple[np.ndarray, np.ndarray]
    bias_correction: str
    pyramids: dict[tuple[float, float], sitk.Image] = field(default_factory=dict)

    def pyramid(self, shrink: float, sigma: float, threads: int) -> sitk.Image:
        key = (float(shrink), float(sigma))
        if key not in self.pyramids:
            self.pyramids[key] = pyramid_image(self.image, shrink, sigma, threads)
        return self.pyramids[key]


def _prepare_fixed(source: sitk.Image, fixed: sitk.Image, stage: RegistrationStageConfig,
                   threads: int) -> PreparedFixed:
    """See :class:`PreparedFixed`; an image with no body is prepared as it is (the driver fails it)."""
    body = body_mask(fixed, threads=threads)
    image = fixed
    if stage.bias_correction == "n4" and sitk.GetArrayFromImage(body).any():
        image = bias_corrected(fixed, body, threads)
    return PreparedFixed(source=source, fixed=fixed, image=image, body=body, metric_mask=metric_mask(body, threads),
                         interior=interior_mask(body, threads), side=fixed_arrays(image),
                         bias_correction=stage.bias_correction)


def prepare_baseline(fixed_baseline: sitk.Image, cfg: RegistrationConfig) -> PreparedFixed:
    """The baseline's side of :func:`register_to_baseline`, computed once and passed to the call
    of each of its follow-ups (``prepared``): the same results, without recomputing it."""
    return _prepare_fixed(fixed_baseline, without_resampling_fill(fixed_baseline), cfg.inter_study, int(cfg.threads))


def _register(fixed: sitk.Image, moving: sitk.Image, cfg: RegistrationConfig,
              stage: RegistrationStageConfig, name: str, intra: bool,
              max_motion_mm: float | None, max_scale_change: float | None,
              hint_shift_lps: Sequence[float] | None = None, device: str | None = None,
              zone_region_lps: tuple[Sequence[float], float] | None = None,
              prepared: PreparedFixed | None = None,
              ) -> tuple[sitk.Transform, RegistrationQC]:
    t0 = time.perf_counter()
    threads = int(cfg.threads)
    backend_name = cfg.backend_of(stage)
    method = f"{backend_name}:" + "+".join(stage.transforms) + (
        f"+{stage.deformable}" if stage.deformable != "none" else "")

    def failed(reason: str, before: float = 0.0, after: float = 0.0, iterations: int = 0,
               stop: str = "", motion: float = 0.0) -> tuple[sitk.Transform, RegistrationQC]:
        return identity(), RegistrationQC(
            name=name, method=method, metric=METRIC_NAME, metric_before=before, metric_after=after,
            iterations=iterations, stop_condition=stop, motion_corrected_mm=motion, ok=False,
            reason=reason, seconds=round(time.perf_counter() - t0, 3))

    backend = _BACKENDS.get(backend_name)
    if backend is None:
        return failed(f"unknown registration backend {backend_name!r}")
    try:
        run_device = resolve_device(device or cfg.device) if backend_name == "torch" else "cpu"
    except ValueError as exc:
        return failed(str(exc))
    try:
        if prepared is None or prepared.fixed is not fixed or prepared.bias_correction != stage.bias_correction:
            prepared = _prepare_fixed(fixed, fixed, stage, threads)
        fixed, fixed_body, fixed_mask = prepared.image, prepared.body, prepared.metric_mask
        if not sitk.GetArrayFromImage(fixed_body).any():
            return failed("no body found on the fixed image")
        # The moving body seeds the inter-study starts and masks N4: computed once.
        moving_body = body_mask(moving, threads=threads) if not intra or stage.bias_correction == "n4" else None
        if stage.bias_correction == "n4":
            moving = bias_corrected(moving, moving_body, threads)
        shrink0, sigma0 = (stage.shrink_factors or [1])[0], (stage.smoothing_sigmas_mm or [0.0])[0]
        last_shrink = (stage.shrink_factors or [1])[-1]
        last_sigma = (stage.smoothing_sigmas_mm or [0.0])[-1]
        fixed_eval = prepared.pyramid(last_shrink, last_sigma, threads)
        moving_eval = pyramid_image(moving, last_shrink, last_sigma, threads)
        mask_frac = float((sitk.GetArrayFromImage(fixed_mask) > 0).mean())
        eval_frac = sampling_fraction(fixed_eval, mask_frac, stage.sampling_fraction)
        metric_before = evaluate_metric(fixed_eval, moving_eval, fixed_mask, identity(), eval_frac, threads)
        ncc_before = registration_ncc(fixed, moving, identity(), prepared.interior,
                                      warped_pair(fixed, moving, identity(), prepared.side))[0]

        if intra:
            # Same FrameOfReference: identity is the right start; rotate about the body centre.
            init = sitk.Euler3DTransform()
            init.SetCenter(mask_centroid_lps(fixed_body).tolist())
            starts = [("identity", init)]
        else:
            f0 = prepared.pyramid(shrink0, sigma0, threads)
            m0 = pyramid_image(moving, shrink0, sigma0, threads)
            frac0 = sampling_fraction(f0, mask_frac, stage.sampling_fraction)
            scored = [(evaluate_metric(f0, m0, fixed_mask, e, frac0, threads), nm, e)
                      for nm, e in _initial_candidates_inter(fixed_body, moving_body, fixed, hint_shift_lps)]
            best, best_name, best_init = min(scored, key=lambda c: c[0])
            # Coarse search around the best start: repositioning between studies can exceed the
            # optimiser's capture range (tens of mm with oblique slabs and other FOVs).
            for offset in _SEARCH_OFFSETS_MM:
                e = sitk.Euler3DTransform(best_init)
                e.SetTranslation((np.array(best_init.GetTranslation()) + offset).tolist())
                value = evaluate_metric(f0, m0, fixed_mask, e, frac0, threads)
                scored.append((value, f"{best_name}+search", e))
            # The optimiser runs from the best few starts in turn until one passes QC.
            starts = [(nm, e) for _, nm, e in sorted(scored, key=lambda c: c[0])[:_MAX_STARTS]]
            if hint_shift_lps is not None and not any(nm.startswith("hint") for nm, _ in starts):
                # Last resort: the caller's hint with its own coarse search. When another start
                # ranks best at the coarse level, the search above never looks around the hint,
                # and with large repositioning all its neighbours can fail QC where the hint's
                # pass (held-out seed 4040, ~18 mm along z).
                hint_init = next(e for _, nm, e in scored if nm == "hint")
                around_hint = [(evaluate_metric(f0, m0, fixed_mask, hint_init, frac0, threads), "hint", hint_init)]
                for offset in _SEARCH_OFFSETS_MM:
                    e = sitk.Euler3DTransform(hint_init)
                    e.SetTranslation((np.array(hint_init.GetTranslation()) + offset).tolist())
                    around_hint.append((evaluate_metric(f0, m0, fixed_mask, e, frac0, threads), "hint+search", e))
                _, nm, e = min(around_hint, key=lambda c: c[0])
                starts.append((nm, e))
    except RuntimeError as exc:  # ITK: no overlap, too few samples, degenerate images...
        return failed(f"initialisation failed: {str(exc).strip().splitlines()[-1][:300]}")

    # When the full chain (e.g. rigid + affine) fails QC from a start, its first, most
    # constrained stage is tried alone from the same start: an affine can stretch along a
    # short slab overlap where the rigid answer was right.
    chains = [stage] if len(stage.transforms) == 1 else [
        stage, stage.model_copy(update={"transforms": stage.transforms[:1], "deformable": "none"})]
    # What every check of this pair needs: the images as registered (bias-corrected when asked).
    pair = PairContext(name=name, fixed=fixed, moving=moving, fixed_body=fixed_body, metric_mask=fixed_mask,
                       fixed_eval=fixed_eval, moving_eval=moving_eval, eval_frac=eval_frac,
                       metric_before=metric_before, max_scale_change=max_scale_change,
                       max_motion_mm=max_motion_mm, threads=threads, t0=t0, interior=prepared.interior,
                       fixed_side=prepared.side,
                       zone_region=None if zone_region_lps is None else sphere_mask(fixed, *zone_region_lps))
    max_step_mm = _MAX_STEP_MM["intra" if intra else "inter"]
    first_failure = None
    for init_name, init in starts:
        for chain in chains:
            try:
                res = backend(fixed, moving, fixed_mask, init, chain, max_step_mm, threads, device=run_device)
            except RuntimeError as exc:  # ITK: samples left the moving image during the search...
                outcome = failed(f"optimisation failed (start {init_name}): {str(exc).strip().splitlines()[-1][:300]}",
                                 before=metric_before)
            else:
                chain_method = f"{backend_name}:" + "+".join(chain.transforms) + (
                    f"+{chain.deformable}" if chain.deformable != "none" else "")
                outcome = quality(res, init_name, chain, chain_method, pair)
                outcome = (outcome[0], outcome[1].model_copy(update={"ncc_before": round(float(ncc_before), 4)}))
                if outcome[1].ok and stage.max_residual_mm is not None:
                    outcome = check_inverse_consistency(outcome, pair, init, chain, backend, intra, max_step_mm,
                                                        run_device, stage.max_residual_mm)
            if outcome[1].ok:
                return outcome
            first_failure = first_failure or outcome
    return first_failure


def register_intra_study(fixed_pre: sitk.Image, moving_post: sitk.Image, cfg: RegistrationConfig,
                         name: str = "post_to_pre", device: str | None = None,
                         ) -> tuple[sitk.Transform, RegistrationQC]:
    """Rigid registration of a post-contrast series onto the pre-contrast of the same study.

    Returns ``(transform, qc)``; ``transform`` (Euler3DTransform) maps a point of the pre
    (fixed) series' space (LPS, mm) to the post (moving) series' space, so
    ``resample_to(moving_post, fixed_pre, transform)`` puts the post on the pre grid.
    Settings from ``cfg.intra_study``; ``qc.ok`` is False (and the transform the identity) when
    the optimisation failed, the Mattes metric got worse, the NCC of the registered pair inside
    the body interior (body mask eroded by 10 mm) is below ``cfg.intra_study.min_ncc_after`` or the corrected motion exceeds
    ``cfg.intra_study.max_motion_mm`` (mm; sanity bound, not a clinical threshold). Never raises on a failed
    optimisation. ``qc.stop_condition`` also carries the NCC values. The residual
    misregistration of rule 5: with ``cfg.intra_study.max_peak_offset_mm`` set (the default),
    the pair's edge agreement peaking farther than that from the pose fails the QC
    (``qc.peak_offset_mm``); with ``cfg.intra_study.max_residual_mm`` set, the pair is also
    registered the other way and a round-trip residual (``qc.residual_mm``, mm, mean over the
    body) above it fails the QC.
    ``device`` (auto | cpu | cuda) overrides ``cfg.device`` for the torch backend.
    """
    return _register(fixed_pre, moving_post, cfg, cfg.intra_study, name, intra=True,
                     max_motion_mm=cfg.intra_study.max_motion_mm, max_scale_change=None, device=device)


def register_to_baseline(fixed_baseline: sitk.Image, moving_followup: sitk.Image,
                         cfg: RegistrationConfig, name: str = "followup_to_baseline",
                         hint_shift_lps: Sequence[float] | None = None, device: str | None = None,
                         zone_region_lps: tuple[Sequence[float], float] | None = None,
                         prepared: PreparedFixed | None = None,
                         ) -> tuple[sitk.Transform, RegistrationQC]:
    """Register a follow-up (moving) to the session's baseline (fixed); both pre-contrast.

    Initialisation: the best (Mattes MI at the coarsest level) of identity and body-mask moments
    (see ``_initial_candidates_inter``); then ``cfg.inter_study.transforms`` in order (rigid,
    affine), each coarse to fine. The returned transform (AffineTransform when the affine stage
    runs, Euler3DTransform otherwise) maps a baseline point (LPS, mm) to the corresponding
    follow-up point: it is what ``to_baseline.tfm`` holds (``sitk.WriteTransform``).
    ``qc.ok`` as in :func:`register_intra_study` without the motion bound (repositioning between
    studies is expected) but with a plausibility bound on the affine: a scaling beyond
    ``1 +- cfg.inter_study.max_scale_change`` along any axis (unitless) fails; identity transform
    when not ok. With ``cfg.inter_study.deformable`` set the transform is a CompositeTransform
    (affine, then the deformable part acting first; see :func:`split_affine_and_deformable`) and
    a folding Jacobian fails the QC. ``zone_region_lps``: ``(centre, radius_mm)`` of the baseline's
    ablation zone and its margin (LPS, mm); with it a follow-up of another field of view passes
    when that region is imaged in both (``checks.MIN_ZONE_COVERAGE``), and the reason says so
    when it is not. Both images are registered without the boundary planes a resampler filled
    (``common.without_resampling_fill``: the pipeline passes pre-contrast series resampled onto
    their post-contrast grid); the transform applies to the whole images, and a displacement
    field covers the cropped baseline (zero displacement beyond it). ``prepared``:
    :func:`prepare_baseline` of ``fixed_baseline`` and ``cfg`` (ignored when it was prepared from
    another image), so that a baseline's side is computed once for all its follow-ups.
    """
    usable = prepared is not None and prepared.source is fixed_baseline
    fixed = prepared.fixed if usable else without_resampling_fill(fixed_baseline)
    moving_followup = without_resampling_fill(moving_followup)
    return _register(fixed, moving_followup, cfg, cfg.inter_study, name, intra=False,
                     max_motion_mm=None, max_scale_change=cfg.inter_study.max_scale_change,
                     hint_shift_lps=hint_shift_lps, device=device, zone_region_lps=zone_region_lps,
                     prepared=prepared if usable else None)


__all__ = ["PreparedFixed", "prepare_baseline", "register_intra_study", "register_to_baseline"]
