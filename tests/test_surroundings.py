"""A zone inside enhancing parenchyma (issue 15, profile ``liver``): rim and foci read above it.

Hand-built volumes, not the phantom: an ablation zone inside a liver-like parenchyma that
enhances +25 % in the arterial phase and +60 % in the delayed one, a thin benign rim, portal
veins, and a tumour nodule at the margin that enhances +100 % in the arterial phase and washes
out to the parenchyma's level in the delayed one (LI-RADS: arterial hyper-enhancement).
"""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from pydantic import ValidationError

from pipeline.core.config import load_config
from pipeline.measurement.axes import measure_ablation_zone
from pipeline.measurement.foci import analyse_foci
from pipeline.measurement.rim import rim_metrics, rim_thickness_profile
from pipeline.segmentation.classical import segment
from pipeline.segmentation.surroundings import (
    read_above_surroundings,
    surroundings_of_zone,
)

CFG = load_config()
SPACING = (1.5, 1.5, 3.0)  # x, y, z (mm)
SHAPE = (24, 100, 100)  # z, y, x
MUSCLE = 260.0


def build(nodule_mm: float | None = None, parenchyma: bool = True, seed: int = 0):
    """(pre, {phase: RE image}, body): phases "1" (arterial) and "3" (delayed)."""
    z, y, x = np.meshgrid(*(np.arange(n) for n in SHAPE), indexing="ij")
    x, y, z = x * SPACING[0] - 75.0, y * SPACING[1] - 75.0, z * SPACING[2] - 36.0
    r_az = np.sqrt((x / 15.0) ** 2 + (y / 12.0) ** 2 + (z / 12.0) ** 2)
    az = r_az <= 1.0
    grad = np.sqrt((x / 225.0) ** 2 + (y / 144.0) ** 2 + (z / 144.0) ** 2) + 1e-9
    rim = (~az) & ((r_az ** 2 - 1.0) / (2 * grad) <= 1.5)
    tissue = 1.2 * MUSCLE if parenchyma else MUSCLE
    tissue_re = {"1": 0.25, "3": 0.6} if parenchyma else {"1": 0.05, "3": 0.07}
    veins = ((x - 32.0) ** 2 + (y + 20.0) ** 2 <= 3.5 ** 2) | ((x + 30.0) ** 2 + (y - 26.0) ** 2 <= 3.0 ** 2)
    nodule = np.zeros(SHAPE, bool)
    if nodule_mm:
        nodule = (x - 15.0 - 0.35 * nodule_mm / 2) ** 2 + y ** 2 + z ** 2 <= (nodule_mm / 2) ** 2
        az &= ~nodule
    pre = np.full(SHAPE, tissue)
    pre[veins] = 120.0
    pre[nodule] = 1.05 * MUSCLE
    pre[az] = 2.2 * MUSCLE
    rng = np.random.default_rng(seed)
    pre_noisy = pre + rng.normal(0, 5, SHAPE)
    phases = {}
    for phase, re_tissue in tissue_re.items():
        re = np.full(SHAPE, re_tissue)
        re[rim] = {"1": 0.3, "3": 0.95}[phase] if parenchyma else {"1": 0.3, "3": 0.6}[phase]
        re[veins] = {"1": 0.4, "3": 1.4}[phase]
        re[nodule] = {"1": 1.0, "3": 0.6}[phase]
        re[az] = 0.0
        post = pre * (1 + re) + rng.normal(0, 5, SHAPE)
        phases[phase] = (post - pre_noisy) / np.maximum(pre_noisy, 26.0)
    images = {}
    for key, arr in [("pre", pre_noisy), *phases.items(), ("body", np.ones(SHAPE, np.uint8))]:
        img = sitk.GetImageFromArray(arr.astype(np.uint8 if key == "body" else np.float32))
        img.SetSpacing(SPACING)
        img.SetOrigin((-75.0, -75.0, -36.0))
        images[key] = img
    return images


