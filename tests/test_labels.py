"""One label registry (issue 17): the DICOM SEG segment numbers, the NIfTI label values and the
network's class indices all come from ``Label`` (models/labels.py, re-exported by pipeline.core.records),
and no product module spells a structure's value as a bare 1, 2 or 3 any more."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np

from models.labels import STRUCTURES, Label, label_map

ROOT = Path(__file__).resolve().parents[1]


def test_one_registry_with_the_contract_values():
    import pipeline.core.records

    assert pipeline.core.records.Label is Label and pipeline.core.records.label_map is label_map
    # DESIGN.md: labels.nii.gz holds 1 ablation zone, 2 rim, 3 enhancing focus.
    assert [(label.key, int(label)) for label in Label] == [
        ("background", 0), ("ablation_zone", 1), ("rim", 2), ("enhancing_focus", 3)]
    assert STRUCTURES == (Label.ABLATION_ZONE, Label.RIM, Label.ENHANCING_FOCUS)


def test_seg_segment_numbers_are_the_label_values():
    from pipeline.outputs.dicom_seg import SEGMENTS
    from pipeline.outputs.dicom_sr import AZ_SEGMENT_NUMBER

    assert [spec.label_value for spec in SEGMENTS] == [int(label) for label in STRUCTURES]
    for spec, label in zip(SEGMENTS, STRUCTURES):
        assert label.text.split()[-1] in spec.label.lower(), (spec.label, label)
    assert AZ_SEGMENT_NUMBER == Label.ABLATION_ZONE


def test_nifti_label_values_come_from_the_registry():
    """Both producers of labels.nii.gz (the pipeline's study analysis, the network's cleaned
    prediction) build the map with label_map: the zone wins over a focus, a focus over the rim."""
    import pipeline.measurement.study
    import pipeline.segmentation.network

    assert pipeline.measurement.study.label_map is label_map and pipeline.segmentation.network.label_map is label_map
    az, rim, focus = (np.zeros((2, 4, 4), bool) for _ in range(3))
    az[0, :2, :2] = rim[0, :3, :3] = focus[0, 1:, 1:] = True
    out = label_map(az, rim, [focus])
    assert out.dtype == np.uint8
    assert out[0, 0, 0] == out[0, 1, 1] == Label.ABLATION_ZONE  # zone over rim and focus
    assert out[0, 0, 2] == Label.RIM and out[0, 2, 2] == out[0, 3, 3] == Label.ENHANCING_FOCUS
    assert out[1].max() == Label.BACKGROUND
    from pipeline.segmentation.network import CleanedPrediction

    cleaned = CleanedPrediction(az, az.astype(np.float32), rim, [focus])
    np.testing.assert_array_equal(cleaned.labels(), out)


def test_network_class_indices_are_the_label_values():
    import torch

    from models.data import CLASS_NAMES, N_CLASSES
    from models.infer import resolve_weights

    assert N_CLASSES == len(Label) and CLASS_NAMES == tuple(label.key for label in Label)
    for index, name in enumerate(CLASS_NAMES):
        assert Label(index).key == name
    # The shipped weights were trained on those classes, in that order.
    from pipeline.core.config import load_config

    weights = resolve_weights(load_config().segmentation.network_weights)
    checkpoint = torch.load(weights, map_location="cpu", weights_only=False)
    assert checkpoint["class_names"] == list(CLASS_NAMES)
    assert int(checkpoint["network"]["out_channels"]) == len(Label)


def _bare_label_values(source: str, where: str) -> list[str]:
    """``x == 2`` / ``x[...] = 3`` where ``x`` names a label map (its name holds "lab"): a
    structure's value spelled as a literal instead of taken from Label."""
    found = []

    def names_labels(node: ast.AST) -> bool:
        while isinstance(node, (ast.Subscript, ast.Attribute)):
            if isinstance(node, ast.Attribute) and "lab" in node.attr.lower():
                return True
            node = node.value
        return isinstance(node, ast.Name) and "lab" in node.id.lower()

    def literal(node: ast.AST) -> bool:
        return isinstance(node, ast.Constant) and type(node.value) is int and node.value in (1, 2, 3)

    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            if any(names_labels(s) for s in sides) and any(literal(s) for s in sides):
                found.append(f"{where}:{node.lineno}")
        elif isinstance(node, ast.Assign) and literal(node.value):
            if any(isinstance(t, ast.Subscript) and names_labels(t) for t in node.targets):
                found.append(f"{where}:{node.lineno}")
    return found


def test_no_bare_label_value_in_the_product_code():
    # The scan itself: it catches the two spellings and leaves component maps and counts alone.
    sample = "labels[m] = 2\nok = self.lab == 1\nfine = lab == i + 1\ncount = labels.max() == 0\nx[m] = 1\n"
    assert _bare_label_values(sample, "sample") == ["sample:1", "sample:2"]
    found = [hit for package in ("pipeline", "models", "flows") for path in sorted((ROOT / package).rglob("*.py"))
             for hit in _bare_label_values(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT)))]
    assert not found, "label values spelled as literals (use Label):\n" + "\n".join(found)
