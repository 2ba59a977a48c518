"""Rigid/affine registration of MRI volumes in physical space (SimpleITK backend).

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
onto the fixed grid with it (:func:`resample_to`) brings the moving image onto the fixed one.
``to_baseline.tfm`` is written with the baseline as the fixed image, so it maps a baseline
point to the corresponding follow-up point.

Backend-neutral interface
-------------------------
Public functions take and return ``SimpleITK`` images and transforms, whatever computes the
registration: the optimisation proper lives behind ``_BACKENDS[cfg.backend_of(stage)]`` (one
function per backend: images, masks, initial transform and stage settings in; transform,
iterations and stop condition out). Initialisation, QC (Mattes MI before/after, NCC of the registered pair, motion
magnitude, inverse-consistency residual, Jacobian of a deformable result) and the failure policy
are shared. Backends: ``simpleitk`` (reference, CPU; optional B-spline stage) and ``torch``
(``pipeline/imaging/registration_torch.py``; CUDA when present; optional smooth displacement field).

Failure policy: registration functions never raise on a failed optimisation. They return an
identity transform and ``RegistrationQC(ok=False, reason=...)``; the caller decides (a study
whose registration failed is ``indeterminate``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from pipeline.core.config import RegistrationConfig, RegistrationStageConfig
from pipeline.core.devices import resolve_device
from pipeline.core.geometry import as_float32, body_mask, radius_vox, resample_to, run_filter
from pipeline.core.records import RegistrationQC
from pipeline.imaging.registration_common import coarse_grid_like, pyramid_image, sampling_fraction

METRIC_NAME = "mattes_mi"
# Mattes MI histogram bins: 32 is plenty for ~10^4 samples (more bins -> noisier PDF estimate).
_HISTOGRAM_BINS = 32
# Fixed seed of the metric's random sampling: the same pair always gives the same result.
_SAMPLING_SEED = 20240601
# The fixed mask for the metric is the body mask dilated by this much (mm): the skin/air edge is
# the strongest, most reliable structure in the pair and must stay inside the sampled region.
_METRIC_MASK_DILATION_MM = 6.0
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
# Fraction of the fixed body interior that must map inside the moving image for the QC
# correlation to mean anything (studies cover different slabs; a pair that barely overlaps
# cannot be checked).
MIN_OVERLAP = 0.5
# The NCC check runs on the body eroded by this much (mm). The skin/fat outline dominates a
# whole-body NCC, and an affine can stretch another patient's outline onto this one's (NCC 0.66
# for a wrong pair on the synthetic data); the interior correlates only when the anatomy matches
# (>= 0.79 for correct pairs, <= 0.24 for wrong ones on the same data).
_NCC_INTERIOR_EROSION_MM = 10.0
# Tolerance when comparing the metric before/after (Mattes MI is negative, lower is better).
_METRIC_WORSE_TOL = 1e-4
# Spacing (mm) of the grid on which a deformable transform's Jacobian is checked: the
# deformable stages have control points tens of mm apart, so 4 mm resolves their gradients.
_JACOBIAN_SPACING_MM = 4.0
# Bound (mm) on each B-spline coefficient of the SimpleITK deformable stage (see _bspline_stage).
_BSPLINE_MAX_COEFFICIENT_MM = 4.0


# --------------------------------------------------------------------------- helpers
def _identity() -> sitk.Euler3DTransform:
    return sitk.Euler3DTransform()


def _mask_centroid_lps(mask: sitk.Image) -> np.ndarray:
    """Centroid (LPS, mm) of the non-zero voxels of ``mask``; image centre if empty."""
    arr = sitk.GetArrayFromImage(mask)
    idx = np.argwhere(arr > 0)
    if idx.size == 0:
        centre_idx = (np.array(mask.GetSize(), dtype=float) - 1.0) / 2.0
    else:
        centre_idx = idx.mean(axis=0)[::-1]  # numpy (k, j, i) -> ITK (i, j, k)
    return np.array(mask.TransformContinuousIndexToPhysicalPoint(centre_idx.tolist()))


def _slice_normal(image: sitk.Image) -> np.ndarray:
    """Unit vector (LPS) along the image's third axis (the slice direction)."""
    d = np.array(image.GetDirection(), dtype=float).reshape(3, 3)
    n = d[:, 2]
    return n / np.linalg.norm(n)


def _euler_to_affine(tx: sitk.Transform) -> sitk.AffineTransform:
    """Same mapping as an AffineTransform (keeps the centre of rotation)."""
    e = sitk.Euler3DTransform(tx)
    aff = sitk.AffineTransform(3)
    aff.SetCenter(e.GetCenter())
    aff.SetMatrix(e.GetMatrix())
    aff.SetTranslation(e.GetTranslation())
    return aff


# N4 on a coarse copy: voxels ~this size (mm); the bias field is smooth over tens of mm. Two
# fitting levels of 15 iterations: on the held-out pairs (seed 2026) the same TRE as 6 mm with
# (20, 20, 10) levels (0.71 vs 0.77 mm median) in ~1 s instead of ~4 s an image.
_N4_VOXEL_MM = 8.0
_N4_ITERATIONS = (15, 15)


