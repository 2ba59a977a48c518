"""Rim thickness along AZ-surface normals (criteria.md §6 rules 7-9) on analytic shells.

AZ = sphere of radius 20 mm; rim = the shell 20 < r <= 21.5 mm (1.5 mm thick). Masks are built from
voxel-centre coordinates that SimpleITK computes (PhysicalPointSource), so the grids may be
anisotropic, oblique or flipped without the test sharing the code's index->LPS arithmetic.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import SimpleITK as sitk

from pipeline.measurement.rim import (
    angular_extent_deg,
    az_surface_samples,
    focus_margin_metrics,
    focus_pattern,
    rim_metrics,
    rim_thickness_profile,
)
from tests.dicom_factory import rotation

R_AZ = 20.0
RIM = 1.5
CENTRE = np.array([3.0, -7.0, 12.0])


def _grid(spacing, direction, fov_mm=64.0):
    spacing = np.asarray(spacing, float)
    direction = np.asarray(direction, float)
    size = np.ceil(fov_mm / spacing).astype(int)
    origin = CENTRE - direction @ (spacing * (size - 1) / 2.0) + np.array([0.3, -0.2, 0.1])
    pts = sitk.GetArrayFromImage(sitk.PhysicalPointSource(
        sitk.sitkVectorFloat64, [int(s) for s in size], [float(o) for o in origin],
        [float(s) for s in spacing], [float(d) for d in direction.ravel()]))
    return pts, (spacing, direction, origin)


def _image(arr, geometry) -> sitk.Image:
    spacing, direction, origin = geometry
    img = sitk.GetImageFromArray(arr.astype(np.uint8))
    img.SetSpacing([float(s) for s in spacing])
    img.SetOrigin([float(o) for o in origin])
    img.SetDirection([float(d) for d in direction.ravel()])
    return img


GRIDS = {
    "iso_1mm": ((1.0, 1.0, 1.0), np.eye(3)),
    "aniso_0.75x0.75x1.5": ((0.75, 0.75, 1.5), np.eye(3)),
    "oblique_flipped_0.8x0.8x2": ((0.8, 0.8, 2.0), rotation(20, 0, 10) @ np.diag([1, -1, 1])),
}


@pytest.fixture(scope="module", params=list(GRIDS))
def scene(request):
    """AZ sphere, rim shell, and helpers on one grid."""
    pts, geom = _grid(*GRIDS[request.param])
    d = pts - CENTRE
    r = np.linalg.norm(d, axis=-1)
    azimuth = np.degrees(np.arctan2(d[..., 1], d[..., 0])) % 360.0
    az = r <= R_AZ
    shell = (r > R_AZ) & (r <= R_AZ + RIM)
    az_img = _image(az, geom)
    surface = az_surface_samples(az_img)
    return dict(pts=pts, geom=geom, az=az, shell=shell, azimuth=azimuth, az_img=az_img,
                surface=surface, name=request.param)


def test_uniform_shell_is_benign(scene):
    t0 = time.perf_counter()
    prof = rim_thickness_profile(scene["az_img"], _image(scene["shell"], scene["geom"]))
    m = rim_metrics(prof, rim_volume_ml=1.0)
    elapsed = time.perf_counter() - t0
    assert m.present
    assert m.median_thickness_mm == pytest.approx(RIM, abs=0.5)
    assert m.coverage_deg >= 350.0
    assert m.cv < 0.3
    assert m.max_thickness_mm <= 3.0
    assert m.benign_pattern, m.reason
    assert m.volume_ml == 1.0
    assert elapsed < 1.0
    # Samples sit on the AZ surface (a binary mask's iso-surface: within half a voxel) with
    # outward unit normals.
    rad = prof.positions_lps - CENTRE
    half_voxel = 0.5 * float(max(scene["geom"][0])) + 0.05
    assert np.allclose(np.linalg.norm(rad, axis=1), R_AZ, atol=half_voxel)
    cos = np.sum(rad * prof.normals_lps, axis=1) / np.linalg.norm(rad, axis=1)
    assert np.median(cos) > 0.99 and cos.min() > 0.8


def test_nodular_bulge_is_not_benign(scene):
    # A sphere of radius 4 mm centred 2.5 mm outside the AZ: up to 6.5 mm of enhancement there.
    u = np.array([0.6, 0.8, 0.0])
    nodule = np.linalg.norm(scene["pts"] - (CENTRE + u * (R_AZ + 2.5)), axis=-1) <= 4.0
    enh = (scene["shell"] | nodule) & ~scene["az"]
    prof = rim_thickness_profile(scene["az_img"], _image(enh, scene["geom"]),
                                 surface=scene["surface"])
    m = rim_metrics(prof, rim_volume_ml=1.0)
    assert m.max_thickness_mm >= 5.0
    assert m.median_thickness_mm == pytest.approx(RIM, abs=0.5)  # the rest stays thin
    assert not m.benign_pattern
    assert "max thickness" in m.reason
    # The thick samples are where the nodule is (azimuth of u = 53 deg): the LPS mapping holds.
    thick = prof.thickness_mm >= 5.0
    assert np.all(np.abs(prof.azimuth_deg[thick] - 53.13) < 15.0)
    # The nodule alone, as a focus: focal, several mm thick.
    fm = focus_margin_metrics(_image(nodule & ~scene["shell"] & ~scene["az"], scene["geom"]),
                              scene["az_img"], surface=scene["surface"])
    assert fm.pattern == "focal"
    assert 10.0 <= fm.angular_extent_deg <= 35.0
    assert fm.local_thickness_mm >= 4.0


def test_arc_covering_90_degrees(scene):
    arc = scene["shell"] & (scene["azimuth"] < 90.0)
    prof = rim_thickness_profile(scene["az_img"], _image(arc, scene["geom"]),
                                 surface=scene["surface"])
    m = rim_metrics(prof, rim_volume_ml=0.3)
    assert m.coverage_deg == pytest.approx(90.0, abs=10.0)
    assert not m.benign_pattern and "coverage" in m.reason
    # Rim is found where the arc is (0..90 deg azimuth, patient left-posterior quadrant).
    rim_az = prof.azimuth_deg[prof.thickness_mm >= 0.5]
    assert np.mean((rim_az >= -5) & (rim_az <= 95) | (rim_az >= 355)) > 0.97
    arc_focus = _image(arc, scene["geom"])
    fm = focus_margin_metrics(arc_focus, scene["az_img"], surface=scene["surface"])
    assert fm.angular_extent_deg == pytest.approx(90.0, abs=10.0)
    assert fm.pattern in ("focal", "crescentic")


def test_no_rim_and_distant_tissue():
    pts, geom = _grid((1.0, 1.0, 1.0), np.eye(3))
    r = np.linalg.norm(pts - CENTRE, axis=-1)
    az_img = _image(r <= R_AZ, geom)
    far = (r > R_AZ + 5.0) & (r <= R_AZ + 7.0)  # enhancement 5 mm away: not a rim
    prof = rim_thickness_profile(az_img, _image(far, geom))
    m = rim_metrics(prof, rim_volume_ml=0.0)
    assert not m.present and m.benign_pattern and m.coverage_deg == 0.0
    assert np.all(prof.thickness_mm == 0.0)


def test_enhancing_mask_on_another_grid():
    """AZ on one grid, enhancement on a flipped oblique one: sampled through physical space."""
    pts_a, geom_a = _grid((1.0, 1.0, 1.0), np.eye(3))
    pts_e, geom_e = _grid((0.9, 0.9, 1.2), rotation(0, 15, 40) @ np.diag([-1, 1, 1]))
    az_img = _image(np.linalg.norm(pts_a - CENTRE, axis=-1) <= R_AZ, geom_a)
    d = pts_e - CENTRE
    r = np.linalg.norm(d, axis=-1)
    azimuth = np.degrees(np.arctan2(d[..., 1], d[..., 0])) % 360.0
    arc = (r > R_AZ) & (r <= R_AZ + 2.0) & (azimuth >= 180.0) & (azimuth < 270.0)
    prof = rim_thickness_profile(az_img, _image(arc, geom_e))
    m = rim_metrics(prof, 0.2)
    assert m.coverage_deg == pytest.approx(90.0, abs=10.0)
    assert m.median_thickness_mm == pytest.approx(2.0, abs=0.5)
    rim_az = prof.azimuth_deg[prof.thickness_mm >= 0.5]
    assert np.mean((rim_az >= 175) & (rim_az <= 275)) > 0.97


def test_angular_extent_and_pattern():
    c = np.zeros(3)
    ang = np.radians(np.arange(0, 90, 1.0))
    quarter = np.column_stack([20 * np.cos(ang), 20 * np.sin(ang), np.zeros_like(ang)])
    assert angular_extent_deg(quarter, c) == pytest.approx(90.0, abs=5.0)
    ang = np.radians(np.arange(-20, 20, 1.0))  # across the 0/360 wrap
    wrap = np.column_stack([20 * np.cos(ang), 20 * np.sin(ang), 5 * np.ones_like(ang)])
    assert angular_extent_deg(wrap, c) == pytest.approx(40.0, abs=5.0)
    ang = np.radians(np.arange(0, 360, 2.0))
    ring = np.column_stack([20 * np.cos(ang), 20 * np.sin(ang), np.zeros_like(ang)])
    assert angular_extent_deg(ring, c) == 360.0
    assert angular_extent_deg(np.array([[0.0, 0.0, 30.0]]), c) == 0.0  # on the axis: undefined
    assert focus_pattern(40) == "focal"
    assert focus_pattern(180) == "crescentic"
    assert focus_pattern(300) == "circumferential"
