"""Registration on synthetic volumes with a known transform (pipeline/imaging/registration/).

The phantom is analytical in physical space (LPS, mm), so a "moving" study is sampled exactly
under the true transform on any grid (oblique, other spacing) without an interpolation step
that would favour the registration's own interpolator. ITK convention: the true transform
maps a fixed (baseline) point to the moving (follow-up) point, so the moving image at ``y``
shows the anatomy found at ``T^-1(y)``.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from pipeline.core.config import load_config
from pipeline.core.geometry import binary_closing_ball, body_mask, resample_to
from pipeline.imaging.registration import (
    motion_magnitude_mm,
    prepare_baseline,
    register_intra_study,
    register_to_baseline,
)
from pipeline.imaging.registration.checks import MIN_OVERLAP, MIN_ZONE_COVERAGE, PairContext, quality
from pipeline.imaging.registration.common import BackendResult, without_resampling_fill
from pipeline.imaging.registration.metric import (
    evaluate_metric,
    interior_mask,
    metric_mask,
    similarity_peak,
    similarity_peak_offsets_mm,
    similarity_peak_vertex_mm,
    sphere_mask,
)


# --------------------------------------------------------------------------- phantom
def _rot(ax_deg: float, ay_deg: float, az_deg: float) -> np.ndarray:
    ax, ay, az = np.deg2rad([ax_deg, ay_deg, az_deg])
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


class Phantom:
    """Body-like analytical volume: elliptic trunk, fat layer, spine, organs, texture, blobs.

    ``values(points)`` evaluates the signal at (N, 3) LPS points (mm); tissue ~ 200 a.u.
    """

    def __init__(self, seed: int = 0, semi_axes=(95.0, 72.0)):
        rng = np.random.default_rng(seed)
        self.a, self.b = semi_axes
        self.organs = [  # centre (mm), semi-axes (mm), relative signal
            (rng.uniform([-50, -35, -35], [50, 30, 35]), rng.uniform(14, 32, 3), rng.choice([0.5, 0.7, 1.4, 1.7]))
            for _ in range(6)
        ]
        self.texture = [(rng.uniform([-80, -60, -70], [80, 60, 70]), rng.uniform(4, 10), rng.uniform(-0.25, 0.25))
                        for _ in range(90)]
        self.blobs = [(np.array(c, float), 6.0) for c in ([25.0, -10.0, 5.0], [-35.0, 20.0, -20.0], [5.0, 35.0, 25.0])]

    def values(self, p: np.ndarray) -> np.ndarray:
        x, y, z = p[:, 0], p[:, 1], p[:, 2]
        a = self.a * (1 + 0.06 * np.sin(z / 35.0))
        r = np.sqrt((x / a) ** 2 + (y / self.b) ** 2)
        body = 1.0 / (1.0 + np.exp(-(1.0 - r) / 0.01))
        sig = np.ones_like(x)
        sig += 0.5 / (1.0 + np.exp(-(r - 0.9) / 0.01))  # subcutaneous fat (bright on T1)
        spine = ((x / 14.0) ** 2 + ((y - 48.0) / 12.0) ** 2) < 1.0
        sig[spine] = 0.35
        for c, s, v in self.organs:
            inside = (((p - c) / s) ** 2).sum(axis=1) < 1.0
            sig[inside] = v
        for c, s, amp in self.texture:
            d2 = ((p - c) ** 2).sum(axis=1)
            sig += amp * np.exp(-d2 / (2 * s * s))
        for c, rad in self.blobs:
            sig[((p - c) ** 2).sum(axis=1) < rad * rad] = 2.2
        return 200.0 * body * sig


def make_grid(size, spacing, direction=np.eye(3), centre=(0.0, 0.0, 0.0)) -> sitk.Image:
    """Empty float32 image whose centre lies at ``centre`` (LPS, mm)."""
    img = sitk.Image([int(s) for s in size], sitk.sitkFloat32)
    img.SetSpacing([float(s) for s in spacing])
    d = np.asarray(direction, float)
    img.SetDirection(d.ravel().tolist())
    half = (np.array(size) - 1) * np.array(spacing) / 2.0
    img.SetOrigin((np.asarray(centre) - d @ half).tolist())
    return img


def grid_points(img: sitk.Image) -> np.ndarray:
    """(N, 3) LPS points of all voxels, in numpy (k, j, i) order."""
    size = img.GetSize()
    k, j, i = np.meshgrid(*[np.arange(n) for n in size[::-1]], indexing="ij")
    idx = np.stack([i.ravel(), j.ravel(), k.ravel()], axis=1).astype(float)
    d = np.array(img.GetDirection()).reshape(3, 3)
    return np.asarray(img.GetOrigin()) + (idx * np.array(img.GetSpacing())) @ d.T


def render(ph: Phantom, grid: sitk.Image, true_tx: sitk.Transform | None = None, scale=1.0,
           noise=0.0, seed=0, enhance=None) -> sitk.Image:
    """Sample the phantom on ``grid``; with ``true_tx`` (fixed->moving) the anatomy is moved."""
    pts = grid_points(grid)
    if true_tx is not None:
        inv = true_tx.GetInverse()
        pts = np.array([inv.TransformPoint(p) for p in pts]) if not isinstance(true_tx, sitk.Euler3DTransform) \
            else _apply_affine_inverse(true_tx, pts)
    vals = ph.values(pts)
    if enhance is not None:
        vals = enhance(pts, vals)
    arr = (scale * vals).reshape(grid.GetSize()[::-1]).astype(np.float32)
    img = sitk.GetImageFromArray(arr)
    img.CopyInformation(grid)
    img = sitk.SmoothingRecursiveGaussian(img, 0.7)  # partial-volume-like blur
    if noise:
        rng = np.random.default_rng(seed)
        a = sitk.GetArrayFromImage(img)
        a = np.abs(a + rng.normal(0, noise * scale * 200.0, a.shape)).astype(np.float32)  # Rician-ish floor
        out = sitk.GetImageFromArray(a)
        out.CopyInformation(img)
        img = out
    return img


def _apply_affine_inverse(tx: sitk.Euler3DTransform, pts: np.ndarray) -> np.ndarray:
    m = np.array(tx.GetMatrix()).reshape(3, 3)
    c = np.array(tx.GetCenter())
    t = np.array(tx.GetTranslation())
    return (pts - c - t) @ np.linalg.inv(m).T + c


def euler(angles_deg, translation, centre=(0.0, 0.0, 0.0)) -> sitk.Euler3DTransform:
    e = sitk.Euler3DTransform()
    e.SetCenter(centre)
    e.SetRotation(*np.deg2rad(angles_deg))
    e.SetTranslation(translation)
    return e


def tre_mm(found: sitk.Transform, true: sitk.Transform, points: np.ndarray) -> np.ndarray:
    return np.array([np.linalg.norm(np.subtract(found.TransformPoint(p), true.TransformPoint(p)))
                     for p in points])


def body_points(fixed: sitk.Image, n=20, seed=1) -> np.ndarray:
    """``n`` random voxel centres (LPS) inside the body, away from the FOV's first/last slices."""
    m = sitk.GetArrayFromImage(body_mask(fixed))
    m[:4] = 0
    m[-4:] = 0
    idx = np.argwhere(m > 0)
    pick = idx[np.random.default_rng(seed).choice(len(idx), n, replace=False)]
    return np.array([fixed.TransformIndexToPhysicalPoint([int(i), int(j), int(k)]) for k, j, i in pick])


