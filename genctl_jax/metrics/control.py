"""Control fidelity: does a generated image follow the spatial condition it was given?

The ControlNet paper's measures: extract the same condition from the generated image and
compare it with the input condition.
- `edge_f1`: precision, recall and F1 of edge pixels, a pixel matching when the other map
  has an edge within `tolerance` pixels (Chebyshev distance); counts pooled over the batch.
- `mean_iou`: mean over classes of intersection over union of label maps, from one confusion
  matrix over the batch (classes absent from both maps are left out).
- `shapes_control_fidelity`: both, on the embedded shapes dataset, with its analytic
  segmenter (`data.shapes.segment`) as the extractor.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from genctl_jax.errors import DataError


def _binary_batch(name: str, maps) -> np.ndarray:
    x = np.asarray(maps)
    if x.ndim == 2:
        x = x[None]
    if x.ndim != 3:
        raise DataError(f"{name} must be [H, W] or [N, H, W] edge maps, got shape {x.shape}")
    return x > (127 if x.dtype == np.uint8 else 0.5)


def edge_f1(predicted, target, tolerance: int = 1) -> dict[str, float]:
    """{'precision', 'recall', 'f1'} of binary edge maps (uint8 {0, 255} or bool / {0, 1}).

    An empty prediction of an empty target scores 1; otherwise an empty side scores 0.
    """
    pred, true = _binary_batch("predicted", predicted), _binary_batch("target", target)
    if pred.shape != true.shape:
        raise DataError(f"edge maps differ in shape: {pred.shape} and {true.shape}")
    if not isinstance(tolerance, int) or tolerance < 0:
        raise DataError(f"tolerance={tolerance!r}: expected pixels >= 0")
    window = np.ones((1, 2 * tolerance + 1, 2 * tolerance + 1), bool)
    near_true = ndimage.binary_dilation(true, window) if tolerance else true
    near_pred = ndimage.binary_dilation(pred, window) if tolerance else pred
    n_pred, n_true = int(pred.sum()), int(true.sum())
    if n_pred == 0 and n_true == 0:
        return {"precision": 1.0, "recall": 1.0, "f1": 1.0}
    precision = float((pred & near_true).sum() / n_pred) if n_pred else 0.0
    recall = float((true & near_pred).sum() / n_true) if n_true else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


def mean_iou(predicted, target, num_classes: int) -> float:
    """Mean IoU of integer label maps [N, H, W] (or [H, W]) with labels in [0, num_classes)."""
    pred, true = np.asarray(predicted), np.asarray(target)
    if pred.shape != true.shape:
        raise DataError(f"label maps differ in shape: {pred.shape} and {true.shape}")
    for name, x in (("predicted", pred), ("target", true)):
        if x.size and (x.min() < 0 or x.max() >= num_classes):
            raise DataError(
                f"{name} labels must lie in [0, {num_classes}), got {x.min()}..{x.max()}"
            )
    confusion = np.bincount(
        true.ravel().astype(np.int64) * num_classes + pred.ravel(), minlength=num_classes**2
    ).reshape(num_classes, num_classes)
    intersection = np.diag(confusion)
    union = confusion.sum(0) + confusion.sum(1) - intersection
    present = union > 0
    if not present.any():
        raise DataError("mean_iou got empty label maps")
    return float((intersection[present] / union[present]).mean())


def shapes_control_fidelity(images, segmentations=None, edges=None, tolerance: int = 1):
    """Control fidelity of shapes-style images [N, S, S, 3] against the segmentation maps
    and/or edge maps they were generated from: {'segmentation_miou', 'edge_f1', ...}."""
    from genctl_jax.data import shapes

    if segmentations is None and edges is None:
        raise DataError("shapes_control_fidelity needs segmentations, edges or both")
    extracted = [shapes.segment(image) for image in np.asarray(images)]
    out = {}
    if segmentations is not None:
        predicted = np.stack([e["segmentation"] for e in extracted])
        out["segmentation_miou"] = mean_iou(predicted, segmentations, 1 + shapes.NUM_SHAPES)
    if edges is not None:
        scores = edge_f1(np.stack([e["edges"] for e in extracted]), edges, tolerance)
        out.update({f"edge_{k}": v for k, v in scores.items()})
    return out
