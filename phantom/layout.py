"""Names in the messy export: deterministic UIDs, random folder and file names per patient."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.uid import generate_uid


class Uids:
    """Deterministic UIDs: the same (seed, profile, parts) always gives the same UID."""

    def __init__(self, seed: int, profile: str):
        self._base = ["ablation-response-phantom", str(seed), profile]

    def __call__(self, *parts: object) -> str:
        return generate_uid(entropy_srcs=self._base + [str(p) for p in parts])


def rand_name(rng: np.random.Generator) -> str:
    style = int(rng.integers(0, 3))
    if style == 0:
        return "".join(rng.choice(list("0123456789ABCDEF"), 8))
    if style == 1:
        return f"S{int(rng.integers(0, 10**7)):07d}"
    return f"DIR{int(rng.integers(0, 1000)):03d}_{int(rng.integers(0, 10**4)):04d}"


class Layout:
    """Messy export folders and file names for one patient."""

    def __init__(self, rng: np.random.Generator, export: Path, top_dirs: list[str]):
        self.rng = rng
        self.root = export / top_dirs[int(rng.integers(0, len(top_dirs)))] / rand_name(rng)
        self.counter = int(rng.integers(1, 5000))
        self.folders: list[Path] = []

    def study_folder(self) -> Path:
        f = self.root / rand_name(self.rng)
        self.folders.append(f)
        return f

    def series_paths(self, study_folder: Path, n: int, sop_uids: list[str]) -> list[Path]:
        rng = self.rng
        folder = study_folder / rand_name(rng) if rng.random() < 0.6 else study_folder
        split = n > 4 and rng.random() < 0.2  # one series split across two folders
        other = self.root / rand_name(rng)
        style = int(rng.integers(0, 4))
        paths = []
        for k in range(n):
            self.counter += 1
            name = (f"IM{self.counter:06d}", f"{sop_uids[k]}.dcm", f"IMG{self.counter:05d}.dcm",
                    f"{self.counter:08X}")[style]
            paths.append((other if split and k >= n // 2 else folder) / name)
        return paths
