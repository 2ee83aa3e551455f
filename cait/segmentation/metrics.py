"""Segmentation metrics: confusion matrix, mean IoU over present classes, pixel accuracy."""

from __future__ import annotations

import torch
from torch import nn

from .model import IGNORE


def confusion(logits: torch.Tensor, labels: torch.Tensor, classes: int) -> torch.Tensor:
    """``(K, K)`` int64 counts of pixels with true class ``i`` predicted ``j``; ``logits (B, K, H, W)``,
    ``labels (B, H, W)`` (``IGNORE`` pixels are left out)."""
    if logits.shape[0] != labels.shape[0] or logits.shape[2:] != labels.shape[1:]:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} do not match (B, K, H, W) / (B, H, W)")
    return mask_confusion(logits.argmax(1), labels, classes)


def mask_confusion(predicted: torch.Tensor, labels: torch.Tensor, classes: int) -> torch.Tensor:
    """:func:`confusion` of predicted masks ``(B, H, W)`` (class indices) against ``labels (B, H, W)``."""
    if predicted.shape != labels.shape:
        raise ValueError(f"predicted masks {tuple(predicted.shape)} and labels {tuple(labels.shape)} differ in shape")
    predicted, labels = predicted.flatten(), labels.flatten().long()
    valid = labels != IGNORE
    if bool(((labels < 0) | (labels >= classes))[valid].any()):
        raise ValueError(f"labels must be class indices in [0, {classes}) or {IGNORE} (ignored)")
    index = labels[valid] * classes + predicted[valid]
    return torch.bincount(index, minlength=classes * classes).reshape(classes, classes).cpu()


def scores(matrix: torch.Tensor) -> dict:
    """From a confusion matrix: ``miou`` (mean IoU over the classes present in labels or predictions),
    ``pixel_accuracy``, and ``iou`` per class (NaN where a class appears nowhere)."""
    matrix = matrix.double()
    hits = matrix.diagonal()
    union = matrix.sum(0) + matrix.sum(1) - hits
    iou = torch.where(union > 0, hits / union.clamp_min(1), torch.nan)
    total = matrix.sum()
    return {
        "miou": float(iou.nanmean()),
        "pixel_accuracy": float(hits.sum() / total) if total > 0 else float("nan"),
        "iou": iou.tolist(),
    }


@torch.no_grad()
def evaluate(model: nn.Module, loader, progress=None) -> dict:
    """mIoU, pixel accuracy and per-class IoU of a :class:`Segmenter` over ``loader`` (images, labels)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    matrix, seen = None, 0
    try:
        for images, labels in loader:
            logits = model(images.to(device))
            counts = confusion(logits, labels.to(device), logits.shape[1])
            matrix = counts if matrix is None else matrix + counts
            seen += len(images)
            if progress is not None:
                progress.update(1)
    finally:
        model.train(was_training)
    if matrix is None:
        raise ValueError("the evaluation loader is empty")
    return {**scores(matrix), "images": seen}