def bias_corrected(image: sitk.Image, body: sitk.Image, threads: int) -> sitk.Image:
    """``image`` divided by its N4-estimated multiplicative bias field (inside and outside the body).

    Why: each study has its own smooth coil bias; a global metric (Mattes MI) then trades a few
    tenths of a mm of alignment for intensity agreement. On the held-out cohort (seed 2026,
    6 pairs) a bias-free but otherwise identical cohort registered at 0.50 mm median TRE vs 0.17
    with N4 (docs/registration.md). N4 (SimpleITK) runs on a ~8 mm copy (two fitting levels);
    its log bias field is evaluated on the full grid.
    """
    img = sitk.Cast(image, sitk.sitkFloat32)
    factors = [max(1, int(round(_N4_VOXEL_MM / s))) for s in img.GetSpacing()]
    small = sitk.BinShrink(img, factors)
    small_mask = sitk.Cast(sitk.BinShrink(sitk.Cast(body, sitk.sitkFloat32), factors) > 0.5, sitk.sitkUInt8)
    if not sitk.GetArrayFromImage(small_mask).any():
        return img
    n4 = sitk.N4BiasFieldCorrectionImageFilter()
    n4.SetMaximumNumberOfIterations(list(_N4_ITERATIONS))
    n4.SetNumberOfThreads(threads)
    # N4 needs positive intensities: lift non-positive images by a constant relative to their range
    # (a fixed +1 would distort images scaled to ~1).
    arr = sitk.GetArrayFromImage(small)
    lo, hi = float(arr.min()), float(arr.max())
    lift = 0.0 if lo > 0 else -lo + 0.01 * max(hi - lo, 1e-6)
    n4.Execute(small + lift, small_mask)
    log_bias = n4.GetLogBiasFieldAsImage(img)
    return sitk.Divide(img, sitk.Exp(log_bias))


def _interior_mask(body: sitk.Image, threads: int) -> sitk.Image:
    """Body eroded by ``_NCC_INTERIOR_EROSION_MM``; the body itself when little would remain."""
    f = sitk.BinaryErodeImageFilter()
    f.SetKernelRadius(radius_vox(body, _NCC_INTERIOR_EROSION_MM))
    f.SetKernelType(sitk.sitkBall)
    f.SetForegroundValue(1)
    inner = run_filter(f, body, threads=threads)
    n_inner = int(sitk.GetArrayFromImage(inner).sum())
    n_body = int(sitk.GetArrayFromImage(body).sum())
    return inner if n_inner >= 0.2 * n_body else body


def _linear_part(tx: sitk.Transform) -> np.ndarray:
    """3x3 linear part of an affine-like transform (of a composite's first, affine transform)."""
    if tx.GetName() == "CompositeTransform":
        tx = sitk.CompositeTransform(tx).GetNthTransform(0)
    for cast in (sitk.AffineTransform, sitk.Euler3DTransform):
        try:
            return np.array(cast(tx).GetMatrix()).reshape(3, 3)
        except (RuntimeError, TypeError):
            continue
    return np.eye(3)


def _scale_factors(tx: sitk.Transform) -> np.ndarray:
    """Singular values of the linear part of an affine-like transform (1 for rigid)."""
    return np.linalg.svd(_linear_part(tx), compute_uv=False)


def rotation_angle_deg(tx: sitk.Transform) -> float:
    """Angle (deg) of the rotation in the linear part (polar decomposition ``M = R S``)."""
    u, _, vt = np.linalg.svd(_linear_part(tx))
    r = u @ vt
    return float(np.degrees(np.arccos(np.clip((np.trace(r) - 1.0) / 2.0, -1.0, 1.0))))


def _metric_mask(body: sitk.Image, threads: int) -> sitk.Image:
    f = sitk.BinaryDilateImageFilter()
    f.SetKernelRadius(radius_vox(body, _METRIC_MASK_DILATION_MM))
    f.SetKernelType(sitk.sitkBall)
    f.SetForegroundValue(1)
    return run_filter(f, body, threads=threads)


def _new_method(fixed_mask: sitk.Image, fraction: float, threads: int) -> sitk.ImageRegistrationMethod:
    r = sitk.ImageRegistrationMethod()
    r.SetMetricAsMattesMutualInformation(numberOfHistogramBins=_HISTOGRAM_BINS)
    r.SetMetricSamplingStrategy(r.RANDOM)
    r.SetMetricSamplingPercentage(fraction, _SAMPLING_SEED)
    r.SetMetricFixedMask(fixed_mask)
    r.SetInterpolator(sitk.sitkLinear)
    r.SetNumberOfThreads(int(threads))
    return r


def _evaluate_metric(fixed: sitk.Image, moving: sitk.Image, fixed_mask: sitk.Image,
                     transform: sitk.Transform, fraction: float, threads: int) -> float:
    """Mattes MI (negative, lower is better) of the pair under ``transform``.

    No overlap (every sample maps outside the moving image) reads as 0.0, the value of
    independent images, rather than raising.
    """
    r = _new_method(fixed_mask, fraction, threads)
    # MetricEvaluate still needs an optimizer set; it is not run.
    r.SetOptimizerAsRegularStepGradientDescent(1.0, 0.01, 1)
    # The transform as the moving initial transform and an identity to "optimise": works for
    # any transform, including composites with a displacement field or B-spline.
    r.SetMovingInitialTransform(transform)
    r.SetInitialTransform(sitk.TranslationTransform(3), inPlace=False)
    try:
        return float(r.MetricEvaluate(fixed, moving))
    except RuntimeError:
        return 0.0


