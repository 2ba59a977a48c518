"""Both registration backends (SimpleITK, PyTorch) behind one interface, the new QC figures
(inverse-consistency residual, Jacobian of deformable transforms) and the transform files.

Small synthetic volumes (3.2 mm pixels) so that the PyTorch backend runs in seconds on a CPU;
the phantom and helpers are those of tests/test_registration.py (truth in physical space).
"""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from pydantic import ValidationError

from pipeline.core.config import RegistrationConfig, load_config
from pipeline.imaging.registration import (
    compose_with_field,
    deformable_as_field,
    inverse_consistency_residual_mm,
    jacobian_determinant_range,
    register_intra_study,
    register_to_baseline,
    split_affine_and_deformable,
)
from pipeline.imaging.registration.torch_backend import MattesMI, adam_keeping_best, voxel_to_lps
from tests.test_registration import Phantom, _rot, body_points, euler, make_grid, render, tre_mm

SMALL_SIZE, SMALL_SPACING = (64, 64, 24), (3.2, 3.2, 4.5)
TRUE = euler((3.0, -2.5, 2.0), (6.0, -5.0, 5.0), centre=(3.0, -2.0, 1.0))


def _cfg(backend: str, deformable: str = "none", deformable_iterations: int | None = None) -> RegistrationConfig:
    reg = load_config().registration
    # The backend under test runs both stages, without N4 unless a test asks for it.
    inter = {"deformable": deformable, "backend": None, "bias_correction": "none", "transforms": ["rigid", "affine"]}
    if deformable_iterations is not None:  # fewer iterations keep the CPU test short
        inter["deformable_iterations"] = deformable_iterations
    return reg.model_copy(update={
        "backend": backend, "device": "cpu", "inter_study": reg.inter_study.model_copy(update=inter)})


@pytest.fixture(scope="module")
def phantom():
    return Phantom(seed=0)


@pytest.fixture(scope="module")
def small_baseline(phantom):
    return render(phantom, make_grid(SMALL_SIZE, SMALL_SPACING), noise=0.02, seed=1)


@pytest.fixture(scope="module")
def small_followup(phantom):
    # Oblique (10 deg about LR), other spacing and FOV centre, other intensity scale.
    grid = make_grid((70, 70, 22), (3.0, 3.0, 5.0), _rot(10.0, 0.0, 0.0), centre=(4.0, -3.0, 5.0))
    return render(phantom, grid, TRUE, scale=1.7, noise=0.025, seed=2)


@pytest.fixture(scope="module")
def inter_results(small_baseline, small_followup):
    return {b: register_to_baseline(small_baseline, small_followup, _cfg(b)) for b in ("simpleitk", "torch")}


# --------------------------------------------------------------------------- geometry
def test_voxel_to_lps_keeps_direction():
    img = make_grid((20, 30, 10), (1.5, 2.0, 3.0), _rot(15.0, -20.0, 30.0) @ np.diag([-1.0, 1.0, -1.0]),
                    centre=(10.0, -5.0, 40.0))
    m = voxel_to_lps(img)
    for idx in ([0, 0, 0], [19, 0, 9], [3.5, 17.25, 6.0]):
        expected = img.TransformContinuousIndexToPhysicalPoint(idx)
        assert np.allclose(m @ np.r_[idx, 1.0], np.r_[expected, 1.0], atol=1e-9)


