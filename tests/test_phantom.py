"""Synthetic cohort generator: determinism, DICOM geometry, truth consistency, appearance."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from scipy import ndimage

from phantom import SCENARIOS, generate_export, get_profile
from phantom.dicom_writer import SeriesHeader, study_dataset, write_series
from phantom.geometry import Deformation, Pose, axial_direction, make_grid, rotation_matrix
from phantom.scenarios import plan_patient

SEED = 1


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("phantom")
    truth = generate_export(out, 2, SEED)
    return out, truth


def _read_series(out: Path, series: dict) -> sitk.Image:
    """Read a series with SimpleITK, files sorted along the slice normal (as GDCM does)."""
    files = [out / f for f in series["files"]]
    heads = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    normal = np.cross(*np.asarray(heads[0].ImageOrientationPatient, float).reshape(2, 3))
    order = np.argsort([normal @ np.asarray(h.ImagePositionPatient, float) for h in heads])
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(files[i]) for i in order])
    return reader.Execute()


def _series(study: dict, role: str) -> list[dict]:
    return [s for s in study["series"] if s["role"] == role]


def _assert_geometry(img: sitk.Image, geo: dict, tol: float = 1e-4) -> None:
    assert list(img.GetSize()) == geo["size"]
    np.testing.assert_allclose(img.GetSpacing(), geo["spacing"], atol=tol)
    np.testing.assert_allclose(img.GetOrigin(), geo["origin"], atol=tol)
    np.testing.assert_allclose(img.GetDirection(), geo["direction"], atol=tol)


# --------------------------------------------------------------------------- writer unit test
def test_writer_roundtrip_oblique_rectangular(tmp_path):
    """Oblique grid, rows != columns, non-square pixels, Philips rescale: SimpleITK reads it back exactly."""
    direction = rotation_matrix(0, 0, 7) @ axial_direction(18.0)
    grid = make_grid(np.array([12.3, -45.6, 78.9]), direction, (24, 20, 6), (1.3, 1.7, 3.2), 3.0)
    rng = np.random.default_rng(0)
    stored = rng.integers(0, 4096, grid.shape).astype(np.uint16)
    study = study_dataset({"PatientID": "T", "StudyInstanceUID": "1.2.3", "FrameOfReferenceUID": "1.2.4"})
    header = SeriesHeader("1.2.3.4", 5, "THRIVE pre", "101010.000000", 2.0, 4.0, "GR", "SP", "FS", "3D",
                          ["ORIGINAL", "PRIMARY", "M", "ND"], rescale=(1.5, -150.0))
    paths = [tmp_path / "s" / f"IM{k:04d}" for k in range(grid.size[2])]
    write_series(study, header, grid, stored, paths, [f"1.2.3.4.{k}" for k in range(grid.size[2])])

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(tmp_path / "s"), "1.2.3.4"))
    img = reader.Execute()
    assert img.GetSize() == grid.size
    np.testing.assert_allclose(img.GetSpacing(), grid.spacing, atol=1e-6)
    np.testing.assert_allclose(img.GetOrigin(), grid.origin, atol=1e-6)
    np.testing.assert_allclose(np.reshape(img.GetDirection(), (3, 3)), direction, atol=1e-6)
    np.testing.assert_allclose(sitk.GetArrayFromImage(img), stored * 1.5 - 150.0)
    ds = pydicom.dcmread(paths[0])
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.4"
    assert [float(v) for v in ds.PixelSpacing] == [1.7, 1.3]  # [row spacing, column spacing]
    np.testing.assert_array_equal(ds.pixel_array, stored[0])


def test_pose_inverse_roundtrip():
    rng = np.random.default_rng(3)
    pose = Pose(rotation_matrix(3, -2, 4), np.array([5.0, -7.0, 9.0]), Deformation.random(rng, 0.85))
    x = rng.uniform(-100, 100, (50, 3))
    np.testing.assert_allclose(pose.physical_to_world(pose.world_to_physical(x)), x, atol=1e-6)


# --------------------------------------------------------------------------- scenarios (no rendering)
def test_scenario_coverage_and_categories():
    prof = get_profile("default")
    plans = [plan_patient(i, np.random.default_rng([SEED, i]), prof) for i in range(8)]
    assert {p.scenario for p in plans} == set(SCENARIOS)
    assert [p.scenario for p in plans[:2]] == ["complete", "ltp"]
    assert {p.scenario for p in plans[:4]} == {"complete", "ltp", "residual", "growth"}
    expected = {
        "complete": ["complete_ablation"] + ["no_evidence_of_ltp"] * 3,
        "ltp": ["complete_ablation", "no_evidence_of_ltp"] + ["local_tumour_progression"] * 2,
        "residual": ["residual_unablated_tumour"] * 4,
        "growth": ["complete_ablation", "no_evidence_of_ltp"] + ["suspected_local_tumour_progression"] * 2,
        "missing_post": ["complete_ablation", "no_evidence_of_ltp", "indeterminate", "no_evidence_of_ltp"],
        "reablation": ["residual_unablated_tumour", "complete_ablation", "no_evidence_of_ltp"],
    }
    for p in plans:
        cats = [s.category for s in p.studies if s.timepoint != "pre_ablation"]
        assert cats == expected.get(p.scenario, expected["complete"]), p.scenario
        for s in p.studies:
            if s.timepoint == "pre_ablation":
                assert s.session is None and s.days_since_ablation is None and s.lesion.az_semi_axes is None
                assert -30 <= (s.date - p.ablation_dates[0]).days <= -7
            elif s.timepoint == "baseline":
                assert 28 <= s.days_since_ablation <= 42
            assert s.has_post == (s.category != "indeterminate")
        dates = [s.date for s in p.studies]
        assert dates == sorted(dates)
    reab = next(p for p in plans if p.scenario == "reablation")
    assert len(reab.ablation_dates) == 2 and 60 <= (reab.ablation_dates[1] - reab.ablation_dates[0]).days <= 75
    assert any(s.vessel_touching for p in plans if p.scenario == "vessel" for s in p.studies)
    assert sum(any(s.timepoint == "pre_ablation" for s in p.studies) for p in plans[:2]) == 1


def test_vessel_touches_az_at_baseline():
    """The confounder vessel's wall is tangent to the AZ surface (gap within +-0.3 mm)."""
    plan = plan_patient(SCENARIOS.index("vessel"), np.random.default_rng([SEED, 4]), get_profile("default"))
    vessel = next(v for v in plan.anatomy.vessels if v.touching)
    les = next(s.lesion for s in plan.studies if s.timepoint == "baseline")
    u = np.random.default_rng(0).standard_normal((200000, 3))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    surf = les.az_centre + (u * les.az_semi_axes) @ les.az_rot.T  # points on the AZ surface
    cx, cy = vessel.centre_xy(surf[:, 2])
    gap = np.hypot(surf[:, 0] - cx, surf[:, 1] - cy) - vessel.radius
    assert -0.3 < gap.min() < 0.3