# --------------------------------------------------------------------------- public helpers
def motion_magnitude_mm(transform: sitk.Transform, mask_image: sitk.Image) -> float:
    """Mean displacement ``|T(x) - x|`` (mm) over the non-zero voxels ``x`` of ``mask_image``.

    ``mask_image`` defines the points (its grid, in the transform's fixed space). Works for any
    transform (it is sampled as a displacement field). Returns 0.0 for an empty mask.
    """
    m = sitk.GetArrayFromImage(mask_image) > 0
    if not m.any():
        return 0.0
    f = sitk.TransformToDisplacementFieldFilter()
    f.SetReferenceImage(mask_image)
    f.SetOutputPixelType(sitk.sitkVectorFloat64)
    field = f.Execute(transform)
    disp = sitk.GetArrayFromImage(field)  # (k, j, i, 3)
    return float(np.linalg.norm(disp[m], axis=1).mean())


def jacobian_determinant_range(transform: sitk.Transform, body: sitk.Image) -> tuple[float, float]:
    """(min, max) of ``det(dT/dx)`` over the body (``body``'s non-zero voxels, ~4 mm grid).

    ``det <= 0`` somewhere means the transform folds space there. Computed with numpy rather
    than ITK's DisplacementFieldJacobianDeterminantFilter because that filter differentiates
    along the index axes and ignores the direction matrix, which is wrong on oblique grids:
    here ``dT/dx = I + (du/dxi) D^T`` with ``xi`` the grid axes (mm) and ``D`` the direction.
    Returns (1.0, 1.0) for an empty body.
    """
    ref = coarse_grid_like(body, _JACOBIAN_SPACING_MM)
    inside = sitk.GetArrayFromImage(sitk.Resample(body, ref, sitk.Transform(), sitk.sitkNearestNeighbor,
                                                      0, sitk.sitkUInt8)) > 0
    if not inside.any():
        return 1.0, 1.0
    f = sitk.TransformToDisplacementFieldFilter()
    f.SetReferenceImage(ref)
    f.SetOutputPixelType(sitk.sitkVectorFloat64)
    disp = sitk.GetArrayFromImage(f.Execute(transform))  # (k, j, i, 3): LPS components
    sp = ref.GetSpacing()
    # grad[..., c, a] = d u_c / d xi_a with a = grid axis i, j, k (array axes 2, 1, 0).
    grad = np.stack([np.gradient(disp, sp[a], axis=2 - a) for a in range(3)], axis=-1)
    d = np.array(ref.GetDirection()).reshape(3, 3)
    jac = np.eye(3) + grad[inside] @ d.T
    det = np.linalg.det(jac)
    return float(det.min()), float(det.max())


def inverse_consistency_residual_mm(forward: sitk.Transform, backward: sitk.Transform,
                                    fixed_body: sitk.Image) -> float:
    """Mean round-trip displacement ``|backward(forward(x)) - x|`` (mm) over the fixed body.

    ``forward`` maps fixed -> moving points, ``backward`` moving -> fixed (registered
    independently the other way): a consistent pair returns every point to itself, and the
    round trip's error estimates the residual misregistration.
    """
    return motion_magnitude_mm(sitk.CompositeTransform([backward, forward]), fixed_body)


def registration_ncc(fixed: sitk.Image, moving: sitk.Image, transform: sitk.Transform,
                     fixed_mask: sitk.Image) -> tuple[float, float, float]:
    """Independent QC of a registered pair, inside ``fixed_mask`` on the fixed grid.

    Returns ``(ncc, gradient_ncc, overlap)``: the Pearson correlation of the intensities
    (invariant to the vendors' linear intensity scales) and of the gradient magnitudes (sigma
    1.5 mm; insensitive to enhancement that changes tissue contrast but not its edges), both
    over the voxels of the mask that map inside the moving image's field of view, and that
    overlap as a fraction of the mask. Two studies rarely cover the same slab along z, so voxels
    outside the moving image must not count as disagreement; the caller bounds the overlap.
    Correlations are in [-1, 1]; 0.0 when undefined (constant images or no overlap).
    """
    mov = resample_to(moving, fixed, transform, sitk.sitkLinear, 0.0)
    ones = sitk.Image(moving.GetSize(), sitk.sitkUInt8) + 1
    ones.CopyInformation(moving)
    inside = sitk.GetArrayFromImage(resample_to(ones, fixed, transform, sitk.sitkNearestNeighbor, 0)) > 0
    mask = sitk.GetArrayFromImage(fixed_mask) > 0
    m = mask & inside
    overlap = float(m.sum() / max(int(mask.sum()), 1))
    if not m.any():
        return 0.0, 0.0, 0.0
    fix = as_float32(fixed)

    def corr(a: np.ndarray, b: np.ndarray) -> float:
        a = a[m].astype(np.float64)
        b = b[m].astype(np.float64)
        a -= a.mean()
        b -= b.mean()
        den = float(np.sqrt((a * a).sum() * (b * b).sum()))
        return float((a * b).sum() / den) if den > 0 else 0.0

    ncc = corr(sitk.GetArrayFromImage(fix), sitk.GetArrayFromImage(mov))
    g = sitk.GradientMagnitudeRecursiveGaussianImageFilter()
    g.SetSigma(1.5)
    # GetArrayFromImage (a copy), not a view: a view of a temporary image dangles.
    gncc = corr(sitk.GetArrayFromImage(g.Execute(fix)), sitk.GetArrayFromImage(g.Execute(mov)))
    return ncc, gncc, overlap


