"""Vendor-like naming and sequence parameters of the synthetic series."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Vendor:
    manufacturer: str
    model: str
    field_strength: float
    philips_rescale: bool  # per-series RescaleSlope/Intercept
    temporal_position: bool  # TemporalPositionIdentifier on dynamic phases
    contrast_agent: str

    def t1_description(self, phase_index: int | None, seconds: int | None, tilt: bool) -> str:
        m = self.manufacturer
        if m == "SIEMENS":
            return "t1_vibe_fs_tra_pre" if seconds is None else f"t1_vibe_fs_tra_post_{seconds}s"
        if m.startswith("GE"):
            pre = "Obl LAVA-Flex" if tilt else "Ax LAVA-Flex"
            return f"{pre} PRE" if seconds is None else f"{pre} +C ph{phase_index}"
        if m.startswith("Philips"):
            return "THRIVE pre" if seconds is None else f"THRIVE +C dyn {phase_index}"
        names = {20: "arterial", 70: "portal", 180: "delayed"}
        return "T1 FS 3D pre" if seconds is None else f"T1 FS 3D post {names[seconds]}"

    def t2_description(self, coronal: bool) -> str:
        m = self.manufacturer
        if m == "SIEMENS":
            return "t2_tse_fs_cor" if coronal else "t2_tse_fs_tra"
        if m.startswith("GE"):
            return "Cor T2 FRFSE FS" if coronal else "Ax T2 FRFSE FS"
        if m.startswith("Philips"):
            return "T2W_TSE_SPAIR COR" if coronal else "T2W_TSE_SPAIR"
        return "T2 FS FSE COR" if coronal else "T2 FS FSE"


VENDOR_INFO = {
    "SIEMENS": Vendor("SIEMENS", "MAGNETOM Aera", 1.5, False, False, "DOTAREM"),
    "GE MEDICAL SYSTEMS": Vendor("GE MEDICAL SYSTEMS", "SIGNA Artist", 1.5, False, True, "Gadovist"),
    "Philips Medical Systems": Vendor("Philips Medical Systems", "Ingenia", 3.0, True, True, "DOTAREM"),
    "CANON_MEC": Vendor("CANON_MEC", "Vantage Orian", 1.5, False, False, "Gadovist"),
}

# (ScanningSequence, SequenceVariant, ScanOptions, MRAcquisitionType)
T1_SEQUENCE = ("GR", "SP\\SS", "FS", "3D")
T2_SEQUENCE = ("SE", "SK\\SP", "FS\\SAT1", "2D")
LOCALIZER_SEQUENCE = ("GR", "SP", "", "2D")
