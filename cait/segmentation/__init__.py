"""Semantic segmentation on ViT backbones, dense or compressed (``cait.segmentation``).

- :mod:`.model`: :class:`Segmenter` (backbone + decode head, logits upsampled to the input),
  :func:`segmenter`, :func:`patch_features` (``forward_dense`` of a compressed backbone),
  :func:`drop_classifier` (what a segmenter removes from its backbone);
- :mod:`.heads`: the decode heads (``linear``, ``upsample``);
- :mod:`.metrics`: confusion matrix, mIoU, pixel accuracy, :func:`evaluate`;
- :mod:`.train`: :func:`make_student` (a compressed student for distillation);
- :mod:`.data`: :class:`SegmentationFolder` and the digit canvases of the benchmark.
"""

from .data import SegmentationFolder
from .heads import HEADS, LinearHead, UpsamplingHead, head_config, head_kind, make_head
from .metrics import confusion, evaluate, scores
from .model import IGNORE, Segmenter, drop_classifier, patch_features, segmenter
from .train import make_student

__all__ = [
    "HEADS",
    "IGNORE",
    "LinearHead",
    "SegmentationFolder",
    "Segmenter",
    "UpsamplingHead",
    "confusion",
    "drop_classifier",
    "evaluate",
    "head_config",
    "head_kind",
    "make_head",
    "make_student",
    "patch_features",
    "scores",
    "segmenter",
]