# --------------------------------------------------------------------------- SimpleITK backend
@dataclass
class _BackendResult:
    transform: sitk.Transform
    iterations: int  # summed over stages and levels
    stop_condition: str  # per stage and level
    converged: bool  # the last (finest) optimisation stopped before its iteration cap


def _set_optimizer(r: sitk.ImageRegistrationMethod, step_mm: float, iterations: int) -> None:
    """Conjugate gradient with a golden-section line search, scales from physical shift.

    Why not SimpleITK's usual choices: plain gradient descent with a learning rate estimated
    each iteration stopped after ~20 iterations at 0.9-1.0 mm mean error on the synthetic pairs
    (the DESIGN.md warning), and regular-step gradient descent halved its step on every direction
    reversal in the narrow rotation/translation valleys and stopped ("step too small") with
    0.5-0.9 mm left; tuning its relaxation fixed one case and broke a large-displacement one. The
    line search reaches 0.03 mm (intra) / 0.25 mm (inter) on the same pairs at ~2x the cost,
    still ~1-2 s per pair. ``step_mm``: the first step's largest point shift (learning rate
    estimated once from it); the line search may go up to 5x further.
    """
    r.SetOptimizerAsConjugateGradientLineSearch(
        learningRate=1.0, numberOfIterations=iterations, convergenceMinimumValue=1e-6,
        convergenceWindowSize=10, lineSearchLowerLimit=0.0, lineSearchUpperLimit=5.0,
        lineSearchEpsilon=0.01, lineSearchMaximumIterations=20,
        estimateLearningRate=r.Once, maximumStepSizeInPhysicalUnits=step_mm)
    r.SetOptimizerScalesFromPhysicalShift()


def _register_simpleitk(fixed: sitk.Image, moving: sitk.Image, metric_mask: sitk.Image,
                        initial: sitk.Transform, stage: RegistrationStageConfig,
                        max_step_mm: float, threads: int, device: str = "cpu") -> _BackendResult:
    """Rigid then (optionally) affine, each over the pyramid of ``stage``; coarse to fine.

    Each pyramid level is its own optimisation (own images, step length restarted) so that the
    shrink is physical (see :func:`pyramid_image`), the step length follows the level's voxel
    size, and every level's iteration count and stop condition can be checked: SimpleITK's
    multi-level run only reports the last level's.
    Raises RuntimeError from ITK on a failed optimisation (caught by the caller).
    """
    levels = list(zip(stage.shrink_factors, stage.smoothing_sigmas_mm))
    if not levels:
        levels = [(1, 0.0)]
    fixed_pyr = [pyramid_image(fixed, s, sg, threads) for s, sg in levels]
    moving_pyr = [pyramid_image(moving, s, sg, threads) for s, sg in levels]
    mask_frac = float((sitk.GetArrayFromImage(metric_mask) > 0).mean())
    finest = min(fixed.GetSpacing())

    tx: sitk.Transform = sitk.Euler3DTransform(initial) if isinstance(initial, sitk.Euler3DTransform) \
        else initial
    iterations = 0
    converged = False
    stops: list[str] = []
    for kind in stage.transforms:
        if kind == "rigid":
            tx = sitk.Euler3DTransform(tx) if tx.GetName() == "Euler3DTransform" else tx
        elif kind == "affine":
            tx = _euler_to_affine(tx) if tx.GetName() == "Euler3DTransform" else sitk.AffineTransform(tx)
        else:  # pragma: no cover - the config schema restricts the values
            raise ValueError(f"unknown transform kind {kind!r}")
        for (shrink, _), f_img, m_img in zip(levels, fixed_pyr, moving_pyr):
            r = _new_method(metric_mask, sampling_fraction(f_img, mask_frac, stage.sampling_fraction),
                            threads)
            # Step length (mm): a fraction of the level's voxel size at most, so the fine level
            # refines rather than jumps; the first (coarsest) level may take the full step.
            step = min(max_step_mm, max(0.5, 0.5 * shrink * finest)) if iterations else max_step_mm
            _set_optimizer(r, step, int(stage.iterations))
            r.SetInitialTransform(tx, inPlace=True)
            r.Execute(f_img, m_img)
            iterations += int(r.GetOptimizerIteration())
            converged = int(r.GetOptimizerIteration()) < int(stage.iterations)
            stops.append(f"{kind}@x{shrink}: {r.GetOptimizerStopConditionDescription()} "
                         f"({r.GetOptimizerIteration()} it)")
    if stage.deformable == "bspline":
        tx, n, stop = _bspline_stage(fixed_pyr[-1], moving_pyr[-1], fixed, metric_mask, tx, stage, mask_frac,
                                     levels[-1][0], threads)
        iterations += n
        stops.append(stop)
    return _BackendResult(tx, iterations, "; ".join(stops), converged)


