"""Segmentation network (models/) and the pipeline's rules around it (pipeline/segmentation/network.py):
training smoke test, inference geometry, pipeline hook and fallback.

The tiny cohort is the shared ``assessed_run``: its per-study ``pre_registered`` and
``subtraction`` images (what the pipeline feeds the network) with the generator's truth labels,
in the case-folder layout of ``--data DIR``; no extra registration is paid here.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from models.data import LABEL_FILE, PRE_FILE, SUB_FILE, load_cases, network_input, working_grid
from models.infer import (
    BODY_MARGIN_MM,
    LoadedModel,
    WeightsError,
    body_box,
    load_model,
    predict,
    predict_study,
    resolve_weights,
)
from models.network import default_network_config
from models.train import TrainSettings, case_dice, train
from pipeline.core.config import load_config
from pipeline.core.geometry import body_mask
from pipeline.segmentation.network import segment_network

# Small enough for 2 CPU cores: 8 filters, 3 mm voxels, 16 x 48 x 48 patches.
TINY = dict(spacing_xyz=(3.0, 3.0, 3.0), roi_zyx=(16, 48, 48), patches_per_case=1, max_iterations=6,
            validate_every=6, network={**default_network_config(2, 4), "init_filters": 8}, threads=2)


def _body(image: sitk.Image) -> np.ndarray:
    """The pipeline's body mask of ``image`` as the array models/ takes."""
    return sitk.GetArrayFromImage(body_mask(image))


@pytest.fixture(scope="module")
def case_root(assessed_run, tmp_path_factory) -> Path:
    root, out, _truth, _summary = assessed_run
    data = tmp_path_factory.mktemp("cases")
    for assessment in sorted(out.glob("patients/*/*/assessment.json")):
        folder = assessment.parent
        if not (folder / PRE_FILE).is_file():
            continue
        uid = json.loads(assessment.read_text())["study_instance_uid"]
        case = data / folder.name
        case.mkdir()
        shutil.copyfile(folder / PRE_FILE, case / PRE_FILE)
        shutil.copyfile(folder / SUB_FILE, case / SUB_FILE)
        shutil.copyfile(root / "data" / "truth" / f"{uid}_labels.nii.gz", case / LABEL_FILE)
    assert len(list(data.iterdir())) >= 3
    return data


@pytest.fixture(scope="module")
def tiny_training(case_root, tmp_path_factory):
    cases = load_cases(case_root, TINY["spacing_xyz"], body_mask)
    out = tmp_path_factory.mktemp("train")
    result = train(cases[:-1], cases[-1:], TrainSettings(seed=3, **TINY), out / "a")
    return cases, out, result


def test_cases_are_the_pipeline_images_with_truth_on_the_working_grid(case_root):
    cases = load_cases(case_root, (3.0, 3.0, 3.0), body_mask)
    case = cases[0]
    assert case.image.shape[0] == 2 and case.image.shape[1:] == case.label.shape
    assert case.working.GetSpacing() == (3.0, 3.0, 3.0)
    assert case.working.GetDirection() == case.source.GetDirection()
    # The truth AZ is T1-bright before contrast: channel 0 (pre / body median) is high there.
    assert any((c.label == 1).any() for c in cases)
    with_az = next(c for c in cases if (c.label == 1).any())
    assert float(np.median(with_az.image[0][with_az.label == 1])) > 1.3


def test_training_smoke_finite_deterministic_and_reloadable(case_root, tiny_training):
    cases, out, first = tiny_training
    assert first.iterations == TINY["max_iterations"]
    assert all(np.isfinite(first.losses)) and first.losses[0] > 0
    assert first.validation and set(first.validation[-1]["dice"]) == {"ablation_zone", "rim", "enhancing_focus"}
    # Same seed, same run: identical losses and weights.
    again = train(cases[:-1], cases[-1:], TrainSettings(seed=3, **TINY), out / "b")
    assert again.losses == first.losses
    a = torch.load(first.last_checkpoint, weights_only=False)["state_dict"]
    b = torch.load(again.last_checkpoint, weights_only=False)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    model = load_model(first.checkpoint, "cpu")
    assert model.meta["spacing_xyz"] == [3.0, 3.0, 3.0] and model.meta["roi_zyx"] == [16, 48, 48]
    # stop_after cuts the same run short (the schedule still spans max_iterations): its losses
    # are the full run's first ones, which is how the shipped weights are reproduced.
    cut = train(cases[:-1], [], TrainSettings(seed=3, **{**TINY, "stop_after": 3}), out / "cut")
    assert cut.iterations == 3 and cut.losses == first.losses[:3]
    # Another seed draws other patches: the losses differ.
    other = train(cases[:-1], [], TrainSettings(seed=4, **{**TINY, "max_iterations": 2}), out / "c")
    assert other.losses != first.losses[:2]


