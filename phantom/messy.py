"""Turn a generated export into a messy real-world one (``generate_export(..., messy=True)``).

What a PACS export from several scanners and archives looks like, applied after the normal
generation (the default output is left as it is: the other tests and the published accuracy
figures depend on it):
- **vendors**: each study is renamed after a different vendor (Siemens, GE, Philips, Canon in
  turn: a patient followed on several scanners), Manufacturer and SeriesDescription;
- **transfer syntaxes**: each series re-encoded in another syntax (every lossless one for the
  T1 series, JPEG baseline for T2/localiser), see :mod:`phantom.transcode`;
- **multi-frame**: one post-contrast phase per study (every other study) stored as one Enhanced
  MR file;
- **defects**, each an extra series (a copy of a T1 series under a new SeriesInstanceUID, so
  the study keeps its good series and is still assessed) or an extra object, each with the
  reason ingest must give (``truth["messy"]["defects"]``): missing slice, duplicate
  positions, non-uniform spacing, mixed orientations, mixed matrix sizes, several stacks in
  one series (a second T2 echo under the same UID: split), SR / PR / KO / RT objects, a DICOMDIR
  listing a file that is not there, ambiguous roles (a pre-contrast series without pre keyword
  or agent).
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from .enhanced import to_enhanced
from .transcode import save, transcode
from .vendors import VENDOR_INFO

VENDOR_ORDER = ("SIEMENS", "GE MEDICAL SYSTEMS", "Philips Medical Systems", "CANON_MEC")
# Assigned in turn, so that even three studies hold every syntax: the T1 series (the ones
# measured) get the lossless compressed ones first, T2 and localisers the lossy JPEG baseline
# and the uncompressed encodings.
T1_SYNTAXES = ("rle", "jpeg_ls", "jpeg_2000", "jpeg_lossless", "explicit_le", "deflated", "implicit_le", "explicit_be")
OTHER_SYNTAXES = ("jpeg_baseline", "implicit_le", "explicit_be", "deflated")
NON_IMAGE = {  # SOP Class UID -> (Modality, name pydicom gives the class)
    "1.2.840.10008.5.1.4.1.1.88.11": ("SR", "Basic Text SR Storage"),
    "1.2.840.10008.5.1.4.1.1.11.1": ("PR", "Grayscale Softcopy Presentation State Storage"),
    "1.2.840.10008.5.1.4.1.1.88.59": ("KO", "Key Object Selection Document Storage"),
    "1.2.840.10008.5.1.4.1.1.481.3": ("RTSTRUCT", "RT Structure Set Storage"),
}
DEFECTS = ("missing_slice", "duplicate_position", "non_uniform_spacing", "mixed_orientation", "mixed_matrix")
DEFECT_REASON = {  # how each reason in errors.csv starts (after "series N 'desc': ")
    "missing_slice": "missing slice(s): gap of",
    "duplicate_position": "duplicate slice positions:",
    "non_uniform_spacing": "non-uniform slice spacing: gap of",
    "mixed_orientation": "mixed orientations: 2 different ImageOrientationPatient values",
    "mixed_matrix": "mixed matrix sizes:",
}


def _read(path: Path) -> Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom.dcmread(path)


class _Uids:
    def __init__(self, seed: int):
        self.base = ["ablation-response-phantom-messy", str(seed)]

    def __call__(self, *parts: object) -> str:
        return generate_uid(entropy_srcs=self.base + [str(p) for p in parts])


def _coronal(series: dict) -> bool:
    geo = series.get("geometry") or {}
    d = np.reshape(geo.get("direction", np.eye(3).ravel()), (3, 3))
    return abs(d[1, 2]) > 0.7  # slice normal along anterior-posterior


def _rename(series: dict, vendor: str, tilt: bool) -> str:
    v = VENDOR_INFO[vendor]
    if series["role"] == "t1_pre":
        return v.t1_description(None, None, tilt)
    if series["role"] == "t1_post":
        return v.t1_description(series["phase_index"], series["phase_seconds"], tilt)
    if series["role"] == "t2":
        return v.t2_description(_coronal(series))
    return series["description"]


def _copy_series(paths: list[Path], folder: Path, uids: _Uids, key: str, number: int, suffix: str) -> list[Dataset]:
    out = []
    series_uid = uids(key, "series")
    for k, p in enumerate(paths):
        ds = _read(p)
        if ds.file_meta.TransferSyntaxUID != ExplicitVRLittleEndian:
            ds = transcode(ds, "explicit_le")
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uids(key, "sop", k)
        ds.SeriesNumber = number
        ds.SeriesDescription = f"{ds.SeriesDescription}{suffix}"
        out.append(ds)
    return out


def _normal(ds: Dataset) -> np.ndarray:
    iop = np.asarray([float(v) for v in ds.ImageOrientationPatient])
    return np.cross(iop[:3], iop[3:])


def _apply_defect(kind: str, slices: list[Dataset], uids: _Uids, key: str) -> list[Dataset]:
    """The slices of a series (sorted by position) with one defect of ``kind``."""
    slices = sorted(slices, key=lambda d: float(np.asarray([float(v) for v in d.ImagePositionPatient]) @ _normal(d)))
    mid = len(slices) // 2
    if kind == "missing_slice":
        return slices[:mid] + slices[mid + 1:]
    if kind == "duplicate_position":
        dup = copy.deepcopy(slices[mid])  # a shallow copy would share the UID element
        dup.SOPInstanceUID = dup.file_meta.MediaStorageSOPInstanceUID = uids(key, "dup")
        return slices + [dup]
    if kind == "non_uniform_spacing":
        ds = slices[mid]
        ipp = np.asarray([float(v) for v in ds.ImagePositionPatient]) + 0.4 * float(ds.SpacingBetweenSlices) * _normal(ds)
        ds.ImagePositionPatient = [f"{v:.6f}" for v in ipp]
        return slices
    if kind == "mixed_orientation":
        ds = slices[mid]
        iop = np.asarray([float(v) for v in ds.ImageOrientationPatient])
        c, s = np.cos(np.deg2rad(12)), np.sin(np.deg2rad(12))
        rot = np.array([[1, 0, 0], [0, c, -s], [0, s, c]])
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in (*(rot @ iop[:3]), *(rot @ iop[3:]))]
        return slices
    if kind == "mixed_matrix":
        ds = slices[mid]
        arr = ds.pixel_array[: int(ds.Rows) - 16]
        ds.Rows = arr.shape[0]
        ds.PixelData = arr.astype("<u2").tobytes()
        return slices
    raise ValueError(kind)


def _non_image(sop_class: str, study: Dataset, uids: _Uids, key: str) -> Dataset:
    modality, _ = NON_IMAGE[sop_class]
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = uids(key, "sop")
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.preamble = b"\0" * 128
    for kw in ("PatientID", "PatientName", "PatientBirthDate", "StudyInstanceUID", "StudyDate", "StudyTime",
               "AccessionNumber", "Manufacturer"):
        if kw in study:
            setattr(ds, kw, study.get(kw))
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.SeriesInstanceUID = uids(key, "series")
    ds.Modality = modality
    ds.SeriesNumber = 900
    if modality in ("SR", "KO"):
        ds.ValueType = "CONTAINER"
        ds.ContentSequence = Sequence([])
    return ds


def _dicomdir(export: Path, listed: list[Path], missing: Path, uids: _Uids) -> Path:
    """A DICOMDIR (media index, PS3.10) listing ``listed`` and ``missing`` as IMAGE records."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.1.3.10"
    ds.file_meta.MediaStorageSOPInstanceUID = uids("dicomdir")
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.preamble = b"\0" * 128
    ds.FileSetID = "MESSY"
    ds.OffsetOfTheFirstDirectoryRecordOfTheRootDirectoryEntity = 0
    ds.OffsetOfTheLastDirectoryRecordOfTheRootDirectoryEntity = 0
    ds.FileSetConsistencyFlag = 0
    records = []
    for p in [*listed, missing]:
        r = Dataset()
        r.OffsetOfTheNextDirectoryRecord = 0
        r.RecordInUseFlag = 0xFFFF
        r.OffsetOfReferencedLowerLevelDirectoryEntity = 0
        r.DirectoryRecordType = "IMAGE"
        with warnings.catch_warnings():  # long file IDs: real media use 8-character ISO 9660 names
            warnings.simplefilter("ignore")
            r.ReferencedFileID = list(p.relative_to(export).parts)
        records.append(r)
    ds.DirectoryRecordSequence = Sequence(records)
    path = export / "DICOMDIR"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pydicom.dcmwrite(path, ds, enforce_file_format=True)
    return path


