"""Normalisation, subtraction and relative enhancement (pipeline/imaging/subtraction.py)."""

from __future__ import annotations

import time

import numpy as np
import pytest
import SimpleITK as sitk

from pipeline.core.config import load_config
from pipeline.core.geometry import body_mask, field_of_view_mask, resample_to
from pipeline.imaging.registration import register_intra_study
from pipeline.imaging.subtraction import normalise_post_to_pre, relative_enhancement, subtraction

SIZE, SPACING = (128, 128, 36), (1.6, 1.6, 3.0)
BLOB_CENTRE, BLOB_RADIUS = np.array([20.0, -15.0, 6.0]), 8.0  # LPS mm


def _points(size=SIZE, spacing=SPACING):
    k, j, i = np.meshgrid(*[np.arange(n) for n in size[::-1]], indexing="ij")
    origin = -(np.array(size) - 1) * np.array(spacing) / 2.0
    return np.stack([i, j, k], axis=-1) * np.array(spacing) + origin, origin


def _image(arr, origin, direction=None):
    img = sitk.GetImageFromArray(arr.astype(np.float32))
    img.SetSpacing(SPACING)
    img.SetOrigin(origin.tolist())
    if direction is not None:
        img.SetDirection(direction)
    return img


@pytest.fixture(scope="module")
def pair():
    """(pre, post, body, blob mask): post = 2.5 x pre, blob enhanced by 50 %, both noisy.

    The body has textured tissue (~200), a dark fat-suppressed band (~15) and air (~0).
    """
    rng = np.random.default_rng(0)
    p, origin = _points()
    x, y, z = p[..., 0], p[..., 1], p[..., 2]
    r = np.sqrt((x / 90.0) ** 2 + (y / 70.0) ** 2)
    body = r < 1.0
    tissue = 200.0 * (1.0 + 0.15 * np.sin(x / 9.0) * np.cos(y / 7.0) + 0.1 * np.sin(z / 11.0))
    pre = np.where(body, tissue, 0.0)
    pre[(r > 0.85) & body] = 15.0  # fat-suppressed subcutaneous fat: near-zero pre
    blob = ((p - BLOB_CENTRE) ** 2).sum(axis=-1) < BLOB_RADIUS**2
    post = pre.copy()
    post[blob] *= 1.5
    noise = 0.01 * 200.0
    pre_n = np.abs(pre + rng.normal(0, noise, pre.shape))
    post_n = np.abs(2.5 * post + rng.normal(0, 2.5 * noise, pre.shape))
    pre_img, post_img = _image(pre_n, origin), _image(post_n, origin)
    body_img = sitk.GetImageFromArray(body.astype(np.uint8))
    body_img.CopyInformation(pre_img)
    return pre_img, post_img, body_img, blob


def test_normalisation_recovers_scale(pair):
    pre, post, body, _ = pair
    post_norm, factor = normalise_post_to_pre(pre, post, body)
    assert factor == pytest.approx(1 / 2.5, rel=0.03)
    assert post_norm.GetPixelID() == sitk.sitkFloat32
    assert post_norm.GetOrigin() == pre.GetOrigin() and post_norm.GetSpacing() == pre.GetSpacing()


def test_relative_enhancement_of_blob(pair):
    pre, post, body, blob = pair
    post_norm, _ = normalise_post_to_pre(pre, post, body)
    re = sitk.GetArrayFromImage(relative_enhancement(pre, post_norm, body))
    b = sitk.GetArrayFromImage(body) > 0
    assert np.median(re[blob]) == pytest.approx(0.5, abs=0.03)
    tissue = b & ~blob & (sitk.GetArrayFromImage(pre) > 100)
    assert abs(float(np.median(re[tissue]))) < 0.02
    # The floor keeps near-zero pre (fat-suppressed fat) from exploding: |RE| stays bounded.
    assert np.abs(re[b]).max() < 2.0
    assert np.all(re[~b] == 0.0)
    sub = sitk.GetArrayFromImage(subtraction(pre, post_norm))
    assert np.median(sub[blob]) == pytest.approx(0.5 * np.median(sitk.GetArrayFromImage(pre)[blob]), rel=0.08)


