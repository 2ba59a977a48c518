"""Registration layer 2: transform algebra (pure functions of ``SimpleITK`` transforms).

Building (:func:`identity`, :func:`euler_to_affine`), reading the linear part
(:func:`scale_factors`, :func:`rotation_angle_deg`), the split of a deformable result into its
affine and its field and back (:func:`split_affine_and_deformable`, :func:`deformable_as_field`,
:func:`compose_with_field`), the inverse (:func:`invert_registration`) and the measures the
checks use (:func:`motion_magnitude_mm`, :func:`inverse_consistency_residual_mm`,
:func:`jacobian_determinant_range`, :func:`deformation_max_mm`). ITK convention: a transform maps
a fixed point (LPS, mm) to a moving point. Imports ``pipeline.core`` and the layer before
(``common``).
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from pipeline.imaging.registration.common import coarse_grid_like

# Spacing (mm) of the grid on which a deformable transform's Jacobian is checked: the
# deformable stages have control points tens of mm apart, so 4 mm resolves their gradients.
_JACOBIAN_SPACING_MM = 4.0


def identity() -> sitk.Euler3DTransform:
    """The identity transform (an Euler3DTransform: what a failed registration returns)."""
    return sitk.Euler3DTransform()


def euler_to_affine(tx: sitk.Transform) -> sitk.AffineTransform:
    """Same mapping as an AffineTransform (keeps the centre of rotation)."""
    e = sitk.Euler3DTransform(tx)
    aff = sitk.AffineTransform(3)
    aff.SetCenter(e.GetCenter())
    aff.SetMatrix(e.GetMatrix())
    aff.SetTranslation(e.GetTranslation())
    return aff


def _linear_part(tx: sitk.Transform) -> np.ndarray:
    """3x3 linear part of an affine-like transform (of a composite's first, affine transform)."""
    if tx.GetName() == "CompositeTransform":
        tx = sitk.CompositeTransform(tx).GetNthTransform(0)
    for cast in (sitk.AffineTransform, sitk.Euler3DTransform):
        try:
            return np.array(cast(tx).GetMatrix()).reshape(3, 3)
        except (RuntimeError, TypeError):
            continue
    return np.eye(3)


def scale_factors(tx: sitk.Transform) -> np.ndarray:
    """Singular values of the linear part of an affine-like transform (1 for rigid)."""
    return np.linalg.svd(_linear_part(tx), compute_uv=False)


def rotation_angle_deg(tx: sitk.Transform) -> float:
    """Angle (deg) of the rotation in the linear part (polar decomposition ``M = R S``)."""
    u, _, vt = np.linalg.svd(_linear_part(tx))
    r = u @ vt
    return float(np.degrees(np.arccos(np.clip((np.trace(r) - 1.0) / 2.0, -1.0, 1.0))))


def motion_magnitude_mm(transform: sitk.Transform, mask_image: sitk.Image) -> float:
    """Mean displacement ``|T(x) - x|`` (mm) over the non-zero voxels ``x`` of ``mask_image``.

    ``mask_image`` defines the points (its grid, in the transform's fixed space). Works for any
    transform (it is sampled as a displacement field). Returns 0.0 for an empty mask.
    """
    m = sitk.GetArrayFromImage(mask_image) > 0
    if not m.any():
        return 0.0
    f = sitk.TransformToDisplacementFieldFilter()
    f.SetReferenceImage(mask_image)
    f.SetOutputPixelType(sitk.sitkVectorFloat64)
    field = f.Execute(transform)
    disp = sitk.GetArrayFromImage(field)  # (k, j, i, 3)
    return float(np.linalg.norm(disp[m], axis=1).mean())


def inverse_consistency_residual_mm(forward: sitk.Transform, backward: sitk.Transform,
                                    fixed_body: sitk.Image) -> float:
    """Mean round-trip displacement ``|backward(forward(x)) - x|`` (mm) over the fixed body.

    ``forward`` maps fixed -> moving points, ``backward`` moving -> fixed (registered
    independently the other way): a consistent pair returns every point to itself, and the
    round trip's error estimates the residual misregistration.
    """
    return motion_magnitude_mm(sitk.CompositeTransform([backward, forward]), fixed_body)


def jacobian_determinant_range(transform: sitk.Transform, body: sitk.Image) -> tuple[float, float]:
    """(min, max) of ``det(dT/dx)`` over the body (``body``'s non-zero voxels, ~4 mm grid).

    ``det <= 0`` somewhere means the transform folds space there. Computed with numpy rather
    than ITK's DisplacementFieldJacobianDeterminantFilter because that filter differentiates
    along the index axes and ignores the direction matrix, which is wrong on oblique grids:
    here ``dT/dx = I + (du/dxi) D^T`` with ``xi`` the grid axes (mm) and ``D`` the direction.
    Returns (1.0, 1.0) for an empty body.
    """
    ref = coarse_grid_like(body, _JACOBIAN_SPACING_MM)
    inside = sitk.GetArrayFromImage(sitk.Resample(body, ref, sitk.Transform(), sitk.sitkNearestNeighbor,
                                                      0, sitk.sitkUInt8)) > 0
    if not inside.any():
        return 1.0, 1.0
    f = sitk.TransformToDisplacementFieldFilter()
    f.SetReferenceImage(ref)
    f.SetOutputPixelType(sitk.sitkVectorFloat64)
    disp = sitk.GetArrayFromImage(f.Execute(transform))  # (k, j, i, 3): LPS components
    sp = ref.GetSpacing()
    # grad[..., c, a] = d u_c / d xi_a with a = grid axis i, j, k (array axes 2, 1, 0).
    grad = np.stack([np.gradient(disp, sp[a], axis=2 - a) for a in range(3)], axis=-1)
    d = np.array(ref.GetDirection()).reshape(3, 3)
    jac = np.eye(3) + grad[inside] @ d.T
    det = np.linalg.det(jac)
    return float(det.min()), float(det.max())


def deformation_max_mm(transform: sitk.Transform, body: sitk.Image) -> float:
    """Largest ``|D(x) - x|`` (mm) of the deformable part ``D`` of ``transform`` over the body
    (~4 mm grid); 0.0 for an affine-like transform or an empty body."""
    _, deformable = split_affine_and_deformable(transform)
    if deformable is None:
        return 0.0
    ref = coarse_grid_like(body, _JACOBIAN_SPACING_MM)
    inside = sitk.GetArrayFromImage(sitk.Resample(body, ref, sitk.Transform(), sitk.sitkNearestNeighbor,
                                                      0, sitk.sitkUInt8)) > 0
    if not inside.any():
        return 0.0
    f = sitk.TransformToDisplacementFieldFilter()
    f.SetReferenceImage(ref)
    f.SetOutputPixelType(sitk.sitkVectorFloat64)
    disp = sitk.GetArrayFromImage(f.Execute(deformable))
    return float(np.linalg.norm(disp[inside], axis=1).max())


def split_affine_and_deformable(tx: sitk.Transform) -> tuple[sitk.Transform, sitk.Transform | None]:
    """(affine part, deformable part or None) of a registration result.

    A ``.tfm`` file holds the affine; a displacement field goes to a NIfTI vector image
    (``to_baseline_field.nii.gz``) because a dense field written as text would be huge.
    """
    if tx.GetName() != "CompositeTransform":
        return tx, None
    comp = sitk.CompositeTransform(tx)
    parts = [comp.GetNthTransform(i) for i in range(comp.GetNumberOfTransforms())]
    return parts[0], (parts[1] if len(parts) > 1 else None)


def deformable_as_field(deformable: sitk.Transform, reference: sitk.Image) -> sitk.Image:
    """The deformable part as a displacement field image (VectorFloat64, LPS mm) on a ~4 mm copy
    of ``reference``'s grid (for ``to_baseline_field.nii.gz``)."""
    if deformable.GetName() == "DisplacementFieldTransform":
        return sitk.DisplacementFieldTransform(deformable).GetDisplacementField()
    f = sitk.TransformToDisplacementFieldFilter()
    f.SetReferenceImage(coarse_grid_like(reference, _JACOBIAN_SPACING_MM))
    f.SetOutputPixelType(sitk.sitkVectorFloat64)
    return f.Execute(deformable)


def compose_with_field(affine: sitk.Transform, field: sitk.Image) -> sitk.Transform:
    """Inverse of the split: ``affine(x + u(x))`` from a stored affine and displacement field."""
    return sitk.CompositeTransform([affine, sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))])


