"""One patient's studies: poses, grids, the rendered series written as DICOM files, and each
study's truth (label map, AZ measurements, landmarks) and procedure rows.

Coordinates of the truth: see :mod:`phantom.export`. The order of draws from the patient's
generator fixes the output of a seed: keep it when changing this module.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from pipeline.core.records import Label

from .acquisition import coil_bias, draw_t1_grid, draw_t2_grid, random_pose, rician, small_motion, store_pixels
from .body import Anatomy
from .dicom_writer import SeriesHeader, study_dataset, write_series
from .geometry import Grid, Pose, axial_direction, coronal_direction, make_grid, sagittal_direction
from .intensities import T1_PHASE_SECONDS, intensity, t1_tissue_values, t2_tissue_values
from .layout import Layout, Uids
from .profiles import Profile
from .render import render
from .scenarios import PatientPlan, StudyPlan, rescale_az
from .vendors import LOCALIZER_SEQUENCE, T1_SEQUENCE, T2_SEQUENCE, VENDOR_INFO

N_LANDMARKS = 20


def _time_str(seconds_of_day: float) -> str:
    s = int(seconds_of_day)
    frac = int(round((seconds_of_day - s) * 1e6)) % 1000000
    return f"{s // 3600:02d}{(s // 60) % 60:02d}{s % 60:02d}.{frac:06d}"


@dataclass
class _SeriesOut:
    uid: str
    role: str
    phase_index: int | None
    description: str
    phase_seconds: int | None
    scale: float  # real value (after rescale) per phantom intensity unit
    grid: Grid
    files: list[Path]


def _landmarks(rng: np.random.Generator, anatomy: Anatomy) -> np.ndarray:
    """20 world points inside the body: 8 within 15-40 mm of the target, 12 further out.

    Kept within +-35 mm (S-I) and 80 mm (in-plane) of the target so they stay in the T1
    field of view whatever the pose.
    """
    a, b = anatomy.body_semi_xy
    pts = []
    while len(pts) < N_LANDMARKS:
        near = len(pts) < 8
        v = rng.standard_normal(3)
        v /= np.linalg.norm(v)
        p = anatomy.target + v * (rng.uniform(15, 40) if near else rng.uniform(40, 80))
        if abs(p[2] - anatomy.target[2]) > 35:
            continue
        if (p[0] / (a - anatomy.fat_mm - 8)) ** 2 + (p[1] / (b - anatomy.fat_mm - 8)) ** 2 >= 1:
            continue
        pts.append(p)
    return np.array(pts)


def _section_axes(grid: Grid, pose: Pose, lesion) -> tuple[float, float]:
    """Analytic (long, short) axis (mm) of the AZ on the acquired slices of ``grid``.

    The largest section of an ellipsoid by parallel planes is the central one (parallel
    sections are homothetic); its quadratic form in the slice plane is the Schur complement
    of the ellipsoid's form in grid axes. The deformation (<= 1.5 mm, smooth) is ignored.
    """
    Rg = grid.direction.T @ pose.R @ lesion.az_rot  # ellipsoid frame -> grid (i, j, k) frame
    Q = Rg @ np.diag(1 / np.asarray(lesion.az_semi_axes, float) ** 2) @ Rg.T
    S = Q[:2, :2] - np.outer(Q[:2, 2], Q[2, :2]) / Q[2, 2]
    ev = np.linalg.eigvalsh(S)
    return float(2 / np.sqrt(ev[0])), float(2 / np.sqrt(ev[1]))


def _az_truth(labels: np.ndarray, grid: Grid, lesion, pose: Pose) -> tuple[dict, str]:
    """AZ measurements from the truth mask with the project's measurement function."""
    semi = np.asarray(lesion.az_semi_axes, float)
    try:
        from pipeline.measurement.axes import measure_ablation_zone  # noqa: PLC0415 (optional while being written)
    except ImportError:
        measure_ablation_zone = None
    if measure_ablation_zone is not None:
        mask = sitk.GetImageFromArray((labels == Label.ABLATION_ZONE).astype(np.uint8))
        mask.SetOrigin(tuple(grid.origin))
        mask.SetSpacing(grid.spacing)
        mask.SetDirection(tuple(grid.direction.ravel()))
        m = measure_ablation_zone(mask)
        return {"long_axis_mm": m.long_axis_mm, "short_axis_mm": m.short_axis_mm, "volume_ml": m.volume_ml,
                "max_3d_diameter_mm": m.max_3d_diameter_mm}, "pipeline.measurement.axes.measure_ablation_zone"
    # Fallback while pipeline.measurement.axes is missing: analytic values.
    la, sa = _section_axes(grid, pose, lesion)
    return {"long_axis_mm": la, "short_axis_mm": sa, "volume_ml": float(4 / 3 * np.pi * np.prod(semi) / 1000),
            "max_3d_diameter_mm": float(2 * semi.max())}, "analytic_fallback"


