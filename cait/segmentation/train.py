"""Fine-tuning glue for segmentation: a compressed student with a copy of the dense model's head."""

from __future__ import annotations

import copy

from ..model import CompressedViT
from ..train import finetune
from .model import Segmenter


def make_student(model: Segmenter, merge, prune, warmup: int):
    """A :class:`cait.finetune.Student` for segmentation: ``model``'s backbone compressed as
    :func:`cait.finetune.make_student` does (merging on, dynamic CDCP gates for ``prune``), a copy of
    its head on top. ``model``'s backbone: a timm ViT or an unpruned :class:`cait.CompressedViT`."""
    if not isinstance(model, Segmenter):
        raise TypeError(f"make_student takes a Segmenter, got {type(model).__name__}")
    backbone = model.backbone.timm_model() if isinstance(model.backbone, CompressedViT) else model.backbone
    inner = finetune.make_student(backbone, merge, prune, warmup)
    return finetune.Student(Segmenter(inner.model, copy.deepcopy(model.head)), inner.gates)