# --------------------------------------------------------------------------- fixtures
FIXED_SIZE, FIXED_SPACING = (128, 128, 36), (1.6, 1.6, 3.0)
TRUE_INTER = euler((4.0, -3.0, 2.5), (8.0, -6.0, 7.0), centre=(3.0, -2.0, 1.0))


@pytest.fixture(scope="module")
def cfg():
    return load_config().registration


@pytest.fixture(scope="module")
def phantom():
    return Phantom(seed=0)


@pytest.fixture(scope="module")
def baseline(phantom):
    return render(phantom, make_grid(FIXED_SIZE, FIXED_SPACING), noise=0.02, seed=1)


@pytest.fixture(scope="module")
def followup(phantom):
    # Oblique grid (12 deg about LR), other spacing, other FOV centre, other intensity scale.
    grid = make_grid((140, 140, 32), (1.45, 1.45, 3.5), _rot(12.0, 0.0, 0.0), centre=(4.0, -3.0, 6.0))
    return render(phantom, grid, TRUE_INTER, scale=1.8, noise=0.025, seed=2)


# --------------------------------------------------------------------------- tests
@pytest.mark.parametrize("radius_xyz", [(2, 2, 1), (3, 1, 2), (1, 1, 1)])
def test_closing_with_itks_ball_is_itks_closing(radius_xyz):
    # Random blobs touching every face of the grid (where SciPy's own closing would erode),
    # thin gaps and holes: the hand-written closing must give ITK's filter's voxels exactly.
    rng = np.random.default_rng(sum(radius_xyz))
    noise = ndimage.gaussian_filter(rng.normal(size=(23, 41, 37)), 2.0)
    mask = noise > np.percentile(noise, 55)
    image = sitk.GetImageFromArray(mask.astype(np.uint8))
    itk = sitk.BinaryMorphologicalClosingImageFilter()
    itk.SetKernelRadius(list(radius_xyz))
    itk.SetKernelType(sitk.sitkBall)
    itk.SetForegroundValue(1)
    expected = sitk.GetArrayFromImage(itk.Execute(image)) > 0
    closed = binary_closing_ball(mask, radius_xyz)
    assert closed.shape == mask.shape and (closed & ~mask).any()
    assert np.array_equal(closed, expected)