def assess(images, cfg=CFG, phases=("3", "1")):
    """What the study driver does on the delayed phase, with the earlier ones read against the surroundings."""
    pre, body, rel = images["pre"], images["body"], images[phases[0]]
    seg = segment(pre, rel, body, cfg.segmentation, cfg.enhancement, cfg.foci.min_thickness_mm)
    assert seg.found, seg.reason
    spacing = np.array(SPACING[::-1])
    excess, read = None, {}
    if cfg.enhancement.surroundings_shell_mm is not None:
        seg, excess, read = read_above_surroundings(
            seg, {p: sitk.GetArrayFromImage(images[p]) for p in phases}, sitk.GetArrayFromImage(pre),
            sitk.GetArrayFromImage(body) > 0, spacing,
            cfg.enhancement, cfg.enhancement.surroundings_shell_mm, cfg.segmentation.rim_search_mm,
            cfg.foci.min_thickness_mm)
    judged_on = rel
    if excess is not None:
        judged_on = sitk.GetImageFromArray(np.nan_to_num(excess, nan=0.0))
        judged_on.CopyInformation(pre)
    az_img = sitk.GetImageFromArray(seg.az.astype(np.uint8))
    az_img.CopyInformation(pre)
    enh = sitk.GetImageFromArray(seg.enhancing.astype(np.uint8))
    enh.CopyInformation(pre)
    az = measure_ablation_zone(az_img, None)
    profile = rim_thickness_profile(az_img, enh, max_search_mm=cfg.segmentation.rim_search_mm)
    rim = rim_metrics(profile, 1.0)
    foci, _ = analyse_foci(seg, judged_on, pre, az, rim, cfg.foci, cfg.enhancement.min_component_mm,
                           cfg.rim.benign_max_thickness_mm, float(np.median(profile.thickness_mm)))
    return rim, foci, read


def without_rule():
    return CFG.model_copy(update={"enhancement": CFG.enhancement.model_copy(update={"surroundings_shell_mm": None})})


def test_the_surroundings_median_is_the_parenchyma_not_the_rim_or_the_nodule():
    images = build(nodule_mm=12.0)
    seg = segment(images["pre"], images["3"], images["body"], CFG.segmentation, CFG.enhancement,
                  CFG.foci.min_thickness_mm)
    body = sitk.GetArrayFromImage(images["body"]) > 0
    for phase, expected in (("1", 0.25), ("3", 0.6)):
        around = surroundings_of_zone(seg.az, sitk.GetArrayFromImage(images[phase]), body, np.array(SPACING[::-1]),
                                      (10.0, 25.0))
        assert around is not None and abs(around.median_re - expected) < 0.03


def test_without_the_rule_the_parenchyma_hides_a_residual_nodule():
    """The failure of development seed 81 on a hand-built volume: rule 6 marks the whole liver."""
    rim, foci, _ = assess(build(nodule_mm=12.0), without_rule())
    assert not rim.benign_pattern and rim.max_thickness_mm >= 6.0
    assert not any(f.suspicious for f in foci)


@pytest.mark.parametrize("nodule_mm", [9.0, 12.0])
def test_a_nodule_enhancing_above_the_liver_in_the_arterial_phase_is_tumour(nodule_mm):
    rim, foci, read = assess(build(nodule_mm=nodule_mm))
    assert set(read) == {"1", "3"} and read["3"] > 0.5
    suspicious = [f for f in foci if f.suspicious]
    assert len(suspicious) == 1 and abs(suspicious[0].centroid_lps[1]) < 3.0
    assert suspicious[0].centroid_lps[0] > 15.0  # at the +x margin, where it was drawn


def test_a_nodule_iso_to_the_liver_in_the_delayed_phase_needs_the_arterial_one():
    _, foci, _ = assess(build(nodule_mm=12.0), phases=("3",))
    assert not any(f.suspicious for f in foci)


