"""Describe enhancing foci and decide which are suspicious (criteria.md §6 rules 4 and 9).

A focus candidate (thick enhancing tissue, from the segmentation) is suspicious when it is
compact (not vessel-like) and locally >= 5 mm thick and >= 2x the rim's typical thickness;
strongly so when > 10 mm across [S10][S12][S24]. It is local when <= 10 mm from the AZ surface,
otherwise a new lesion [S6]. Its pattern along the margin is focal (< 90 deg), crescentic
(90-270 deg) or circumferential (> 270 deg) [S12]. A candidate touching an organ-scale
enhancing body (kidney, spleen, large vessel, a bowel loop filled with its contents; issue 15,
``pipeline.measurement.focus_context``) is split at the organ's surface: the organ part is kept in the
evidence, not suspicious, and only what protrudes from it is judged. Its thickness is at most
the diameter of the largest disc its half-maximum core holds on one slice
(``foci.thickness_holds_ball``): a thin wall crossed obliquely by the margin normals is not a nodule.
A local piece called vessel-like is fitted with one tube (``pipeline.measurement.tubes``) and
what the tube does not explain is judged on its own (a nodule merged with the vessel it lies
on, ``foci.vessel_residual_margin_mm``); the vessel test looks at tissue outside organ bodies.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
from scipy import ndimage as ndi
from scipy.spatial import ConvexHull, QhullError
from skimage.morphology import skeletonize

from pipeline.core.config import FociConfig
from pipeline.core.records import AxisMeasurement, Focus, RimMetrics
from pipeline.measurement.focus_context import enclosed_contents, inscribed_disc_mm, open_with_ball, organ_bodies
from pipeline.measurement.rim import angular_extent_deg, az_surface_samples, focus_margin_metrics
from pipeline.measurement.tubes import fit_tube
from pipeline.segmentation.classical import SegmentationResult, ball_zyx, spacing_zyx


def voxels_to_lps(image: sitk.Image, zyx: np.ndarray) -> np.ndarray:
    """(N, 3) voxel indices in (z, y, x) order -> (N, 3) LPS points in mm, direction kept."""
    direction = np.array(image.GetDirection(), dtype=float).reshape(3, 3)
    ijk = zyx[:, ::-1].astype(float) * np.array(image.GetSpacing())
    return np.array(image.GetOrigin()) + ijk @ direction.T


def _max_diameter_mm(points: np.ndarray, voxel_mm: float) -> float:
    """Largest distance between voxel centres, plus one voxel (centres underestimate by one)."""
    if len(points) < 2:
        return voxel_mm
    try:
        hull = points[ConvexHull(points).vertices] if len(points) > 4 else points
    except QhullError:  # flat or collinear component
        hull = points
    diffs = hull[:, None, :] - hull[None, :, :]
    return float(np.sqrt((diffs ** 2).sum(-1)).max()) + voxel_mm


def _elongation(points: np.ndarray) -> tuple[float, float]:
    """(ratio of the two largest principal extents, length along the first axis in mm)."""
    if len(points) < 4:
        return 1.0, 0.0
    centred = points - points.mean(0)
    eigval, eigvec = np.linalg.eigh(np.cov(centred.T))
    eigval = np.clip(eigval[::-1], 1e-6, None)
    proj = centred @ eigvec[:, -1]
    return float(np.sqrt(eigval[0] / eigval[1])), float(proj.max() - proj.min())


# Radius (mm) of the neighbourhood whose enhancing tissue tells a vessel piece from a nodule.
_LOCAL_BALL_MM = 15.0


# In-plane upsampling of the sub-pixel thickness measurement.
_UPSAMPLE = 3


def _thickness_half_max(re_a: np.ndarray, focus: np.ndarray, az: np.ndarray, spacing: np.ndarray) -> float:
    """Local thickness (mm) of a focus: the widest in-plane disc inside its half-maximum contour.

    Per slice, the relative-enhancement map around the focus is upsampled 3x in-plane (linear)
    and thresholded at half the focus's peak enhancement: for a sharp-edged object the half-
    maximum contour sits on its edge whatever the pixel size, whereas voxel masks misjudge a
    6 mm nodule on 1.5 mm pixels by a pixel either way. The AZ is excluded.
    """
    pad = 3
    best = 0.0
    fine = spacing[1:] / _UPSAMPLE
    for k in np.unique(np.nonzero(focus)[0]):
        rows, cols = np.nonzero(focus[k])
        r0, r1 = max(rows.min() - pad, 0), min(rows.max() + pad + 1, focus.shape[1])
        c0, c1 = max(cols.min() - pad, 0), min(cols.max() + pad + 1, focus.shape[2])
        patch = re_a[k, r0:r1, c0:c1].astype(np.float32)
        peak = float(np.percentile(re_a[k][focus[k]], 90))
        if peak <= 0:
            continue
        # grid_mode: pixels are areas, so the fine grid is exactly 3x the coarse one.
        up = ndi.zoom(patch, _UPSAMPLE, order=1, grid_mode=True, mode="nearest")
        region = np.kron(ndi.binary_dilation(focus[k, r0:r1, c0:c1], iterations=1),
                         np.ones((_UPSAMPLE, _UPSAMPLE), bool))
        not_az = np.kron(~az[k, r0:r1, c0:c1], np.ones((_UPSAMPLE, _UPSAMPLE), bool))
        mask = (up >= 0.5 * peak) & region & not_az
        if mask.any():
            edt = ndi.distance_transform_edt(mask, sampling=fine)
            # Centre-to-centre distance on the fine grid: add back half a fine pixel per side.
            best = max(best, 2.0 * float(edt.max()) - float(fine.min()))
    return best


def _local_shape(enhancing: np.ndarray, focus: np.ndarray, centre_zyx: np.ndarray, grid: sitk.Image,
                 spacing: np.ndarray, radius_mm: float) -> tuple[float, float]:
    """Elongation and length of the enhancing tissue connected to ``focus`` within a ball."""
    lo = np.maximum(np.floor(centre_zyx - radius_mm / spacing).astype(int), 0)
    hi = np.minimum(np.ceil(centre_zyx + radius_mm / spacing).astype(int) + 1, enhancing.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    zz, yy, xx = np.meshgrid(*(np.arange(a, b) for a, b in zip(lo, hi)), indexing="ij")
    inside = (((zz - centre_zyx[0]) * spacing[0]) ** 2 + ((yy - centre_zyx[1]) * spacing[1]) ** 2
              + ((xx - centre_zyx[2]) * spacing[2]) ** 2) <= radius_mm ** 2
    lab, _ = ndi.label(enhancing[box] & inside)
    keep = np.unique(lab[focus[box] & (lab > 0)])
    region = np.isin(lab, keep) & (lab > 0)
    if region.sum() < 4:
        return 1.0, 0.0
    return _elongation(voxels_to_lps(grid, np.argwhere(region) + lo))


def analyse_foci(
    seg: SegmentationResult,
    relative_enhancement: sitk.Image,
    grid: sitk.Image,
    az: AxisMeasurement | None,
    rim: RimMetrics | None,
    fc: FociConfig,
    min_component_mm: float,
    benign_rim_max_mm: float,
    rim_typical_mm: float | None = None,
) -> tuple[list[Focus], list[np.ndarray]]:
    """Describe each focus candidate; returns (all foci near the AZ, masks of the suspicious ones).

    ``fc``: the ``foci`` section; ``min_component_mm`` (``enhancement.min_component_mm``): a part
    of a candidate smaller than this is a speck; ``benign_rim_max_mm``
    (``rim.benign_max_thickness_mm``): the shell beyond which the vessel test follows the tissue.

    ``rim_typical_mm``: the rim's typical thickness around the whole margin (median over every
    surface normal, 0 where there is no rim), the reference of rule 9's "2x the rim median".
    The rim's own median (over normals that have rim) would compare a focus with itself on a
    margin where the focus is the only enhancement. Defaults to ``rim.median_thickness_mm``.
    """
    if not seg.found or az is None or not seg.focus_candidates:
        return [], []
    spacing = spacing_zyx(grid)
    in_plane = float(np.min(spacing[1:]))
    re_a = sitk.GetArrayFromImage(relative_enhancement)
    # Physical distance (mm) of every voxel to the AZ; 0 inside it.
    dist_to_az = ndi.distance_transform_edt(~seg.az, sampling=spacing)
    if rim_typical_mm is not None:
        rim_median = rim_typical_mm
    else:
        rim_median = rim.median_thickness_mm if (rim is not None and rim.present) else 0.0
    az_img = sitk.GetImageFromArray(seg.az.astype(np.uint8))
    az_img.CopyInformation(grid)
    surface = az_surface_samples(az_img)
    # Vessel test on the enhancing tissue beyond the benign-rim shell: a vessel touching the AZ
    # merges with the rim into a compact-looking blob, but beyond the shell it runs on as a tube.
    shell = ndi.binary_dilation(seg.az, structure=ball_zyx(benign_rim_max_mm, spacing))
    beyond = seg.enhancing & ~shell
    shapes: dict[int, tuple[float, float]] = {}
    foci: list[Focus] = []
    masks: list[np.ndarray] = []
    # Organ-scale enhancing bodies (kidney, spleen, large vessels, and bowel loops filled with
    # their enclosed contents): candidates are split at their surface and only what protrudes is
    # judged (focus_context.py).
    bodies = None
    if fc.organ_min_radius_mm is not None:
        contents = None
        if fc.hollow_min_content_ml is not None:
            contents = enclosed_contents(beyond, shell, spacing, fc.hollow_min_content_ml)
        bodies = organ_bodies(seg.enhancing & ~seg.az, spacing, fc.organ_min_radius_mm, fc.organ_min_extent_mm,
                              fc.organ_contact_margin_mm, contents, fc.hollow_wall_max_mm,
                              fc.organ_lobe_depth_mm, fc.organ_lobe_max_mm, fc.organ_core_radius_mm,
                              dist_to_az <= fc.local_max_distance_mm)
    # The vessel test looks at the enhancing tissue outside the organ bodies: an organ is
    # anatomy already (candidates are split at its surface below), and its length would make a
    # nodule protruding from it "vessel-like" (development seed 61: an 11 mm LTP nodule on a bowel
    # loop, dismissed as 3.3:1, 118 mm, the loop's own shape).
    free = seg.enhancing if bodies is None or not bodies.found else seg.enhancing & ~bodies.zone
    beyond_lab, _ = ndi.label(beyond & free)
    min_part_vox = max(1, int(np.ceil((np.pi / 6 * min_component_mm ** 3) / np.prod(spacing))))

    def describe(outside: np.ndarray, organ_mm: float | None, anatomy_reason: str,
                 alone: bool = False) -> tuple[Focus, bool, str] | None:
        """(the focus, suspicious, vessel kind) of one part; None beyond the search distance.

        The vessel kind of a local vessel-like part: "straight" (elongated along one axis: one
        straight tube is fitted to it), "curved" (long for its calibre and leaving the zone: it
        bends or branches), "" when it is not a local vessel.

        ``alone``: the part is what a fitted tube does not explain, judged on its own shape (the
        vessel it lies on would otherwise call it vessel-like again).
        """
        # Distance from the AZ surface: voxel-centre distance minus half a voxel.
        distance = max(0.0, float(dist_to_az[outside].min()) - 0.5 * in_plane)
        if distance > fc.new_lesion_search_mm:
            return None
        zyx = np.argwhere(outside)
        points = voxels_to_lps(grid, zyx)
        volume_ml = float(len(zyx) * np.prod(spacing) / 1000.0)
        diameter = _max_diameter_mm(points, in_plane)
        search_stopped = False
        if distance <= fc.local_max_distance_mm:
            # Rule 9's "locally thick" along the margin: thickness along the AZ-surface normals.
            focus_img = sitk.GetImageFromArray(outside.astype(np.uint8))
            focus_img.CopyInformation(grid)
            margin = focus_margin_metrics(focus_img, az_img, max_search_mm=fc.local_max_distance_mm, surface=surface)
            thickness = measured = margin.local_thickness_mm
            if margin.search_stopped:
                # The rule's rays end local_max_distance_mm from the zone: what it compares stops
                # there (and stays so: the calls do not change). The report gives the whole
                # focus: the same rays, followed on for the focus's diameter.
                whole = focus_margin_metrics(focus_img, az_img, max_search_mm=fc.local_max_distance_mm + diameter,
                                             surface=surface, start_within_mm=fc.local_max_distance_mm)
                measured, search_stopped = max(measured, whole.local_thickness_mm), whole.search_stopped
        else:
            thickness = measured = _thickness_half_max(re_a, outside, seg.az, spacing)
        along_normals = thickness
        disc = None
        if fc.thickness_holds_ball:
            # A nodule is thick in every direction, a wall cut obliquely only along the normals.
            # Its half-maximum core: partial-volume voxels at a thin wall's faces do not count.
            core = ndi.binary_fill_holes(outside & (re_a >= 0.5 * np.percentile(re_a[outside], 95)))
            disc = inscribed_disc_mm(core, spacing)
            thickness = min(thickness, disc)
        # The rule's thickness along the normals, as a reader is told it (whole focus, or 'at least').
        shown = f"at least {measured:.1f} mm" if search_stopped else f"{measured:.1f} mm"
        if disc is not None and disc < measured:
            measured, search_stopped = disc, False
        elongation, length = _elongation(points)
        # A vessel whose calibre hovers around the focus threshold breaks into short, compact-
        # looking pieces: look at the enhancing tissue within a ball around the piece as well.
        local_e, local_len = (1.0, 0.0) if alone else _local_shape(
            free, outside, zyx.mean(0), grid, spacing, _LOCAL_BALL_MM)
        if local_len > length and local_e >= fc.vessel_min_elongation:
            elongation, length = local_e, local_len
        for label in ([] if alone else touching_beyond(outside)):
            if label not in shapes:
                shapes[label] = _elongation(voxels_to_lps(grid, np.argwhere(beyond_lab == label)))
            if shapes[label][1] > length and shapes[label][0] >= fc.vessel_min_elongation:
                elongation, length = shapes[label]
        extent = angular_extent_deg(points, np.asarray(az.centroid_lps))
        mean_re = float(re_a[outside].mean())
        local = distance <= fc.local_max_distance_mm
        if not local and thickness > 0:
            # Away from the AZ a branching vessel tree is one component that PCA cannot call
            # elongated; its length for its calibre (volume / cross-section) gives it away. Only
            # for distant foci: a crescent of tumour along the margin is long for its thickness too.
            # (A sphere reads 2/3 of its diameter, a 20 x 8 x 8 mm ellipsoid 13 mm: never a vessel.)
            # Until 2026-12-07 this ran after the vessel decision and changed only the reported
            # figures (development liver seed 82: a 144 mm portal-vein tree, 16 mL of 5 mm calibre,
            # called a new nodular lesion).
            tube_length = volume_ml * 1000.0 / (np.pi / 4 * thickness ** 2)
            if tube_length >= fc.vessel_min_elongation * max(thickness, 1.0) and tube_length >= fc.vessel_min_length_mm:
                elongation, length = max(elongation, tube_length / thickness), max(length, tube_length)
        vessel = elongation >= fc.vessel_min_elongation and length >= fc.vessel_min_length_mm
        # The disc tells a sheet from a nodule and is held to the absolute minimum only: the rim
        # ratio compares thicknesses along the normals (a thick baseline rim, 2.7 mm, would ask
        # a 7.5 mm nodule on 5 mm slices for a 5.4 mm disc on one slice; development seed 13).
        thick = (along_normals >= fc.min_thickness_mm
                 and along_normals >= fc.min_thickness_ratio_to_rim * rim_median
                 and (disc is None or disc >= fc.min_thickness_mm))
        curved = False
        if (not vessel and thick and local and not alone and fc.vessel_tube_leaving_zone and disc
                and float(dist_to_az[outside].max()) - 0.5 * in_plane >= fc.vessel_min_length_mm):
            # A vessel that bends or branches beside the zone is not elongated along one axis
            # (a 7 mm vessel on a 30 mm radius reads 2:1), yet it is long for its calibre
            # (volume / the cross-section of its disc) and it leaves the zone: it reaches farther
            # than vessel_min_length_mm from the surface. A crescent of tumour is long for its
            # thickness too but hugs the margin; a nodule is neither long nor reaching away.
            # Asked only of a part that would otherwise be a nodule (thick).
            tube_length = volume_ml * 1000.0 / (np.pi / 4 * disc ** 2)
            if tube_length >= fc.vessel_min_elongation * disc and tube_length >= fc.vessel_min_length_mm:
                vessel, curved, elongation, length = True, True, tube_length / disc, tube_length
        # Rule 9: a nodular focus (thick) is suspicious, and strongly so when > 10 mm across. Size
        # alone is not enough: a stretch of patchy rim is long (and, with 3 mm slices, an oblique
        # 2.5 mm rim reads up to ~4.5 mm along its normals). The rule's "or coverage under 90 deg"
        # is not applied for the same reason: a patchy benign rim breaks into pieces under 90 deg.
        large = diameter > fc.strongly_suspicious_diameter_mm
        weak_distant = (not local) and mean_re < fc.new_lesion_min_relative_enhancement
        if curved:
            suspicious, reason = False, (
                f"enhancing structure long for its calibre and leaving the zone (vessel-like: ~{length:.0f} mm of "
                f"a {disc:.1f} mm calibre, reaching >= {fc.vessel_min_length_mm:g} mm from the zone): a bending or "
                f"branching vessel, not a nodule")
        elif vessel:
            suspicious, reason = False, f"elongated enhancing structure (vessel-like: {elongation:.1f}:1, {length:.0f} mm)"
        elif weak_distant:
            suspicious, reason = False, (f"distant and weakly enhancing (mean RE {mean_re:.2f} < "
                                         f"{fc.new_lesion_min_relative_enhancement:g}): parenchyma, not a new lesion")
        elif thick:
            suspicious = True
            # rim_median is the rim's median over every margin normal (0 where there is no rim),
            # not the rim's maximum (rim_max_thickness_mm): the text says which.
            reason = (f"nodular, {shown} thick (>= {fc.min_thickness_mm:g} mm and >= "
                      f"{fc.min_thickness_ratio_to_rim:g}x the rim's median thickness around the whole margin, "
                      f"{rim_median:.1f} mm)")
            if disc is not None:
                reason += f", holds a {disc:.1f} mm disc on one slice (>= {fc.min_thickness_mm:g} mm)"
            if large:
                reason += f"; strongly suspicious: {diameter:.1f} mm across (> {fc.strongly_suspicious_diameter_mm:g} mm)"
        elif disc is not None and disc < fc.min_thickness_mm <= along_normals:
            suspicious, reason = False, (
                f"thin enhancement: holds no disc thicker than {disc:.1f} mm (< {fc.min_thickness_mm:g} mm) on any "
                f"slice ({along_normals:.1f} mm along the margin normals): a wall or sheet cut obliquely, not a nodule")
        else:
            suspicious, reason = False, f"thin enhancement ({thickness:.1f} mm), within the benign rim pattern"
        if local:
            pattern = ("focal" if extent < fc.focal_max_deg else
                       "crescentic" if extent <= fc.crescentic_max_deg else "circumferential")
        else:
            pattern = "distant"
        if (not anatomy_reason and organ_mm and suspicious and fc.organ_fringe_min_aspect is not None
                and diameter >= fc.organ_fringe_min_aspect * max(measured, 0.1)):
            anatomy_reason = (f"fringe of an organ-scale enhancing structure ({organ_mm:.0f} mm): what protrudes is "
                              f"{diameter:.0f} mm across and {measured:.1f} mm thick (>= "
                              f"{fc.organ_fringe_min_aspect:g}:1), too flat for a nodule")
        if anatomy_reason:
            suspicious, reason = False, anatomy_reason
        elif organ_mm:
            reason = f"{reason}; measured on what protrudes from an organ-scale enhancing structure ({organ_mm:.0f} mm)"
        return Focus(
            centroid_lps=[round(float(v), 2) for v in points.mean(0)], volume_ml=round(volume_ml, 3),
            diameter_mm=round(diameter, 2), max_thickness_mm=round(thickness, 2),
            measured_thickness_mm=round(measured, 2), thickness_search_stopped=search_stopped,
            distance_to_az_surface_mm=round(distance, 2), mean_relative_enhancement=round(mean_re, 3),
            angular_extent_deg=round(extent, 1), pattern=pattern, local=local, suspicious=suspicious,
            reason=reason, organ_extent_mm=organ_mm), suspicious, (
                ("curved" if curved else "straight") if vessel and local and not anatomy_reason else "")

    def touching_beyond(region: np.ndarray) -> np.ndarray:
        """Labels of the enhancing components beyond the benign-rim shell that ``region`` touches."""
        return np.unique(beyond_lab[ndi.binary_dilation(region) & (beyond_lab > 0)])

    def off_the_tube(part: np.ndarray, kind: str) -> list[np.ndarray]:
        """The pieces of ``part`` that the vessel it is (with the vessel it joins) does not explain.

        A straight vessel: what lies off one tube fitted to it. A curved or branching one: what
        holds a ball wider than the vessel's calibre (the median inscribed radius along its
        skeleton) plus the margin; a vessel of that calibre cannot, whatever its course.
        """
        structure = part | np.isin(beyond_lab, touching_beyond(part))
        if kind == "curved":
            skeleton = skeletonize(structure)
            if not skeleton.any():
                return []
            radius = float(np.median(ndi.distance_transform_edt(structure, sampling=spacing)[skeleton]))
            off = open_with_ball(structure, radius + fc.vessel_residual_margin_mm, spacing)
        else:
            zyx = np.argwhere(structure)
            fit = fit_tube(zyx * spacing, float(np.max(spacing)), float(np.prod(spacing)))
            if fit is None:
                return []
            off = np.zeros_like(part)
            off[tuple(zyx[fit.unexplained(fc.vessel_residual_margin_mm)].T)] = True
        off &= part
        lab, n = ndi.label(off)
        sizes = ndi.sum_labels(off, lab, index=np.arange(1, n + 1)) if n else []
        return [lab == i + 1 for i, size in enumerate(sizes) if size >= min_part_vox]

    for mask in seg.focus_candidates:
        outside = mask & ~seg.az
        if not outside.any():
            continue
        # Split the candidate at the surface of the organ it touches: what lies within it stays
        # in the evidence with its reason, what protrudes is judged.
        parts: list[tuple[np.ndarray, float | None, str]] = [(outside, None, "")]
        if bodies is not None and bodies.found and (outside & bodies.zone).any():
            organ_mm, hollow = bodies.touching(outside)
            kind = ("a hollow organ (enhancing wall around non-enhancing contents: bowel loop, gallbladder)"
                    if hollow else "an organ-scale enhancing structure (kidney, spleen, large vessel)")
            size = (f"{organ_mm:.0f} mm long" if hollow else
                    f"{organ_mm:.0f} mm long and >= {2 * fc.organ_min_radius_mm:g} mm thick")
            parts = [(outside & bodies.zone, organ_mm, f"part of {kind}, {size}: normal anatomy, not a nodule")]
            rest = outside & ~bodies.zone
            lab, n = ndi.label(rest)
            sizes = ndi.sum_labels(rest, lab, index=np.arange(1, n + 1)) if n else []
            parts += [(lab == i + 1, organ_mm, "") for i, size in enumerate(sizes) if size >= min_part_vox]
        for part, part_organ_mm, anatomy_reason in parts:
            described = describe(part, part_organ_mm, anatomy_reason)
            if described is None:
                continue
            focus, suspicious, vessel_kind = described
            if vessel_kind and fc.vessel_residual_margin_mm is not None:
                # A nodule merged with the vessel: what the vessel's tube does not explain is
                # judged on its own, the rest stays in the evidence as the vessel.
                for residual in off_the_tube(part, vessel_kind):
                    alone = describe(residual, part_organ_mm, "", alone=True)
                    if alone is not None and alone[1]:
                        foci.append(alone[0].model_copy(update={
                            "reason": f"{alone[0].reason}; lies off a vessel's tube ({focus.reason})"}))
                        masks.append(residual)
            foci.append(focus)
            if suspicious:
                masks.append(part)
    return foci, masks