def test_no_subtraction_where_the_pre_contrast_was_not_imaged(pair):
    """A pre-contrast slab 6 planes shorter than the post's: its fill is not read as enhancement."""
    pre, post, body, _ = pair
    short_pre = pre[:, :, 3:-3]  # SimpleITK slicing keeps the physical position of each plane
    identity = sitk.Euler3DTransform()
    pre_on_post = resample_to(short_pre, post, identity)
    imaged = field_of_view_mask(short_pre, post, identity)
    assert not imaged[:3].any() and not imaged[-3:].any() and imaged[3:-3].all()
    post_norm, _ = normalise_post_to_pre(pre_on_post, post, body_mask(pre_on_post))
    inside_body = sitk.GetArrayFromImage(body) > 0
    bare = sitk.GetArrayFromImage(subtraction(pre_on_post, post_norm))
    # Without the mask the end planes read the whole post-contrast body as enhancement...
    assert np.median(bare[:3][inside_body[:3]]) > 100.0
    masked = sitk.GetArrayFromImage(subtraction(pre_on_post, post_norm, imaged))
    # ...with it they are 0, and the imaged planes are unchanged.
    assert np.all(masked[:3] == 0.0) and np.all(masked[-3:] == 0.0)
    np.testing.assert_array_equal(masked[3:-3], bare[3:-3])
    with pytest.raises(ValueError, match="not on the grid"):
        subtraction(pre_on_post, post_norm, imaged[1:])


def test_grid_mismatch_raises(pair):
    pre, post, body, _ = pair
    shifted = sitk.Image(post)
    shifted.SetOrigin((np.array(post.GetOrigin()) + 1.6).tolist())
    with pytest.raises(ValueError):
        subtraction(pre, shifted)
    with pytest.raises(ValueError):
        normalise_post_to_pre(pre, shifted, body)


def test_end_to_end_moved_post_on_flipped_grid(pair):
    """Post acquired with motion (2 mm, 1.5 deg) on a grid with flipped axes: register, resample,
    normalise; the blob's RE still reads ~0.5 at the right place."""
    pre, post, _, blob = pair
    true = sitk.Euler3DTransform()
    true.SetRotation(*np.deg2rad([0.0, 0.0, 1.5]))
    true.SetTranslation((2.0, -1.0, 1.0))
    # Flipped grid for the moved post: x and z axes reversed, origin at the opposite corner.
    flip = sitk.Image(post.GetSize(), sitk.sitkFloat32)
    flip.SetSpacing(post.GetSpacing())
    flip.SetDirection((-1, 0, 0, 0, 1, 0, 0, 0, -1))
    corner = post.TransformIndexToPhysicalPoint([post.GetSize()[0] - 1, 0, post.GetSize()[2] - 1])
    flip.SetOrigin(corner)
    # Moving image at y shows the anatomy at T^-1(y): resample the original with the inverse.
    moved = sitk.Resample(post, flip, true.GetInverse(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    cfg = load_config().registration
    t0 = time.perf_counter()
    tx, qc = register_intra_study(pre, moved, cfg)
    on_pre = resample_to(moved, pre, tx)
    body = body_mask(pre)
    post_norm, factor = normalise_post_to_pre(pre, on_pre, body)
    re = sitk.GetArrayFromImage(relative_enhancement(pre, post_norm, body))
    print(f"\nend to end (register + resample + normalise + RE): {time.perf_counter() - t0:.2f} s; "
          f"factor {factor:.4f}; motion {qc.motion_corrected_mm:.2f} mm; ok={qc.ok}")
    assert qc.ok, qc.reason
    pts = np.array([[0.0, 0.0, 0.0], [60.0, 40.0, 30.0], [-70.0, -40.0, -30.0], BLOB_CENTRE])
    err = [np.linalg.norm(np.subtract(tx.TransformPoint(q), true.TransformPoint(q))) for q in pts]
    print(f"registration error at 4 points: {np.round(err, 2)} mm")
    assert max(err) < 0.7
    assert factor == pytest.approx(1 / 2.5, rel=0.03)
    # Blob core (>= 1 voxel diagonal from its edge): two linear resamplings blur the rim.
    p, _ = _points()
    core = ((p - BLOB_CENTRE) ** 2).sum(axis=-1) < (BLOB_RADIUS - 3.5) ** 2
    print(f"RE median: core {np.median(re[core]):.3f}, whole blob {np.median(re[blob]):.3f}")
    assert np.median(re[core]) == pytest.approx(0.5, abs=0.05)