def test_optimiser_never_returns_worse_than_its_start():
    """Adam's first steps move a parameter by the learning rate whatever the gradient's size:
    from the bottom of a narrow well (the right pose) beside a wide, shallower one (a wrong
    pose, as a short slab along z offers), it walks out and settles in the wide one. The
    optimiser must hand back the lowest loss it saw (issue 15: a follow-up 30 mm off along z)."""
    import torch

    def loss_fn():
        x = p[0]
        return -torch.exp(-x ** 2 / (2 * 0.3 ** 2)) - 0.5 * torch.exp(-(x - 10.0) ** 2 / (2 * 4.0 ** 2))

    p = torch.nn.Parameter(torch.tensor([0.0]))
    before = float(loss_fn())
    _, why, _ = adam_keeping_best([p], loss_fn, 2.0, 100, lambda b: float((p.detach() - b[0]).abs().max()))
    with torch.no_grad():
        assert float(loss_fn()) <= before
    assert abs(float(p)) < 0.3 and "kept iteration 0" in why
    # The walk itself does leave the well (what the test guards against).
    q = torch.nn.Parameter(torch.tensor([0.0]))
    opt = torch.optim.Adam([q], lr=2.0)
    for _ in range(20):
        opt.zero_grad()
        x = q[0]
        (-torch.exp(-x ** 2 / 0.18) - 0.5 * torch.exp(-(x - 10.0) ** 2 / 32.0)).backward()
        opt.step()
    assert float(q) > 2.0


def test_mattes_mi_is_the_histogram_of_the_cubic_bspline_window():
    # Reference: every sample's window evaluated on every bin (the kernel's definition, dense),
    # against the metric's four closed-form weights; the value and its gradient must agree.
    import torch

    rng = np.random.default_rng(5)
    fixed = torch.tensor(rng.normal(100.0, 30.0, 4000), dtype=torch.float32)
    moving_image = torch.tensor(rng.normal(300.0, 90.0, (1, 1, 8, 16, 16)), dtype=torch.float32)
    moving = (0.5 * fixed * 3 + torch.tensor(rng.normal(0.0, 40.0, 4000), dtype=torch.float32)).requires_grad_()
    inside = torch.ones(4000, dtype=torch.bool)
    inside[:200] = False
    metric = MattesMI(fixed, moving_image)
    value = metric(fixed, moving, inside)
    (grad,) = torch.autograd.grad(value, moving)

    nb, pad = metric.bins, metric._PAD
    ref_moving = moving.detach().clone().requires_grad_()
    f, m = fixed[inside], ref_moving[inside]
    fb = ((f - metric.f_lo) / metric.f_step + pad).round().clamp(pad, nb - pad - 1).long()
    mpos = ((m - metric.m_lo) / metric.m_step + pad).clamp(pad, nb - pad - 1)
    a = (mpos[:, None] - torch.arange(nb, dtype=torch.float32)[None, :]).abs()
    window = torch.where(a < 1, (4 - 6 * a ** 2 + 3 * a ** 3) / 6, torch.where(a < 2, (2 - a) ** 3 / 6, 0 * a))
    joint = torch.zeros(nb, nb).index_add(0, fb, window)
    p = joint / joint.sum()
    pf, pm = p.sum(1, keepdim=True), p.sum(0, keepdim=True)
    reference = -(p * (torch.log(p + 1e-12) - torch.log(pf + 1e-12) - torch.log(pm + 1e-12))).sum()
    (ref_grad,) = torch.autograd.grad(reference, ref_moving)
    assert float(reference) < -0.1  # the pair is related: a real histogram, not a flat one
    assert abs(float(value) - float(reference)) < 1e-5
    assert torch.allclose(grad, ref_grad, rtol=1e-3, atol=1e-7 * float(ref_grad.abs().max()))
    assert float(grad[:200].abs().max()) == 0.0  # samples outside the moving image do not count


# --------------------------------------------------------------------------- both backends
@pytest.mark.parametrize("backend", ["simpleitk", "torch"])
def test_inter_study_each_backend(inter_results, small_baseline, backend):
    tx, qc = inter_results[backend]
    tre = tre_mm(tx, TRUE, body_points(small_baseline, 20))
    print(f"\n{backend}: TRE mean {tre.mean():.2f} max {tre.max():.2f} mm; {qc.seconds} s; {qc.stop_condition}")
    assert qc.ok, qc.reason
    assert qc.method.startswith(f"{backend}:rigid")
    assert qc.metric_after < qc.metric_before
    assert qc.ncc_after is not None and qc.ncc_before is not None and qc.ncc_after > qc.ncc_before
    assert tre.mean() <= 1.2 and tre.max() <= 2.0  # 3.2 mm pixels: well under half a voxel


