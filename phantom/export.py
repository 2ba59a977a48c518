"""Orchestration: patients -> studies -> series -> messy PACS export + ground truth.

Coordinates written to the truth (``truth.json``):
- ``az.centre_lps``, ``nodule.centre_lps`` and the truth label map are in the physical
  space (LPS mm) of the study's **post-contrast series pose (last phase)**; for a study
  without post-contrast (``has_post_contrast`` false) they are in the pre-contrast pose and
  the labels lie on the pre-contrast grid.
- ``landmarks_pre_lps`` / ``landmarks_post_lps``: the same 20 anatomical points in the
  pre-contrast and post-contrast (last phase) poses (``landmarks_post_lps`` is null
  without post-contrast).
- ``procedures.csv`` target: AZ centre in the pre-contrast pose of the session's baseline.

Determinism: every patient draws from its own ``numpy`` Generator seeded by
(seed, profile, patient index), so patient *i* is identical whatever ``n_patients`` is; UIDs
come from ``pydicom.uid.generate_uid(entropy_srcs=...)``.
"""

from __future__ import annotations

import csv
import io
import json
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.uid import generate_uid

from pipeline.core.records import Label

from .body import Anatomy
from .dicom_writer import SeriesHeader, study_dataset, write_series
from .geometry import (
    Deformation,
    Grid,
    Pose,
    axial_direction,
    coronal_direction,
    make_grid,
    rotation_matrix,
    sagittal_direction,
)
from .intensities import T1_PHASE_SECONDS, intensity, t1_tissue_values, t2_tissue_values
from .profiles import Profile, get_profile
from .render import render
from .scenarios import PatientPlan, StudyPlan, plan_patient, rescale_az
from .vendors import LOCALIZER_SEQUENCE, T1_SEQUENCE, T2_SEQUENCE, VENDOR_INFO

GENERATOR_VERSION = 1
N_LANDMARKS = 20


# --------------------------------------------------------------------------- small helpers
class Uids:
    """Deterministic UIDs: the same (seed, profile, parts) always gives the same UID."""

    def __init__(self, seed: int, profile: str):
        self._base = ["ablation-response-phantom", str(seed), profile]

    def __call__(self, *parts: object) -> str:
        return generate_uid(entropy_srcs=self._base + [str(p) for p in parts])


def _rand_name(rng: np.random.Generator) -> str:
    style = int(rng.integers(0, 3))
    if style == 0:
        return "".join(rng.choice(list("0123456789ABCDEF"), 8))
    if style == 1:
        return f"S{int(rng.integers(0, 10**7)):07d}"
    return f"DIR{int(rng.integers(0, 1000)):03d}_{int(rng.integers(0, 10**4)):04d}"


def _time_str(seconds_of_day: float) -> str:
    s = int(seconds_of_day)
    frac = int(round((seconds_of_day - s) * 1e6)) % 1000000
    return f"{s // 3600:02d}{(s // 60) % 60:02d}{s % 60:02d}.{frac:06d}"


def _random_pose(rng: np.random.Generator, rot_deg: float, trans_mm: float, max_def: float) -> Pose:
    R = rotation_matrix(*rng.uniform(-rot_deg, rot_deg, 3))
    return Pose(R, rng.uniform(-trans_mm, trans_mm, 3), Deformation.random(rng, max_def))


