"""Decode heads for ViT features on the patch grid: ``(B, C, h, w)`` -> logits ``(B, K, h', w')``.

:class:`LinearHead` is a 1x1 classifier after a BatchNorm ("linear" in SETR/Segmenter);
:class:`UpsamplingHead` is SETR's progressive upsampling (``stages`` times conv3x3-BN-ReLU then 2x
bilinear upsampling, then a 1x1 classifier).
"""

from __future__ import annotations

import torch
from torch import nn

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
        self.hidden, self.stage_count = hidden, stages

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.classify(self.stages(features))


def make_head(kind: str, channels: int, classes: int, **options) -> nn.Module:
    """``kind`` ``linear`` or ``upsample`` (see :data:`HEADS`); ``options``: ``hidden`` and ``stages``
    of an upsampling head."""
    if classes < 2:
        raise ValueError(f"segmentation needs at least 2 classes, got {classes}")
    if kind == "linear" and not options:
        return LinearHead(channels, classes)
    if kind == "upsample" and set(options) <= {"hidden", "stages"}:
        return UpsamplingHead(channels, classes, **options)
    if kind in HEADS:
        raise ValueError(f"a {kind} head takes no options {sorted(options)}")
    raise ValueError(f"head must be one of {HEADS}, got {kind!r}")


def head_kind(head: nn.Module) -> str:
    """The :data:`HEADS` name of a head made by :func:`make_head`; ValueError for any other head."""
    kinds = {LinearHead: "linear", UpsamplingHead: "upsample"}
    if type(head) not in kinds:
        raise ValueError(f"a {type(head).__name__} head is not one of cait's segmentation heads {HEADS}: cait.save cannot rebuild it")
    return kinds[type(head)]


def head_config(head: nn.Module) -> dict:
    """What :func:`make_head` needs to rebuild ``head``: ``kind``, ``classes`` and the options."""
    config = {"kind": head_kind(head), "classes": head.classify.out_channels}
    if isinstance(head, UpsamplingHead):
        config.update(hidden=head.hidden, stages=head.stage_count)
    return config