def test_fine_tuning_keeps_the_checkpoints_grid(case_root, tiny_training):
    cases, out, first = tiny_training
    settings = TrainSettings(seed=0, **{**TINY, "spacing_xyz": (2.0, 2.0, 2.0), "max_iterations": 1})
    tuned = train(cases[:1], [], settings, out / "tuned", init_checkpoint=first.checkpoint)
    assert torch.load(tuned.checkpoint, weights_only=False)["spacing_xyz"] == [3.0, 3.0, 3.0]


class _BrightIsAblationZone(torch.nn.Module):
    """Stand-in network with a known answer: class 1 where the pre-contrast channel exceeds 1.5."""

    def forward(self, x):
        az = 20.0 * (x[:, :1] - 1.5)
        zero = torch.zeros_like(az)
        return torch.cat([zero, az, zero - 10.0, zero - 10.0], dim=1)


def _oblique_flipped_pair():
    """Pre/sub on a grid tilted 20 deg and flipped left-right, with an off-centre bright sphere."""
    size, spacing = (60, 50, 20), (1.7, 1.7, 3.0)
    t = np.deg2rad(20.0)
    rot = np.array([[1, 0, 0], [0, np.cos(t), -np.sin(t)], [0, np.sin(t), np.cos(t)]])
    direction = rot @ np.diag([-1.0, 1.0, 1.0])
    pre = sitk.Image(size, sitk.sitkFloat32)
    pre.SetSpacing(spacing)
    pre.SetOrigin((40.0, -30.0, 12.0))
    pre.SetDirection(tuple(direction.ravel()))
    centre_idx = np.array([18.0, 30.0, 7.0])  # (i, j, k): off centre on every axis
    centre_lps = np.array(pre.TransformContinuousIndexToPhysicalPoint(tuple(centre_idx)))
    k, j, i = np.meshgrid(*(np.arange(n, dtype=float) for n in size[::-1]), indexing="ij")
    pts = np.stack([i, j, k], -1) @ (direction * np.array(spacing)).T + np.array(pre.GetOrigin())
    sphere = np.linalg.norm(pts - centre_lps, axis=-1) <= 12.0
    arr = np.full(sphere.shape, 100.0, np.float32)
    arr[sphere] = 250.0
    arr[:, :, :3] = 0.0  # air at one border: the body mask is not the whole FOV
    pre_img = sitk.GetImageFromArray(arr)
    pre_img.CopyInformation(pre)
    sub_img = sitk.GetImageFromArray(np.zeros_like(arr))
    sub_img.CopyInformation(pre)
    return pre_img, sub_img, sphere, centre_lps


class _CountingWindows(_BrightIsAblationZone):
    """The stand-in network counting the windows it is given."""

    def __init__(self):
        super().__init__()
        self.windows = 0

    def forward(self, x):
        self.windows += x.shape[0]
        return super().forward(x)


def test_body_box_holds_the_body_with_a_margin_and_fills_its_windows():
    body = np.zeros((20, 200, 200), bool)
    body[:, 60:130, 50:160] = True
    box = body_box(body, (3.0, 1.6, 1.6), (16, 80, 80), 0.25)
    margin = int(np.ceil(BODY_MARGIN_MM / 1.6))
    for axis, (lo, hi) in enumerate(((0, 20), (60, 130), (50, 160))):
        s = box[axis]
        assert s.start <= max(0, lo - (margin if axis else 2)) and s.stop >= min(body.shape[axis], hi + margin)
        assert 0 <= s.start and s.stop <= body.shape[axis]
    # Grown to what its windows cover (80 + 60 k voxels): 70 + 8 -> 80, 110 + 8 -> 140.
    assert box[1].stop - box[1].start == 80 and box[2].stop - box[2].start == 140
    assert body_box(np.zeros_like(body), (3.0, 1.6, 1.6), (16, 80, 80), 0.25) is None
    whole = body_box(np.ones_like(body), (3.0, 1.6, 1.6), (16, 80, 80), 0.25)
    assert all(s == slice(0, n) for s, n in zip(whole, body.shape))