def test_body_mask_is_body(baseline):
    m = body_mask(baseline)
    assert m.GetPixelID() == sitk.sitkUInt8
    assert m.GetOrigin() == baseline.GetOrigin() and m.GetDirection() == baseline.GetDirection()
    arr = sitk.GetArrayFromImage(m)
    # Ellipse a(z) x 72 mm per slice (a ~ 95 mm). The mask may be up to ~2 mm generous at the
    # blurred skin edge (perimeter ~530 mm x 2 mm ~ 5 % of the area), never smaller.
    z = np.array([baseline.TransformIndexToPhysicalPoint([0, 0, k])[2] for k in range(arr.shape[0])])
    expected = np.pi * 95.0 * (1 + 0.06 * np.sin(z / 35.0)) * 72.0 / 1.6**2
    ratio = arr.sum(axis=(1, 2)) / expected
    assert np.all((ratio > 0.98) & (ratio < 1.09)), ratio
    # The dark spine and organs are inside the body (hole filling).
    assert arr[18, 64 + int(48 / 1.6), 64] == 1


def test_inter_study_tre(cfg, baseline, followup):
    t0 = time.perf_counter()
    tx, qc = register_to_baseline(baseline, followup, cfg)
    dt = time.perf_counter() - t0
    pts = body_points(baseline, 20)
    tre = tre_mm(tx, TRUE_INTER, pts)
    before = tre_mm(sitk.Euler3DTransform(), TRUE_INTER, pts)
    print(f"\ninter-study: {dt:.2f} s, TRE mean {tre.mean():.2f} max {tre.max():.2f} mm "
          f"(before {before.mean():.1f} mm); {qc.model_dump()}")
    assert qc.ok, qc.reason
    assert qc.metric_after < qc.metric_before
    assert tre.mean() <= 1.0 and tre.max() <= 1.5
    # The follow-up resampled onto the baseline grid keeps the baseline's geometry.
    on_base = resample_to(followup, baseline, tx)
    assert on_base.GetSize() == baseline.GetSize()
    assert np.allclose(on_base.GetOrigin(), baseline.GetOrigin())
    assert np.allclose(on_base.GetSpacing(), baseline.GetSpacing())
    assert np.allclose(on_base.GetDirection(), baseline.GetDirection())


def test_a_prepared_baseline_gives_the_same_registrations(cfg, phantom, baseline, followup):
    """The baseline's side computed once (issue 19) changes no result: the follow-up gets the
    transform and QC it gets without it; a baseline prepared from another image is not used."""
    other = render(phantom, make_grid((150, 150, 30), (1.3, 1.3, 4.0), _rot(0.0, 15.0, 0.0)),
                   euler((-2.0, 1.0, 3.0), (-6.0, 4.0, -5.0)), scale=0.7, noise=0.03, seed=7)
    prepared = prepare_baseline(baseline, cfg)
    points = body_points(baseline, 10)
    plain_tx, plain_qc = register_to_baseline(baseline, followup, cfg)
    assert not prepared.pyramids
    tx, qc = register_to_baseline(baseline, followup, cfg, prepared=prepared)
    assert prepared.pyramids, "the prepared baseline was not used"
    assert plain_qc.ok and qc.ok
    assert np.allclose([tx.TransformPoint(p) for p in points], [plain_tx.TransformPoint(p) for p in points],
                       atol=1e-9)
    same = {"seconds", "stop_condition"}  # both carry the run's own timings
    assert qc.model_dump(exclude=same) == plain_qc.model_dump(exclude=same)
    # A baseline prepared from another image is ignored: the result is still right.
    of_other = prepare_baseline(other, cfg)
    tx, qc = register_to_baseline(baseline, followup, cfg, prepared=of_other)
    assert qc.ok and tre_mm(tx, TRUE_INTER, points).mean() <= 1.0
    assert not of_other.pyramids


def test_inter_study_large_repositioning(cfg, phantom, baseline):
    """Beyond the expected range on every axis (5 deg about each axis, 21 mm), another oblique
    grid (15 deg about AP), 4 mm slices, a lower intensity scale and more noise."""
    true = euler((-5.0, 4.0, -5.0), (-15.0, 10.0, -12.0))
    grid = make_grid((150, 150, 30), (1.3, 1.3, 4.0), _rot(0.0, 15.0, 0.0), centre=(-10.0, 5.0, -12.0))
    moving = render(phantom, grid, true, scale=0.6, noise=0.03, seed=6)
    t0 = time.perf_counter()
    tx, qc = register_to_baseline(baseline, moving, cfg)
    dt = time.perf_counter() - t0
    tre = tre_mm(tx, true, body_points(baseline, 20))
    print(f"\ninter-study large: {dt:.2f} s, TRE mean {tre.mean():.2f} max {tre.max():.2f} mm; "
          f"{qc.stop_condition}")
    assert qc.ok, qc.reason
    assert tre.mean() <= 1.0