def test_abdomen_profile_puts_enhancing_organs_against_the_zone():
    """Issue 15: every ablation zone of the abdomen profile touches a kidney, the spleen or a
    bowel loop (gap 0-2 mm between the surfaces at baseline), whose contrast physiology enhances like tumour; the old profiles draw no such organ."""
    from phantom.intensities import t1_tissue_values
    from phantom.lesion import LesionState

    prof = get_profile("abdomen")
    u = np.random.default_rng(0).standard_normal((40000, 3))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    kinds = set()
    for i in range(8):
        plan = plan_patient(i, np.random.default_rng([SEED, i]), prof)
        beside = [o for o in plan.anatomy.organs if o.beside_zone]
        assert beside, plan.scenario
        les = next(s.lesion for s in plan.studies if s.timepoint == "baseline")
        for organ in beside:
            kinds.add(organ.kind)
            # Points of the organ's surface against the AZ's implicit function: the nearest is
            # within 0-2.5 mm of the AZ surface (first-order distance, a fraction of a mm off).
            w = ((u * organ.semi) @ organ.rot.T + organ.centre - les.az_centre) @ les.az_rot / les.az_semi_axes
            q = np.sqrt(np.sum(w * w, axis=1))
            gap = float(np.min((q - 1) * np.min(les.az_semi_axes)))
            assert -0.5 < gap < 2.5, (plan.scenario, organ.kind, gap)
        assert plan.anatomy.physiology == "abdominal"
        values = t1_tissue_values(plan.anatomy, les, 20)
        pre = t1_tissue_values(plan.anatomy, les, None)
        assert values["kidney_cortex"] / pre["kidney_cortex"] - 1 >= 1.0  # corticomedullary phase
    assert kinds >= {"kidney", "bowel"}
    # The default profile is unchanged: no organ beside the zone, mild physiology.
    plan = plan_patient(0, np.random.default_rng([SEED, 0]), get_profile("default"))
    assert not any(o.beside_zone for o in plan.anatomy.organs) and plan.anatomy.physiology == "mild"
    assert isinstance(les, LesionState)