def test_cropping_to_the_body_changes_no_voxel_of_a_voxel_wise_network_and_needs_fewer_windows():
    """A body off-centre in a wide field of view, on a grid tilted 20 deg and flipped left-right:
    the same answer from fewer windows (a box taken in the wrong orientation would miss the
    zone, which lies where the body's mirror image has none)."""
    size, spacing = (150, 150, 20), (1.6, 1.6, 3.0)
    k, j, i = np.meshgrid(*(np.arange(n, dtype=float) for n in size[::-1]), indexing="ij")
    inside = ((i - 50) / 30) ** 2 + ((j - 70) / 25) ** 2 <= 1.0
    arr = np.where(inside, 100.0, 0.0).astype(np.float32)
    arr[inside & (((i - 40) ** 2 + (j - 70) ** 2) <= 64)] = 250.0  # a bright zone in the body
    pre = sitk.GetImageFromArray(arr)
    pre.SetSpacing(spacing)
    t = np.deg2rad(20.0)
    tilt = np.array([[1, 0, 0], [0, np.cos(t), -np.sin(t)], [0, np.sin(t), np.cos(t)]])
    pre.SetDirection(tuple((tilt @ np.diag([-1.0, 1.0, 1.0])).ravel()))
    pre.SetOrigin((40.0, -30.0, 12.0))
    sub = sitk.GetImageFromArray(np.zeros_like(arr))
    sub.CopyInformation(pre)
    meta = {"spacing_xyz": [1.6, 1.6, 3.0], "roi_zyx": [16, 32, 32]}
    whole_net, crop_net = _CountingWindows().eval(), _CountingWindows().eval()
    whole = predict_study(LoadedModel(whole_net, meta, "cpu", Path("stand-in")), pre, sub, _body(pre),
                          crop_to_body=False)
    cropped = predict_study(LoadedModel(crop_net, meta, "cpu", Path("stand-in")), pre, sub, _body(pre))
    assert (cropped.labels == 1).sum() > 0
    assert np.array_equal(cropped.labels, whole.labels)
    # In the body the same probabilities; beyond the box certain background (the network's own
    # answer there is background at 0.9999).
    body = _body(pre) > 0
    assert np.allclose(cropped.probabilities[:, body], whole.probabilities[:, body], atol=1e-6)
    assert np.allclose(cropped.probabilities[0], whole.probabilities[0], atol=1e-3)
    assert cropped.case_uncertainty == pytest.approx(whole.case_uncertainty, abs=1e-9)
    assert crop_net.windows < 0.6 * whole_net.windows


def test_prediction_lies_on_the_study_grid_of_an_oblique_flipped_acquisition():
    pre, sub, sphere, centre_lps = _oblique_flipped_pair()
    model = LoadedModel(_BrightIsAblationZone().eval(), {"spacing_xyz": [1.6, 1.6, 3.0], "roi_zyx": [16, 32, 32]},
                        "cpu", Path("stand-in"))
    pred = predict_study(model, pre, sub, _body(pre), tta=True, tta_views=4)
    assert pred.labels.shape == sphere.shape and pred.probabilities.shape == (4, *sphere.shape)
    assert pred.n_views == 4
    assert predict_study(model, pre, sub, _body(pre), tta=True).n_views == 2  # the default: input + flip along all axes
    # predict itself: numpy in, numpy out, on the working grid of the input.
    image, grid = network_input(pre, sub, (1.6, 1.6, 3.0), _body(pre))
    working = predict(model, image, tta_views=4)
    assert working.probabilities.shape == (4, *grid.GetSize()[::-1]) and working.n_views == 4
    assert working.labels.shape == grid.GetSize()[::-1] and working.case_uncertainty == pred.case_uncertainty
    found = pred.labels == 1
    dice = 2 * (found & sphere).sum() / (found.sum() + sphere.sum())
    assert dice > 0.9
    zyx = np.argwhere(found).mean(0)
    found_lps = np.array(pre.TransformContinuousIndexToPhysicalPoint(tuple(zyx[::-1])))
    assert np.linalg.norm(found_lps - centre_lps) < 1.0
    # The views agree on a flip-symmetric answer: near-zero uncertainty away from the edge.
    assert pred.case_uncertainty < 0.05
    assert float(pred.uncertainty[sphere].max()) <= 0.75 + 1e-6