def _size_consistent(st: StudyPlan, lesion, long_axis: float, nadir: float | None):
    """Rescale the AZ so the truth category agrees with the growth rule on *this* grid.

    The in-plane long axis depends on how the (random-oriented) AZ is cut by the slices of
    each study (tilt, pose), so nominal scale factors alone could make a clean follow-up
    "grow" over the nadir, or a growth case miss the threshold. Growth cases get >=
    max(28 %, 7 mm) over the nadir; other follow-ups stay <= min(+8 %, +3 mm).
    """
    if nadir is None or st.timepoint != "follow_up":
        return lesion, long_axis
    if st.category == "suspected_local_tumour_progression":
        need = max(1.28 * nadir, nadir + 7.0)
        f = need / long_axis if long_axis < need else 1.0
    else:
        cap = min(1.08 * nadir, nadir + 3.0)
        f = cap / long_axis if long_axis > cap else 1.0
    return (rescale_az(lesion, f), long_axis * f) if f != 1.0 else (lesion, long_axis)


def generate_patient(plan: PatientPlan, rng: np.random.Generator, prof: Profile, uids: Uids, layout: Layout,
                      truth_dir: Path, out_dir: Path) -> tuple[dict, list[dict]]:
    vendor = VENDOR_INFO[plan.vendor]
    anatomy = plan.anatomy
    landmarks = _landmarks(rng, anatomy)
    pid = plan.patient_id
    birth = f"{int(rng.integers(1945, 1996))}{int(rng.integers(1, 13)):02d}{int(rng.integers(1, 29)):02d}"
    sex = str(rng.choice(["F", "M"]))
    sigma = float(rng.uniform(*prof.noise_sigma)) * anatomy.muscle_t1
    studies_truth, procedures = [], []
    baseline_target: dict[int, list[float]] = {}
    nadir: dict[int, float] = {}  # smallest analytic long axis so far, per session

    for s_idx, st in enumerate(plan.studies):
        study_uid = uids(pid, st.key, "study")
        pose_pre = random_pose(rng, prof.reposition_rot_deg, prof.reposition_trans_mm, prof.deform_amplitude_mm)
        target_pre = pose_pre.world_to_physical(anatomy.target)
        R_m, t_m = small_motion(rng, prof.motion_rot_deg, prof.motion_trans_mm)
        pose_post = pose_pre.moved(R_m, t_m, target_pre)
        grid, tilt = draw_t1_grid(rng, prof, target_pre)
        t2_grid, t2_cor = draw_t2_grid(rng, target_pre)
        bias_c = target_pre + rng.uniform(-60, 60, 3)
        bias_g = rng.standard_normal(3)
        bias_g *= rng.uniform(0.03, 0.08) / np.linalg.norm(bias_g)
        bias_h = float(rng.uniform(-0.04, 0.04))
        bias_args = (bias_c, bias_g, bias_h, *prof.bias_range)
        if st.has_post:
            n_phases = int(rng.integers(1, 4))
            phases = {1: [(70, 180)[int(rng.integers(0, 2))]], 2: [[70, 180], [20, 180]][int(rng.integers(0, 2))],
                      3: list(T1_PHASE_SECONDS)}[n_phases]
        else:
            phases = []
        with_localizer = bool(rng.random() < 0.4)

        study_time = float(rng.uniform(8 * 3600, 17 * 3600))
        frame_uid = uids(pid, st.key, "frame")
        study_ds = study_dataset({
            "SpecificCharacterSet": "ISO_IR 100",
            "PatientID": pid, "PatientName": f"PHANTOM^{plan.index + 1:03d}", "PatientBirthDate": birth,
            "PatientSex": sex, "StudyInstanceUID": study_uid, "StudyDate": st.date.strftime("%Y%m%d"),
            "SeriesDate": st.date.strftime("%Y%m%d"), "AcquisitionDate": st.date.strftime("%Y%m%d"),
            "ContentDate": st.date.strftime("%Y%m%d"),
            "StudyTime": _time_str(study_time), "StudyDescription": "MR soft tissue w/wo contrast",
            "AccessionNumber": f"A{int(rng.integers(10**6, 10**7))}", "StudyID": str(s_idx + 1),
            "ReferringPhysicianName": "", "Manufacturer": vendor.manufacturer,
            "ManufacturerModelName": vendor.model, "MagneticFieldStrength": vendor.field_strength,
            "InstitutionName": "PHANTOM HOSPITAL", "FrameOfReferenceUID": frame_uid, "PatientPosition": "HFS",
            "BodyPartExamined": "EXTREMITY",
        })
        folder = layout.study_folder()
        series_out: list[_SeriesOut] = []
        series_no = 1

        def emit(role, phase_index, seconds, desc, g, img, seq, te, tr, acq_t, image_type, agent=None,
                 first_instance=1, uid_key=None):
            nonlocal series_no
            key = uid_key or desc
            uid = uids(pid, st.key, "series", key)
            noisy = rician(rng, img, sigma if role != "t2" else sigma * 100.0 / anatomy.muscle_t1)
            stored, rescale, scale = store_pixels(rng, noisy, vendor.philips_rescale)
            sops = [uids(pid, st.key, key, "sop", k) for k in range(g.size[2])]
            paths = layout.series_paths(folder, g.size[2], sops)
            header = SeriesHeader(
                series_instance_uid=uid, series_number=series_no, series_description=desc,
                acquisition_time=_time_str(acq_t), echo_time=te, repetition_time=tr, scanning_sequence=seq[0],
                sequence_variant=seq[1], scan_options=seq[2], acquisition_type=seq[3], image_type=image_type,
                rescale=rescale, contrast_agent=agent,
                temporal_position=phase_index if (vendor.temporal_position and phase_index) else None)
            write_series(study_ds, header, g, stored, paths, sops, first_instance)
            series_no += 1
            series_out.append(_SeriesOut(uid, role, phase_index, desc, seconds, scale, g, paths))

        t = study_time
        if with_localizer:
            _emit_localizer(rng, uids, pid, st, study_ds, layout, folder, pose_pre, anatomy, target_pre,
                            series_no, _time_str(t), series_out, vendor.philips_rescale, sigma)
            series_no += 1
        t += 120
        les = st.lesion
        if les.az_semi_axes is not None:
            la, _ = _section_axes(grid, pose_post if phases else pose_pre, les)
            les, la = _size_consistent(st, les, la, nadir.get(st.session))
            if phases:  # what the pipeline can measure: post-contrast studies only
                nadir[st.session] = min(la, nadir.get(st.session, np.inf))
        r_pre = render(grid, pose_pre, anatomy, les)
        bias = coil_bias(grid, *bias_args)
        t1_type = ["ORIGINAL", "PRIMARY", "M", "ND"]
        emit("t1_pre", None, None, vendor.t1_description(None, None, tilt != 0), grid,
             intensity(r_pre, t1_tissue_values(anatomy, les, None)) * bias, T1_SEQUENCE, 2.0, 4.2, t, t1_type)
        labels, label_grid, label_pose = r_pre.labels, grid, pose_pre
        del r_pre
        inject = t + 90
        if phases:
            r_post = render(grid, pose_post, anatomy, les)
            for pi, sec in enumerate(phases, 1):
                emit("t1_post", pi, sec, vendor.t1_description(pi, sec, tilt != 0), grid,
                     intensity(r_post, t1_tissue_values(anatomy, les, sec)) * bias, T1_SEQUENCE, 2.0, 4.2,
                     inject + sec, t1_type, agent=vendor.contrast_agent)
            labels, label_pose = r_post.labels, pose_post
            del r_post
        r_t2 = render(t2_grid, pose_pre, anatomy, les)
        emit("t2", None, None, vendor.t2_description(t2_cor), t2_grid,
             intensity(r_t2, t2_tissue_values(les)) * coil_bias(t2_grid, *bias_args), T2_SEQUENCE,
             float(rng.uniform(80, 100)), float(rng.uniform(3000, 4500)), inject + 420,
             ["ORIGINAL", "PRIMARY", "M", "NORM"])
        del r_t2

        # --- truth for this study
        label_rel = f"truth/{study_uid}_labels.nii.gz"
        lab_img = sitk.GetImageFromArray(labels)
        lab_img.SetOrigin(tuple(label_grid.origin))
        lab_img.SetSpacing(label_grid.spacing)
        lab_img.SetDirection(tuple(label_grid.direction.ravel()))
        sitk.WriteImage(lab_img, str(out_dir / label_rel), useCompression=True)

        az = None
        if les.az_semi_axes is not None:
            meas, how = _az_truth(labels, label_grid, les, label_pose)
            az = {**{k: round(float(v), 3) for k, v in meas.items()}, "measured_by": how,
                  "semi_axes_mm": [round(float(v), 3) for v in les.az_semi_axes],
                  "centre_lps": _r(label_pose.world_to_physical(les.az_centre)),
                  "rim_thickness_mm": round(float(les.rim_mm), 3)}
        nodule = None
        if les.nodule_centre is not None:
            nodule = {"centre_lps": _r(label_pose.world_to_physical(les.nodule_centre)),
                      "diameter_mm": round(2 * les.nodule_radius, 3), "kind": "nodule"}
        elif les.tumour_radius > 0:
            nodule = {"centre_lps": _r(label_pose.world_to_physical(les.az_centre)),
                      "diameter_mm": round(2 * les.tumour_radius, 3), "kind": "pre_ablation_tumour"}
        if st.timepoint == "baseline":
            baseline_target[st.session] = _r(target_pre)
        studies_truth.append({
            "study_instance_uid": study_uid, "study_date": st.date.isoformat(), "timepoint": st.timepoint,
            "session": st.session, "category": st.category, "has_post_contrast": st.has_post,
            "days_since_ablation": st.days_since_ablation, "az": az, "nodule": nodule,
            "vessel_touching": st.vessel_touching,
            "series": [{"series_instance_uid": s.uid, "role": s.role, "phase_index": s.phase_index,
                        "description": s.description, "phase_seconds": s.phase_seconds,
                        "intensity_scale": round(s.scale, 6), "n_files": len(s.files),
                        "oblique_tilt_deg": round(tilt, 3) if s.role in ("t1_pre", "t1_post") else None,
                        "geometry": _geometry(s.grid) if s.role != "other" else None,
                        "files": [str(p.relative_to(out_dir)) for p in s.files]} for s in series_out],
            "truth_labels": label_rel,
            "landmarks_pre_lps": [_r(p) for p in pose_pre.world_to_physical(landmarks)],
            "landmarks_post_lps": [_r(p) for p in pose_post.world_to_physical(landmarks)] if phases else None,
        })

    zone_in_liver = any(o.kind == "liver" for o in anatomy.organs)
    for session, abl in enumerate(plan.ablation_dates, 1):
        tgt = baseline_target.get(session, [float("nan")] * 3)
        organ = "liver" if zone_in_liver else "soft_tissue"
        procedures.append({"patient_id": pid, "ablation_date": abl.isoformat(), "organ": organ,
                           "target_x": tgt[0], "target_y": tgt[1], "target_z": tgt[2]})
    patient = {
        "patient_id": pid, "scenario": plan.scenario, "vendor": plan.vendor,
        "organs_beside_zone": [o.kind for o in anatomy.organs if o.beside_zone],
        "zone_site": "liver" if zone_in_liver else "muscle",
        "ablation_dates": [d.isoformat() for d in plan.ablation_dates],
        "intensities": {"muscle_t1_pre": round(anatomy.muscle_t1, 3), "muscle_re": round(anatomy.muscle_re, 4),
                        "noise_sigma": round(sigma, 3)},
        "studies": studies_truth,
    }
    return patient, procedures