def test_liver_profile_puts_the_zone_inside_enhancing_liver_with_veins_around_it():
    """Issue 15 item 1: a zone of the liver profile lies >= 12 mm inside a liver (its whole reach:
    growth, nodule), with 2-4 veins through the liver clear of the zone; the parenchyma enhances
    less than a tumour nodule in the arterial phase and most in the portal phase, the veins from
    the portal phase."""
    from phantom.intensities import t1_tissue_values
    from phantom.render import render

    prof = get_profile("liver")
    u = np.random.default_rng(0).standard_normal((20000, 3))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    for i in range(8):
        plan = plan_patient(i, np.random.default_rng([SEED, i]), prof)
        livers = [o for o in plan.anatomy.organs if o.kind == "liver"]
        assert len(livers) == 1 and plan.anatomy.physiology == "abdominal"
        liver = livers[0]
        for st in plan.studies:
            les = st.lesion
            pts = [les.az_centre + (u * les.az_semi_axes) @ les.az_rot.T] if les.az_semi_axes is not None else []
            if les.nodule_centre is not None:
                pts.append(les.nodule_centre + u * les.nodule_radius)
            for p in pts:  # inside the liver shrunk by 12 mm
                q = np.sum((((p - liver.centre) @ liver.rot) / (liver.semi - 12.0)) ** 2, axis=1)
                assert q.max() < 1.0, (plan.scenario, st.timepoint, float(q.max()))
        veins = [v for v in plan.anatomy.vessels if v.venous and not v.touching]
        assert 1 <= len(veins) <= 4
        les = next(s.lesion for s in plan.studies if s.timepoint == "baseline")
        pre = t1_tissue_values(plan.anatomy, les, None)
        re = {t: {k: v / pre[k] - 1 for k, v in t1_tissue_values(plan.anatomy, les, t).items() if pre[k]}
              for t in (20, 70, 180)}
        assert re[20]["liver"] < 0.5 * re[20]["nodule"] and re[70]["liver"] == max(re[t]["liver"] for t in re)
        assert re[20]["vein"] < re[70]["vein"]
    # A rendered study holds liver around the zone on the zone's own slice.
    from phantom.geometry import Deformation, Pose, axial_direction, make_grid

    plan = plan_patient(0, np.random.default_rng([SEED, 0]), prof)
    les = next(s.lesion for s in plan.studies if s.timepoint == "baseline")
    grid = make_grid(les.az_centre, axial_direction(), (96, 96, 3), (1.5, 1.5, 3.0), 3.0)
    r = render(grid, Pose(np.eye(3), np.zeros(3), Deformation.identity()), plan.anatomy, les)
    assert r.fractions["liver"][1].sum() > 0.3 * 96 * 96 and r.fractions["az"][1].sum() > 50
    # The other profiles draw no liver and no vein.
    for name in ("default", "abdomen"):
        plan = plan_patient(0, np.random.default_rng([SEED, 0]), get_profile(name))
        assert not any(o.kind == "liver" for o in plan.anatomy.organs)
        assert not any(v.venous for v in plan.anatomy.vessels)


def test_growth_rescaling_rule():
    """Truth sizes are adjusted so the category agrees with the growth rule on each grid."""
    from phantom.patient import _size_consistent

    plan = plan_patient(SCENARIOS.index("growth"), np.random.default_rng([SEED, 3]), get_profile("default"))
    grown = next(s for s in plan.studies if s.category == "suspected_local_tumour_progression")
    _, la = _size_consistent(grown, grown.lesion, 30.0, 28.0)
    assert la >= max(1.2 * 28.0, 28.0 + 5.0) + 2.0
    clean = next(s for s in plan.studies if s.category == "no_evidence_of_ltp")
    les, la = _size_consistent(clean, clean.lesion, 34.0, 28.0)
    assert la <= min(1.2 * 28.0, 28.0 + 5.0) - 2.0
    np.testing.assert_allclose(les.az_semi_axes, clean.lesion.az_semi_axes * la / 34.0)