def test_working_grid_covers_the_fov_with_the_same_direction():
    pre, _sub, _sphere, _c = _oblique_flipped_pair()
    grid = working_grid(pre, (1.6, 1.6, 3.0))
    assert grid.GetDirection() == pre.GetDirection()
    corner = lambda img, idx: np.array(img.TransformContinuousIndexToPhysicalPoint(idx))  # noqa: E731
    for a, b in (((-0.5, -0.5, -0.5), (-0.5, -0.5, -0.5)),):
        assert np.allclose(corner(pre, a), corner(grid, b), atol=1e-6)
    image, _ = network_input(pre, _sub, (1.6, 1.6, 3.0), _body(pre))
    assert image.shape == (2, *grid.GetSize()[::-1])


def _pipeline_inputs(assessed_run):
    from pipeline.imaging.subtraction import relative_enhancement

    _root, out, _t, _s = assessed_run
    folder = next(p.parent for p in sorted(out.glob(f"patients/*/*/{PRE_FILE}")))
    pre = sitk.ReadImage(str(folder / PRE_FILE), sitk.sitkFloat32)
    sub = sitk.ReadImage(str(folder / SUB_FILE), sitk.sitkFloat32)
    body = body_mask(pre)
    rel = relative_enhancement(pre, sitk.Add(pre, sub), body)
    return pre, sub, rel, body


def _network_cfg(weights: str, tta: bool = True):
    cfg = load_config()
    return cfg.model_copy(update={"segmentation": cfg.segmentation.model_copy(
        update={"method": "network", "network_weights": weights, "network_tta": tta})})


def test_the_network_is_the_default():
    cfg = load_config()
    assert cfg.segmentation.method == "network" and cfg.segmentation.network_az_edge == "half_max"
    assert (Path(__file__).resolve().parents[1] / cfg.segmentation.network_weights).is_file()


def test_without_weights_the_classical_method_segments_and_says_why(assessed_run, tmp_path):
    from pipeline.measurement.study import _segment

    pre, sub, rel, body = _pipeline_inputs(assessed_run)
    missing = tmp_path / "none.pt"
    seg, method, note, unc, _device = _segment(pre, sub, rel, body, _network_cfg(str(missing)), None, "cpu")
    assert method == "classical" and unc is None
    assert "not found" in note and str(missing) in note and "classical method used" in note
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError):
        load_model(broken)
    _seg, method, note, _u, _d = _segment(pre, sub, rel, body, _network_cfg(str(broken)), None, "cpu")
    assert method == "classical" and "unusable" in note
    # The assessments of the shared run (network default) record the method and device used.
    _root, out, _t, _s = assessed_run
    records = [json.loads(p.read_text()) for p in sorted(out.glob("patients/*/*/assessment.json"))]
    imaged = [r["imaging"] for r in records if r["imaging"]["ok"]]
    assert imaged and all(i["segmentation_method"] == "network" and i["device"] == "cpu" for i in imaged)


