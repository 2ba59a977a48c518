"""The label registry: one value per structure, everywhere (issue 17).

The same integers are the values of ``labels.nii.gz``, the segment numbers of ``seg.dcm``, the
network's class indices (0 is the background class) and the phantom's truth labels. Every module
takes them from here; nothing else spells 1, 2 or 3 for a structure.

It lives in ``models`` (and imports nothing) because the network package never imports
``pipeline`` (DESIGN.md "Layout"); ``pipeline.core.records`` re-exports it for the stages.
"""

from __future__ import annotations

from enum import IntEnum

import numpy as np


class Label(IntEnum):
    """Structure of a voxel; its value is the label value, the SEG segment number and the class index."""

    BACKGROUND = 0
    ABLATION_ZONE = 1  # the non-enhancing zone of induced necrosis, inside the rim
    RIM = 2  # the enhancing rim around the zone
    ENHANCING_FOCUS = 3  # an enhancing focus outside the benign-rim pattern

    @property
    def key(self) -> str:
        """``ablation_zone``, ``rim``, ... (class names of the network's model card)."""
        return self.name.lower()

    @property
    def text(self) -> str:
        """``ablation zone``, ``rim``, ``enhancing focus``: for a reader (legends)."""
        return self.key.replace("_", " ")


# The structures a label map holds, in label order (every label but the background).
STRUCTURES: tuple[Label, ...] = tuple(label for label in Label if label != Label.BACKGROUND)


def label_map(az: np.ndarray, rim: np.ndarray, foci: list[np.ndarray] | tuple[np.ndarray, ...] = ()) -> np.ndarray:
    """uint8 label map (Label values) from boolean masks of one shape: the ablation zone wins
    over everything, an enhancing focus over the rim; every other voxel is background."""
    out = np.full(az.shape, Label.BACKGROUND, np.uint8)
    out[rim] = Label.RIM
    for mask in foci:
        out[mask] = Label.ENHANCING_FOCUS
    out[az] = Label.ABLATION_ZONE
    return out