def test_backends_agree(inter_results, small_baseline):
    pts = body_points(small_baseline, 20)
    a = np.array([inter_results["simpleitk"][0].TransformPoint(p) for p in pts])
    b = np.array([inter_results["torch"][0].TransformPoint(p) for p in pts])
    gap = np.linalg.norm(a - b, axis=1)
    print(f"\nbackends differ by {gap.mean():.2f} mm mean, {gap.max():.2f} max")
    assert gap.mean() <= 1.0 and gap.max() <= 2.0


def test_torch_intra_study_residual(phantom, small_baseline):
    true = euler((1.0, -1.5, 0.8), (1.5, -2.0, 1.2))
    post = render(phantom, make_grid(SMALL_SIZE, SMALL_SPACING), true, scale=1.3, noise=0.02, seed=3)
    cfg = _cfg("torch")
    # Both residual estimates: inverse consistency (the default) and the peak test (selectable).
    cfg = cfg.model_copy(update={"intra_study": cfg.intra_study.model_copy(
        update={"max_residual_mm": 2.0, "max_peak_offset_mm": 2.0})})
    tx, qc = register_intra_study(small_baseline, post, cfg)
    err = tre_mm(tx, true, body_points(small_baseline, 20))
    print(f"\ntorch intra: error mean {err.mean():.2f} mm; residual {qc.residual_mm} mm; peak {qc.peak_offset_mm} mm; "
          f"{qc.stop_condition}")
    assert qc.ok, qc.reason
    assert isinstance(tx, sitk.Euler3DTransform)
    assert err.mean() <= 0.8
    assert qc.residual_mm is not None and 0.0 <= qc.residual_mm < 1.0
    assert qc.peak_offset_mm is not None and qc.peak_offset_mm <= cfg.intra_study.max_peak_offset_mm


def test_torch_registers_on_one_thread_and_gives_the_count_back(small_baseline, small_followup, monkeypatch):
    # The count is the calling thread's and the network runs next on the same thread: until
    # 0.3.3 the registration left it at 1, so every later network ran on one thread.
    import torch

    import pipeline.imaging.registration.torch_backend as torch_backend

    seen = []
    inner = torch_backend._register
    monkeypatch.setattr(torch_backend, "_register", lambda *a: seen.append(torch.get_num_threads()) or inner(*a))
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        register_to_baseline(small_baseline, small_followup, _cfg("torch"))
        assert seen and set(seen) == {1}
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


def test_torch_wrong_patient_flagged(small_baseline):
    other = Phantom(seed=11, semi_axes=(92.0, 75.0))  # nearly the same outline, other anatomy
    wrong = render(other, make_grid((70, 70, 22), (3.0, 3.0, 5.0)), scale=1.5, noise=0.02, seed=4)
    tx, qc = register_to_baseline(small_baseline, wrong, _cfg("torch"))
    print(f"\ntorch wrong patient: {qc.reason}")
    assert not qc.ok and qc.reason
    assert np.allclose(tx.TransformPoint((10.0, 20.0, 30.0)), (10.0, 20.0, 30.0))


def test_torch_deformable_field(small_baseline, small_followup, inter_results, tmp_path):
    tx, qc = register_to_baseline(small_baseline, small_followup, _cfg("torch", "field", 30))
    pts = body_points(small_baseline, 20)
    tre = tre_mm(tx, TRUE, pts)
    affine_tre = tre_mm(inter_results["torch"][0], TRUE, pts)
    print(f"\ntorch+field: TRE mean {tre.mean():.2f} (affine {affine_tre.mean():.2f}); "
          f"jacobian {qc.jacobian_min}..{qc.jacobian_max}; {qc.stop_condition}")
    assert qc.ok, qc.reason
    assert qc.method == "torch:rigid+affine+field"
    assert tx.GetName() == "CompositeTransform"
    # The truth is rigid here: the field must stay small and smooth, never fold.
    assert 0.8 < qc.jacobian_min <= qc.jacobian_max < 1.25
    assert qc.deformation_max_mm is not None and qc.deformation_max_mm < 5.0
    assert tre.mean() <= affine_tre.mean() + 0.3
    # Files: the affine goes in the .tfm, the field in a NIfTI vector image; read back equal.
    affine, deformable = split_affine_and_deformable(tx)
    assert affine.GetName() == "AffineTransform" and deformable is not None
    sitk.WriteTransform(affine, str(tmp_path / "to_baseline.tfm"))
    sitk.WriteImage(deformable_as_field(deformable, small_baseline), str(tmp_path / "to_baseline_field.nii.gz"))
    back = compose_with_field(sitk.ReadTransform(str(tmp_path / "to_baseline.tfm")),
                              sitk.ReadImage(str(tmp_path / "to_baseline_field.nii.gz")))
    for p in pts[:5]:
        assert np.allclose(back.TransformPoint(p), tx.TransformPoint(p), atol=1e-3)


