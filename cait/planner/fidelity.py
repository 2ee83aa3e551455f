"""One-shot fidelity of a compressed model to its dense original on calibration images (no labels
needed): top-1 agreement and KL divergence of the class distributions for classifiers, cosine
similarity of the grid features (``forward_dense``) for backbones, agreement of the predicted masks
for segmentation models; top-1 accuracy (mIoU for segmentation) when labels are given."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

CHUNK = 16  # images per forward
KINDS = ("classifier", "backbone", "segmenter")


def kind_of(model: nn.Module) -> str:
    """``segmenter`` (a :class:`cait.segmentation.Segmenter`), ``backbone`` (a timm ViT without
    classifier, ``num_classes == 0``) or ``classifier``."""
    from ..segmentation import Segmenter

    if isinstance(model, Segmenter):
        return "segmenter"
    return "backbone" if getattr(model, "num_classes", 0) == 0 else "classifier"


def outputs(model: nn.Module, images: torch.Tensor, kind: str) -> torch.Tensor:
    """What fidelity compares, in float32 (masks as int64): a classifier's logits ``(B, classes)``; a
    backbone's grid features flattened to ``(B, cells, C)`` (``forward_dense``: every cell gets the
    feature of the token holding it); a segmenter's predicted masks ``(B, H, W)`` (its logits are
    ``(B, K, H, W)``: too large to keep for many images at ADE20k sizes)."""
    out = []
    with torch.inference_mode():
        for chunk in images.split(CHUNK):
            if kind == "backbone":
                out.append(model.forward_dense(chunk).flatten(2).transpose(1, 2).float())
            elif kind == "segmenter":
                out.append(model(chunk).argmax(1))
            else:
                out.append(model(chunk).float())
    return torch.cat(out) if out else torch.empty(0)


def measure(reference: torch.Tensor, candidate: torch.Tensor, kind: str, labels: torch.Tensor | None = None, classes: int = 0) -> dict:
    """Fidelity of ``candidate``'s outputs to ``reference``'s (both from :func:`outputs`).

    Returns ``score`` (higher is closer; what a plan ranks by) and its parts: classifiers
    ``agreement`` (share of images whose top-1 class matches the dense model's), ``kl`` (mean
    KL(dense || candidate) of the softmax distributions, nats) and, with ``labels`` ``(B,)``, ``top1``
    (accuracy; then the score); backbones ``cosine`` (mean over images and cells); segmenters
    ``agreement`` (share of pixels whose predicted class matches the dense model's) and, with
    ``labels`` ``(B, H, W)`` over ``classes`` classes, ``miou`` (mean IoU, :mod:`cait.segmentation.metrics`;
    then the score)."""
    if kind == "backbone":
        cosine = F.cosine_similarity(candidate, reference, dim=-1).mean().item()
        return {"score": cosine, "cosine": cosine}
    agreement = (candidate == reference if kind == "segmenter" else candidate.argmax(-1) == reference.argmax(-1)).float().mean().item()
    result = {"score": agreement, "agreement": agreement}
    if kind == "segmenter":
        if labels is not None:
            from ..segmentation.metrics import mask_confusion, scores

            result["miou"] = result["score"] = scores(mask_confusion(candidate, labels.to(candidate.device), classes))["miou"]
        return result
    result["kl"] = F.kl_div(candidate.log_softmax(-1), reference.log_softmax(-1), log_target=True, reduction="batchmean").item()
    if labels is not None:
        result["top1"] = result["score"] = (candidate.argmax(-1) == labels.to(candidate.device)).float().mean().item()
    return result