def test_network_segmentation_has_the_classical_structure(assessed_run):
    from pipeline.measurement.study import _segment
    from pipeline.segmentation.classical import segment

    # The shipped weights: a network trained for a few iterations (tiny_training) finds a "zone"
    # by chance, and the definition check (a zone overlaps the T1-bright region) may refuse it.
    weights = resolve_weights(load_config().segmentation.network_weights)
    pre, sub, rel, body = _pipeline_inputs(assessed_run)
    cfg = _network_cfg(str(weights), tta=False)  # TTA: the geometry test (CPU time)
    seg, method, note, unc, device = _segment(pre, sub, rel, body, cfg, None, "cpu")
    assert (method, note, device) == ("network", "", "cpu"), note
    assert isinstance(unc, float) and 0.0 <= unc <= 0.75
    plain = load_config()
    reference = segment(pre, rel, body, plain.segmentation, plain.enhancement, plain.foci.min_thickness_mm)
    for name in ("az", "az_soft", "enhancing", "rim"):
        assert getattr(seg, name).shape == getattr(reference, name).shape
        assert getattr(seg, name).dtype == getattr(reference, name).dtype
    seg2, pred = segment_network(pre, sub, rel, body, cfg.segmentation, cfg.enhancement, cfg.foci.min_thickness_mm,
                                 load_model(weights), None)
    assert pred.labels.shape == seg.az.shape and np.array_equal(seg2.az, seg.az)


def test_train_command_fine_tunes_on_case_folders(case_root, tmp_path):
    from typer.testing import CliRunner

    from pipeline.cli import app

    out, weights = tmp_path / "run", tmp_path / "weights" / "w.pt"
    result = CliRunner().invoke(app, ["train", "--data", str(case_root), "--out", str(out), "--work-dir",
                                      str(tmp_path / "cache"), "--val-patients", "0", "--iterations", "2",
                                      "--init-filters", "8", "--device", "cpu", "--weights-out", str(weights)])
    assert result.exit_code == 0, result.output
    assert "2 iterations on cpu" in result.output
    assert weights.is_file() and load_model(weights).meta["iteration"] == 2
    bad = CliRunner().invoke(app, ["train", "--data", str(tmp_path), "--out", str(out), "--val-patients", "0"])
    assert bad.exit_code == 2 and "no usable case folder" in bad.output


def test_patch_sampler_centres_patches_on_the_requested_class():
    """crop_ratios drive the patch centres: with only the rim requested every patch holds rim."""
    from models.train import _transforms

    label = np.zeros((1, 40, 96, 96), np.uint8)
    label[0, 5:9, 10:14, 70:74] = 2  # a small rim patch far from the AZ
    label[0, 25:35, 50:80, 20:50] = 1
    image = np.random.default_rng(0).normal(size=(2, 40, 96, 96)).astype(np.float32)
    settings = TrainSettings(roi_zyx=(8, 16, 16), patches_per_case=4, crop_ratios=(0.0, 0.0, 1.0, 0.0))
    chain = _transforms(settings)
    chain.set_random_state(seed=0)
    patches = chain({"image": image, "label": label})
    assert len(patches) == 4
    assert all(int((p["label"] == 2).sum()) > 0 for p in patches)
    chain = _transforms(TrainSettings(roi_zyx=(8, 16, 16), patches_per_case=4, crop_ratios=(0.0, 1.0, 0.0, 0.0)))
    chain.set_random_state(seed=0)
    assert all(int((p["label"] == 2).sum()) == 0 and int((p["label"] == 1).sum()) > 0
               for p in chain({"image": image, "label": label}))


def test_uncertain_network_segmentation_raises_the_review_flag():
    """segmentation.network_review_uncertainty: a network segmentation above it needs review."""
    from pipeline.longitudinal.classify import classify_patient
    from pipeline.longitudinal.timeline import Procedure, build_patient_timeline
    from tests.helpers import DAY0, imaging, study

    base = load_config()
    cfg = base.model_copy(update={"segmentation": base.segmentation.model_copy(
        update={"network_review_uncertainty": 0.05})})
    studies = [study("s1", 30), study("s2", 90)]

    def decide(method, uncertainty, config):
        imgs = {uid: imaging(30).model_copy(update={"segmentation_method": method,
                                                   "segmentation_uncertainty": uncertainty})
                for uid in ("s1", "s2")}
        entries = build_patient_timeline(studies, [Procedure("P1", DAY0)], {u: True for u in imgs}, config.rules)
        return classify_patient(entries, imgs, config.rules, config.foci,
                                config.segmentation.network_review_uncertainty)["s2"]

    calm = decide("network", 0.01, cfg)
    assert not calm.flagged
    unsure = decide("network", 0.2, cfg)
    assert unsure.flagged and any(f.startswith("segmentation_uncertain:") for f in unsure.flag_reasons)
    assert not decide("classical", 0.2, cfg).flagged  # the classical method has no such uncertainty
    off = base.model_copy(update={"segmentation": base.segmentation.model_copy(
        update={"network_review_uncertainty": None})})
    assert not decide("network", 0.2, off).flagged  # None: the uncertainty never flags