def test_deformation_bound(small_baseline):
    """deformation_max_mm measures the deformable part alone (not the affine); a field larger
    than registration.<stage>.max_deformation_mm fails QC (checked in checks.quality)."""
    from pipeline.core.geometry import body_mask
    from pipeline.imaging.registration import deformation_max_mm
    from pipeline.imaging.registration.common import coarse_grid_like

    body = body_mask(small_baseline)
    ref = coarse_grid_like(small_baseline, 4.0)
    u = np.zeros((*ref.GetSize()[::-1], 3))
    u[..., 0] = 3.0  # 3 mm along L everywhere
    field = sitk.GetImageFromArray(u, isVector=True)
    field.CopyInformation(ref)
    shift = sitk.TranslationTransform(3, (20.0, 0.0, 0.0))
    tx = compose_with_field(shift, field)
    assert deformation_max_mm(tx, body) == pytest.approx(3.0, abs=1e-6)
    assert deformation_max_mm(shift, body) == 0.0


def test_too_large_deformation_is_not_used(small_baseline, small_followup):
    """With a bound below any field the optimiser returns, the deformable chain fails QC and the
    driver falls back to the chain's rigid stage alone; the field is never used."""
    reg = _cfg("torch", "field", 10)
    reg = reg.model_copy(update={"inter_study": reg.inter_study.model_copy(update={"max_deformation_mm": 1e-4})})
    tx, qc = register_to_baseline(small_baseline, small_followup, reg)
    assert qc.ok and qc.method == "torch:rigid", (qc.method, qc.reason)
    assert tx.GetName() != "CompositeTransform"


def test_inconsistent_round_trip_fails_qc(phantom, small_baseline, monkeypatch):
    """Rule 5: a phase whose residual misregistration exceeds max_residual_mm is not used."""
    import pipeline.imaging.registration.checks as checks

    true = euler((0.5, -0.5, 0.5), (1.0, -1.0, 0.5))
    post = render(phantom, make_grid(SMALL_SIZE, SMALL_SPACING), true, scale=1.2, noise=0.02, seed=7)
    cfg = _cfg("simpleitk")
    cfg = cfg.model_copy(update={"intra_study": cfg.intra_study.model_copy(update={"max_residual_mm": 2.0})})
    # The measured residual of this pair is ~0.1-0.4 mm (test_torch_intra_study_residual checks a
    # real one); here the round trip is made to read 2.6 mm to check the policy.
    # Patched where check_inverse_consistency looks it up (checks imports it from transforms).
    monkeypatch.setattr(checks, "inverse_consistency_residual_mm", lambda *a: 2.6)
    tx, qc = register_intra_study(small_baseline, post, cfg)
    assert not qc.ok and "inverse-consistency residual 2.60 mm > 2.0 mm" in qc.reason
    assert qc.residual_mm == pytest.approx(2.6)
    assert np.allclose(tx.TransformPoint((10.0, 20.0, 30.0)), (10.0, 20.0, 30.0))  # identity: not used