def test_intra_study_small_motion(cfg, phantom, baseline):
    true = euler((1.0, -1.5, 0.8), (1.5, -2.0, 1.2), centre=(0.0, 0.0, 0.0))

    def enhance(pts, vals):  # blobs enhance by 80 %, one organ by 30 %: contrast differs
        out = vals.copy()
        for c, rad in phantom.blobs:
            out[((pts - c) ** 2).sum(axis=1) < rad * rad] *= 1.8
        c, s, _ = phantom.organs[0]
        out[(((pts - c) / s) ** 2).sum(axis=1) < 1.0] *= 1.3
        return out

    post = render(phantom, make_grid(FIXED_SIZE, FIXED_SPACING), true, scale=1.3, noise=0.02, seed=3,
                  enhance=enhance)
    t0 = time.perf_counter()
    tx, qc = register_intra_study(baseline, post, cfg)
    dt = time.perf_counter() - t0
    m = body_mask(baseline)
    err = tre_mm(tx, true, body_points(baseline, 20))
    print(f"\nintra-study: {dt:.2f} s, error mean {err.mean():.2f} max {err.max():.2f} mm, "
          f"motion {motion_magnitude_mm(true, m):.2f} mm true / {qc.motion_corrected_mm:.2f} found; "
          f"{qc.model_dump()}")
    assert qc.ok, qc.reason
    assert err.mean() <= 0.7
    assert abs(qc.motion_corrected_mm - motion_magnitude_mm(true, m)) < 0.7


def test_intra_study_pair_whose_enhancement_inverts_the_contrast_passes_on_its_edges(cfg, phantom, baseline):
    """Issue 15 (abdomen development seed 62): organs enhancing strongly pull the intensity NCC of a
    right pre/post pair under 0.35 and the study became indeterminate; the edges still agree."""
    true = euler((1.0, -1.5, 0.8), (1.5, -2.0, 1.2), centre=(0.0, 0.0, 0.0))

    def enhance(pts, vals):  # dark organs enhance x3.5, bright ones darken: contrast inverted
        out = vals.copy()
        for c, s, v in phantom.organs:
            out[(((pts - c) / s) ** 2).sum(axis=1) < 1.0] *= 3.5 if v < 1 else 0.6
        return out

    post = render(phantom, make_grid(FIXED_SIZE, FIXED_SPACING), true, scale=1.3, noise=0.02, seed=3,
                  enhance=enhance)
    tx, qc = register_intra_study(baseline, post, cfg)
    assert qc.ok, qc.reason
    assert tre_mm(tx, true, body_points(baseline, 20)).mean() <= 0.7
    assert float(qc.stop_condition.split("ncc_interior=")[1].split(";")[0]) < cfg.intra_study.min_ncc_after
    # Either edge rule alone passes it: the absolute gradient floor, or (0.3.5) the edges standing
    # above their shifted copies; without both the intensity floor refuses it.
    for update in ({"min_gradient_ncc_after": None}, {"min_gradient_ncc_prominence": None}):
        one = cfg.model_copy(update={"intra_study": cfg.intra_study.model_copy(update=update)})
        assert register_intra_study(baseline, post, one)[1].ok, update
    off = cfg.model_copy(update={"intra_study": cfg.intra_study.model_copy(
        update={"min_gradient_ncc_after": None, "min_gradient_ncc_prominence": None})})
    _, qc_off = register_intra_study(baseline, post, off)
    assert not qc_off.ok and "ncc of the body interior" in qc_off.reason
    assert "gradient_ncc_prominence=" in qc.stop_condition