def test_an_input_unlike_the_training_data_raises_the_uncertainty_above_the_review_threshold(case_root):
    """The shipped weights on a study as the pipeline prepares it, then on the same study with its
    pre-contrast inverted (a series of another contrast taken for the T1, say): the clean study's
    per-case uncertainty stays under ``segmentation.network_review_uncertainty``, the corrupted
    one rises above it (models/README.md: the threshold and what it catches)."""
    cfg = load_config()
    limit = cfg.segmentation.network_review_uncertainty
    assert limit is not None
    model = load_model(Path(__file__).resolve().parents[1] / cfg.segmentation.network_weights)
    folder = next(f for f in sorted(case_root.iterdir())
                  if (sitk.GetArrayFromImage(sitk.ReadImage(str(f / LABEL_FILE))) == 1).any())
    pre = sitk.ReadImage(str(folder / PRE_FILE), sitk.sitkFloat32)
    sub = sitk.ReadImage(str(folder / SUB_FILE), sitk.sitkFloat32)
    inverted = sitk.Subtract(float(np.percentile(sitk.GetArrayFromImage(pre), 99)), pre)
    clean = predict_study(model, pre, sub, _body(pre)).case_uncertainty
    corrupted = predict_study(model, inverted, sitk.Subtract(sitk.Add(pre, sub), inverted),
                              _body(inverted)).case_uncertainty
    assert clean < limit < corrupted


def test_the_batch_of_windows_is_sized_to_the_free_gpu_memory(monkeypatch):
    from models.infer import MAX_WINDOWS_PER_BATCH, WINDOW_BYTES, windows_per_batch

    assert windows_per_batch("cpu", (24, 64, 64)) == 2
    free = {"bytes": 0}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free["bytes"], 80 * 2**30))
    free["bytes"] = 10 * WINDOW_BYTES  # half of it: 5 windows of the reference size
    assert windows_per_batch("cuda", (24, 64, 64)) == 5
    assert windows_per_batch("cuda:0", (48, 64, 64)) == 2  # windows twice as large
    free["bytes"] = WINDOW_BYTES // 4
    assert windows_per_batch("cuda", (24, 64, 64)) == 1  # never none
    free["bytes"] = 140 * 2**30
    assert windows_per_batch("cuda", (24, 64, 64)) == MAX_WINDOWS_PER_BATCH


def test_clean_prediction_keeps_one_zone_its_rim_and_real_foci():
    """The argmax is cleaned as the classical method is: the largest AZ component, rim only
    within rim_search_mm of it, focus components of rule 6's minimum size."""
    from models.infer import NetworkPrediction
    from models.labels import Label
    from pipeline.segmentation.network import clean_prediction

    cfg = load_config()
    shape, spacing = (20, 60, 60), np.array([3.0, 1.5, 1.5])
    labels = np.zeros(shape, np.uint8)
    labels[8:13, 20:35, 20:35] = Label.ABLATION_ZONE  # the zone (~2.5 mL)
    labels[8:10, 50:52, 50:52] = Label.ABLATION_ZONE  # a speck of AZ elsewhere
    labels[8:13, 18:20, 20:35] = Label.RIM  # rim on the zone's margin
    labels[15:17, 50:55, 5:10] = Label.RIM  # "rim" 30 mm away: not this zone's rim
    labels[8:12, 40:46, 40:46] = Label.ENHANCING_FOCUS  # a nodule, 6 x 9 x 9 mm
    labels[2, 5, 5] = Label.ENHANCING_FOCUS  # one stray voxel
    probs = np.stack([(labels == c).astype(np.float32) for c in range(4)])
    pred = NetworkPrediction(labels, probs, np.zeros(shape, np.float32), 0.0, "cpu", 1)
    cleaned = clean_prediction(pred, np.ones(shape, bool), spacing, cfg.segmentation, cfg.enhancement)
    assert cleaned is not None
    assert cleaned.az.sum() == 5 * 15 * 15 and not cleaned.az[8:10, 50:52, 50:52].any()
    assert cleaned.rim[8:13, 18:20, 20:35].all() and not cleaned.rim[15:17].any()
    assert len(cleaned.foci) == 1 and cleaned.foci[0][8:12, 40:46, 40:46].all()
    out = cleaned.labels()
    assert out[2, 5, 5] == 0 and out[10, 25, 25] == Label.ABLATION_ZONE and out[10, 19, 25] == Label.RIM
    empty = NetworkPrediction(np.zeros(shape, np.uint8), probs, probs[0], 0.0, "cpu", 1)
    assert clean_prediction(empty, np.ones(shape, bool), spacing, cfg.segmentation, cfg.enhancement) is None


