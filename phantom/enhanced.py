"""Merge single-frame MR slices into one Enhanced MR Image Storage object (multi-frame).

Modern scanners (Siemens XA, Philips R5+, GE with enhanced export) store a whole series as one
multi-frame file whose per-frame geometry sits in functional groups (PS3.3 C.7.6.16): the
Plane Position (ImagePositionPatient) per frame, and the Plane Orientation, Pixel Measures
and Pixel Value Transformation shared by all frames. The phantom writes single-frame files;
this module builds the enhanced form of the same slices for tests and messy exports.
"""

from __future__ import annotations

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian

ENHANCED_MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4.1"
# Slice-level attributes that move into functional groups (or disappear) in the enhanced form.
_PER_SLICE = ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "SliceThickness",
              "SpacingBetweenSlices", "RescaleSlope", "RescaleIntercept", "RescaleType", "EchoTime",
              "InstanceNumber", "SliceLocation", "SOPInstanceUID", "PixelData", "TemporalPositionIdentifier",
              "AcquisitionTime", "ContentTime")


def _item(**attrs) -> Dataset:
    ds = Dataset()
    for k, v in attrs.items():
        setattr(ds, k, v)
    return ds


def to_enhanced(slices: list[Dataset], sop_instance_uid: str, *, per_frame_echo: list[float] | None = None) -> Dataset:
    """One Enhanced MR dataset holding ``slices`` (single-frame datasets of one series) as frames.

    Frames keep the order of ``slices``. ``per_frame_echo`` writes an EchoTime per frame (an
    MR Echo functional group per frame), which is how a multi-echo acquisition looks.
    """
    first = slices[0]
    ds = Dataset()
    for elem in first:
        if elem.keyword not in _PER_SLICE and elem.tag.group != 0x0002:
            ds.add(elem)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ENHANCED_MR_IMAGE_STORAGE
    ds.file_meta.MediaStorageSOPInstanceUID = sop_instance_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.preamble = b"\0" * 128
    ds.SOPClassUID = ENHANCED_MR_IMAGE_STORAGE
    ds.SOPInstanceUID = sop_instance_uid
    ds.InstanceNumber = 1
    ds.NumberOfFrames = len(slices)
    ds.ContentTime = first.get("AcquisitionTime", "")
    ds.AcquisitionDateTime = f"{first.get('StudyDate', '')}{first.get('AcquisitionTime', '')}"
    ds.ImageType = list(first.ImageType)[:4] if "ImageType" in first else ["ORIGINAL", "PRIMARY", "M", "NONE"]
    shared = _item(
        PlaneOrientationSequence=Sequence([_item(ImageOrientationPatient=list(first.ImageOrientationPatient))]),
        PixelMeasuresSequence=Sequence([_item(PixelSpacing=list(first.PixelSpacing),
                                              SliceThickness=first.get("SliceThickness", 1.0))]),
        PixelValueTransformationSequence=Sequence([_item(
            RescaleSlope=first.get("RescaleSlope", 1.0), RescaleIntercept=first.get("RescaleIntercept", 0.0),
            RescaleType="US")]),
    )
    if per_frame_echo is None and "EchoTime" in first:
        shared.MREchoSequence = Sequence([_item(EffectiveEchoTime=float(first.EchoTime))])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    per_frame = []
    for k, s in enumerate(slices):
        item = _item(PlanePositionSequence=Sequence([_item(ImagePositionPatient=list(s.ImagePositionPatient))]),
                     FrameContentSequence=Sequence([_item(InStackPositionNumber=k + 1, StackID="1")]))
        if per_frame_echo is not None:
            item.MREchoSequence = Sequence([_item(EffectiveEchoTime=float(per_frame_echo[k]))])
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    ds.PixelData = np.stack([s.pixel_array for s in slices]).astype(
        "<i2" if int(first.get("PixelRepresentation") or 0) else "<u2").tobytes()
    ds["PixelData"].VR = "OW"
    return ds
