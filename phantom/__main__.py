"""``python -m phantom OUT_DIR N_PATIENTS SEED [PROFILE]`` (for quick manual runs)."""

import sys
import time
from pathlib import Path

from . import generate_export

if __name__ == "__main__":
    if len(sys.argv) < 4:
        sys.exit(__doc__)
    t0 = time.perf_counter()
    truth = generate_export(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]),
                            profile=sys.argv[4] if len(sys.argv) > 4 else "default")
    n = sum(len(p["studies"]) for p in truth["patients"])
    print(f"{len(truth['patients'])} patients, {n} studies in {time.perf_counter() - t0:.1f} s -> {sys.argv[1]}")
