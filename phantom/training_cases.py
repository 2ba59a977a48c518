"""Synthetic training cohorts: phantom export -> the real pipeline's per-study images -> case folders.

The generator only writes DICOM (its rendering, noise, vendor scaling and series layout are
interleaved with the writer), so a small export is written once, ingested and analysed by the real
pipeline; that cost (registration, ~15 s a study on 2 cores) is paid once per cohort, not per
epoch. The case-folder layout is models/data.py's.

In ``phantom``, not ``models``: it runs ``pipeline.measurement.study.analyse_study``, and the
network package never imports the pipeline (issue 17); ``flows/train.py`` calls it.
"""

from __future__ import annotations

import json
from pathlib import Path

import SimpleITK as sitk

from models.data import CLASSICAL_FILE, LABEL_FILE, PRE_FILE, SUB_FILE, resample_onto
from phantom.export import generate_export
from pipeline.core.config import load_config
from pipeline.core.files import atomic_write_image, atomic_write_text
from pipeline.ingest.index import index_export
from pipeline.measurement.study import analyse_study

COHORT_MANIFEST = "cohort.json"


def build_synthetic_cohort(root: Path, n_patients: int, seed: int, profile: str = "default") -> Path:
    """Phantom export -> ingest -> the pipeline's registration/subtraction -> case folders.

    Writes ``root/cases/<patient>_<study>/`` with the pipeline's ``pre_registered``/``subtraction``,
    the generator's truth ``labels`` and the classical method's labels (the reference of
    benchmarks/segmentation_eval.py). Idempotent: an existing ``root/cohort.json`` with the same
    parameters is reused. Returns ``root/cases``.
    """
    root = Path(root)
    # "reference": caches built while the default method was the network (2026-12-02, before this
    # key) hold the network's labels under CLASSICAL_FILE; the key makes them rebuild.
    params = {"n_patients": n_patients, "seed": seed, "profile": profile, "reference": "classical"}
    manifest = root / COHORT_MANIFEST
    if manifest.is_file() and json.loads(manifest.read_text()).get("params") == params:
        return root / "cases"
    truth = generate_export(root / "data", n_patients, seed, profile=profile, with_junk=False)
    labels_of = {s["study_instance_uid"]: root / "data" / s["truth_labels"]
                 for p in truth["patients"] for s in p["studies"]}
    # The reference labels come from the classical method whatever the default method is (the
    # network's cohort is built with this function, so it must not depend on the weights).
    base = load_config()
    cfg = base.model_copy(update={"segmentation": base.segmentation.model_copy(update={"method": "classical"})})
    index = index_export(root / "data" / "export", root / "catalogue.sqlite", cfg.ingest)
    written, skipped = [], []
    for study in index.studies:
        name = f"{study.patient_id}_{study.study_instance_uid[-8:]}"
        analysis = analyse_study(study, cfg)
        if not analysis.imaging.ok or analysis.images is None:
            skipped.append({"case": name, "reason": analysis.imaging.reason})
            continue
        images = analysis.images
        truth_labels = sitk.ReadImage(str(labels_of[study.study_instance_uid]))
        # The truth lies on the post series' grid (phantom/patient.py); resampling by
        # nearest neighbour only absorbs header rounding.
        truth_labels = resample_onto(sitk.Cast(truth_labels, sitk.sitkUInt8), images.post, sitk.sitkNearestNeighbor)
        folder = root / "cases" / name
        atomic_write_image(images.pre_registered, folder / PRE_FILE)
        # What the network is given at inference (the fill kept at the slab ends; StudyImages).
        network_subtraction = images.network_subtraction if images.network_subtraction is not None else images.subtraction
        atomic_write_image(network_subtraction, folder / SUB_FILE)
        atomic_write_image(truth_labels, folder / LABEL_FILE)
        atomic_write_image(images.labels, folder / CLASSICAL_FILE)
        written.append(name)
    atomic_write_text(manifest, json.dumps({"params": params, "cases": written, "skipped": skipped}, indent=1))
    return root / "cases"
