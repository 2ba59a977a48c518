"""Organ-scale enhancing structures: what a focus candidate must not be part of (issue 15).

Normal organs enhance as much as tumour does (renal cortex, spleen, bowel wall, large vessels;
criteria.md §4: a dynamic series at ~20/70/180 s), and they lie against ablation zones in
practice (retroperitoneal and paraspinal zones touch the kidney, hepatic ones the vessels and
bowel). Enhancement alone cannot tell them from a residual nodule; scale and shape can: a nodule
at the margin is compact and bounded, an organ is thick over a long extent.

An **organ body** is enhancing tissue that holds a ball of radius ``organ_min_radius_mm``
everywhere (a morphological opening, computed exactly with two Euclidean distance transforms in
mm, anisotropic slices included) over a length of at least ``organ_min_extent_mm``. A candidate
focus is split at the organ's surface: its voxels within ``organ_contact_margin_mm`` of an
organ body are the organ's (partial volume, the organ's own surface roughness), and only what
protrudes from it is judged as a focus. Small vessels are too thin to have a body and keep their
own tests (elongation, thickness); a bowel loop gets one once its enclosed contents fill it
(``enclosed_contents``).

scipy's ``binary_opening`` with a ball of 6-8 mm is slow on a whole abdomen (an 11x11x5
structuring element); the distance-transform form is the same opening for a Euclidean ball.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi
from skimage.morphology import h_maxima
from skimage.segmentation import watershed


@dataclass
class OrganBodies:
    """Organ-scale enhancing bodies of one study, on the post-contrast grid (z, y, x)."""

    labels: np.ndarray  # int: 0 outside, k = body k (the opened enhancing tissue, long enough)
    hollow: dict[int, bool]  # body label -> it holds enclosed non-enhancing contents (a hollow organ)
    zone: np.ndarray  # bool: the bodies grown by the contact margin (what belongs to an organ)
    extents_mm: dict[int, float]  # body label -> length along its first principal axis

    @property
    def found(self) -> bool:
        return bool(self.extents_mm)

    def touching(self, region: np.ndarray) -> tuple[float, bool]:
        """(length in mm, hollow) of the longest body that ``region`` overlaps or touches ((0, False): none)."""
        near = ndi.binary_dilation(region, iterations=2) & (self.labels > 0)
        found = [(self.extents_mm[int(t)], self.hollow[int(t)]) for t in np.unique(self.labels[near])]
        return max(found, default=(0.0, False))


def principal_length_mm(zyx: np.ndarray, spacing: np.ndarray) -> float:
    """Length (mm) of a point set along its first principal axis (voxel centres, +1 voxel)."""
    if len(zyx) < 4:
        return float(len(zyx) and np.max(spacing))
    pts = zyx * spacing
    centred = pts - pts.mean(0)
    _, vecs = np.linalg.eigh(np.cov(centred.T))
    proj = centred @ vecs[:, -1]
    return float(proj.max() - proj.min() + np.min(spacing))


def open_with_ball(mask: np.ndarray, radius_mm: float, spacing: np.ndarray) -> np.ndarray:
    """Morphological opening by a Euclidean ball of ``radius_mm`` on an anisotropic grid.

    Erosion: voxels farther than the radius from the background; dilation: voxels within the
    radius of what survived. The volume is padded so that the image border is not background.
    """
    if not mask.any():
        return np.zeros_like(mask)
    pad = np.ceil(radius_mm / spacing).astype(int) + 1
    padded = np.pad(mask, [(p, p) for p in pad], mode="edge")
    core = ndi.distance_transform_edt(padded, sampling=spacing) > radius_mm
    if not core.any():
        return np.zeros_like(mask)
    opened = ndi.distance_transform_edt(~core, sampling=spacing) <= radius_mm
    opened &= padded
    return opened[tuple(slice(p, p + n) for p, n in zip(pad, mask.shape))]


def organ_bodies(enhancing: np.ndarray, spacing: np.ndarray, min_radius_mm: float, min_extent_mm: float,
                 contact_margin_mm: float, contents: np.ndarray | None = None,
                 wall_max_mm: float | None = None, lobe_depth_mm: float | None = None,
                 lobe_max_mm: float | None = None, core_radius_mm: float | None = None,
                 core_region: np.ndarray | None = None) -> OrganBodies:
    """Organ-scale bodies of an enhancing mask (bool, z/y/x; ``spacing`` mm in the same order).

    ``enhancing`` should not hold the ablation zone. ``contents``: enclosed non-enhancing
    contents (``enclosed_contents``) that make a hollow organ solid. ``wall_max_mm``: the
    enhancing tissue within this distance of the contents is the hollow organ's wall whether or
    not it holds the ball (a collapsed loop narrower than the ball, a loop's tapering end).
    Bodies shorter than ``min_extent_mm`` (a compact nodule thick enough to hold the ball, a
    small ring-enhancing nodule around its necrosis) are not organs. ``lobe_depth_mm``,
    ``lobe_max_mm``: the bodies are cut into lobes (``split_lobes``), and a lobe shorter than
    ``lobe_max_mm`` is taken out of its body: a nodule pressed against an organ, thick enough
    to hold the ball itself, joins the organ in the opening but is a lobe of its own.
    ``core_radius_mm``, ``core_region`` (bool): within ``core_region``, what of a solid body lies
    farther than ``contact_margin_mm`` from the body's opening by that larger ball is taken out
    of it (``outside_core``): a nodule sunk into an organ makes no depth saddle, but it is
    smaller than the organ.
    """
    solid = enhancing if contents is None else enhancing | contents
    opened = open_with_ball(solid, min_radius_mm, spacing)
    if contents is not None and wall_max_mm is not None and contents.any():
        opened |= solid & (ndi.distance_transform_edt(~contents, sampling=spacing) <= wall_max_mm)
    lab, _ = ndi.label(opened)
    extents: dict[int, float] = {}
    hollow: dict[int, bool] = {}
    for idx, sl in enumerate(ndi.find_objects(lab), 1):
        body = lab[sl] == idx
        length = principal_length_mm(np.argwhere(body) + [s.start for s in sl], spacing)
        if length >= min_extent_mm:
            extents[idx] = round(length, 1)
            hollow[idx] = contents is not None and bool(
                contents[sl][body].sum() > 0.1 * body.sum())
    lab[~np.isin(lab, list(extents))] = 0
    if contents is not None and any(hollow.values()):
        # A solid organ the filled loop touches joins its body in the opening; it is an organ
        # body of its own (it holds the ball over the organ length without the contents) and
        # is kept when the loop is cut back to its wall (development seed 61: a 34 mm thick
        # organ left over from a loop's body was read as a residual tumour 134 mm across).
        solid_organs = organ_scale(open_with_ball(enhancing, min_radius_mm, spacing), spacing, min_extent_mm)
        for idx, is_hollow in hollow.items():
            if is_hollow:
                trim_to_wall(lab, idx, contents, spacing, keep=solid_organs)
    if extents and lobe_depth_mm is not None and lobe_max_mm is not None:
        lobes = split_lobes(solid, lab > 0, spacing, lobe_depth_mm)
        for idx, sl in enumerate(ndi.find_objects(lobes), 1):
            if sl is None:
                continue
            lobe = lobes[sl] == idx
            if principal_length_mm(np.argwhere(lobe) + [s.start for s in sl], spacing) < lobe_max_mm:
                lab[sl][lobe] = 0
    if extents and core_radius_mm is not None and core_region is not None:
        for idx, sl in enumerate(ndi.find_objects(lab), 1):
            if sl is None or hollow.get(idx, False):
                continue
            box = tuple(slice(max(0, s.start - 1), s.stop + 1) for s in sl)  # background around the body
            body = lab[box] == idx
            lab[box][body & outside_core(body, core_radius_mm, contact_margin_mm, spacing) & core_region[box]] = 0
    zone = np.zeros(enhancing.shape, bool)
    if extents:
        zone = ndi.distance_transform_edt(lab == 0, sampling=spacing) <= contact_margin_mm
    return OrganBodies(lab, hollow, zone, extents)


def outside_core(body: np.ndarray, radius_mm: float, margin_mm: float, spacing: np.ndarray) -> np.ndarray:
    """Voxels of ``body`` (bool) farther than ``margin_mm`` from its opening by a ball of
    ``radius_mm`` (none when the body holds no such ball: it has no core to compare with)."""
    core = open_with_ball(body, radius_mm, spacing)
    if not core.any():
        return np.zeros_like(body)
    return body & (ndi.distance_transform_edt(~core, sampling=spacing) > margin_mm)


def organ_scale(opened: np.ndarray, spacing: np.ndarray, min_extent_mm: float) -> np.ndarray:
    """The connected parts of ``opened`` (bool) at least ``min_extent_mm`` long (bool)."""
    lab, _ = ndi.label(opened)
    keep = [idx for idx, sl in enumerate(ndi.find_objects(lab), 1)
            if principal_length_mm(np.argwhere(lab[sl] == idx) + [s.start for s in sl], spacing) >= min_extent_mm]
    return np.isin(lab, keep)


def trim_to_wall(lab: np.ndarray, idx: int, contents: np.ndarray, spacing: np.ndarray,
                 keep: np.ndarray | None = None) -> None:
    """Cut hollow body ``idx`` of ``lab`` (in place) back to its contents and its own wall.

    The ball rolling inside a filled loop reaches through its thin wall into a nodule pressed
    against it, so the opening makes the nodule part of the loop (development seed 61: an 11 mm
    LTP nodule between the zone and a bowel loop, discounted as bowel). A loop is its contents
    and a wall of one thickness: the body keeps what lies within the wall's typical thickness of
    them (the median distance of the wall's outer surface from the contents, in 3D so that a
    slice cutting the wall tangentially does not thicken it, plus half a pixel); what is thicker
    is not the wall and is judged. ``keep`` (bool): voxels never cut (solid organs the loop
    touches). The body's recorded length stays the uncut one (the organ the reader sees).
    """
    body = lab == idx
    inner = contents & body
    if not inner.any():
        return
    depth = ndi.distance_transform_edt(~inner, sampling=spacing)
    outer = body & ~inner & ~ndi.binary_erosion(body)
    wall_mm = float(np.median(depth[outer])) + 0.5 * float(np.min(spacing[1:]))
    cut = body & (depth > wall_mm)
    if keep is not None:
        cut &= ~keep
    lab[cut] = 0


def split_lobes(solid: np.ndarray, opened: np.ndarray, spacing: np.ndarray, depth_mm: float) -> np.ndarray:
    """Label the lobes of ``opened`` (int, 0 outside): one per depth maximum of ``solid``.

    Depth is the distance (mm) to the nearest non-solid voxel. A lobe is the watershed basin
    of a maximum that stands ``depth_mm`` or more above the saddle joining it to a deeper one:
    a nodule pressed against an organ is as deep as its radius at its centre and shallower
    where it meets the organ, so it becomes a lobe of its own, while an organ's surface
    irregularities (shallower than ``depth_mm``) do not split it. The opening joins what
    touches over a ball's width; only this separates a 12-20 mm nodule from the kidney it lies
    against. scikit-image's h-maxima and watershed.
    """
    lobes = np.zeros(opened.shape, np.int32)
    found = ndi.find_objects(opened.astype(np.uint8))
    if not found:
        return lobes
    # The maxima and basins on the bodies' box (one voxel of background around it) only: the same
    # labels as on the whole grid (nothing outside the bodies is a maximum or a basin, and the
    # raster order within the box is the grid's), ~3x faster on an abdomen (issue 19). The depth
    # itself needs the whole grid: a body's nearest non-solid voxel may lie outside its box.
    box = tuple(slice(max(0, s.start - 1), min(n, s.stop + 1)) for s, n in zip(found[0], opened.shape))
    depth = np.where(opened[box], ndi.distance_transform_edt(solid, sampling=spacing)[box], 0.0)
    markers, _ = ndi.label(h_maxima(depth, depth_mm))
    lobes[box] = watershed(-depth, markers, mask=opened[box])
    return lobes


def inscribed_disc_mm(region: np.ndarray, spacing: np.ndarray) -> float:
    """Diameter (mm) of the largest disc ``region`` holds on one acquired slice (bool, z/y/x).

    Twice the largest in-plane distance from a voxel to the background, less half a pixel (n
    pixels across read n or n + 1 pixels; the estimate is within half a pixel either way). In
    plane, not in 3D: with 3-6 mm slices a 6 mm nodule spans one or two slices and partial
    volume, so no 3D ball can tell its thickness, while 1-2 mm pixels can. A wall crossed
    obliquely by the zone's margin normals (bowel, vessel wall, renal cortex) is long along those
    normals but holds only a disc of its own thickness on the slices that cut it across.
    """
    if not region.any():
        return 0.0
    box = np.pad(region[ndi.find_objects(region.astype(np.uint8))[0]], ((0, 0), (1, 1), (1, 1)))
    deepest = max(float(ndi.distance_transform_edt(plane, sampling=spacing[1:]).max()) for plane in box)
    return max(0.0, 2.0 * deepest - 0.5 * float(np.min(spacing[1:])))


def enclosed_contents(enhancing: np.ndarray, exclude: np.ndarray, spacing: np.ndarray,
                      min_content_ml: float) -> np.ndarray:
    """Non-enhancing contents enclosed by enhancing walls, slice by slice (bool, z/y/x).

    ``exclude``: space never counted as contents (the ablation zone and its rim shell, which a
    tumour crescent may wrap). On each acquired slice the enhancing tissue is closed by one pixel
    (a thin wall loses pixels to partial volume) and its holes filled; the filled space that is
    neither enhancing nor excluded is enclosed. Regions under ``min_content_ml`` (specks between
    vessels) are dropped. A bowel loop, the gallbladder or a cyst is a thin enhancing wall
    around such contents; filled with them it is the solid organ it is. Per slice because
    3-6 mm slices cut a loop into rings, while 3D hole filling needs a wall closed in every
    direction.
    """
    contents = np.zeros_like(enhancing)
    ring = ndi.generate_binary_structure(2, 1)
    for k in np.flatnonzero(enhancing.any(axis=(1, 2))):
        closed = ndi.binary_closing(enhancing[k], structure=ring, iterations=1) | enhancing[k]
        contents[k] = ndi.binary_fill_holes(closed) & ~closed & ~exclude[k]
    lab, n = ndi.label(contents)
    if not n:
        return contents
    sizes = ndi.sum_labels(contents, lab, index=np.arange(1, n + 1)) * float(np.prod(spacing)) / 1000.0
    return np.isin(lab, 1 + np.flatnonzero(sizes >= min_content_ml))