def test_intra_study_pose_off_by_a_few_mm_fails_rule_5(cfg, phantom, baseline):
    # Rule 5: residual misregistration above 2 mm makes a phase unusable. The residual is
    # estimated by where the pre/post pair's edges agree best: the true pose passes, the same
    # pose 4 mm off along y does not (the enhancement changes the intensities, not the edges).
    # The peak test within a study is selectable (off by default, docs/registration.md).
    stage = cfg.intra_study.model_copy(update={"max_peak_offset_mm": 2.0, "max_residual_mm": None})
    true = euler((1.0, -1.5, 0.8), (1.5, -2.0, 1.2), centre=(0.0, 0.0, 0.0))

    def enhance(pts, vals):
        out = vals.copy()
        for c, rad in phantom.blobs:
            out[((pts - c) ** 2).sum(axis=1) < rad * rad] *= 1.8
        return out

    post = render(phantom, make_grid(FIXED_SIZE, FIXED_SPACING), true, scale=1.3, noise=0.02, seed=3,
                  enhance=enhance)
    fixed_body = body_mask(baseline)
    mask = metric_mask(fixed_body, 1)
    before = evaluate_metric(baseline, post, mask, sitk.Euler3DTransform(), 0.2, 1)
    pair = PairContext(name="post_to_pre", fixed=baseline, moving=post, fixed_body=fixed_body, metric_mask=mask,
                       fixed_eval=baseline, moving_eval=post, eval_frac=0.2, metric_before=before,
                       max_scale_change=None, max_motion_mm=stage.max_motion_mm, threads=1, t0=time.perf_counter())
    _, qc = quality(BackendResult(true, 1, "", True), "truth", stage, "test", pair)
    assert qc.ok and qc.peak_offset_mm <= 1.0, (qc.peak_offset_mm, qc.reason)
    _, qc = quality(BackendResult(_shifted(true, [0, 4.0, 0]), 1, "", True), "truth+4mm", stage, "test", pair)
    assert not qc.ok and "edges agree best" in qc.reason and "along y" in qc.reason, qc.reason


def test_intra_study_pair_of_another_patient_fails_on_its_edges_too(cfg, baseline):
    other = Phantom(seed=7, semi_axes=(92.0, 75.0))
    wrong = render(other, make_grid(FIXED_SIZE, FIXED_SPACING), scale=1.3, noise=0.02, seed=4)
    _, qc = register_intra_study(baseline, wrong, cfg)
    assert not qc.ok, qc.reason
    # The edges disagree: under the absolute floor, and they do not stand above their shifted copies.
    assert f"< {cfg.intra_study.min_gradient_ncc_after};" in qc.reason, qc.reason
    assert f"above its shifted copies < {cfg.intra_study.min_gradient_ncc_prominence})" in qc.reason, qc.reason


def _shifted(tx: sitk.Transform, shift_lps) -> sitk.Transform:
    """``tx`` preceded by a translation in the fixed space: a registration ``shift_lps`` mm off."""
    return sitk.CompositeTransform([tx, sitk.TranslationTransform(3, [float(v) for v in shift_lps])])


def test_peak_offset_tells_right_from_misregistered(baseline, followup):
    # The pair's similarity peaks at the true pose (within a voxel); 8 mm off along an axis its
    # peak lies at least a few mm away along that axis, whatever the absolute NCC says.
    inner = interior_mask(body_mask(baseline), 1)
    right = similarity_peak_offsets_mm(baseline, followup, TRUE_INTER, inner, 4.0)
    assert np.abs(right).max() < 1.5, right
    for axis in range(3):
        shift = [8.0 if k == axis else 0.0 for k in range(3)]
        off = similarity_peak_offsets_mm(baseline, followup, _shifted(TRUE_INTER, shift), inner, 4.0)
        assert np.abs(off[1, axis]) > 3.0, (shift, off)
    # The edges of the right pose stand above their shifted copies; 8 mm off they do not.
    peak = similarity_peak(baseline, followup, TRUE_INTER, inner, 4.0)
    assert np.array_equal(peak.offsets_mm, right) and peak.neighbours.shape == (2, 3, 2)
    assert peak.prominence[1] == pytest.approx(peak.at_pose[1] - peak.neighbours[1].mean())
    assert peak.prominence[1] > 0.06 > similarity_peak(baseline, followup, _shifted(TRUE_INTER, [8.0, 0, 0]),
                                                       inner, 4.0).prominence[1]


def test_parabola_vertex_of_a_known_peak():
    # A parabola peaking 1.2 mm above the centre, sampled at -4, 0, +4 mm; and a slope.
    peak = lambda x: 1.0 - 0.01 * (x - 1.2) ** 2  # noqa: E731
    assert similarity_peak_vertex_mm(peak(-4.0), peak(0.0), peak(4.0), 4.0) == pytest.approx(1.2)
    assert similarity_peak_vertex_mm(0.2, 0.5, 0.9, 4.0) == np.inf
    assert similarity_peak_vertex_mm(0.9, 0.5, 0.2, 4.0) == -np.inf