def invert_registration(tx: sitk.Transform) -> sitk.Transform:
    """Inverse of a registration result (maps moving points back to fixed points).

    Affine-like transforms invert exactly; a composite ``affine(x + u(x))`` inverts as
    ``x = F^-1(A^-1(y))`` with the displacement field inverted numerically
    (``sitk.InvertDisplacementField``, fixed-point iterations; smooth, non-folding fields only,
    which the Jacobian QC guarantees).
    """
    affine, deformable = split_affine_and_deformable(tx)
    if deformable is None:
        return tx.GetInverse()
    field = deformable_as_field(deformable, _field_reference(deformable))
    inverse_field = sitk.InvertDisplacementField(field, maximumNumberOfIterations=20,
                                                 maxErrorToleranceThreshold=0.01, meanErrorToleranceThreshold=0.001)
    return sitk.CompositeTransform([sitk.DisplacementFieldTransform(inverse_field), affine.GetInverse()])


def _field_reference(deformable: sitk.Transform) -> sitk.Image:
    """A grid for sampling a deformable transform: its own field grid or B-spline domain."""
    if deformable.GetName() == "DisplacementFieldTransform":
        ref = sitk.DisplacementFieldTransform(deformable).GetDisplacementField()
    else:  # BSplineTransform: a ~4 mm grid over its transform domain
        b = sitk.BSplineTransform(deformable)
        dims = np.array(b.GetTransformDomainPhysicalDimensions())
        size = np.maximum(2, np.ceil(dims / _JACOBIAN_SPACING_MM).astype(int) + 1)
        ref = sitk.Image([int(v) for v in size], sitk.sitkUInt8)
        ref.SetOrigin(b.GetTransformDomainOrigin())
        ref.SetSpacing((dims / (size - 1)).tolist())
        ref.SetDirection(b.GetTransformDomainDirection())
    out = sitk.Image(ref.GetSize(), sitk.sitkUInt8)
    out.CopyInformation(ref)
    return out


__all__ = [
    "compose_with_field",
    "deformable_as_field",
    "deformation_max_mm",
    "euler_to_affine",
    "identity",
    "inverse_consistency_residual_mm",
    "invert_registration",
    "jacobian_determinant_range",
    "motion_magnitude_mm",
    "rotation_angle_deg",
    "scale_factors",
    "split_affine_and_deformable",
]
