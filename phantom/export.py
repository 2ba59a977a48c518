"""The cohort: a messy PACS export of ``n_patients`` patients, junk files, ``truth.json`` and
``procedures.csv`` (each patient's studies: :mod:`phantom.patient`).

Coordinates written to the truth (``truth.json``):
- ``az.centre_lps``, ``nodule.centre_lps`` and the truth label map are in the physical
  space (LPS mm) of the study's **post-contrast series pose (last phase)**; for a study
  without post-contrast (``has_post_contrast`` false) they are in the pre-contrast pose and
  the labels lie on the pre-contrast grid.
- ``landmarks_pre_lps`` / ``landmarks_post_lps``: the same 20 anatomical points in the
  pre-contrast and post-contrast (last phase) poses (``landmarks_post_lps`` is null
  without post-contrast).
- ``procedures.csv`` target: AZ centre in the pre-contrast pose of the session's baseline.

Determinism: every patient draws from its own ``numpy`` Generator seeded by
(seed, profile, patient index), so patient *i* is identical whatever ``n_patients`` is; UIDs
come from ``pydicom.uid.generate_uid(entropy_srcs=...)``.
"""

from __future__ import annotations

import csv
import io
import json
import zlib
from pathlib import Path

import numpy as np
import pydicom

from .layout import Layout, Uids, rand_name
from .patient import generate_patient
from .profiles import get_profile
from .scenarios import plan_patient

GENERATOR_VERSION = 1


# --------------------------------------------------------------------------- junk
def _add_junk(rng: np.random.Generator, export: Path, out_dir: Path, patients: list[dict], uids: Uids) -> list[str]:
    """README, a Thumbs.db-like binary and one DICOM file cut in half (own series)."""
    junk = []
    readme = export / "README.txt"
    readme.write_text("PACS export (synthetic, ablation-response phantom).\r\nDo not edit.\r\n")
    junk.append(readme)
    folders = sorted({p.parent for p in export.rglob("*") if p.is_file()})
    thumbs = folders[int(rng.integers(0, len(folders)))] / "Thumbs.db"
    thumbs.write_bytes(b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + rng.integers(0, 256, 3000, dtype=np.uint8).tobytes())
    junk.append(thumbs)
    # A slice re-sent as its own series and cut mid-transfer: the header parses, the pixels do not.
    st = patients[0]["studies"][0]
    src = out_dir / st["series"][-1]["files"][0]
    ds = pydicom.dcmread(src)
    ds.SOPInstanceUID = uids("junk", "truncated", "sop")
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.SeriesInstanceUID = uids("junk", "truncated", "series")
    ds.SeriesNumber = 999
    ds.SeriesDescription = "screen save"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    data = buf.getvalue()
    trunc = folders[int(rng.integers(0, len(folders)))] / "IM999999"
    trunc.write_bytes(data[: len(data) // 2])
    junk.append(trunc)
    return [str(p.relative_to(out_dir)) for p in junk]


# --------------------------------------------------------------------------- entry point
def generate_export(out_dir: Path, n_patients: int, seed: int, *, profile: str = "default",
                    with_junk: bool = True, messy: bool = False) -> dict:
    """Write a synthetic PACS export with ground truth under ``out_dir``; return the truth.

    Writes ``export/`` (messy DICOM tree), ``truth.json`` (also returned), ``procedures.csv``
    (``patient_id,ablation_date,organ,target_x,target_y,target_z``, one row per session;
    target = AZ centre, LPS mm, in the session baseline's pre-contrast physical space) and
    ``truth/<StudyInstanceUID>_labels.nii.gz`` (0 bg, 1 AZ, 2 rim, 3 tumour/nodule, on the
    grid of the study's post-contrast series). See the module docstring for coordinates.
    ``messy``: also mix vendors' naming, transfer syntaxes, multi-frame files and every defect
    ingest reports (:mod:`phantom.messy`; ``truth["messy"]`` lists them).
    """
    prof = get_profile(profile)
    out_dir = Path(out_dir)
    export = out_dir / "export"
    (out_dir / "truth").mkdir(parents=True, exist_ok=True)
    export.mkdir(parents=True, exist_ok=True)
    uids = Uids(seed, prof.name)
    pcode = zlib.crc32(prof.name.encode())
    top_rng = np.random.default_rng([seed, pcode, 999_999])
    top_dirs = [rand_name(top_rng) for _ in range(2)]

    patients, procedures = [], []
    for i in range(n_patients):
        rng = np.random.default_rng([seed, pcode, i])
        plan = plan_patient(i, rng, prof)
        layout = Layout(rng, export, top_dirs)
        p, procs = generate_patient(plan, rng, prof, uids, layout, out_dir / "truth", out_dir)
        patients.append(p)
        procedures += procs

    truth = {"generator": {"seed": seed, "profile": prof.name, "n_patients": n_patients,
                           "version": GENERATOR_VERSION},
             "patients": patients, "junk": []}
    if with_junk and patients:
        truth["junk"] = _add_junk(top_rng, export, out_dir, patients, uids)
    if messy and patients:
        # Vendors, transfer syntaxes, multi-frame, defects (phantom/messy.py); applied
        # after everything above so that the default output is unchanged.
        from .messy import make_messy  # noqa: PLC0415

        truth["messy"] = make_messy(out_dir, truth, seed)

    with open(out_dir / "procedures.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["patient_id", "ablation_date", "organ", "target_x", "target_y", "target_z"])
        w.writeheader()
        w.writerows(procedures)
    (out_dir / "truth.json").write_text(json.dumps(truth, indent=1))
    return truth
