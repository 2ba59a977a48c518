"""Registration layer 5b: the PyTorch backend (rigid, affine, optional smooth displacement field).

Plugged into the driver's backends (``pipeline.imaging.registration.driver``, imported there on
first use: torch is slow to import): the shared driver does the initialisation (moments, coarse
search, several starts), the QC and the failure policy; this module only optimises from the
start it is given and returns SimpleITK transforms in the one
:class:`~pipeline.imaging.registration.common.BackendResult`, so the rest of the pipeline
(resampling, ``to_baseline.tfm``) is the same whatever backend ran. Imports ``pipeline.core``
and ``common`` only.

Geometry
--------
Everything is in physical space (LPS, mm). Each image's voxel -> LPS matrix is built from its
origin, spacing AND direction (:func:`voxel_to_lps`), so oblique and flipped grids register as
they lie in the scanner. A transform ``T`` maps a fixed point ``x`` to the moving point ``y``
(ITK convention): ``y = A (x + u(x) - c) + c + t`` with ``A`` the 3x3 linear part (a rotation
for the rigid stage), ``c`` the centre of rotation of the start transform, ``t`` the translation
and ``u`` the optional displacement field (defined on the fixed image, zero without a
deformable stage). ``torch.nn.functional.grid_sample`` samples the moving image at
``y`` converted to its normalised grid coordinates.

Why points rather than a whole output grid: the metric is evaluated on a fixed random subset
of the fixed body's voxels (as SimpleITK's RANDOM sampling does): ~2*10^4 points instead of
~10^6 voxels makes one iteration a few milliseconds on a CPU core, with the same optimum.

Metric: Mattes mutual information (:class:`MattesMI`, the Parzen-window estimate of Mattes et
al. that ITK uses; pre/post pairs differ in contrast, studies in intensity scale).
Samples that map outside the moving image are left out of each evaluation, because a zero
padding would pull the optimum towards overlapping the FOV borders.

Optimiser: Adam in scaled parameters (rotations and linear-part changes are multiplied by the
body's radius, so one unit of every parameter moves a body point by ~1 mm), a learning rate
that starts at the step the driver allows (mm) and decays by cosine to 2 % of it per level,
stopping early once the last steps move body points by < ``_STOP_STEP_MM``.

Deformable stage (``stage.deformable == "field"``): a displacement field parameterised on a
coarse control grid (``stage.deformable_grid_spacing_mm``) over the fixed image and
interpolated trilinearly (a first-order B-spline), optimised after the affine with MI plus a
diffusion penalty (MONAI ``DiffusionLoss``) that keeps it smooth. It is returned as a
``sitk.DisplacementFieldTransform`` on a coarse copy of the fixed grid, composed so that it acts
before the affine (``CompositeTransform([affine, field])``: ITK applies the last added first).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from pipeline.core.config import RegistrationStageConfig
from pipeline.core.devices import torch_threads
from pipeline.imaging.registration.common import (
    HISTOGRAM_BINS,
    SAMPLING_SEED,
    BackendResult,
    coarse_grid_like,
    pyramid_image,
    sampling_fraction,
)

# Histogram bins of the MI (common.HISTOGRAM_BINS) and the seed of the point sampling
# (common.SAMPLING_SEED): those of the SimpleITK backend.
# Points per level: at least this many (stable MI gradient), at most _MAX_SAMPLES (cost).
_MIN_SAMPLES = 12_000
_MAX_SAMPLES = 20_000
# Early stop: the mean step over the last _STOP_WINDOW iterations moves a body point by less
# than this (mm). A tenth of the finest pixel is below what MI can resolve on these images.
_STOP_STEP_MM = 0.01
_STOP_WINDOW = 10
# Final learning rate as a fraction of the first (cosine decay within each level).
_LR_FLOOR = 0.02
# Deformable stage: Adam step (mm) of the control-point displacements, and the weight of the
# diffusion penalty (mean squared displacement gradient, (mm/mm)^2; MI is ~ -0.5). Adam moves
# every parameter by ~its step whatever the gradient's size, so a larger step random-walks the
# control points far from the body (a 0.5 mm step reached 15 mm and folded on a rigid pair);
# weight 10 still let the field follow noise on 3 mm pixels (TRE 0.28 -> 0.73 mm on a rigid
# pair), 100 kept it < 0.8 mm there.
_FIELD_STEP_MM = 0.1
_FIELD_SMOOTHNESS = 100.0
# Spacing (mm) of the dense displacement field handed to SimpleITK: fine enough for a field
# interpolated from control points tens of mm apart, coarse enough to stay a few MB.
_FIELD_OUTPUT_SPACING_MM = 4.0


# --------------------------------------------------------------------------- geometry
def voxel_to_lps(image: sitk.Image) -> np.ndarray:
    """4x4 matrix mapping a continuous index (i, j, k, 1) of ``image`` to LPS (mm).

    ``lps = origin + direction @ diag(spacing) @ index``: the direction is never dropped, so a
    flipped or oblique grid maps to the right place.
    """
    m = np.eye(4)
    d = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    m[:3, :3] = d @ np.diag(image.GetSpacing())
    m[:3, 3] = image.GetOrigin()
    return m


def _index_to_normalised(size: tuple[int, ...]) -> np.ndarray:
    """4x4 matrix: index (i, j, k) -> grid_sample coordinates in [-1, 1] (align_corners=True)."""
    m = np.eye(4)
    for a, n in enumerate(size):
        m[a, a] = 2.0 / max(n - 1, 1)
        m[a, 3] = -1.0
    return m


def _tensor(image: sitk.Image, device: torch.device) -> torch.Tensor:
    """(1, 1, k, j, i) float32 tensor of the image's voxels (numpy order, i fastest)."""
    arr = sitk.GetArrayFromImage(image).astype(np.float32, copy=False)
    return torch.from_numpy(arr)[None, None].to(device)


