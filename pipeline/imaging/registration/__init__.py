"""Registration: post-contrast to pre-contrast within a study, follow-up to baseline between studies.

Owns the registration of MRI volumes in physical space (LPS, mm; ITK convention: a transform
maps a fixed point to a moving point), its quality checks and failure policy, the two backends
(SimpleITK on the CPU, PyTorch on the CPU or GPU) and the ``to_baseline`` transform files. The
body mask and resampling it uses are the shared core's (``pipeline.core.geometry``). Layers,
each importing only the ones before it: ``common`` (pyramid, sampling, the one backend result
type) -> ``transforms`` (transform algebra, fields, inverse, deformation measures) -> ``metric``
(Mattes MI, metric masks, NCC, N4 bias correction) -> ``checks`` (the QC of one result,
inverse consistency) -> ``sitk_backend`` and ``torch_backend`` (the latter imported on first
use) -> ``driver`` (initialisation, starts, ``register_intra_study``, ``register_to_baseline``)
-> ``files`` (write/read ``to_baseline.tfm`` and its field). Other stages import the public API
below from this package; the layer modules are for this package (and for tests that reach into
a layer). May import: ``pipeline.core`` and ``pipeline.ingest``.
"""

from pipeline.imaging.registration.driver import (
    PreparedFixed,
    prepare_baseline,
    register_intra_study,
    register_to_baseline,
)
from pipeline.imaging.registration.files import FIELD_FILE, TRANSFORM_FILE, read_to_baseline, write_to_baseline
from pipeline.imaging.registration.metric import registration_ncc
from pipeline.imaging.registration.transforms import (
    compose_with_field,
    deformable_as_field,
    deformation_max_mm,
    inverse_consistency_residual_mm,
    invert_registration,
    jacobian_determinant_range,
    motion_magnitude_mm,
    split_affine_and_deformable,
)

__all__ = [
    "PreparedFixed",
    "prepare_baseline",
    "FIELD_FILE",
    "TRANSFORM_FILE",
    "compose_with_field",
    "deformable_as_field",
    "deformation_max_mm",
    "inverse_consistency_residual_mm",
    "invert_registration",
    "jacobian_determinant_range",
    "motion_magnitude_mm",
    "read_to_baseline",
    "register_intra_study",
    "register_to_baseline",
    "registration_ncc",
    "split_affine_and_deformable",
    "write_to_baseline",
]