# --------------------------------------------------------------------------- QC helpers
def test_jacobian_of_scaling_and_folding():
    ref = make_grid((30, 30, 12), (4.0, 4.0, 5.0), _rot(20.0, 0.0, 10.0))
    body = sitk.Cast(ref * 0 + 1, sitk.sitkUInt8)
    aff = sitk.AffineTransform(3)
    aff.SetMatrix(np.diag([1.1, 1.0, 0.9]).ravel().tolist())
    lo, hi = jacobian_determinant_range(aff, body)
    assert lo == pytest.approx(0.99, abs=1e-6) and hi == pytest.approx(0.99, abs=1e-6)
    # A field that reverses the LR axis locally (u_x = -2.5 x inside a slab) folds: det < 0.
    pts = np.array([ref.TransformIndexToPhysicalPoint([i, j, k]) for k in range(12) for j in range(30)
                    for i in range(30)])
    u = np.zeros_like(pts)
    u[:, 0] = np.where(np.abs(pts[:, 0]) < 20, -2.5 * pts[:, 0], 0.0)
    field = sitk.GetImageFromArray(u.reshape(12, 30, 30, 3), isVector=True)
    field.CopyInformation(ref)
    lo, _ = jacobian_determinant_range(sitk.DisplacementFieldTransform(field), body)
    assert lo < 0


def test_inverse_consistency_residual():
    body = sitk.Image([20, 20, 10], sitk.sitkUInt8) + 1
    fwd = euler((2.0, -1.0, 3.0), (4.0, -2.0, 1.0), centre=(5.0, 5.0, 2.0))
    assert inverse_consistency_residual_mm(fwd, fwd.GetInverse(), body) == pytest.approx(0.0, abs=1e-6)
    off = sitk.CompositeTransform([sitk.TranslationTransform(3, (1.5, 0.0, 2.0)), fwd.GetInverse()])
    assert inverse_consistency_residual_mm(fwd, off, body) == pytest.approx(2.5, abs=1e-6)


def test_config_backend_and_deformable_validated():
    raw = load_config().registration.model_dump()
    assert RegistrationConfig.model_validate({**raw, "backend": "torch"}).backend == "torch"
    with pytest.raises(ValidationError):
        RegistrationConfig.model_validate({**raw, "backend": "itk"})
    torch_bspline = {**raw, "backend": "torch", "inter_study": {**raw["inter_study"], "deformable": "bspline"}}
    with pytest.raises(ValidationError, match="not available with backend 'torch'"):
        RegistrationConfig.model_validate(torch_bspline)
    with pytest.raises(ValidationError):
        RegistrationConfig.model_validate({**raw, "inter_study": {**raw["inter_study"], "deformable": "syn"}})


def test_stage_backend_overrides_the_default(small_baseline, small_followup):
    """registration.inter_study.backend picks that stage's backend; the validator checks the
    deformable kind against the stage's effective backend, not registration.backend."""
    raw = load_config().registration.model_dump()
    mixed = {**raw, "backend": "simpleitk", "intra_study": {**raw["intra_study"], "backend": None},
             "inter_study": {**raw["inter_study"], "backend": "torch", "deformable": "field"}}
    cfg = RegistrationConfig.model_validate({**mixed, "device": "cpu"})
    assert cfg.backend_of(cfg.inter_study) == "torch" and cfg.backend_of(cfg.intra_study) == "simpleitk"
    with pytest.raises(ValidationError, match="not available with backend 'simpleitk'"):
        RegistrationConfig.model_validate({**mixed, "inter_study": {**mixed["inter_study"], "backend": "simpleitk"}})
    cfg = cfg.model_copy(update={"inter_study": cfg.inter_study.model_copy(update={"deformable": "none"})})
    tx, qc = register_to_baseline(small_baseline, small_followup, cfg)
    assert qc.ok and qc.method.startswith("torch:"), (qc.method, qc.reason)