def _emit_localizer(rng, uids, pid, st: StudyPlan, study_ds, layout: Layout, folder: Path, pose: Pose,
                    anatomy: Anatomy, target: np.ndarray, series_no: int, acq_time: str,
                    series_out: list, philips: bool, sigma: float) -> None:
    """3-plane localizer: one slice each axial, coronal, sagittal through the target (one series)."""
    uid = uids(pid, st.key, "series", "localizer")
    paths: list[Path] = []
    for n, direction in enumerate((axial_direction(0), coronal_direction(), sagittal_direction())):
        g = make_grid(target, direction, (128, 128, 1), (3.0, 3.0, 8.0), 8.0)
        img = intensity(render(g, pose, anatomy, st.lesion), t1_tissue_values(anatomy, st.lesion, None))
        stored, rescale, scale = store_pixels(rng, rician(rng, img, sigma), philips)
        sop = uids(pid, st.key, "localizer", "sop", n)
        p = layout.series_paths(folder, 1, [sop])
        header = SeriesHeader(uid, series_no, "localizer", acq_time, 1.6, 3.8, *LOCALIZER_SEQUENCE,
                              image_type=["ORIGINAL", "PRIMARY", "LOCALIZER"], rescale=rescale)
        write_series(study_ds, header, g, stored, p, [sop], first_instance=n + 1)
        paths += p
    series_out.append(_SeriesOut(uid, "other", None, "localizer", None, scale, g, paths))


def _geometry(g: Grid) -> dict:
    """The grid a series was rendered on, in SimpleITK's terms (size/spacing as (i, j, k))."""
    return {"size": list(g.size), "spacing": [float(v) for v in g.spacing], "origin": [float(v) for v in g.origin],
            "direction": [float(v) for v in g.direction.ravel()], "slice_thickness": g.slice_thickness}


def _r(p) -> list[float]:
    return [round(float(v), 4) for v in p]