def test_misregistered_pose_fails_qc_on_the_peak_test(cfg, baseline, followup):
    # What a converged but wrong optimisation would hand the QC: the right pose moved 8 mm.
    # The absolute NCC of the body interior cannot tell (the same anatomy, slightly off); the
    # peak test does. The right pose passes both.
    stage = cfg.inter_study
    assert stage.max_peak_offset_mm is not None
    fixed_body = body_mask(baseline)
    mask = metric_mask(fixed_body, 1)
    before = evaluate_metric(baseline, followup, mask, sitk.Euler3DTransform(), 0.2, 1)
    pair = PairContext(name="followup_to_baseline", fixed=baseline, moving=followup, fixed_body=fixed_body,
                       metric_mask=mask, fixed_eval=baseline, moving_eval=followup, eval_frac=0.2,
                       metric_before=before, max_scale_change=None, max_motion_mm=None, threads=1,
                       t0=time.perf_counter())
    _, qc = quality(BackendResult(TRUE_INTER, 1, "", True), "truth", stage, "test", pair)
    assert qc.ok, qc.reason
    assert qc.peak_offset_mm is not None and qc.peak_offset_mm <= stage.max_peak_offset_mm
    tx, qc = quality(BackendResult(_shifted(TRUE_INTER, [0, 0, 8.0]), 1, "", True), "truth+8mm", stage, "test", pair)
    assert not qc.ok and "edges agree best" in qc.reason and "along z" in qc.reason, qc.reason
    assert "ncc of the body interior" not in qc.reason and qc.ncc_after >= stage.min_ncc_after, qc.reason
    assert np.allclose(tx.TransformPoint((10.0, 20.0, 30.0)), (10.0, 20.0, 30.0))  # identity returned


def test_sphere_mask_on_an_oblique_grid():
    grid = make_grid((40, 50, 20), (1.5, 1.2, 3.0), _rot(12.0, 5.0, 0.0), centre=(4.0, -3.0, 6.0))
    centre = np.array([6.0, -1.0, 8.0])
    found = sitk.GetArrayFromImage(sphere_mask(grid, centre, 12.0)).astype(bool)
    points = grid_points(grid).reshape(20, 50, 40, 3)
    assert found.any() and np.array_equal(found, ((points - centre) ** 2).sum(axis=-1) <= 144.0)


def test_other_field_of_view_is_not_a_failure_when_the_zone_is_imaged(cfg, phantom, baseline):
    # A follow-up of a 36 mm slab: right, but only ~35 % of the baseline's body interior overlaps.
    # Without the zone that cannot be told from a failure; with the zone's region inside the
    # slab it passes and is accurate there; with the zone outside it fails, saying why.
    slab = render(phantom, make_grid((140, 140, 12), (1.45, 1.45, 3.0), centre=(4.0, -3.0, 30.0)), TRUE_INTER,
                  scale=1.8, noise=0.025, seed=2)
    inside, outside = ((0.0, 0.0, 23.0), 15.0), ((0.0, 0.0, -30.0), 15.0)
    tx, qc = register_to_baseline(baseline, slab, cfg, zone_region_lps=inside)
    assert qc.ok, qc.reason
    assert qc.overlap < MIN_OVERLAP and qc.zone_coverage >= MIN_ZONE_COVERAGE
    assert "another field of view" in qc.stop_condition
    pts = body_points(baseline, 200)
    near = pts[np.abs(pts[:, 2] - 23.0) < 10.0]
    assert tre_mm(tx, TRUE_INTER, near).mean() < 1.0

    fixed_body = body_mask(baseline)
    mask = metric_mask(fixed_body, 1)
    before = evaluate_metric(baseline, slab, mask, sitk.Euler3DTransform(), 0.2, 1)
    for region, passes in ((None, False), (inside, True), (outside, False)):
        pair = PairContext(name="followup_to_baseline", fixed=baseline, moving=slab, fixed_body=fixed_body,
                           metric_mask=mask, fixed_eval=baseline, moving_eval=slab, eval_frac=0.2,
                           metric_before=before, max_scale_change=None, max_motion_mm=None, threads=1,
                           t0=time.perf_counter(),
                           zone_region=None if region is None else sphere_mask(baseline, *region))
        _, qc = quality(BackendResult(TRUE_INTER, 1, "", True), "truth", cfg.inter_study, "test", pair)
        assert qc.ok is passes, (region, qc.reason)
        if region is None:
            assert "no ablation zone to check, another field of view cannot be told" in qc.reason
        elif not passes:
            assert qc.zone_coverage == 0.0 and "0% of the ablation zone's region" in qc.reason


@pytest.mark.parametrize("seed,semi_axes", [(7, (80.0, 88.0)), (11, (92.0, 75.0))])
def test_wrong_patient_flagged(cfg, baseline, seed, semi_axes):
    # Another patient: other organs and texture; the second has nearly the same body outline,
    # which an affine can match (whole-body NCC ~0.6): only the interior tells them apart.
    other = Phantom(seed=seed, semi_axes=semi_axes)
    wrong = render(other, make_grid((140, 140, 32), (1.45, 1.45, 3.5)), scale=1.5, noise=0.02, seed=4)
    t0 = time.perf_counter()
    tx, qc = register_to_baseline(baseline, wrong, cfg)
    print(f"\nwrong patient {semi_axes}: {time.perf_counter() - t0:.2f} s; {qc.reason}")
    assert not qc.ok and qc.reason
    assert np.allclose(tx.TransformPoint((10.0, 20.0, 30.0)), (10.0, 20.0, 30.0))  # identity returned


