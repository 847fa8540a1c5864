"""Control fidelity: edge F1 and mean IoU against hand-computed cases, and the shapes
dataset's analytic segmenter against the dataset's own maps."""

import numpy as np
import pytest

from genctl_jax.data import shapes
from genctl_jax.errors import DataError
from genctl_jax.metrics import control


def test_edge_f1_counts_matches_within_the_tolerance():
    target = np.zeros((8, 8), np.uint8)
    target[3, 1:7] = 255  # a 6-pixel line
    shifted = np.roll(target, 1, axis=0)
    assert control.edge_f1(target, target, 0) == {"precision": 1.0, "recall": 1.0, "f1": 1.0}
    assert control.edge_f1(shifted, target, 1)["f1"] == 1.0
    assert control.edge_f1(shifted, target, 0)["f1"] == 0.0
    # 3 of 4 predicted pixels lie on the line; they cover 3 of its 6 pixels (tolerance 0).
    pred = np.zeros((8, 8), bool)
    pred[3, 1:4] = True
    pred[6, 6] = True
    scores = control.edge_f1(pred, target, 0)
    assert scores["precision"] == pytest.approx(3 / 4) and scores["recall"] == pytest.approx(3 / 6)
    assert scores["f1"] == pytest.approx(2 * 0.75 * 0.5 / 1.25)
    empty = np.zeros((8, 8), np.uint8)
    assert control.edge_f1(empty, empty)["f1"] == 1.0
    assert control.edge_f1(empty, target)["f1"] == 0.0
    with pytest.raises(DataError, match="differ in shape"):
        control.edge_f1(target, target[:4])


def test_mean_iou_is_the_mean_over_present_classes():
    target = np.array([[0, 0, 1, 1], [0, 0, 1, 1]])
    pred = np.array([[0, 1, 1, 1], [0, 0, 1, 1]])
    # class 0: inter 3, union 4; class 1: inter 4, union 5; class 2 absent from both.
    assert control.mean_iou(pred, target, 3) == pytest.approx((3 / 4 + 4 / 5) / 2)
    with pytest.raises(DataError, match=r"labels must lie in \[0, 2\)"):
        control.mean_iou(pred, target + 1, 2)


def test_analytic_segmenter_recovers_the_datasets_maps_and_tells_wrong_controls_apart():
    examples = [shapes.generate_example(i, seed=3, image_size=32, max_objects=3) for i in range(40)]
    images = np.stack([e["image"] for e in examples])
    segmentations = np.stack([e["segmentation"] for e in examples])
    edges = np.stack([e["edges"] for e in examples])
    right = control.shapes_control_fidelity(images, segmentations, edges)
    wrong = control.shapes_control_fidelity(
        images, np.roll(segmentations, 1, 0), np.roll(edges, 1, 0)
    )
    print(f"right controls: {right}\nshuffled controls: {wrong}")
    assert right["segmentation_miou"] > 0.95 and right["edge_f1"] > 0.95
    assert wrong["segmentation_miou"] < 0.3 and wrong["edge_f1"] < 0.3
    # Also from the model's [-1, 1] floats.
    floats = images.astype(np.float32) / 127.5 - 1.0
    assert control.shapes_control_fidelity(floats, segmentations) == pytest.approx(
        {"segmentation_miou": right["segmentation_miou"]}
    )
