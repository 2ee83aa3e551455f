"""Semantic segmentation on ViT backbones, dense or compressed: decode heads, the model, and its metrics.

A backbone is a timm ``VisionTransformer`` or a :class:`cait.CompressedViT`; :func:`patch_features`
gives its final features on the patch grid, ``(B, C, H / p, W / p)`` with ``C = embed_dim`` and
stride ``p`` (the patch size), after the final norm, prefix tokens dropped. For a compressed model
this is ``forward_dense``: every cell carries the feature of the merged token that holds it, so any
decode head written for a plain ViT (SETR, Segmenter, UPerNet on one scale, ...) works unchanged::

    features = fast.forward_dense(images)          # (B, embed_dim, H / 16, W / 16) for DeiT
    logits = my_head(features)

Heads: :class:`LinearHead` (a 1x1 classifier after a BatchNorm, "linear" in SETR/Segmenter) and
:class:`UpsamplingHead` (SETR's progressive upsampling: ``stages`` times conv3x3-BN-ReLU then 2x
bilinear upsampling, then a 1x1 classifier). :class:`Segmenter` upsamples the head's logits
bilinearly to the input size. Labels are class indices per pixel; ``IGNORE`` (-100, as in
``F.cross_entropy``) marks pixels that count nowhere.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

IGNORE = -100
HEADS = ("linear", "upsample")


class LinearHead(nn.Module):
    """features ``(B, C, h, w)`` -> logits ``(B, K, h, w)``: BatchNorm then a 1x1 convolution."""

    def __init__(self, channels: int, classes: int):
        super().__init__()
        self.norm = nn.BatchNorm2d(channels)
        self.classify = nn.Conv2d(channels, classes, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.classify(self.norm(features))


class UpsamplingHead(nn.Module):
    """features ``(B, C, h, w)`` -> logits ``(B, K, h * 2**stages, w * 2**stages)``: ``stages`` times
    conv3x3 (``hidden`` channels)-BN-ReLU and 2x bilinear upsampling, then a 1x1 classifier."""

    def __init__(self, channels: int, classes: int, hidden: int = 64, stages: int = 2):
        super().__init__()
        if hidden < 1 or stages < 1:
            raise ValueError(f"UpsamplingHead needs hidden >= 1 and stages >= 1, got hidden={hidden}, stages={stages}")
        layers = []
        for i in range(stages):
            layers += [nn.Conv2d(channels if i == 0 else hidden, hidden, 3, padding=1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU()]
            layers.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
        self.stages = nn.Sequential(*layers)
        self.classify = nn.Conv2d(hidden, classes, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.classify(self.stages(features))


def make_head(kind: str, channels: int, classes: int) -> nn.Module:
    """``kind`` ``linear`` or ``upsample`` (see :data:`HEADS`)."""
    if classes < 2:
        raise ValueError(f"segmentation needs at least 2 classes, got {classes}")
    if kind == "linear":
        return LinearHead(channels, classes)
    if kind == "upsample":
        return UpsamplingHead(channels, classes)
    raise ValueError(f"head must be one of {HEADS}, got {kind!r}")


def head_kind(head: nn.Module) -> str:
    """The :data:`HEADS` name of a head made by :func:`make_head`."""
    return "upsample" if isinstance(head, UpsamplingHead) else "linear"


def patch_features(backbone: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """images ``(B, C_in, H, W)`` -> final features ``(B, embed_dim, H / p, W / p)`` of a timm ViT or
    a :class:`cait.CompressedViT` (its ``forward_dense``)."""
    from .model import CompressedViT

    if isinstance(backbone, CompressedViT):
        return backbone.forward_dense(images)
    tokens = backbone.forward_features(images)[:, backbone.num_prefix_tokens :]
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], *backbone.patch_embed.grid_size)


class Segmenter(nn.Module):
    """``backbone`` (timm ViT or :class:`cait.CompressedViT`) + ``head``: images ``(B, C_in, H, W)`` ->
    logits ``(B, K, H, W)`` (the head's logits upsampled bilinearly to the input size)."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone, self.head = backbone, head

    @property
    def num_classes(self) -> int:
        return self.head.classify.out_channels

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = self.head(patch_features(self.backbone, images))
        return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)


def segmenter(backbone: nn.Module, classes: int, head: str = "linear") -> Segmenter:
    """A :class:`Segmenter` on ``backbone`` with a new ``head`` (``linear`` or ``upsample``) for ``classes``."""
    from .support import check_supported

    if not hasattr(backbone, "forward_dense"):
        check_supported(backbone)
    return Segmenter(backbone, make_head(head, backbone.embed_dim, classes))


def confusion(logits: torch.Tensor, labels: torch.Tensor, classes: int) -> torch.Tensor:
    """``(K, K)`` int64 counts of pixels with true class ``i`` predicted ``j``; ``logits (B, K, H, W)``,
    ``labels (B, H, W)`` (``IGNORE`` pixels are left out)."""
    if logits.shape[0] != labels.shape[0] or logits.shape[2:] != labels.shape[1:]:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} do not match (B, K, H, W) / (B, H, W)")
    predicted, labels = logits.argmax(1).flatten(), labels.flatten().long()
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


def make_student(model: Segmenter, merge, prune, warmup: int):
    """A :class:`cait.finetune.Student` for segmentation: ``model``'s backbone compressed as
    :func:`cait.finetune.make_student` does (merging on, dynamic CDCP gates for ``prune``), a copy of
    its head on top. ``model``'s backbone: a timm ViT or an unpruned :class:`cait.CompressedViT`."""
    from . import finetune
    from .model import CompressedViT

    if not isinstance(model, Segmenter):
        raise TypeError(f"make_student takes a Segmenter, got {type(model).__name__}")
    backbone = model.backbone.timm_model() if isinstance(model.backbone, CompressedViT) else model.backbone
    inner = finetune.make_student(backbone, merge, prune, warmup)
    return finetune.Student(Segmenter(inner.model, copy.deepcopy(model.head)), inner.gates)