def _rotation(rotvec: torch.Tensor) -> torch.Tensor:
    """Rodrigues' formula: rotation vector (rad) -> 3x3 rotation matrix (differentiable)."""
    theta = torch.sqrt((rotvec * rotvec).sum() + 1e-24)
    k = rotvec / theta
    zero = torch.zeros((), dtype=rotvec.dtype, device=rotvec.device)
    kx = torch.stack([torch.stack([zero, -k[2], k[1]]), torch.stack([k[2], zero, -k[0]]),
                      torch.stack([-k[1], k[0], zero])])
    eye = torch.eye(3, dtype=rotvec.dtype, device=rotvec.device)
    return eye + torch.sin(theta) * kx + (1.0 - torch.cos(theta)) * (kx @ kx)


def _affine_parts(tx: sitk.Transform) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(matrix, centre, translation) of an Euler3D/Affine/identity-like transform."""
    name = tx.GetName()
    if name == "Euler3DTransform":
        e = sitk.Euler3DTransform(tx)
        return np.array(e.GetMatrix()).reshape(3, 3), np.array(e.GetCenter()), np.array(e.GetTranslation())
    if name == "AffineTransform":
        a = sitk.AffineTransform(tx)
        return np.array(a.GetMatrix()).reshape(3, 3), np.array(a.GetCenter()), np.array(a.GetTranslation())
    if name == "TranslationTransform":
        return np.eye(3), np.zeros(3), np.array(sitk.TranslationTransform(tx).GetOffset())
    raise ValueError(f"torch backend: unsupported initial transform {name}")


# --------------------------------------------------------------------------- sampling
@dataclass(eq=False)
class _Level:
    fixed_pts: torch.Tensor  # (N, 3) LPS of the sample points
    fixed_vals: torch.Tensor  # (N,) fixed intensities there
    moving: torch.Tensor  # (1, 1, k, j, i)
    lps_to_moving_norm: torch.Tensor  # (4, 4)
    shrink: int


def _level(fixed_l: sitk.Image, moving_l: sitk.Image, mask: sitk.Image, fraction: float, shrink: int,
           device: torch.device) -> _Level:
    mask_l = sitk.Resample(mask, fixed_l, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    m = sitk.GetArrayFromImage(mask_l) > 0
    idx = np.argwhere(m)  # (k, j, i)
    if len(idx) == 0:
        raise RuntimeError("torch backend: the metric mask is empty on this level")
    n = int(min(len(idx), _MAX_SAMPLES, max(_MIN_SAMPLES, fraction * len(idx))))
    pick = idx[np.random.default_rng(SAMPLING_SEED).choice(len(idx), n, replace=False)]
    vals = sitk.GetArrayFromImage(fixed_l)[pick[:, 0], pick[:, 1], pick[:, 2]].astype(np.float64)
    ijk1 = np.c_[pick[:, ::-1].astype(np.float64), np.ones(n)]
    pts = (ijk1 @ voxel_to_lps(fixed_l).T)[:, :3]
    to_norm = _index_to_normalised(moving_l.GetSize()) @ np.linalg.inv(voxel_to_lps(moving_l))
    return _Level(torch.tensor(pts, dtype=torch.float32, device=device),
                  torch.tensor(vals, dtype=torch.float32, device=device),
                  _tensor(moving_l, device), torch.tensor(to_norm, dtype=torch.float32, device=device), shrink)


def _sample_moving(level: _Level, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Moving intensities at LPS points ``y`` (N, 3) and a mask of the points inside its grid."""
    g = y @ level.lps_to_moving_norm[:3, :3].T + level.lps_to_moving_norm[:3, 3]
    inside = (g.abs() <= 1.0).all(dim=1)
    vals = F.grid_sample(level.moving, g.view(1, 1, 1, -1, 3), mode="bilinear", padding_mode="border",
                         align_corners=True).view(-1)
    return vals, inside