def test_validation_dice_counts_a_class_predicted_where_the_truth_has_none():
    truth = np.zeros((4, 6, 6), np.uint8)
    truth[1:3, 1:4, 1:4] = 1  # an AZ, no rim, no focus
    pred = truth.copy()
    pred[0, 0, :3] = 2  # a false rim
    az, rim, focus = case_dice(pred, truth)
    assert az == pytest.approx(1.0)
    assert rim == 0.0  # counted as a miss, not ignored
    assert np.isnan(focus)  # neither holds a focus: not counted


def _zone_with_rim(shape=(20, 60, 60)):
    from models.infer import NetworkPrediction
    from models.labels import Label

    labels = np.zeros(shape, np.uint8)
    labels[8:13, 20:35, 20:35] = Label.ABLATION_ZONE
    labels[8:13, 18:20, 20:35] = Label.RIM
    probs = np.stack([(labels == c).astype(np.float32) for c in range(4)])
    return NetworkPrediction(labels, probs, np.zeros(shape, np.float32), 0.0, "cpu", 1)


def test_a_network_rim_that_does_not_enhance_is_dropped():
    from pipeline.segmentation.network import clean_prediction

    cfg = load_config()
    sections = (cfg.segmentation, cfg.enhancement)
    pred, spacing = _zone_with_rim(), np.array([3.0, 1.5, 1.5])
    body = np.ones(pred.labels.shape, bool)
    flat = np.full(pred.labels.shape, -0.02, np.float32)  # a late follow-up: nothing enhances
    assert not clean_prediction(pred, body, spacing, *sections, relative_enhancement=flat).rim.any()
    enhancing = flat.copy()
    enhancing[8:13, 18:20, 20:35] = 0.08  # a thin rim, diluted by partial volume, still enhances
    assert clean_prediction(pred, body, spacing, *sections, relative_enhancement=enhancing).rim.sum() == 5 * 2 * 15
    assert clean_prediction(pred, body, spacing, *sections).rim.any()  # no RE map given: not judged


def _bright_sphere(shape=(24, 64, 64), spacing=(3.0, 1.5, 1.5), radius_mm=15.0):
    """A T1-bright sphere (200 against 100) with partial volume at its edge, and its true mask."""
    from scipy import ndimage as ndi

    spacing = np.array(spacing)
    zz, yy, xx = np.meshgrid(*(np.arange(n) * s for n, s in zip(shape, spacing)), indexing="ij")
    truth = np.sqrt((zz - 36.0) ** 2 + (yy - 48.0) ** 2 + (xx - 48.0) ** 2) <= radius_mm
    pre = ndi.gaussian_filter(np.where(truth, 200.0, 100.0).astype(np.float32), sigma=0.6 / spacing)
    return pre, truth, spacing


def _dice(a, b):
    return 2 * (a & b).sum() / (a.sum() + b.sum())