def test_a_complete_ablation_in_the_liver_is_clean_with_a_thin_rim_and_veins_discounted():
    rim, foci, _ = assess(build())
    assert rim.present and rim.median_thickness_mm <= 3.0
    assert not any(f.suspicious for f in foci)


def test_a_zone_in_muscle_is_read_by_rule_6_alone():
    images = build(nodule_mm=12.0, parenchyma=False)
    pre, body, rel = images["pre"], images["body"], images["3"]
    seg = segment(pre, rel, body, CFG.segmentation, CFG.enhancement, CFG.foci.min_thickness_mm)
    out, excess, read = read_above_surroundings(
        seg, {"3": sitk.GetArrayFromImage(rel)}, sitk.GetArrayFromImage(pre), sitk.GetArrayFromImage(body) > 0,
        np.array(SPACING[::-1]),
        CFG.enhancement, (10.0, 25.0), CFG.segmentation.rim_search_mm, CFG.foci.min_thickness_mm)
    assert excess is None and out is seg and read["3"] < 0.15


def test_the_shell_must_be_ordered(tmp_path):
    text = (tmp_path / "c.yaml")
    text.write_text("enhancement:\n  surroundings_shell_mm: [25, 10]\n")
    with pytest.raises(ValidationError, match="surroundings_shell_mm"):
        load_config(text)


@pytest.mark.parametrize("where", ["liver_edge", "zone"])
def test_a_network_zone_that_is_not_t1_bright_and_non_enhancing_is_not_the_ablation_zone(where, monkeypatch):
    """Development liver seed 81: out of its distribution the network labelled a sliver of
    enhancing liver 80 mm from the zone; the definition (T1-bright, non-enhancing) overrules it."""
    import pipeline.segmentation.network as network
    from models.infer import NetworkPrediction
    from pipeline.core.records import Label

    images = build()
    pre, body, rel = images["pre"], images["body"], images["3"]
    z, y, x = np.meshgrid(*(np.arange(n) for n in SHAPE), indexing="ij")
    x, y = x * SPACING[0] - 75.0, y * SPACING[1] - 75.0
    if where == "zone":
        labelled = np.sqrt((x / 15.0) ** 2 + (y / 12.0) ** 2 + ((z * SPACING[2] - 36.0) / 12.0) ** 2) <= 0.9
    else:
        labelled = (x > 50.0) & (np.abs(y) < 15.0) & (np.abs(z - 12) < 4)
    labels = np.where(labelled, int(Label.ABLATION_ZONE), 0).astype(np.uint8)
    probabilities = np.stack([(labels == k).astype(np.float32) for k in range(4)])
    prediction = NetworkPrediction(labels, probabilities, np.zeros(SHAPE, np.float32), 0.0, "cpu", 1)
    monkeypatch.setattr(network, "predict_study", lambda *a, **k: prediction)
    seg, _ = network.segment_network(pre, images["3"], rel, body, CFG.segmentation, CFG.enhancement,
                                     CFG.foci.min_thickness_mm, model=None)
    if where == "zone":
        assert seg.found and seg.az.sum() > 0.8 * labelled.sum()
    else:
        assert not seg.found and seg.reason == network.NOT_AN_ABLATION_ZONE
        # The classical method, which the study driver then runs, finds the zone itself.
        classical = segment(pre, rel, body, CFG.segmentation, CFG.enhancement, CFG.foci.min_thickness_mm)
        assert classical.found and abs(float(np.mean(x[classical.az]))) < 3.0


def test_which_phase_read_is_arterial_is_read_from_the_parenchyma():
    from pipeline.segmentation.surroundings import arterial_phase_read

    assert arterial_phase_read({"3": 0.45, "1": 0.15}, 0.5)  # arterial, delayed
    assert not arterial_phase_read({"2": 0.46, "1": 0.60}, 0.5)  # portal, delayed: no arterial phase
    assert not arterial_phase_read({"1": 0.46}, 0.5)  # one phase


