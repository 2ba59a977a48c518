"""The tube fit that tells a nodule from the vessel it lies on (pipeline/measurement/tubes.py)."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.measurement.tubes import fit_tube

SPACING = np.array([3.0, 1.5, 1.5])  # z, y, x (mm)


def _grid(shape=(30, 60, 60)):
    z, y, x = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    return z * SPACING[0] - 45.0, y * SPACING[1] - 45.0, x * SPACING[2] - 45.0


def _fit(mask):
    zyx = np.argwhere(mask)
    return fit_tube(zyx * SPACING, float(SPACING.max()), float(np.prod(SPACING))), zyx


@pytest.mark.parametrize("tilt_deg", [0.0, 30.0])
def test_a_straight_tube_is_explained_whole_and_its_radius_measured(tilt_deg):
    z, y, x = _grid()
    t = np.deg2rad(tilt_deg)
    # Axis through the origin in the x-z plane, tilted from z by tilt_deg.
    along = z * np.cos(t) + x * np.sin(t)
    off = np.sqrt((x - along * np.sin(t)) ** 2 + y ** 2 + (z - along * np.cos(t)) ** 2)
    tube = off <= 4.0
    fit, _ = _fit(tube)
    assert fit is not None
    assert fit.radius_mm == pytest.approx(4.0, abs=0.8)
    assert fit.unexplained(1.5).sum() <= 0.01 * tube.sum()


def test_a_bump_on_a_tube_is_what_the_tube_does_not_explain():
    z, y, x = _grid()
    tube = x ** 2 + y ** 2 <= 4.0 ** 2
    bump = (x - 7.0) ** 2 + y ** 2 + z ** 2 <= 5.5 ** 2
    fit, zyx = _fit(tube | bump)
    off = np.zeros(tube.shape, bool)
    off[tuple(zyx[fit.unexplained(1.5)].T)] = True
    assert off.sum() >= 0.3 * (bump & ~tube).sum()
    assert not (off & ~bump).any()  # nothing of the tube itself is left out
    assert fit.radius_mm == pytest.approx(4.0, abs=0.8)  # the bump does not widen the tube


def test_too_few_points_or_slabs_is_no_tube():
    z, y, x = _grid()
    assert _fit((x ** 2 + y ** 2 + z ** 2) <= 2.0 ** 2)[0] is None
