"""The lesion at one study: ablation zone (ellipsoid), rim, nodule or pre-ablation tumour.

World frame, mm (``geometry.py``); the timelines that set its state per study are in
``scenarios``, how it renders in ``render`` and its contrast in ``intensities``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .geometry import random_rotation


@dataclass(frozen=True)
class LesionState:
    """The lesion at one study (world frame, mm) and its contrast behaviour.

    ``az_semi_axes`` None = no ablation zone (pre-ablation). ``rim_asym`` = (w1, w2) unit
    vectors of the smooth thickness modulation, None for a uniform rim.
    """

    az_centre: np.ndarray
    az_rot: np.ndarray
    az_semi_axes: np.ndarray | None
    rim_mm: float = 0.0
    rim_asym: tuple[np.ndarray, np.ndarray] | None = None
    rim_asym_amp_mm: float = 0.0
    nodule_centre: np.ndarray | None = None
    nodule_radius: float = 0.0
    tumour_radius: float = 0.0  # pre-ablation tumour, centred on az_centre
    az_t1_ratio: float = 2.2  # AZ / muscle, pre-contrast
    az_re: float = 0.01
    rim_re: float = 0.6  # at the delayed phase
    nodule_re: float = 1.0  # at the arterial phase
    az_t2: float = 90.0

    def reach(self) -> float:
        """Largest distance (mm) from az_centre the lesion covers."""
        r = self.tumour_radius
        if self.az_semi_axes is not None:
            r = max(r, float(np.max(self.az_semi_axes)) + self.rim_mm + self.rim_asym_amp_mm)
        if self.nodule_centre is not None:
            r = max(r, float(np.linalg.norm(self.nodule_centre - self.az_centre)) + self.nodule_radius)
        return r


def surface_point(centre: np.ndarray, rot: np.ndarray, semi_axes: np.ndarray, direction: np.ndarray) -> np.ndarray:
    """Point where the ray from the ellipsoid centre along ``direction`` leaves it."""
    n = direction / np.linalg.norm(direction)
    w = rot.T @ n
    return centre + n / np.sqrt(np.sum((w / semi_axes) ** 2))


def random_lesion_orientation(rng: np.random.Generator) -> np.ndarray:
    return random_rotation(rng)
