"""Files of the follow-up -> baseline transform: ``to_baseline.tfm`` (+ ``to_baseline_field.nii.gz``).

The ``.tfm`` always holds the affine part (rigid or affine), so every ITK tool reads it. A
deformable result (``CompositeTransform([affine, deformable])``, the deformable part acting
first) adds its displacement field as a NIfTI vector image (LPS mm, on a ~4 mm copy of the
baseline grid): a dense field written as .tfm text would be tens of MB. Reading composes them
back; a stale field from an earlier deformable run is removed when the new result has none.
Registration layer 7: imports ``pipeline.core`` and ``transforms``.
"""

from __future__ import annotations

from pathlib import Path

import SimpleITK as sitk

from pipeline.core.files import atomic_write_image, atomic_write_transform, read_image
from pipeline.imaging.registration.transforms import (
    compose_with_field,
    deformable_as_field,
    split_affine_and_deformable,
)

TRANSFORM_FILE = "to_baseline.tfm"
FIELD_FILE = "to_baseline_field.nii.gz"


def write_to_baseline(transform: sitk.Transform, folder: Path, baseline_reference: sitk.Image) -> None:
    """Write ``transform`` (baseline point -> follow-up point) into ``folder`` atomically."""
    folder = Path(folder)
    affine, deformable = split_affine_and_deformable(transform)
    if deformable is not None:
        atomic_write_image(deformable_as_field(deformable, baseline_reference), folder / FIELD_FILE)
    else:
        (folder / FIELD_FILE).unlink(missing_ok=True)
    atomic_write_transform(affine, folder / TRANSFORM_FILE)


def read_to_baseline(folder: Path) -> sitk.Transform:
    """The transform :func:`write_to_baseline` wrote (composite when a field file exists)."""
    folder = Path(folder)
    affine = sitk.ReadTransform(str(folder / TRANSFORM_FILE))
    field_path = folder / FIELD_FILE
    if field_path.exists():
        return compose_with_field(affine, read_image(field_path))
    return affine


__all__ = ["FIELD_FILE", "TRANSFORM_FILE", "read_to_baseline", "write_to_baseline"]