# --------------------------------------------------------------------------- the export
def test_files_and_truth_schema(cohort):
    out, truth = cohort
    assert json.loads((out / "truth.json").read_text()) == truth
    assert truth["generator"] == {"seed": SEED, "profile": "default", "n_patients": 2, "version": 1}
    assert [p["scenario"] for p in truth["patients"]] == ["complete", "ltp"]
    for p in truth["patients"]:
        for st in p["studies"]:
            for key in ("study_instance_uid", "study_date", "timepoint", "session", "category", "has_post_contrast",
                        "days_since_ablation", "az", "nodule", "vessel_touching", "series", "truth_labels",
                        "landmarks_pre_lps", "landmarks_post_lps"):
                assert key in st
            assert (out / st["truth_labels"]).is_file()
            assert len(st["landmarks_pre_lps"]) == 20 and len(st["landmarks_post_lps"]) == 20
            roles = [s["role"] for s in st["series"]]
            assert roles.count("t1_pre") == 1 and roles.count("t2") == 1 and 1 <= roles.count("t1_post") <= 3
            if st["az"]:
                assert st["az"]["measured_by"] == "pipeline.measurement.axes.measure_ablation_zone"
                assert st["az"]["long_axis_mm"] >= st["az"]["short_axis_mm"] > 10
    with open(out / "procedures.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["patient_id", "ablation_date", "organ", "target_x", "target_y", "target_z"]
    assert len(rows) == sum(len(p["ablation_dates"]) for p in truth["patients"])
    n_files = sum(len(s["files"]) for p in truth["patients"] for st in p["studies"] for s in st["series"])
    assert len([f for f in (out / "export").rglob("*") if f.is_file()]) == n_files + 3  # + junk
    names = [f.name for f in (out / "export").rglob("*") if f.is_file()]
    assert any(n.endswith(".dcm") for n in names) and any("." not in n for n in names)


def test_geometry_roundtrip_incl_oblique(cohort):
    """SimpleITK reads every T1/T2 series on exactly the grid it was rendered on."""
    out, truth = cohort
    tilts = []
    for p in truth["patients"]:
        for st in p["studies"][:3]:
            for s in st["series"]:
                if s["role"] == "other" or (s["role"] == "t1_post" and s["phase_index"] > 1):
                    continue
                _assert_geometry(_read_series(out, s), s["geometry"])
                tilts.append(abs(s["oblique_tilt_deg"] or 0.0))
    oblique = [s for p in truth["patients"] for st in p["studies"] for s in st["series"]
               if abs(s["oblique_tilt_deg"] or 0) > 5]
    assert oblique, "the test cohort should hold an oblique series (change SEED)"
    img = _read_series(out, oblique[0])
    _assert_geometry(img, oblique[0]["geometry"])
    assert abs(np.degrees(np.arccos(img.GetDirection()[8])) - abs(oblique[0]["oblique_tilt_deg"])) < 1e-3


def test_labels_on_post_grid_and_centres(cohort):
    """Truth labels share the post series' grid; the AZ centre (LPS) hits the AZ label and a bright core."""
    out, truth = cohort
    for p in truth["patients"]:
        for st in p["studies"]:
            lab = sitk.ReadImage(str(out / st["truth_labels"]))
            post = _series(st, "t1_post")[-1]
            _assert_geometry(lab, post["geometry"], tol=1e-3)  # NIfTI stores float32
            arr = sitk.GetArrayFromImage(lab)
            if st["az"] is None:
                assert (arr == 1).sum() == 0 and (arr == 3).sum() > 0  # pre-ablation tumour
                continue
            idx = lab.TransformPhysicalPointToIndex(st["az"]["centre_lps"])
            assert lab[idx] == 1
            if st["nodule"]:
                assert lab[lab.TransformPhysicalPointToIndex(st["nodule"]["centre_lps"])] == 3
            vox_ml = np.prod(lab.GetSpacing()) / 1000
            assert abs((arr == 1).sum() * vox_ml - st["az"]["volume_ml"]) < 0.15 * st["az"]["volume_ml"]


def test_t1_bright_core_and_enhancement(cohort):
    """Baseline: AZ pre >= 1.6x surrounding muscle, not enhancing (post/pre ~ 1); rim enhances."""
    out, truth = cohort
    for p in truth["patients"]:
        st = next(s for s in p["studies"] if s["timepoint"] == "baseline")
        pre = sitk.GetArrayFromImage(_read_series(out, _series(st, "t1_pre")[0])).astype(float)
        post_s = _series(st, "t1_post")[-1]
        post = sitk.GetArrayFromImage(_read_series(out, post_s)).astype(float)
        lab = sitk.GetArrayFromImage(sitk.ReadImage(str(out / st["truth_labels"])))
        box = tuple(slice(max(sl.start - m, 0), sl.stop + m)
                    for sl, m in zip(ndimage.find_objects((lab > 0).astype(int))[0], (4, 16, 16)))
        pre, post, lab = pre[box], post[box], lab[box]
        # Labels follow the post pose; pre moved by <= 2.5 mm + 1 deg: erode/dilate generously.
        core = ndimage.binary_erosion(lab == 1, np.ones((1, 7, 7)))
        near = ndimage.binary_dilation(lab > 0, np.ones((3, 13, 13)))
        ring = ndimage.binary_dilation(lab > 0, np.ones((5, 25, 25))) & ~near
        pre_ratio = np.median(pre[core]) / np.median(pre[ring])
        post_ratio = np.median(post[core]) / np.median(post[ring])
        assert pre_ratio >= 1.6
        assert 0.85 <= post_ratio / pre_ratio <= 1.05
        if (lab == 2).sum() > 20:
            assert np.mean(post[lab == 2]) / np.median(post[ring]) > 1.15


def test_target_and_landmarks(cohort):
    """procedures.csv target lies in the bright AZ of the baseline pre series; landmarks move with motion."""
    out, truth = cohort
    with open(out / "procedures.csv") as f:
        rows = {r["patient_id"]: r for r in csv.DictReader(f)}
    for p in truth["patients"]:
        st = next(s for s in p["studies"] if s["timepoint"] == "baseline")
        pre = _read_series(out, _series(st, "t1_pre")[0])
        r = rows[p["patient_id"]]
        target = [float(r["target_x"]), float(r["target_y"]), float(r["target_z"])]
        arr = sitk.GetArrayFromImage(pre)
        i, j, k = pre.TransformPhysicalPointToIndex(target)
        muscle = np.median(arr[arr > 0.4 * np.percentile(arr, 99)])  # the body is mostly muscle
        assert np.median(arr[k, j - 1:j + 2, i - 1:i + 2]) > 1.5 * muscle
        for s in p["studies"]:
            a, b = np.asarray(s["landmarks_pre_lps"]), np.asarray(s["landmarks_post_lps"])
            shift = np.linalg.norm(a - b, axis=1)
            assert shift.max() < 5.0 and shift.max() > 0.05
            g = _series(s, "t1_pre")[0]["geometry"]
            grid_idx = (a - g["origin"]) @ np.reshape(g["direction"], (3, 3)) / g["spacing"]
            assert np.all(grid_idx > -0.5) and np.all(grid_idx < np.asarray(g["size"]) - 0.5)


def test_junk_present(cohort):
    out, truth = cohort
    junk = truth["junk"]
    assert any(j.endswith("README.txt") for j in junk) and any(j.endswith("Thumbs.db") for j in junk)
    trunc = out / next(j for j in junk if j.endswith("IM999999"))
    ds = pydicom.dcmread(trunc, force=True)
    with pytest.raises(Exception):
        _ = ds.pixel_array


def test_deterministic_and_independent_of_n(cohort, tmp_path):
    """Same seed -> same UIDs and pixels; patient i does not depend on n_patients."""
    out, truth = cohort
    truth1 = generate_export(tmp_path, 1, SEED, with_junk=False)
    p_a, p_b = truth["patients"][0], truth1["patients"][0]
    assert p_a == p_b

    def digest(root: Path, patient: dict) -> str:
        h = hashlib.sha256()
        for st in patient["studies"]:
            for s in st["series"]:
                for f in s["files"]:
                    h.update((root / f).read_bytes())
        return h.hexdigest()

    assert digest(out, p_a) == digest(tmp_path, p_b)
    other = generate_export(tmp_path / "other", 1, SEED + 1, with_junk=False)
    assert other["patients"][0]["studies"][0]["study_instance_uid"] != p_a["studies"][0]["study_instance_uid"]
