"""ANTsPy worker of benchmarks/registration_compare.py (run with a Python that has ``antspyx``).

antspyx 0.6.3 pins numpy < 2.4 and scipy < 1.16, older than the pipeline's environment, so the
comparison runs it in its own interpreter (``--ants-python``) rather than downgrading the
pipeline's packages. Reads one JSON request on stdin:
``{"fixed": path, "moving": path, "fixed_mask": path, "points": [[x, y, z], ...],
"types": ["Rigid", "Affine", "SyN"], "threads": 2}`` (NIfTI files written by SimpleITK; ANTs reads
them through ITK, so the physical frame is the same LPS frame) and prints one JSON line:
``{"Rigid": {"points": [...], "seconds": s}, ...}`` with the fixed points mapped into the moving
image's space (ANTs maps points with the transforms that warp the moving image onto the fixed
one, i.e. fixed -> moving, ITK's convention).
"""

from __future__ import annotations

import json
import os
import sys
import time


def main() -> None:
    req = json.loads(sys.stdin.read())
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(req.get("threads", 2))
    import ants
    import pandas as pd

    fixed = ants.image_read(req["fixed"])
    moving = ants.image_read(req["moving"])
    mask = ants.image_read(req["fixed_mask"]) if req.get("fixed_mask") else None
    pts = pd.DataFrame(req["points"], columns=["x", "y", "z"])
    out = {}
    for kind in req["types"]:
        t0 = time.perf_counter()
        reg = ants.registration(fixed, moving, type_of_transform=kind, mask=mask, random_seed=1)
        seconds = time.perf_counter() - t0
        mapped = ants.apply_transforms_to_points(3, pts, reg["fwdtransforms"])
        out[kind] = {"points": mapped[["x", "y", "z"]].to_numpy().tolist(), "seconds": seconds}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