def _bspline_stage(f_img: sitk.Image, m_img: sitk.Image, fixed: sitk.Image, metric_mask: sitk.Image,
                   affine: sitk.Transform, stage: RegistrationStageConfig, mask_frac: float, shrink: int,
                   threads: int) -> tuple[sitk.Transform, int, str]:
    """Cubic B-spline free-form deformation after the affine, on the finest pyramid level.

    Control points ``stage.deformable_grid_spacing_mm`` apart over the fixed image; L-BFGS-B
    (the usual optimiser for the many B-spline coefficients). The affine stays fixed (moving
    initial transform), so the result is ``affine(x + u(x))``: ``CompositeTransform([affine,
    bspline])`` (ITK applies the last added transform first).
    """
    extent = (np.array(fixed.GetSize()) - 1) * np.array(fixed.GetSpacing())
    mesh = [max(1, int(round(e / stage.deformable_grid_spacing_mm))) for e in extent]
    bspline = sitk.BSplineTransformInitializer(fixed, mesh, order=3)
    r = _new_method(metric_mask, sampling_fraction(f_img, mask_frac, stage.sampling_fraction), threads)
    r.SetMovingInitialTransform(affine)
    r.SetInitialTransform(bspline, inPlace=True)
    # Coefficients bounded to +-_BSPLINE_MAX_COEFFICIENT_MM: unbounded, L-BFGS-B moved control
    # points by several mm where the body sampled them thinly (median TRE 3.4 mm, worst pair
    # 7.5 mm on the held-out cohort, all passing QC); the deformation it must follow is <= ~3 mm.
    r.SetOptimizerAsLBFGSB(gradientConvergenceTolerance=1e-5, numberOfIterations=int(stage.deformable_iterations),
                           maximumNumberOfCorrections=5, maximumNumberOfFunctionEvaluations=4 * int(stage.deformable_iterations),
                           costFunctionConvergenceFactor=1e7, lowerBound=-_BSPLINE_MAX_COEFFICIENT_MM,
                           upperBound=_BSPLINE_MAX_COEFFICIENT_MM)
    r.Execute(f_img, m_img)
    n = int(r.GetOptimizerIteration())
    return (sitk.CompositeTransform([affine, bspline]), n,
            f"bspline@x{shrink} mesh {mesh}: {r.GetOptimizerStopConditionDescription()} ({n} it)")


def _register_torch(fixed: sitk.Image, moving: sitk.Image, metric_mask: sitk.Image, initial: sitk.Transform,
                    stage: RegistrationStageConfig, max_step_mm: float, threads: int,
                    device: str = "cpu") -> _BackendResult:
    """The PyTorch backend (imported on first use: torch is slow to import)."""
    from pipeline.imaging.registration_torch import register_torch

    r = register_torch(fixed, moving, metric_mask, initial, stage, max_step_mm, threads, device=device)
    return _BackendResult(r.transform, r.iterations, r.stop_condition, r.converged)


_Backend = Callable[..., _BackendResult]
# One function per backend: (fixed, moving, metric mask, initial transform, stage, first step
# in mm, threads, device=...) -> _BackendResult; raises RuntimeError on a failed optimisation.
_BACKENDS: dict[str, _Backend] = {"simpleitk": _register_simpleitk, "torch": _register_torch}


# --------------------------------------------------------------------------- shared driver
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
    c_fixed = _mask_centroid_lps(fixed_body)
    c_moving = _mask_centroid_lps(moving_body)
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


