"""SimpleITK pixel buffers: the pipeline never holds a NumPy view whose image may be freed.

``sitk.GetArrayViewFromImage`` returns a view that does not keep its image alive (the memoryview's
``obj`` is None). A view of a temporary (``GetArrayViewFromImage(sitk.Resample(...))``) reads freed
memory: usually unnoticed in one thread, but the flow's worker threads reuse that memory at once, which
is how CI segfaulted inside scipy.ndimage. The pipeline copies with ``GetArrayFromImage`` instead.
"""

from __future__ import annotations

import re
from pathlib import Path

import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[1]
_PACKAGES = ("pipeline", "models", "flows", "benchmarks", "scripts")


def test_the_view_really_does_not_own_its_image():
    # The premise of the rule below: if SimpleITK ever makes the view own the image, this fails
    # and the rule can be relaxed.
    view = sitk.GetArrayViewFromImage(sitk.Image([4, 4, 4], sitk.sitkFloat32))
    base = view
    while getattr(base, "base", None) is not None:
        base = base.base
    assert isinstance(base, memoryview) and base.obj is None


def test_no_module_takes_a_view_of_a_simpleitk_buffer():
    offenders = []
    for package in _PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if re.search(r"GetArrayViewFromImage|_GetMemoryViewFromImage", line):
                    offenders.append(f"{path.relative_to(ROOT)}:{number}")
    assert offenders == []
