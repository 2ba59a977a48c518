"""Re-encode a DICOM image dataset in another transfer syntax (test data, messy exports).

Real PACS exports mix every transfer syntax; the phantom writes Explicit VR Little Endian
only, so this module re-encodes a dataset the way another archive or modality would have
stored it. Encoders, all libraries rather than hand-written codecs:
- RLE Lossless, JPEG-LS lossless, JPEG 2000 lossless: ``pydicom``'s own encoders
  (``Dataset.compress``; backed by pylibjpeg-rle/pydicom's native RLE, pyjpegls and
  pylibjpeg-openjpeg);
- JPEG Lossless SV1 (process 14): GDCM inside SimpleITK (pydicom has no JPEG encoder);
- JPEG baseline (process 1, 8 bits, lossy): Pillow's libjpeg; values are scaled to 8 bits
  and RescaleSlope/Intercept set so that the real values are approximately kept;
- Deflated Explicit VR Little Endian, Implicit VR Little Endian, Explicit VR Big Endian:
  ``pydicom.dcmwrite`` with the matching encoding (big endian pixel words byte-swapped).
"""

from __future__ import annotations

import io
import tempfile
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)

# Short names used by the messy-export generator and the tests.
SYNTAXES: dict[str, UID] = {
    "explicit_le": ExplicitVRLittleEndian,
    "implicit_le": ImplicitVRLittleEndian,
    "explicit_be": ExplicitVRBigEndian,
    "deflated": DeflatedExplicitVRLittleEndian,
    "rle": RLELossless,
    "jpeg_ls": JPEGLSLossless,
    "jpeg_2000": JPEG2000Lossless,
    "jpeg_lossless": JPEGLosslessSV1,
    "jpeg_baseline": JPEGBaseline8Bit,
}
LOSSY = {"jpeg_baseline"}


def _jpeg_lossless_frame(pixels: np.ndarray) -> bytes:
    """One JPEG Lossless SV1 codestream of a 2D uint16 image, encoded by GDCM (SimpleITK)."""
    import SimpleITK as sitk  # noqa: PLC0415 - heavy import, only for this codec

    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "frame.dcm")
        writer = sitk.ImageFileWriter()
        writer.SetFileName(path)
        writer.SetUseCompression(True)
        writer.SetCompressor("JPEG")  # GDCM: JPEG Lossless, Non-Hierarchical, SV1
        writer.Execute(sitk.GetImageFromArray(np.ascontiguousarray(pixels)))
        encoded = pydicom.dcmread(path)
    if encoded.file_meta.TransferSyntaxUID != JPEGLosslessSV1:
        raise RuntimeError(f"GDCM wrote {encoded.file_meta.TransferSyntaxUID}, not JPEG Lossless SV1")
    from pydicom.encaps import generate_fragmented_frames  # noqa: PLC0415

    frames = [b"".join(f) for f in generate_fragmented_frames(encoded.PixelData)]
    return frames[0]


def _jpeg_baseline_frame(pixels8: np.ndarray) -> bytes:
    from PIL import Image  # noqa: PLC0415 - Pillow comes with matplotlib

    buf = io.BytesIO()
    Image.fromarray(pixels8, mode="L").save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _frames(ds: Dataset) -> np.ndarray:
    arr = ds.pixel_array
    n = int(ds.get("NumberOfFrames") or 1)
    return arr.reshape(n, int(ds.Rows), int(ds.Columns))


def transcode(ds: Dataset, syntax: str) -> Dataset:
    """A copy of ``ds`` (monochrome, 16-bit unsigned or 8-bit) re-encoded in ``syntax``.

    ``syntax`` is a key of :data:`SYNTAXES`. The returned dataset is ready for
    :func:`save`; its file meta TransferSyntaxUID says what it holds.
    """
    if syntax not in SYNTAXES:
        raise ValueError(f"unknown transfer syntax {syntax!r}; one of {sorted(SYNTAXES)}")
    uid = SYNTAXES[syntax]
    out = pydicom.Dataset(ds)  # shallow copy of the elements
    out.file_meta = pydicom.dataset.FileMetaDataset(ds.file_meta)
    out.preamble = getattr(ds, "preamble", None) or b"\0" * 128
    frames = _frames(ds)
    word = f"{'i' if int(ds.get('PixelRepresentation') or 0) else 'u'}{int(ds.BitsAllocated) // 8}"
    if syntax in ("explicit_le", "implicit_le", "deflated", "explicit_be"):
        out.PixelData = frames.astype((">" if syntax == "explicit_be" else "<") + word).tobytes()
        out["PixelData"].VR = "OW" if int(ds.BitsAllocated) > 8 else "OB"
        out.file_meta.TransferSyntaxUID = uid
        return out
    if syntax in ("rle", "jpeg_ls", "jpeg_2000"):
        out.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        out.PixelData = frames.astype("<" + word).tobytes()
        # Lossless: the instance keeps its SOP Instance UID, as the other transcodings here do
        # (pydicom would draw a random one, and the same seed would not give the same export).
        out.compress(uid, frames if len(frames) > 1 else frames[0], encoding_plugin=None,
                     generate_instance_uid=False)
        return out
    if syntax == "jpeg_lossless":
        out.PixelData = encapsulate([_jpeg_lossless_frame(f.astype(np.uint16)) for f in frames])
    else:  # jpeg_baseline: 8 bits, rescale keeps real values approximately
        real = frames.astype(np.float64) * float(ds.get("RescaleSlope") or 1.0) + float(
            ds.get("RescaleIntercept") or 0.0)
        lo, hi = float(real.min()), float(real.max())
        slope = (hi - lo) / 255.0 if hi > lo else 1.0
        stored = np.clip(np.rint((real - lo) / slope), 0, 255).astype(np.uint8)
        out.PixelData = encapsulate([_jpeg_baseline_frame(f) for f in stored])
        out.BitsAllocated = out.BitsStored = 8
        out.HighBit = 7
        out.PixelRepresentation = 0
        out.RescaleSlope = f"{slope:.10g}"[:16]
        out.RescaleIntercept = f"{lo:.10g}"[:16]
        out.LossyImageCompression = "01"
    out["PixelData"].VR = "OB"
    out["PixelData"].is_undefined_length = True
    out.file_meta.TransferSyntaxUID = uid
    return out


def save(ds: Dataset, path: Path) -> Path:
    """Write ``ds`` in the transfer syntax its file meta names (with preamble and meta)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ts = UID(ds.file_meta.TransferSyntaxUID)
    if ts == ExplicitVRBigEndian:
        pydicom.dcmwrite(path, ds, implicit_vr=False, little_endian=False, enforce_file_format=True)
    else:
        pydicom.dcmwrite(path, ds, enforce_file_format=True)
    return path