def test_rotated_90_flagged(cfg, phantom, baseline):
    # The same anatomy rotated 90 deg about LR (axial <-> coronal). The SimpleITK optimiser cannot
    # capture it; the torch backend (the inter-study default) can, and the max_rotation_deg
    # sanity bound flags it: two supine studies never differ by 90 deg.
    rotated = render(phantom, make_grid(FIXED_SIZE, FIXED_SPACING), euler((90.0, 0.0, 0.0), (0, 0, 0)),
                     noise=0.02, seed=5)
    for fn in (register_to_baseline, register_intra_study):
        tx, qc = fn(baseline, rotated, cfg)
        print(f"\nrotated 90 ({fn.__name__}): {qc.model_dump()}")
        assert not qc.ok and qc.reason


def test_failed_optimisation_does_not_raise(cfg, baseline):
    blank = sitk.Image(baseline.GetSize(), sitk.sitkFloat32)
    blank.CopyInformation(baseline)
    tx, qc = register_to_baseline(baseline, blank, cfg)
    assert not qc.ok and qc.reason
    tx, qc = register_intra_study(blank, baseline, cfg)
    assert not qc.ok and qc.reason


def test_resample_flipped_reference_keeps_physical_position():
    """A reference with a flipped axis (and its origin at the other end) must still show the
    blob at the same physical place: the direction matrix is never dropped."""
    src = make_grid((60, 60, 20), (2.0, 2.0, 3.0))
    pts = grid_points(src)
    blob = np.array([20.0, -14.0, 9.0])
    arr = (1000.0 * (((pts - blob) ** 2).sum(axis=1) < 36.0)).reshape(src.GetSize()[::-1]).astype(np.float32)
    img = sitk.GetImageFromArray(arr)
    img.CopyInformation(src)
    flip = make_grid((60, 60, 20), (2.0, 2.0, 3.0), np.diag([-1.0, 1.0, -1.0]))
    out = resample_to(img, flip, sitk.Euler3DTransform())
    assert out.GetDirection() == flip.GetDirection() and out.GetOrigin() == flip.GetOrigin()
    a = sitk.GetArrayFromImage(out)
    centroid_idx = np.argwhere(a > 500).mean(axis=0)[::-1]
    centroid = np.array(out.TransformContinuousIndexToPhysicalPoint(centroid_idx.tolist()))
    assert np.linalg.norm(centroid - blob) < 1.0
    # In index space the blob moved (axis flipped): the test would catch a dropped direction.
    src_idx = np.argwhere(arr > 500).mean(axis=0)[::-1]
    assert abs(src_idx[0] - centroid_idx[0]) > 10
    # Labels keep their type with nearest neighbour.
    lab = resample_to(sitk.Cast(img > 500, sitk.sitkUInt8), flip, sitk.Euler3DTransform(), sitk.sitkNearestNeighbor)
    assert lab.GetPixelID() == sitk.sitkUInt8


def test_transform_file_roundtrip(tmp_path):
    aff = sitk.AffineTransform(3)
    aff.SetCenter((3.0, -2.0, 1.0))
    aff.SetMatrix((_rot(4.0, -3.0, 2.5) @ np.diag([1.02, 0.99, 1.01])).ravel().tolist())
    aff.SetTranslation((8.0, -6.0, 7.0))
    for tx in (aff, TRUE_INTER):
        path = tmp_path / "to_baseline.tfm"
        sitk.WriteTransform(tx, str(path))
        back = sitk.ReadTransform(str(path))
        for p in ([0.0, 0.0, 0.0], [50.0, -40.0, 30.0], [-80.0, 60.0, -45.0]):
            assert np.allclose(back.TransformPoint(p), tx.TransformPoint(p), atol=1e-6)


def test_motion_magnitude_of_translation():
    m = sitk.Image([20, 20, 10], sitk.sitkUInt8) + 1
    t = sitk.TranslationTransform(3, (3.0, 4.0, 0.0))
    assert motion_magnitude_mm(t, m) == pytest.approx(5.0)
    assert motion_magnitude_mm(t, m * 0) == 0.0