def _small_motion(rng: np.random.Generator, rot_deg: float, trans_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """Rigid motion with rotation angle <= rot_deg about a random axis and |t| <= trans_mm."""
    axis = rng.standard_normal(3)
    axis /= np.linalg.norm(axis)
    ang = np.deg2rad(rng.uniform(0.2, 1.0) * rot_deg)
    K = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    R = np.eye(3) + np.sin(ang) * K + (1 - np.cos(ang)) * K @ K
    t = rng.standard_normal(3)
    t *= rng.uniform(0.3, 1.0) * trans_mm / np.linalg.norm(t)
    return R, t


def _bias(grid: Grid, centre: np.ndarray, g: np.ndarray, h: float, lo: float, hi: float) -> np.ndarray:
    """Smooth multiplicative coil bias ``1 + g.(p-c)/100 + h |p-c|^2/100^2`` (p LPS mm), clipped.

    Separable in the voxel index because the direction matrix is orthonormal:
    ``p - c = D (e + s*idx)`` with ``e = D^T (o - c)``, so ``|p - c|^2 = sum_i (e_i + s_i idx_i)^2``.
    """
    e = grid.direction.T @ (grid.origin - centre)
    gd = grid.direction.T @ g  # g in grid axes
    b = np.float32(1.0)
    for ax, shape in ((0, (1, 1, -1)), (1, (1, -1, 1)), (2, (-1, 1, 1))):
        r = (e[ax] + grid.spacing[ax] * np.arange(grid.size[ax])) / 100.0
        b = b + (gd[ax] * r + h * r * r).astype(np.float32).reshape(shape)
    return np.clip(b, lo, hi)


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


# --------------------------------------------------------------------------- layout
class _Layout:
    """Messy export folders and file names for one patient."""

    def __init__(self, rng: np.random.Generator, export: Path, top_dirs: list[str]):
        self.rng = rng
        self.root = export / top_dirs[int(rng.integers(0, len(top_dirs)))] / _rand_name(rng)
        self.counter = int(rng.integers(1, 5000))
        self.folders: list[Path] = []

    def study_folder(self) -> Path:
        f = self.root / _rand_name(self.rng)
        self.folders.append(f)
        return f

    def series_paths(self, study_folder: Path, n: int, sop_uids: list[str]) -> list[Path]:
        rng = self.rng
        folder = study_folder / _rand_name(rng) if rng.random() < 0.6 else study_folder
        split = n > 4 and rng.random() < 0.2  # one series split across two folders
        other = self.root / _rand_name(rng)
        style = int(rng.integers(0, 4))
        paths = []
        for k in range(n):
            self.counter += 1
            name = (f"IM{self.counter:06d}", f"{sop_uids[k]}.dcm", f"IMG{self.counter:05d}.dcm",
                    f"{self.counter:08X}")[style]
            paths.append((other if split and k >= n // 2 else folder) / name)
        return paths


# --------------------------------------------------------------------------- per patient
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


def _t1_grid(rng: np.random.Generator, prof: Profile, target_phys: np.ndarray) -> tuple[Grid, float]:
    tilt = 0.0
    if rng.random() < prof.oblique_fraction:
        tilt = float(rng.uniform(*prof.oblique_tilt_deg) * rng.choice([-1, 1]))
    direction = axial_direction(tilt)
    ni = int(rng.choice(np.arange(prof.t1_matrix[0], prof.t1_matrix[1] + 1, 8)))
    nj = ni if rng.random() < 0.6 else int(max(prof.t1_matrix[0], ni - 8 * rng.integers(1, 4)))
    nk = int(rng.integers(prof.t1_slices[0], prof.t1_slices[1] + 1))
    px = float(np.round(rng.uniform(*prof.t1_pixel_mm), 4))
    off = np.array([*rng.uniform(-prof.fov_offset_mm, prof.fov_offset_mm, 2), rng.uniform(-8, 8)])
    slice_mm = prof.t1_slice_mm
    if prof.t1_slice_mm_choices:
        slice_mm = float(rng.choice(prof.t1_slice_mm_choices))
        nk = int(round(nk * prof.t1_slice_mm / slice_mm))  # the same slab, thicker slices
    grid = make_grid(target_phys + direction @ off, direction, (ni, nj, nk), (px, px, slice_mm), slice_mm)
    return grid, tilt


def _t2_grid(rng: np.random.Generator, target_phys: np.ndarray) -> tuple[Grid, bool]:
    coronal = rng.random() < 0.25
    thick = float(rng.choice([4.0, 4.5, 5.0]))
    gap = float(rng.choice([0.0, 0.4, 0.5]))
    sx = float(np.round(rng.uniform(1.3, 1.7), 4))
    sy = sx if rng.random() < 0.5 else float(np.round(sx * rng.uniform(1.05, 1.2), 4))  # rectangular pixels
    if coronal:
        size = (int(rng.choice([176, 192])), int(rng.choice([144, 160])), int(rng.integers(22, 27)))
        direction = coronal_direction()
    else:
        size = (int(rng.choice([176, 192])), int(rng.choice([160, 176])), int(rng.integers(22, 29)))
        direction = axial_direction(0.0)
    off = np.array([*rng.uniform(-15, 15, 2), rng.uniform(-5, 5)])
    return make_grid(target_phys + direction @ off, direction, size, (sx, sy, thick + gap), thick), coronal


def _store(rng: np.random.Generator, img: np.ndarray, philips: bool) -> tuple[np.ndarray, tuple | None, float]:
    """Vendor gain and quantisation: uint16 (12 bits used), optional Philips-like rescale.

    Returns (stored, (slope, intercept) or None, scale) with real = stored*slope + intercept
    = scale * img (up to rounding).
    """
    gain = float(rng.uniform(2.0, 4.5))
    stored = np.rint(img * np.float32(gain))
    rescale = None
    scale = gain
    if philips:
        slope = float(np.round(rng.uniform(0.4, 3.0), 5))
        offset = int(rng.choice([0, 0, 100]))  # stored offset compensated by the intercept
        stored += offset
        rescale = (slope, -offset * slope)
        scale = gain * slope
    return np.clip(stored, 0, 4095).astype(np.uint16), rescale, scale


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


def _generate_patient(plan: PatientPlan, rng: np.random.Generator, prof: Profile, uids: Uids, layout: _Layout,
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
        pose_pre = _random_pose(rng, prof.reposition_rot_deg, prof.reposition_trans_mm, prof.deform_amplitude_mm)
        target_pre = pose_pre.world_to_physical(anatomy.target)
        R_m, t_m = _small_motion(rng, prof.motion_rot_deg, prof.motion_trans_mm)
        pose_post = pose_pre.moved(R_m, t_m, target_pre)
        grid, tilt = _t1_grid(rng, prof, target_pre)
        t2_grid, t2_cor = _t2_grid(rng, target_pre)
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
            noisy = _rician(rng, img, sigma if role != "t2" else sigma * 100.0 / anatomy.muscle_t1)
            stored, rescale, scale = _store(rng, noisy, vendor.philips_rescale)
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
        bias = _bias(grid, *bias_args)
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
             intensity(r_t2, t2_tissue_values(les)) * _bias(t2_grid, *bias_args), T2_SEQUENCE,
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

    for session, abl in enumerate(plan.ablation_dates, 1):
        tgt = baseline_target.get(session, [float("nan")] * 3)
        procedures.append({"patient_id": pid, "ablation_date": abl.isoformat(), "organ": "soft_tissue",
                           "target_x": tgt[0], "target_y": tgt[1], "target_z": tgt[2]})
    patient = {
        "patient_id": pid, "scenario": plan.scenario, "vendor": plan.vendor,
        "organs_beside_zone": [o.kind for o in anatomy.organs if o.beside_zone],
        "ablation_dates": [d.isoformat() for d in plan.ablation_dates],
        "intensities": {"muscle_t1_pre": round(anatomy.muscle_t1, 3), "muscle_re": round(anatomy.muscle_re, 4),
                        "noise_sigma": round(sigma, 3)},
        "studies": studies_truth,
    }
    return patient, procedures


def _emit_localizer(rng, uids, pid, st: StudyPlan, study_ds, layout: _Layout, folder: Path, pose: Pose,
                    anatomy: Anatomy, target: np.ndarray, series_no: int, acq_time: str,
                    series_out: list, philips: bool, sigma: float) -> None:
    """3-plane localizer: one slice each axial, coronal, sagittal through the target (one series)."""
    uid = uids(pid, st.key, "series", "localizer")
    paths: list[Path] = []
    for n, direction in enumerate((axial_direction(0), coronal_direction(), sagittal_direction())):
        g = make_grid(target, direction, (128, 128, 1), (3.0, 3.0, 8.0), 8.0)
        img = intensity(render(g, pose, anatomy, st.lesion), t1_tissue_values(anatomy, st.lesion, None))
        stored, rescale, scale = _store(rng, _rician(rng, img, sigma), philips)
        sop = uids(pid, st.key, "localizer", "sop", n)
        p = layout.series_paths(folder, 1, [sop])
        header = SeriesHeader(uid, series_no, "localizer", acq_time, 1.6, 3.8, *LOCALIZER_SEQUENCE,
                              image_type=["ORIGINAL", "PRIMARY", "LOCALIZER"], rescale=rescale)
        write_series(study_ds, header, g, stored, p, [sop], first_instance=n + 1)
        paths += p
    series_out.append(_SeriesOut(uid, "other", None, "localizer", None, scale, g, paths))


def _rician(rng: np.random.Generator, img: np.ndarray, sigma: float) -> np.ndarray:
    """Magnitude of the image plus complex Gaussian noise of std ``sigma`` per channel."""
    n1 = rng.standard_normal(img.shape, dtype=np.float32) * np.float32(sigma)
    n2 = rng.standard_normal(img.shape, dtype=np.float32) * np.float32(sigma)
    return np.sqrt((img + n1) ** 2 + n2 * n2)


def _geometry(g: Grid) -> dict:
    """The grid a series was rendered on, in SimpleITK's terms (size/spacing as (i, j, k))."""
    return {"size": list(g.size), "spacing": [float(v) for v in g.spacing], "origin": [float(v) for v in g.origin],
            "direction": [float(v) for v in g.direction.ravel()], "slice_thickness": g.slice_thickness}


def _r(p) -> list[float]:
    return [round(float(v), 4) for v in p]


# --------------------------------------------------------------------------- junk
def _add_junk(rng: np.random.Generator, export: Path, out_dir: Path, patients: list[dict], uids: Uids) -> list[str]:
    """README, a Thumbs.db-like binary and one DICOM file cut in half (own series)."""
    junk = []
    readme = export / "README.txt"
    readme.write_text("PACS export (synthetic, ablation-response phantom).\r\nDo not edit.\r\n")
    junk.append(readme)
    folders = sorted({p.parent for p in export.rglob("*") if p.is_file()})
    thumbs = folders[int(rng.integers(0, len(folders)))] / "Thumbs.db"
    thumbs.write_bytes(b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + rng.integers(0, 256, 3000, dtype=np.uint8).tobytes())
    junk.append(thumbs)
    # A slice re-sent as its own series and cut mid-transfer: the header parses, the pixels do not.
    st = patients[0]["studies"][0]
    src = out_dir / st["series"][-1]["files"][0]
    ds = pydicom.dcmread(src)
    ds.SOPInstanceUID = uids("junk", "truncated", "sop")
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.SeriesInstanceUID = uids("junk", "truncated", "series")
    ds.SeriesNumber = 999
    ds.SeriesDescription = "screen save"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    data = buf.getvalue()
    trunc = folders[int(rng.integers(0, len(folders)))] / "IM999999"
    trunc.write_bytes(data[: len(data) // 2])
    junk.append(trunc)
    return [str(p.relative_to(out_dir)) for p in junk]


# --------------------------------------------------------------------------- entry point
def generate_export(out_dir: Path, n_patients: int, seed: int, *, profile: str = "default",
                    with_junk: bool = True, messy: bool = False) -> dict:
    """Write a synthetic PACS export with ground truth under ``out_dir``; return the truth.

    Writes ``export/`` (messy DICOM tree), ``truth.json`` (also returned), ``procedures.csv``
    (``patient_id,ablation_date,organ,target_x,target_y,target_z``, one row per session;
    target = AZ centre, LPS mm, in the session baseline's pre-contrast physical space) and
    ``truth/<StudyInstanceUID>_labels.nii.gz`` (0 bg, 1 AZ, 2 rim, 3 tumour/nodule, on the
    grid of the study's post-contrast series). See the module docstring for coordinates.
    ``messy``: also mix vendors' naming, transfer syntaxes, multi-frame files and every defect
    ingest reports (:mod:`phantom.messy`; ``truth["messy"]`` lists them).
    """
    prof = get_profile(profile)
    out_dir = Path(out_dir)
    export = out_dir / "export"
    (out_dir / "truth").mkdir(parents=True, exist_ok=True)
    export.mkdir(parents=True, exist_ok=True)
    uids = Uids(seed, prof.name)
    pcode = zlib.crc32(prof.name.encode())
    top_rng = np.random.default_rng([seed, pcode, 999_999])
    top_dirs = [_rand_name(top_rng) for _ in range(2)]

    patients, procedures = [], []
    for i in range(n_patients):
        rng = np.random.default_rng([seed, pcode, i])
        plan = plan_patient(i, rng, prof)
        layout = _Layout(rng, export, top_dirs)
        p, procs = _generate_patient(plan, rng, prof, uids, layout, out_dir / "truth", out_dir)
        patients.append(p)
        procedures += procs

    truth = {"generator": {"seed": seed, "profile": prof.name, "n_patients": n_patients,
                           "version": GENERATOR_VERSION},
             "patients": patients, "junk": []}
    if with_junk and patients:
        truth["junk"] = _add_junk(top_rng, export, out_dir, patients, uids)
    if messy and patients:
        # Vendors, transfer syntaxes, multi-frame, defects (phantom/messy.py); applied
        # after everything above so that the default output is unchanged.
        from .messy import make_messy  # noqa: PLC0415

        truth["messy"] = make_messy(out_dir, truth, seed)

    with open(out_dir / "procedures.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["patient_id", "ablation_date", "organ", "target_x", "target_y", "target_z"])
        w.writeheader()
        w.writerows(procedures)
    (out_dir / "truth.json").write_text(json.dumps(truth, indent=1))
    return truth