def _cubic_bspline_weights(t: torch.Tensor) -> torch.Tensor:
    """The cubic B-spline window's weights (4, N) on the bins ``floor - 1 .. floor + 2`` of a
    position whose fractional part is ``t`` (N): the kernel's four pieces in closed form, so one
    position costs a few multiplications instead of the kernel evaluated (both branches) per bin."""
    s = 1 - t
    t2 = t * t
    t3 = t2 * t
    return torch.stack([s * s * s / 6, (3 * t3 - 6 * t2 + 4) / 6, (-3 * t3 + 3 * t2 + 3 * t + 1) / 6, t3 / 6])


class MattesMI:
    """Negative Mattes mutual information (lower is better), as ITK's Mattes metric computes it.

    Joint histogram with a zero-order (box) Parzen window on the fixed intensities and a cubic
    B-spline window on the moving ones, so the metric is differentiable in the moving samples.
    Hand-written rather than MONAI's ``GlobalMutualInformationLoss``: that evaluates every bin
    for every sample (N x bins dense tensors, ~1-2 s per evaluation at 4*10^4 samples on a CPU
    core); the cubic window touches only 4 bins, so scattering 4 weights per sample is O(N).
    Intensity ranges are fixed once per level (robust percentiles), not re-read per iteration.
    """

    _PAD = 2  # bins of padding at each end so the cubic window never leaves the histogram

    def __init__(self, fixed_vals: torch.Tensor, moving: torch.Tensor) -> None:
        self.bins = HISTOGRAM_BINS
        self.f_lo, self.f_step = self._range(fixed_vals)
        self.m_lo, self.m_step = self._range(moving[moving > 0] if bool((moving > 0).any()) else moving.flatten())

    def _range(self, values: torch.Tensor) -> tuple[float, float]:
        v = values.flatten().float()
        if v.numel() > 200_000:  # quantile() limits its input size; a strided subset suffices
            v = v[:: v.numel() // 200_000 + 1]
        lo, hi = (float(q) for q in torch.quantile(v, torch.tensor([0.001, 0.999], device=v.device)))
        return lo, max(hi - lo, 1e-6) / (self.bins - 2 * self._PAD - 1)

    def __call__(self, fixed_vals: torch.Tensor, moving_vals: torch.Tensor, inside: torch.Tensor) -> torch.Tensor:
        if int(inside.sum()) < 100:
            raise RuntimeError("torch backend: too few samples inside the moving image")
        nb, pad = self.bins, self._PAD
        f = fixed_vals[inside]
        m = moving_vals[inside]
        fb = ((f - self.f_lo) / self.f_step + pad).round().clamp(pad, nb - pad - 1).long()
        mpos = ((m - self.m_lo) / self.m_step + pad).clamp(pad, nb - pad - 1)
        base = mpos.detach().floor()
        # The window's 4 bins base-1 .. base+2 lie within [1, nb - 1] (the clamp above): all
        # four weights scattered at once (one scatter of 4N; 2.5x faster with its gradient
        # than a scatter and a kernel evaluation per bin, the same histogram to float rounding).
        bins = (fb * nb + base.long()).unsqueeze(0) + torch.arange(-1, 3, device=m.device).unsqueeze(1)
        joint = torch.zeros(nb * nb, dtype=m.dtype, device=m.device).scatter_add(
            0, bins.reshape(-1), _cubic_bspline_weights(mpos - base).reshape(-1))
        p = joint.view(nb, nb) / joint.sum()
        pf = p.sum(dim=1, keepdim=True)
        pm = p.sum(dim=0, keepdim=True)
        eps = 1e-12
        return -(p * (torch.log(p + eps) - torch.log(pf + eps) - torch.log(pm + eps))).sum()


# --------------------------------------------------------------------------- optimisation
class _AffineModel(torch.nn.Module):
    """``y = A (x - c) + c + t`` in scaled parameters (1 unit ~ 1 mm at the body radius)."""

    def __init__(self, matrix: np.ndarray, centre: np.ndarray, translation: np.ndarray, kind: str,
                 radius_mm: float, device: torch.device):
        super().__init__()
        self.kind, self.radius = kind, float(radius_mm)
        f64 = dict(dtype=torch.float64, device=device)
        self.base = torch.tensor(matrix, **f64)
        self.centre = torch.tensor(centre, **f64)
        self.t = torch.nn.Parameter(torch.tensor(translation, **f64))
        if kind == "rigid":
            self.rot = torch.nn.Parameter(torch.zeros(3, **f64))  # rotation on top of ``base``
        else:
            self.lin = torch.nn.Parameter(torch.zeros(3, 3, **f64))

    def matrix(self) -> torch.Tensor:
        if self.kind == "rigid":
            return _rotation(self.rot / self.radius) @ self.base
        return self.base + self.lin / self.radius

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.matrix().to(x.dtype)
        c = self.centre.to(x.dtype)
        return (x - c) @ a.T + c + self.t.to(x.dtype)

    def as_sitk(self) -> sitk.Transform:
        with torch.no_grad():
            a = self.matrix().cpu().numpy()
            c, t = self.centre.cpu().numpy(), self.t.detach().cpu().numpy()
        if self.kind == "rigid":
            # Re-orthonormalise (float64 Rodrigues is orthonormal to ~1e-15; SVD guards the check).
            u, _, vt = np.linalg.svd(a)
            e = sitk.Euler3DTransform()
            e.SetCenter(c.tolist())
            e.SetMatrix((u @ vt).ravel().tolist(), 1e-6)
            e.SetTranslation(t.tolist())
            return e
        aff = sitk.AffineTransform(3)
        aff.SetCenter(c.tolist())
        aff.SetMatrix(a.ravel().tolist())
        aff.SetTranslation(t.tolist())
        return aff


def adam_keeping_best(params: list[torch.nn.Parameter], loss_fn, step_mm: float, iterations: int,
              step_size_fn) -> tuple[int, str, bool]:
    """Adam with cosine-decayed learning rate; early stop on a small mean step (mm).

    Returns with the parameters of the lowest loss seen (the start included), not the last
    iterate: Adam's first steps move every parameter by ~``step_mm`` whatever the gradient's
    size, and where the images constrain a direction weakly (a short slab along z, a nearly
    uniform trunk) that walk can leave the basin and settle on a worse optimum. Measured on a
    development pair (default seed 17, ABL-001 2025-10-15): from a start ~0.5 mm from the
    truth the rigid stage ended 30 mm off along z with a worse metric (-0.65 vs -0.98), the
    affine stage squeezed z by 0.665. The samples are fixed per level, so the loss is
    deterministic and the comparison fair.
    """
    opt = torch.optim.Adam(params, lr=step_mm)
    recent: list[float] = []
    best_loss, best_it, best = math.inf, 0, [p.detach().clone() for p in params]
    n, why, converged = iterations, "iteration cap", False
    for it in range(1, iterations + 1):
        lr = step_mm * (_LR_FLOOR + (1 - _LR_FLOOR) * 0.5 * (1 + math.cos(math.pi * (it - 1) / iterations)))
        for group in opt.param_groups:
            group["lr"] = lr
        before = [p.detach().clone() for p in params]
        opt.zero_grad(set_to_none=True)
        loss = loss_fn()
        if not torch.isfinite(loss):
            raise RuntimeError("torch backend: the metric is not finite")
        value = float(loss.detach())
        if value < best_loss:  # the loss of ``before``, the parameters of iteration it - 1
            best_loss, best_it, best = value, it - 1, before
        loss.backward()
        opt.step()
        recent.append(step_size_fn(before))
        if len(recent) >= _STOP_WINDOW and float(np.mean(recent[-_STOP_WINDOW:])) < _STOP_STEP_MM:
            n, why, converged = it, f"mean step < {_STOP_STEP_MM} mm over {_STOP_WINDOW} iterations", True
            break
    with torch.no_grad():
        last = loss_fn()
        if not (torch.isfinite(last) and float(last) <= best_loss):
            for p, b in zip(params, best):
                p.copy_(b)
            why += f"; kept iteration {best_it} (lowest metric, {best_loss:.4f} < {float(last):.4f})"
    return n, why, converged


def _body_radius_mm(level: _Level) -> float:
    pts = level.fixed_pts
    return float(max(10.0, torch.sqrt(((pts - pts.mean(0)) ** 2).sum(1)).mean()))


def _control_grid(fixed: sitk.Image, spacing_mm: float) -> tuple[tuple[int, int, int], np.ndarray]:
    """Control-point counts per axis (i, j, k) covering ``fixed``'s extent, and the LPS ->
    control-grid normalised coordinates matrix (4x4)."""
    extent = (np.array(fixed.GetSize()) - 1) * np.array(fixed.GetSpacing())
    counts = tuple(int(max(3, math.ceil(e / spacing_mm) + 1)) for e in extent)
    lps_to_norm = _index_to_normalised(fixed.GetSize()) @ np.linalg.inv(voxel_to_lps(fixed))
    return counts, lps_to_norm


class _FieldModel(torch.nn.Module):
    """Displacement ``u(x)`` (mm, LPS) trilinearly interpolated from a coarse control grid."""

    def __init__(self, fixed: sitk.Image, spacing_mm: float, device: torch.device):
        super().__init__()
        counts, lps_to_norm = _control_grid(fixed, spacing_mm)
        self.spacing = float(spacing_mm)
        self.lps_to_norm = torch.tensor(lps_to_norm, dtype=torch.float32, device=device)
        # (1, 3, k, j, i): the three LPS components on the control grid.
        self.ctrl = torch.nn.Parameter(torch.zeros(1, 3, counts[2], counts[1], counts[0], device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = x.float() @ self.lps_to_norm[:3, :3].T + self.lps_to_norm[:3, 3]
        u = F.grid_sample(self.ctrl, g.view(1, 1, 1, -1, 3), mode="bilinear", padding_mode="border",
                          align_corners=True)
        return u.view(3, -1).T.to(x.dtype)

    def smoothness(self) -> torch.Tensor:
        """Diffusion energy: mean squared displacement gradient (mm/mm)^2 between control points.

        Forward differences written out (three lines) rather than MONAI's DiffusionLoss, which
        costs ~0.1 s per call on this small grid through its generic gradient code."""
        c = self.ctrl / self.spacing
        return sum(((c.diff(dim=d)) ** 2).mean() for d in (2, 3, 4))

    def as_sitk(self, fixed: sitk.Image) -> sitk.DisplacementFieldTransform:
        """The field sampled on a ~4 mm copy of the fixed grid (same origin and direction)."""
        ref = coarse_grid_like(fixed, _FIELD_OUTPUT_SPACING_MM)
        k, j, i = np.meshgrid(*[np.arange(n) for n in ref.GetSize()[::-1]], indexing="ij")
        ijk1 = np.stack([i.ravel(), j.ravel(), k.ravel(), np.ones(i.size)], axis=1)
        pts = (ijk1 @ voxel_to_lps(ref).T)[:, :3]
        with torch.no_grad():
            u = self(torch.tensor(pts, dtype=torch.float32, device=self.ctrl.device)).cpu().numpy()
        field = sitk.GetImageFromArray(u.reshape(*ref.GetSize()[::-1], 3).astype(np.float64), isVector=True)
        field.CopyInformation(ref)
        return sitk.DisplacementFieldTransform(field)


def compose_affine_and_field(affine: sitk.Transform, field: sitk.DisplacementFieldTransform) -> sitk.CompositeTransform:
    """``x -> affine(x + u(x))``: the field (fixed space) acts first, then the affine."""
    return sitk.CompositeTransform([affine, field])


def register_torch(fixed: sitk.Image, moving: sitk.Image, metric_mask: sitk.Image, initial: sitk.Transform,
                   stage: RegistrationStageConfig, max_step_mm: float, threads: int,
                   device: str = "cpu") -> BackendResult:
    """Backend entry point (same contract as ``sitk_backend.register_simpleitk``).

    Runs ``stage.transforms`` (rigid, affine) from ``initial`` over the stage's pyramid, then the
    displacement field when ``stage.deformable == "field"``. ``device``: ``"cpu"`` or ``"cuda"``
    (resolved by the caller with ``pipeline.core.devices.resolve_device``). Raises RuntimeError on a
    failed optimisation (the driver catches it and fails the QC).
    """
    dev = torch.device(device)
    if dev.type != "cpu":
        return _register(fixed, moving, metric_mask, initial, stage, max_step_mm, threads, dev)
    # One intra-op thread: the tensors are small (~10^4 points), and on a shared 2-core machine
    # torch's thread pool spends more time synchronising than computing (measured: ~10x slower
    # per iteration with 2 threads under load). Only for this call: the count is the thread's,
    # and the network that runs next on it needs its own (until 0.3.3 it kept this one).
    with torch_threads(1):
        return _register(fixed, moving, metric_mask, initial, stage, max_step_mm, threads, dev)


def _register(fixed: sitk.Image, moving: sitk.Image, metric_mask: sitk.Image, initial: sitk.Transform,
              stage: RegistrationStageConfig, max_step_mm: float, threads: int, dev: torch.device) -> BackendResult:
    levels = list(zip(stage.shrink_factors, stage.smoothing_sigmas_mm)) or [(1, 0.0)]
    mask_frac = float((sitk.GetArrayFromImage(metric_mask) > 0).mean())
    pyramid = []
    for shrink, sigma in levels:
        f_img = pyramid_image(fixed, shrink, sigma, threads)
        m_img = pyramid_image(moving, shrink, sigma, threads)
        pyramid.append(_level(f_img, m_img, metric_mask, sampling_fraction(f_img, mask_frac, stage.sampling_fraction),
                              shrink, dev))
    metrics = [MattesMI(level.fixed_vals, level.moving) for level in pyramid]
    radius = _body_radius_mm(pyramid[-1])
    finest = min(fixed.GetSpacing())
    matrix, centre, translation = _affine_parts(initial)
    model: _AffineModel | None = None
    iterations, converged, stops = 0, False, []
    t0 = time.perf_counter()
    for kind in stage.transforms:
        if model is not None:
            with torch.no_grad():
                matrix, translation = model.matrix().cpu().numpy(), model.t.detach().cpu().numpy()
        model = _AffineModel(matrix, centre, translation, kind, radius, dev)
        params = list(model.parameters())
        levels_of_kind = list(zip(pyramid, metrics))
        if kind == "rigid" and kind != stage.transforms[-1]:
            # A rigid stage an affine follows runs on the coarsest level only: the affine refines
            # it on every level anyway (held-out seed 2026: same TRE, ~1.7 s less a pair).
            levels_of_kind = levels_of_kind[:1]
        for level, metric in levels_of_kind:
            step = min(max_step_mm, max(0.5, 0.5 * level.shrink * finest)) if iterations else max_step_mm

            def loss_fn(level=level, metric=metric):
                vals, inside = _sample_moving(level, model(level.fixed_pts))
                return metric(level.fixed_vals, vals, inside)

            def step_size(before):
                # Largest-parameter change in scaled units ~ mm of body-point motion.
                return float(max((p.detach() - b).abs().max() for p, b in zip(params, before)))

            n, why, converged = adam_keeping_best(params, loss_fn, step, int(stage.iterations), step_size)
            iterations += n
            stops.append(f"{kind}@x{level.shrink}: {why} ({n} it)")
    if model is None:
        raise RuntimeError("torch backend: the stage lists no transform")
    affine = model.as_sitk()
    if stage.deformable == "field":
        field = _FieldModel(fixed, stage.deformable_grid_spacing_mm, dev)
        model.requires_grad_(False)
        level = pyramid[-1]

        def field_loss():
            x = level.fixed_pts
            vals, inside = _sample_moving(level, model(x + field(x)))
            return metrics[-1](level.fixed_vals, vals, inside) + _FIELD_SMOOTHNESS * field.smoothness()

        def field_step(before):
            return float((field.ctrl.detach() - before[0]).abs().max())

        n, why, converged = adam_keeping_best([field.ctrl], field_loss, _FIELD_STEP_MM,
                                              int(stage.deformable_iterations), field_step)
        iterations += n
        stops.append(f"field@x{level.shrink}: {why} ({n} it)")
        tx: sitk.Transform = compose_affine_and_field(affine, field.as_sitk(fixed))
    else:
        tx = affine
    stops.append(f"device={dev.type}, {time.perf_counter() - t0:.2f} s")
    return BackendResult(tx, iterations, "; ".join(stops), converged)


__all__ = ["MattesMI", "adam_keeping_best", "compose_affine_and_field", "register_torch", "voxel_to_lps"]