def test_hint_is_tried_when_the_best_ranked_starts_fail(cfg, baseline, followup, monkeypatch):
    """The caller's hint gets its own coarse search and a run when the best-ranked starts (none
    from the hint) all fail QC: here every other start is forced to fail, and the hint is 20 mm
    off the truth (so that it ranks low and only its own search finds the way back)."""
    import pipeline.imaging.registration.driver as driver

    # Patched where the driver looks it up (driver imports quality from checks).
    real_quality = driver.quality

    def quality_failing_unless_hint(res, init_name, *args, **kwargs):
        tx, qc = real_quality(res, init_name, *args, **kwargs)
        if not init_name.startswith("hint"):
            qc = qc.model_copy(update={"ok": False, "reason": f"forced failure of start {init_name}"})
        return tx, qc

    monkeypatch.setattr(driver, "quality", quality_failing_unless_hint)
    hint = np.array(TRUE_INTER.GetTranslation()) + np.array([20.0, 0.0, 0.0])
    tx, qc = register_to_baseline(baseline, followup, cfg, hint_shift_lps=hint.tolist())
    assert qc.ok, qc.reason
    assert qc.stop_condition.startswith("init=hint"), qc.stop_condition
    assert tre_mm(tx, TRUE_INTER, body_points(baseline, 20)).mean() <= 1.5


# --------------------------------------------------------------------------- resampler fill
def _on_post_grid(pre: sitk.Image, pre_to_post_motion: sitk.Euler3DTransform) -> sitk.Image:
    """What the pipeline hands the registration between studies: the pre-contrast resampled onto
    its post-contrast grid (``pre_registered``), 0.0 where the pre-contrast slab did not reach."""
    return resample_to(pre, pre, pre_to_post_motion)


def test_resampling_fill_is_cropped_and_air_is_not():
    image = sitk.Image([20, 16, 10], sitk.sitkFloat32) + 100.0
    image.SetSpacing((1.5, 1.5, 3.0))
    image.SetOrigin((4.0, -2.0, 7.0))
    a = sitk.GetArrayFromImage(image)
    # Scanner-zeroed background: a share of exact zeros in every plane alike is not fill.
    a[np.random.default_rng(0).random(a.shape) < 0.3] = 0.0
    a[0, :8] = 0.0  # half of the first slice is fill
    a[-1] = 0.0  # the last slice is all fill
    filled = sitk.GetImageFromArray(a)
    filled.CopyInformation(image)
    cropped = without_resampling_fill(filled)
    assert cropped.GetSize() == (20, 16, 8)
    # Physical coordinates kept: the first voxel of the crop is the second slice.
    assert np.allclose(cropped.GetOrigin(), filled.TransformIndexToPhysicalPoint((0, 0, 1)))
    assert without_resampling_fill(image) is image


class SlowAlongZ(Phantom):
    """The phantom stretched 6x along z: anatomy that changes slowly from slice to slice (a trunk
    through the liver), so that little but the slab ends tells z."""

    def values(self, p: np.ndarray) -> np.ndarray:
        return super().values(p * np.array([1.0, 1.0, 1.0 / 6.0]))


def test_registration_between_resampled_pre_contrasts_is_not_drawn_to_their_fills(cfg):
    # Each study's pre-contrast moved onto its post-contrast grid by the motion between the two
    # series (a tilt and a few mm along z): each image's first or last slice is partly fill, at
    # other places in the two studies. Truth: baseline post point -> baseline pre point ->
    # follow-up pre point (TRUE_INTER) -> follow-up post point. Registered with the fills, the
    # pair erred 1.3 mm along z here (3-7 mm on the liver development seed 82); without, 0.3.
    body = SlowAlongZ(seed=0)
    baseline = render(body, make_grid(FIXED_SIZE, FIXED_SPACING), noise=0.02, seed=1)
    grid = make_grid((140, 140, 32), (1.45, 1.45, 3.5), _rot(12.0, 0.0, 0.0), centre=(4.0, -3.0, 6.0))
    followup = render(body, grid, TRUE_INTER, scale=1.8, noise=0.025, seed=2)
    motion_base = euler((1.5, 0.0, 0.0), (0.0, 1.0, 2.2), centre=(0.0, 0.0, 0.0))
    motion_follow = euler((-1.2, 0.6, 0.0), (0.5, -1.0, -2.6), centre=(4.0, -3.0, 6.0))
    fixed, moving = _on_post_grid(baseline, motion_base), _on_post_grid(followup, motion_follow)
    assert without_resampling_fill(fixed).GetSize() != fixed.GetSize()
    tx, qc = register_to_baseline(fixed, moving, cfg)
    assert qc.ok, qc.reason
    points = body_points(fixed, 20)
    back = motion_follow.GetInverse()
    truth = np.array([back.TransformPoint(TRUE_INTER.TransformPoint(motion_base.TransformPoint(p))) for p in points])
    found = np.array([tx.TransformPoint(p) for p in points])
    tre = np.linalg.norm(found - truth, axis=1)
    print(f"\nresampled pair: TRE mean {tre.mean():.2f} max {tre.max():.2f} mm; {qc.stop_condition[-80:]}")
    assert tre.mean() <= 0.7 and tre.max() <= 1.2