def test_unavailable_cuda_fails_cleanly(small_baseline, small_followup, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = _cfg("torch").model_copy(update={"device": "cuda"})
    tx, qc = register_to_baseline(small_baseline, small_followup, cfg)
    assert not qc.ok and "cuda" in qc.reason.lower()


def test_simpleitk_bspline_stage(small_baseline, small_followup, inter_results):
    cfg = _cfg("simpleitk", "bspline", 8)
    tx, qc = register_to_baseline(small_baseline, small_followup, cfg)
    pts = body_points(small_baseline, 20)
    tre = tre_mm(tx, TRUE, pts)
    print(f"\nsimpleitk+bspline: TRE mean {tre.mean():.2f}; jacobian {qc.jacobian_min}..{qc.jacobian_max}; "
          f"{qc.stop_condition}")
    assert qc.ok, qc.reason
    assert qc.method == "simpleitk:rigid+affine+bspline" and tx.GetName() == "CompositeTransform"
    assert 0.7 < qc.jacobian_min <= qc.jacobian_max < 1.4
    assert tre.mean() <= 1.5
    # The inverse (used to bring the baseline onto the follow-up grid) undoes it.
    from pipeline.imaging.registration import invert_registration

    inv = invert_registration(tx)
    back = np.array([inv.TransformPoint(tx.TransformPoint(p)) for p in pts])
    assert np.linalg.norm(back - pts, axis=1).max() < 0.2


def test_temporal_difference_on_followup_grid():
    from pipeline.imaging.subtraction import temporal_difference

    def volume(grid, scale, blob_gain, move=None):
        pts = np.array([grid.TransformIndexToPhysicalPoint([i, j, k]) for k in range(grid.GetSize()[2])
                        for j in range(grid.GetSize()[1]) for i in range(grid.GetSize()[0])])
        anat = pts if move is None else np.array([move.GetInverse().TransformPoint(p) for p in pts])
        body = ((anat[:, 0] / 70.0) ** 2 + (anat[:, 1] / 55.0) ** 2) < 1.0
        blob = ((anat - [15.0, -10.0, 0.0]) ** 2).sum(axis=1) < 12.0 ** 2
        pre = np.where(body, 100.0 * scale, 0.0)
        sub = np.where(blob, blob_gain * 100.0 * scale, 0.0)
        shape = grid.GetSize()[::-1]
        out = []
        for a in (sub, pre):
            img = sitk.GetImageFromArray(a.reshape(shape).astype(np.float32))
            img.CopyInformation(grid)
            out.append(img)
        return out

    base_grid = make_grid((48, 48, 12), (3.5, 3.5, 5.0))
    fu_grid = make_grid((52, 52, 12), (3.2, 3.2, 5.0), _rot(0.0, 0.0, 8.0), centre=(5.0, -4.0, 2.0))
    move = euler((0.0, 0.0, 6.0), (5.0, -4.0, 2.0))  # baseline point -> follow-up point
    base_sub, base_pre = volume(base_grid, 1.0, 0.3)
    fu_sub, fu_pre = volume(fu_grid, 2.0, 0.8, move)  # other intensity scale, blob enhances more
    diff = temporal_difference(fu_sub, fu_pre, base_sub, base_pre, move)
    assert diff.GetSize() == fu_grid.GetSize() and diff.GetDirection() == fu_grid.GetDirection()
    arr = sitk.GetArrayFromImage(diff)
    blob_centre = fu_grid.TransformPhysicalPointToIndex(move.TransformPoint((15.0, -10.0, 0.0)))
    k, j, i = blob_centre[::-1]
    assert arr[k, j, i] == pytest.approx(0.5, abs=0.05)  # 0.8 - 0.3 of the typical tissue signal
    # Away from the blob both studies agree: no difference.
    far = fu_grid.TransformPhysicalPointToIndex(move.TransformPoint((-40.0, 20.0, 0.0)))
    assert abs(arr[far[2], far[1], far[0]]) < 1e-3
    # The caller's inverse (the pipeline inverts once per follow-up) gives the same difference.
    given = temporal_difference(fu_sub, fu_pre, base_sub, base_pre, move, move.GetInverse())
    assert np.array_equal(sitk.GetArrayFromImage(given), arr)
    # ... and it is the one used: a wrong inverse (the identity) gives another difference.
    wrong = temporal_difference(fu_sub, fu_pre, base_sub, base_pre, move, sitk.Euler3DTransform())
    assert not np.allclose(sitk.GetArrayFromImage(wrong), arr, atol=1e-3)
    # The callers' body masks (a baseline's is shared by its follow-ups) give the same difference...
    from pipeline.core.geometry import body_mask
    shared = temporal_difference(fu_sub, fu_pre, base_sub, base_pre, move, None, body_mask(fu_pre), body_mask(base_pre))
    assert np.array_equal(sitk.GetArrayFromImage(shared), arr)
    # ... and they are the ones read: a follow-up body without the columns of the blob zeroes it there.
    cut_body = sitk.GetArrayFromImage(body_mask(fu_pre))
    cut_body[:, :, i - 3:i + 4] = 0
    cut_img = sitk.GetImageFromArray(cut_body)
    cut_img.CopyInformation(fu_pre)
    cut = sitk.GetArrayFromImage(temporal_difference(fu_sub, fu_pre, base_sub, base_pre, move, None, cut_img))
    assert cut[k, j, i] == 0.0 and not cut[cut_body == 0].any()
    assert np.array_equal(cut[cut_body > 0], arr[cut_body > 0])  # the same tissue median elsewhere
    with pytest.raises(ValueError, match="followup pre, body"):
        temporal_difference(fu_sub, fu_pre, base_sub, base_pre, move, None, body_mask(base_pre))


def test_a_study_computes_its_body_mask_once(monkeypatch):
    """StudyImages.pre_body: the temporal difference and the comparison with the baseline read a
    baseline's body mask for each of its follow-ups; it is computed on first use only."""
    from pipeline.measurement import study as study_module

    grid = make_grid((24, 24, 6), (3.0, 3.0, 5.0))
    pre = sitk.Image(grid.GetSize(), sitk.sitkFloat32)
    pre.CopyInformation(grid)
    pre = sitk.Add(pre, 100.0)
    images = study_module.StudyImages(post=pre, pre_registered=pre, subtraction=pre, labels=pre)
    calls = []
    real = study_module.body_mask
    monkeypatch.setattr(study_module, "body_mask", lambda image: calls.append(image) or real(image))
    first = images.pre_body()
    assert images.pre_body() is first and len(calls) == 1 and calls[0] is pre


def test_n4_bias_correction_removes_a_smooth_bias(small_baseline):
    """A known smooth multiplicative bias is mostly removed: the corrected / true ratio is flat."""
    from pipeline.core.geometry import body_mask
    from pipeline.imaging.registration.metric import bias_corrected

    body = body_mask(small_baseline)
    arr = sitk.GetArrayFromImage(small_baseline).astype(np.float64)
    k, j, i = np.meshgrid(*[np.arange(n) for n in arr.shape], indexing="ij")
    bias = 1.0 + 0.25 * (i - arr.shape[2] / 2) / arr.shape[2] + 0.15 * (k - arr.shape[0] / 2) / arr.shape[0]
    biased = sitk.GetImageFromArray((arr * bias).astype(np.float32))
    biased.CopyInformation(small_baseline)
    corrected = sitk.GetArrayFromImage(bias_corrected(biased, body, threads=1)).astype(np.float64)
    inside = (sitk.GetArrayFromImage(body) > 0) & (arr > 0.2 * np.median(arr[sitk.GetArrayFromImage(body) > 0]))
    cv = lambda r: float(np.std(r) / np.mean(r))  # noqa: E731
    before, after = cv((arr * bias)[inside] / arr[inside]), cv(corrected[inside] / arr[inside])
    assert after < 0.5 * before, (before, after)


@pytest.mark.parametrize("backend", ["simpleitk", "torch"])
def test_inter_study_with_bias_correction(small_baseline, small_followup, backend):
    reg = _cfg(backend)
    reg = reg.model_copy(update={"inter_study": reg.inter_study.model_copy(update={"bias_correction": "n4"})})
    tx, qc = register_to_baseline(small_baseline, small_followup, reg)
    assert qc.ok, qc.reason
    assert float(np.median(tre_mm(tx, TRUE, body_points(small_baseline)))) < 1.5