def _register(fixed: sitk.Image, moving: sitk.Image, cfg: RegistrationConfig,
              stage: RegistrationStageConfig, name: str, intra: bool,
              max_motion_mm: float | None, max_scale_change: float | None,
              hint_shift_lps: Sequence[float] | None = None, device: str | None = None,
              ) -> tuple[sitk.Transform, RegistrationQC]:
    t0 = time.perf_counter()
    threads = int(cfg.threads)
    backend_name = cfg.backend_of(stage)
    method = f"{backend_name}:" + "+".join(stage.transforms) + (
        f"+{stage.deformable}" if stage.deformable != "none" else "")

    def failed(reason: str, before: float = 0.0, after: float = 0.0, iterations: int = 0,
               stop: str = "", motion: float = 0.0) -> tuple[sitk.Transform, RegistrationQC]:
        return _identity(), RegistrationQC(
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
        fixed_body = body_mask(fixed, threads=threads)
        if not sitk.GetArrayFromImage(fixed_body).any():
            return failed("no body found on the fixed image")
        # The moving body seeds the inter-study starts and masks N4: computed once.
        moving_body = body_mask(moving, threads=threads) if not intra or stage.bias_correction == "n4" else None
        if stage.bias_correction == "n4":
            fixed = bias_corrected(fixed, fixed_body, threads)
            moving = bias_corrected(moving, moving_body, threads)
        metric_mask = _metric_mask(fixed_body, threads)
        shrink0, sigma0 = (stage.shrink_factors or [1])[0], (stage.smoothing_sigmas_mm or [0.0])[0]
        last_shrink = (stage.shrink_factors or [1])[-1]
        last_sigma = (stage.smoothing_sigmas_mm or [0.0])[-1]
        fixed_eval = pyramid_image(fixed, last_shrink, last_sigma, threads)
        moving_eval = pyramid_image(moving, last_shrink, last_sigma, threads)
        mask_frac = float((sitk.GetArrayFromImage(metric_mask) > 0).mean())
        eval_frac = sampling_fraction(fixed_eval, mask_frac, stage.sampling_fraction)
        metric_before = _evaluate_metric(fixed_eval, moving_eval, metric_mask, _identity(),
                                         eval_frac, threads)
        ncc_before = registration_ncc(fixed, moving, _identity(), _interior_mask(fixed_body, threads))[0]

        if intra:
            # Same FrameOfReference: identity is the right start; rotate about the body centre.
            init = sitk.Euler3DTransform()
            init.SetCenter(_mask_centroid_lps(fixed_body).tolist())
            starts = [("identity", init)]
        else:
            f0 = pyramid_image(fixed, shrink0, sigma0, threads)
            m0 = pyramid_image(moving, shrink0, sigma0, threads)
            frac0 = sampling_fraction(f0, mask_frac, stage.sampling_fraction)
            scored = [(_evaluate_metric(f0, m0, metric_mask, e, frac0, threads), nm, e)
                      for nm, e in _initial_candidates_inter(fixed_body, moving_body, fixed, hint_shift_lps)]
            best, best_name, best_init = min(scored, key=lambda c: c[0])
            # Coarse search around the best start: repositioning between studies can exceed the
            # optimiser's capture range (tens of mm with oblique slabs and other FOVs).
            for offset in _SEARCH_OFFSETS_MM:
                e = sitk.Euler3DTransform(best_init)
                e.SetTranslation((np.array(best_init.GetTranslation()) + offset).tolist())
                value = _evaluate_metric(f0, m0, metric_mask, e, frac0, threads)
                scored.append((value, f"{best_name}+search", e))
            # The optimiser runs from the best few starts in turn until one passes QC.
            starts = [(nm, e) for _, nm, e in sorted(scored, key=lambda c: c[0])[:_MAX_STARTS]]
            if hint_shift_lps is not None and not any(nm.startswith("hint") for nm, _ in starts):
                # Last resort: the caller's hint with its own coarse search. When another start
                # ranks best at the coarse level, the search above never looks around the hint,
                # and with large repositioning all its neighbours can fail QC where the hint's
                # pass (held-out seed 4040, ~18 mm along z).
                hint_init = next(e for _, nm, e in scored if nm == "hint")
                around_hint = [(_evaluate_metric(f0, m0, metric_mask, hint_init, frac0, threads), "hint", hint_init)]
                for offset in _SEARCH_OFFSETS_MM:
                    e = sitk.Euler3DTransform(hint_init)
                    e.SetTranslation((np.array(hint_init.GetTranslation()) + offset).tolist())
                    around_hint.append((_evaluate_metric(f0, m0, metric_mask, e, frac0, threads), "hint+search", e))
                _, nm, e = min(around_hint, key=lambda c: c[0])
                starts.append((nm, e))
    except RuntimeError as exc:  # ITK: no overlap, too few samples, degenerate images...
        return failed(f"initialisation failed: {str(exc).strip().splitlines()[-1][:300]}")

    # When the full chain (e.g. rigid + affine) fails QC from a start, its first, most
    # constrained stage is tried alone from the same start: an affine can stretch along a
    # short slab overlap where the rigid answer was right.
    chains = [stage] if len(stage.transforms) == 1 else [
        stage, stage.model_copy(update={"transforms": stage.transforms[:1], "deformable": "none"})]
    first_failure = None
    for init_name, init in starts:
        for chain in chains:
            try:
                res = backend(fixed, moving, metric_mask, init, chain, _MAX_STEP_MM["intra" if intra else "inter"],
                              threads, device=run_device)
            except RuntimeError as exc:  # ITK: samples left the moving image during the search...
                outcome = failed(f"optimisation failed (start {init_name}): {str(exc).strip().splitlines()[-1][:300]}",
                                 before=metric_before)
            else:
                chain_method = f"{backend_name}:" + "+".join(chain.transforms) + (
                    f"+{chain.deformable}" if chain.deformable != "none" else "")
                outcome = _quality(res, init_name, fixed, moving, fixed_body, metric_mask, fixed_eval, moving_eval,
                                   eval_frac, metric_before, chain, max_scale_change, max_motion_mm, threads,
                                   name, chain_method, t0)
                outcome = (outcome[0], outcome[1].model_copy(update={"ncc_before": round(float(ncc_before), 4)}))
                if outcome[1].ok and stage.max_residual_mm is not None:
                    outcome = _check_inverse_consistency(outcome, fixed, moving, fixed_body, init, chain, backend,
                                                         intra, threads, run_device, stage.max_residual_mm, t0)
            if outcome[1].ok:
                return outcome
            first_failure = first_failure or outcome
    return first_failure


def _quality(res: "_BackendResult", init_name: str, fixed: sitk.Image, moving: sitk.Image, fixed_body: sitk.Image,
             metric_mask: sitk.Image, fixed_eval: sitk.Image, moving_eval: sitk.Image, eval_frac: float,
             metric_before: float, stage: RegistrationStageConfig, max_scale_change: float | None,
             max_motion_mm: float | None, threads: int, name: str, method: str,
             t0: float) -> tuple[sitk.Transform, RegistrationQC]:
    """QC of one optimisation result; the identity transform when it fails."""
    tx = res.transform
    stop = f"init={init_name}; {res.stop_condition}"
    if not res.converged:
        # Not a failure by itself (the NCC check decides) but worth seeing in the QC record.
        stop += "; NOT CONVERGED: the finest level hit its iteration cap"
    metric_after = _evaluate_metric(fixed_eval, moving_eval, metric_mask, tx, eval_frac, threads)
    motion = motion_magnitude_mm(tx, fixed_body)
    ncc, gncc, overlap = registration_ncc(fixed, moving, tx, _interior_mask(fixed_body, threads))
    scales = _scale_factors(tx)

    reasons = []
    if not np.isfinite(metric_after) or metric_after > metric_before + _METRIC_WORSE_TOL:
        reasons.append(f"metric got worse ({metric_before:.4f} -> {metric_after:.4f})")
    if overlap < MIN_OVERLAP:
        reasons.append(f"only {overlap:.0%} of the body interior overlaps after registration "
                       f"(< {MIN_OVERLAP:.0%})")
    edges_agree = stage.min_gradient_ncc_after is not None and gncc >= stage.min_gradient_ncc_after
    if ncc < stage.min_ncc_after and not edges_agree:
        gate = "" if stage.min_gradient_ncc_after is None else f" < {stage.min_gradient_ncc_after}"
        reasons.append(f"ncc of the body interior {ncc:.3f} < {stage.min_ncc_after} "
                       f"(gradient ncc {gncc:.3f}{gate})")
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
        jac_min, jac_max = jacobian_determinant_range(tx, fixed_body)
        if jac_min <= 0:
            reasons.append(f"deformable transform folds (Jacobian determinant min {jac_min:.3f} <= 0)")
        deform_max = deformation_max_mm(tx, fixed_body)
        if stage.max_deformation_mm is not None and deform_max > stage.max_deformation_mm:
            reasons.append(f"deformable part moves the body up to {deform_max:.1f} mm beyond the affine "
                           f"(> {stage.max_deformation_mm} mm sanity bound)")
    ok = not reasons
    qc = RegistrationQC(
        name=name, method=method, metric=METRIC_NAME, metric_before=round(metric_before, 5),
        metric_after=round(metric_after, 5), iterations=res.iterations,
        stop_condition=f"{stop}; ncc_interior={ncc:.3f}; gradient_ncc_interior={gncc:.3f}; "
                       f"overlap={overlap:.2f}; "
                       f"scales={np.round(scales, 3).tolist()}; rotation_deg={angle:.1f}",
        motion_corrected_mm=round(motion, 3), ok=ok, reason="; ".join(reasons),
        seconds=round(time.perf_counter() - t0, 3), ncc_after=round(ncc, 4),
        jacobian_min=None if jac_min is None else round(jac_min, 4),
        jacobian_max=None if jac_max is None else round(jac_max, 4),
        deformation_max_mm=None if deform_max is None else round(deform_max, 3))
    if not ok:
        return _identity(), qc
    return tx, qc


def _check_inverse_consistency(outcome: tuple[sitk.Transform, RegistrationQC], fixed: sitk.Image,
                               moving: sitk.Image, fixed_body: sitk.Image, init: sitk.Transform,
                               chain: RegistrationStageConfig, backend: _Backend, intra: bool, threads: int,
                               device: str, max_residual_mm: float,
                               t0: float) -> tuple[sitk.Transform, RegistrationQC]:
    """Register the pair the other way and fail the QC when the round trip exceeds the bound.

    The backward run is independent: it starts from the identity rotating about the moving
    body's centre (intra-study, same FrameOfReference), or from the inverse of the start the
    forward run used (between studies), never from the forward result, which would make the
    check agree with itself.
    """
    tx, qc = outcome
    try:
        moving_body = body_mask(moving, threads=threads)
        if intra:
            start = sitk.Euler3DTransform()
            start.SetCenter(_mask_centroid_lps(moving_body).tolist())
        else:
            start = sitk.Euler3DTransform(init.GetInverse())
        res = backend(moving, fixed, _metric_mask(moving_body, threads), start, chain,
                      _MAX_STEP_MM["intra" if intra else "inter"], threads, device=device)
        residual = inverse_consistency_residual_mm(tx, res.transform, fixed_body)
    except RuntimeError as exc:
        residual, why = float("nan"), f"backward registration failed: {str(exc).strip().splitlines()[-1][:200]}"
    else:
        why = f"inverse-consistency residual {residual:.2f} mm > {max_residual_mm} mm"
    update = {"residual_mm": round(residual, 3) if np.isfinite(residual) else None,
              "seconds": round(time.perf_counter() - t0, 3)}
    if np.isfinite(residual) and residual <= max_residual_mm:
        return tx, qc.model_copy(update=update)
    update.update(ok=False, reason=why)
    return _identity(), qc.model_copy(update=update)


# --------------------------------------------------------------------------- public API
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
    optimisation. ``qc.stop_condition`` also carries the NCC values. With
    ``cfg.intra_study.max_residual_mm`` set, the pair is also registered the other way and a
    round-trip residual (``qc.residual_mm``, mm, mean over the body) above it fails the QC.
    ``device`` (auto | cpu | cuda) overrides ``cfg.device`` for the torch backend.
    """
    return _register(fixed_pre, moving_post, cfg, cfg.intra_study, name, intra=True,
                     max_motion_mm=cfg.intra_study.max_motion_mm, max_scale_change=None, device=device)


def register_to_baseline(fixed_baseline: sitk.Image, moving_followup: sitk.Image,
                         cfg: RegistrationConfig, name: str = "followup_to_baseline",
                         hint_shift_lps: Sequence[float] | None = None, device: str | None = None,
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
    a folding Jacobian fails the QC.
    """
    return _register(fixed_baseline, moving_followup, cfg, cfg.inter_study, name, intra=False,
                     max_motion_mm=None, max_scale_change=cfg.inter_study.max_scale_change,
                     hint_shift_lps=hint_shift_lps, device=device)


def deformation_max_mm(transform: sitk.Transform, body: sitk.Image) -> float:
    """Largest ``|D(x) - x|`` (mm) of the deformable part ``D`` of ``transform`` over the body
    (~4 mm grid); 0.0 for an affine-like transform or an empty body."""
    _, deformable = split_affine_and_deformable(transform)
    if deformable is None:
        return 0.0
    ref = coarse_grid_like(body, _JACOBIAN_SPACING_MM)
    inside = sitk.GetArrayFromImage(sitk.Resample(body, ref, sitk.Transform(), sitk.sitkNearestNeighbor,
                                                      0, sitk.sitkUInt8)) > 0
    if not inside.any():
        return 0.0
    f = sitk.TransformToDisplacementFieldFilter()
    f.SetReferenceImage(ref)
    f.SetOutputPixelType(sitk.sitkVectorFloat64)
    disp = sitk.GetArrayFromImage(f.Execute(deformable))
    return float(np.linalg.norm(disp[inside], axis=1).max())


def split_affine_and_deformable(tx: sitk.Transform) -> tuple[sitk.Transform, sitk.Transform | None]:
    """(affine part, deformable part or None) of a registration result.

    A ``.tfm`` file holds the affine; a displacement field goes to a NIfTI vector image
    (``to_baseline_field.nii.gz``) because a dense field written as text would be huge.
    """
    if tx.GetName() != "CompositeTransform":
        return tx, None
    comp = sitk.CompositeTransform(tx)
    parts = [comp.GetNthTransform(i) for i in range(comp.GetNumberOfTransforms())]
    return parts[0], (parts[1] if len(parts) > 1 else None)


def deformable_as_field(deformable: sitk.Transform, reference: sitk.Image) -> sitk.Image:
    """The deformable part as a displacement field image (VectorFloat64, LPS mm) on a ~4 mm copy
    of ``reference``'s grid (for ``to_baseline_field.nii.gz``)."""
    if deformable.GetName() == "DisplacementFieldTransform":
        return sitk.DisplacementFieldTransform(deformable).GetDisplacementField()
    f = sitk.TransformToDisplacementFieldFilter()
    f.SetReferenceImage(coarse_grid_like(reference, _JACOBIAN_SPACING_MM))
    f.SetOutputPixelType(sitk.sitkVectorFloat64)
    return f.Execute(deformable)


def compose_with_field(affine: sitk.Transform, field: sitk.Image) -> sitk.Transform:
    """Inverse of the split: ``affine(x + u(x))`` from a stored affine and displacement field."""
    return sitk.CompositeTransform([affine, sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))])