def make_messy(out_dir: Path, truth: dict, seed: int) -> dict:
    """Apply the messy-export changes to ``out_dir/export`` in place; return the ``messy``
    section of the truth (what was changed and which reason each defect must give)."""
    out_dir = Path(out_dir)
    export = out_dir / "export"
    uids = _Uids(seed)
    studies = [(p, st) for p in truth["patients"] for st in p["studies"]]
    info: dict = {"vendors": {}, "transfer_syntaxes": {}, "multiframe_series": [], "defects": []}
    t1_cycle, other_cycle = 0, 0
    folders: dict[str, Path] = {}
    for j, (patient, st) in enumerate(studies):
        vendor = VENDOR_ORDER[j % len(VENDOR_ORDER)]
        info["vendors"][st["study_instance_uid"]] = vendor
        study_folder = None
        first_ds = None
        for series in st["series"]:
            paths = [out_dir / f for f in series["files"]]
            tilt = bool(series.get("oblique_tilt_deg"))
            new_desc = _rename(series, vendor, tilt)
            if series["role"] in ("t1_pre", "t1_post"):
                syntax = T1_SYNTAXES[t1_cycle % len(T1_SYNTAXES)]
                t1_cycle += 1
            else:
                syntax = OTHER_SYNTAXES[other_cycle % len(OTHER_SYNTAXES)]
                other_cycle += 1
            enhanced = (series["role"] == "t1_post" and j % 2 == 0
                        and series["phase_index"] == max(s["phase_index"] or 0 for s in st["series"]))
            datasets = []
            for p in paths:
                ds = _read(p)
                ds.Manufacturer = VENDOR_INFO[vendor].manufacturer
                ds.ManufacturerModelName = VENDOR_INFO[vendor].model
                ds.SeriesDescription = new_desc
                datasets.append(ds)
            first_ds = first_ds or datasets[0]
            study_folder = study_folder or paths[0].parent
            if enhanced:
                for p in paths:
                    p.unlink()
                mf = to_enhanced(datasets, uids(series["series_instance_uid"], "enhanced"))
                target = paths[0].with_name(f"{paths[0].name}_MF")
                save(transcode(mf, syntax) if syntax != "explicit_le" else mf, target)
                series["files"] = [str(target.relative_to(out_dir))]
                info["multiframe_series"].append(series["series_instance_uid"])
            else:
                for p, ds in zip(paths, datasets):
                    save(transcode(ds, syntax), p)
            series["description"] = new_desc
            info["transfer_syntaxes"][series["series_instance_uid"]] = syntax

        folders[st["study_instance_uid"]] = study_folder
        # A non-image object per study, in turn SR, PR, KO, RT structure set.
        sop_class = list(NON_IMAGE)[j % len(NON_IMAGE)]
        obj = save(_non_image(sop_class, first_ds, uids, f"{st['study_instance_uid']}-obj"), study_folder / f"OBJ{j:03d}")
        info["defects"].append({"kind": "non_image", "path": str(obj), "stage": "ingest",
                                "study_instance_uid": st["study_instance_uid"],
                                "reason": f"non-image object ({NON_IMAGE[sop_class][1]}) skipped"})

    # Defect series: copies of a pre-contrast T1 under new UIDs, the defects spread over the
    # studies in turn (several per study when there are fewer studies than defects).
    # (Over the first three studies: a test may keep only those to stay short.)
    with_pre = [st for _, st in studies if any(s["role"] == "t1_pre" and len(s["files"]) > 4 for s in st["series"])][:3]
    for i, kind in enumerate(DEFECTS if with_pre else ()):
        st = with_pre[i % len(with_pre)]
        pre = next(s for s in st["series"] if s["role"] == "t1_pre")
        key = f"{st['study_instance_uid']}-{kind}"
        slices = _apply_defect(kind, _copy_series([out_dir / f for f in pre["files"]], folders[st["study_instance_uid"]],
                                                  uids, key, 90 + i, " repeat"), uids, key)
        folder = folders[st["study_instance_uid"]] / f"DEFECT_{kind.upper()}"
        for k, ds in enumerate(slices):
            save(ds, folder / f"IM{k:04d}")
        info["defects"].append({"kind": kind, "study_instance_uid": st["study_instance_uid"],
                                "series_instance_uid": slices[0].SeriesInstanceUID,
                                "stage": "series_geometry", "reason_contains": DEFECT_REASON[kind]})

    # Several stacks in one series: a second T2 echo under the same SeriesInstanceUID.
    p0, st0 = studies[0]
    t2 = next(s for s in st0["series"] if s["role"] == "t2")
    echoes = []
    for k, f in enumerate(t2["files"]):
        ds = _read(out_dir / f)
        ds = transcode(ds, "explicit_le") if ds.file_meta.TransferSyntaxUID != ExplicitVRLittleEndian else ds
        ds.EchoTime = f"{float(ds.EchoTime) * 2:.2f}"
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uids("echo2", k)
        echoes.append(save(ds, (out_dir / f).parent.parent / "ECHO2" / f"E{k:04d}"))
    info["defects"].append({"kind": "several_stacks", "series_instance_uid": t2["series_instance_uid"],
                            "study_instance_uid": st0["study_instance_uid"],
                            "stage": "ingest", "reason_contains": "several stacks in one series: 2 stacks by EchoTime"})

    # Ambiguous roles: the pre-contrast series of the third study loses its "pre" keyword.
    p1, st1 = studies[min(2, len(studies) - 1)]
    pre = next((s for s in st1["series"] if s["role"] == "t1_pre"), None)
    if pre is not None:
        for f in pre["files"]:
            ds = _read(out_dir / f)
            ds.SeriesDescription = "t1 3d fs tra"
            ds.Manufacturer = "SIEMENS"
            save(ds, out_dir / f)
        pre["description"] = "t1 3d fs tra"
        info["ambiguous_study"] = st1["study_instance_uid"]

    # A DICOMDIR listing the first study's image files and one file lost in the copy.
    listed = [out_dir / f for s in st0["series"] for f in s["files"]]
    missing = listed[0].parent / "LOSTFILE"
    _dicomdir(export, listed, missing, uids)
    info["defects"].append({"kind": "dicomdir_missing", "path": str(missing), "stage": "ingest",
                            "study_instance_uid": st0["study_instance_uid"],
                            "reason": "listed in DICOMDIR but missing from the export"})
    return info