def test_a_zone_in_parenchyma_without_an_arterial_phase_is_flagged_and_its_call_kept():
    """LI-RADS LR-TR: arterial hyper-enhancement cannot be assessed without an arterial phase
    (development liver seed 82: two nodules iso to the liver in the portal and delayed phases of
    studies without one)."""
    from pipeline.longitudinal.classify import classify_patient
    from pipeline.longitudinal.timeline import Procedure, build_patient_timeline
    from tests.helpers import DAY0, imaging, study

    studies = [study("s1", 30), study("s2", 90)]

    def decide(read, above=True):
        from pipeline.segmentation.surroundings import arterial_phase_read

        imgs = {uid: imaging(30).model_copy(update={
            "surroundings_re": read, "enhancement_above_surroundings": above,
            "arterial_phase_read": arterial_phase_read(read, CFG.enhancement.arterial_max_fraction) if above else None})
            for uid in ("s1", "s2")}
        entries = build_patient_timeline(studies, [Procedure("P1", DAY0)], {u: True for u in imgs}, CFG.rules)
        return classify_patient(entries, imgs, CFG.rules, CFG.foci, None)["s2"]

    without = decide({"2": 0.46, "1": 0.60})
    assert without.flagged and without.category.value == "no_evidence_of_ltp"
    assert any(f.startswith("arterial_phase_not_assessed:") and "phase 1 +60 %" in f for f in without.flag_reasons)
    assert not decide({"3": 0.45, "1": 0.15}).flagged
    assert not decide({"3": 0.05}, above=False).flagged  # a zone in muscle


def test_a_clean_call_without_the_arterial_phase_documents_no_complete_ablation():
    """IWG-IGTA: LTP needs an earlier contrast study that documented adequate ablation; a zone in
    the liver read without its arterial phase documents none (LI-RADS LR-TR nonevaluable by
    omission). A nodule found at the next study is residual; after a clean study with an
    arterial phase it is LTP (development liver seed 82: a residual read complete at a baseline
    without an arterial phase made its three follow-ups LTP)."""
    from pipeline.longitudinal.classify import classify_patient
    from pipeline.longitudinal.timeline import Procedure, build_patient_timeline
    from pipeline.segmentation.surroundings import arterial_phase_read
    from tests.helpers import DAY0, focus, imaging, study

    def calls(reads):
        studies = [study(f"s{i}", 30 + 60 * i) for i in range(len(reads))]
        imgs = {}
        for i, read in enumerate(reads):
            last = i == len(reads) - 1
            imgs[f"s{i}"] = imaging(30, foci=[focus(9.0, 8.0)] if last else []).model_copy(update={
                "surroundings_re": read, "enhancement_above_surroundings": True,
                "arterial_phase_read": arterial_phase_read(read, CFG.enhancement.arterial_max_fraction)})
        entries = build_patient_timeline(studies, [Procedure("P1", DAY0)], {u: True for u in imgs}, CFG.rules)
        decided = classify_patient(entries, imgs, CFG.rules, CFG.foci, None)
        return [decided[f"s{i}"] for i in range(len(reads))]

    portal_delayed, with_arterial = {"2": 0.46, "1": 0.60}, {"3": 0.45, "1": 0.15}
    base, later = calls([portal_delayed, with_arterial])
    assert base.category.value == "complete_ablation" and base.flagged
    assert later.category.value == "residual_unablated_tumour"
    assert later.rule_id == "R2-residual-never-documented-complete"
    from pipeline.outputs.dicom_sr import FINDING_CODES, key_finding

    assert key_finding(later.rule_id) == FINDING_CODES["focus"]  # the SR's key finding is the focus
    assert calls([portal_delayed, with_arterial, with_arterial])[-1].category.value == "local_tumour_progression"
    assert calls([with_arterial, with_arterial])[-1].category.value == "local_tumour_progression"