def test_the_zone_edge_is_placed_at_the_half_way_pre_contrast_level():
    """A network zone drawn one voxel too wide all round is brought back to the true edge."""
    from scipy import ndimage as ndi

    from pipeline.segmentation.network import CleanedPrediction, place_az_edge

    pre, truth, spacing = _bright_sphere()
    shape = truth.shape
    too_wide = ndi.binary_dilation(truth)
    rim = ndi.binary_dilation(too_wide, iterations=2) & ~too_wide
    cleaned = CleanedPrediction(too_wide, too_wide.astype(np.float32), rim, [])
    placed = place_az_edge(cleaned, pre, np.zeros(shape, np.float32), np.zeros(shape, bool), np.ones(shape, bool),
                           spacing, load_config().segmentation, load_config().enhancement)

    assert _dice(too_wide, truth) < 0.93
    assert _dice(placed.az, truth) > 0.98
    assert not (placed.rim & placed.az).any() and placed.rim.sum() >= rim.sum()
    assert 0.0 <= placed.az_soft.min() and placed.az_soft.max() <= 1.0


def test_a_network_zone_short_of_the_bright_region_still_reaches_its_edge():
    """The network's zone 6 mm short of the T1-bright region all round: the edge grows from the
    zone joined with the bright region it overlaps, not from the zone alone (whose 4 mm search
    cannot reach the true edge); a bright region it does not touch is left out."""
    from scipy import ndimage as ndi

    from pipeline.segmentation.network import CleanedPrediction, place_az_edge
    from pipeline.segmentation.classical import half_max_edge

    pre, truth, spacing = _bright_sphere()
    shape = truth.shape
    other = np.zeros(shape, bool)
    other[2:6, 5:15, 5:15] = True  # another T1-bright region (a cyst, say), far from the zone
    pre = np.where(other, 200.0, pre).astype(np.float32)
    short = ndi.binary_erosion(truth, structure=np.ones((1, 3, 3), bool), iterations=4)
    cleaned = CleanedPrediction(short, short.astype(np.float32), np.zeros(shape, bool), [])
    body = np.ones(shape, bool)
    placed = place_az_edge(cleaned, pre, np.zeros(shape, np.float32), np.zeros(shape, bool), body, spacing,
                           load_config().segmentation, load_config().enhancement)
    from_zone_alone, _ = half_max_edge(short, pre, np.zeros(shape, bool), body, spacing, 100.0)

    assert _dice(from_zone_alone, truth) < 0.97
    assert _dice(placed.az, truth) > 0.98
    assert not (placed.az & other).any()


def test_a_thick_enhancing_nodule_the_network_missed_is_still_a_focus_candidate():
    """The network (a stand-in that labels only the bright zone) draws no focus; rule 6's thick
    enhancing region at the zone's margin still reaches the foci stage as a candidate."""
    from pipeline.imaging.subtraction import relative_enhancement

    size, spacing = (64, 64, 20), (1.5, 1.5, 3.0)
    k, j, i = np.meshgrid(*(np.arange(n, dtype=float) for n in size[::-1]), indexing="ij")
    x, y, z = i * spacing[0], j * spacing[1], k * spacing[2]
    zone = (x - 48) ** 2 + (y - 48) ** 2 + (z - 30) ** 2 <= 15.0 ** 2
    nodule = ((x - 66) ** 2 + (y - 48) ** 2 + (z - 30) ** 2 <= 5.0 ** 2) & ~zone
    pre = np.where(zone, 250.0, 100.0).astype(np.float32)
    sub = np.where(nodule, 80.0, 0.0).astype(np.float32)  # RE +80 % in the nodule only
    images = []
    for arr in (pre, sub):
        img = sitk.GetImageFromArray(arr)
        img.SetSpacing(spacing)
        images.append(img)
    pre_img, sub_img = images
    body = body_mask(pre_img)
    rel = relative_enhancement(pre_img, sitk.Add(pre_img, sub_img), body)
    model = LoadedModel(_BrightIsAblationZone().eval(), {"spacing_xyz": [1.6, 1.6, 3.0], "roi_zyx": [16, 32, 32]},
                        "cpu", Path("stand-in"))
    cfg = _network_cfg("stand-in", tta=False)
    seg, pred = segment_network(pre_img, sub_img, rel, body, cfg.segmentation, cfg.enhancement,
                                cfg.foci.min_thickness_mm, model)
    assert not (pred.labels == 3).any() and seg.found
    assert any((mask & nodule).sum() >= 0.5 * nodule.sum() for mask in seg.focus_candidates)