def invert_registration(tx: sitk.Transform) -> sitk.Transform:
    """Inverse of a registration result (maps moving points back to fixed points).

    Affine-like transforms invert exactly; a composite ``affine(x + u(x))`` inverts as
    ``x = F^-1(A^-1(y))`` with the displacement field inverted numerically
    (``sitk.InvertDisplacementField``, fixed-point iterations; smooth, non-folding fields only,
    which the Jacobian QC guarantees).
    """
    affine, deformable = split_affine_and_deformable(tx)
    if deformable is None:
        return tx.GetInverse()
    field = deformable_as_field(deformable, _field_reference(deformable))
    inverse_field = sitk.InvertDisplacementField(field, maximumNumberOfIterations=20,
                                                 maxErrorToleranceThreshold=0.01, meanErrorToleranceThreshold=0.001)
    return sitk.CompositeTransform([sitk.DisplacementFieldTransform(inverse_field), affine.GetInverse()])


def _field_reference(deformable: sitk.Transform) -> sitk.Image:
    """A grid for sampling a deformable transform: its own field grid or B-spline domain."""
    if deformable.GetName() == "DisplacementFieldTransform":
        ref = sitk.DisplacementFieldTransform(deformable).GetDisplacementField()
    else:  # BSplineTransform: a ~4 mm grid over its transform domain
        b = sitk.BSplineTransform(deformable)
        dims = np.array(b.GetTransformDomainPhysicalDimensions())
        size = np.maximum(2, np.ceil(dims / _JACOBIAN_SPACING_MM).astype(int) + 1)
        ref = sitk.Image([int(v) for v in size], sitk.sitkUInt8)
        ref.SetOrigin(b.GetTransformDomainOrigin())
        ref.SetSpacing((dims / (size - 1)).tolist())
        ref.SetDirection(b.GetTransformDomainDirection())
    out = sitk.Image(ref.GetSize(), sitk.sitkUInt8)
    out.CopyInformation(ref)
    return out


__all__: Sequence[str] = (
    "invert_registration",
    "compose_with_field",
    "deformable_as_field",
    "inverse_consistency_residual_mm",
    "jacobian_determinant_range",
    "split_affine_and_deformable",
    "motion_magnitude_mm",
    "register_intra_study",
    "register_to_baseline",
    "registration_ncc",
)
