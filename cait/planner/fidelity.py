"""One-shot fidelity of a compressed model to its dense original on calibration images (no labels
needed): top-1 agreement and KL divergence of the class distributions for classifiers, cosine
similarity of the grid features (``forward_dense``) for backbones; top-1 accuracy when labels are given."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

CHUNK = 16  # images per forward


def outputs(model: nn.Module, images: torch.Tensor, features: bool) -> torch.Tensor:
    """``model``'s logits ``(B, classes)`` or, with ``features``, its grid features flattened to
    ``(B, cells, C)`` (``forward_dense``: every cell gets the feature of the token holding it), in float32."""
    out = []
    with torch.inference_mode():
        for chunk in images.split(CHUNK):
            y = model.forward_dense(chunk).flatten(2).transpose(1, 2) if features else model(chunk)
            out.append(y.float())
    return torch.cat(out) if out else torch.empty(0)


def measure(reference: torch.Tensor, candidate: torch.Tensor, features: bool, labels: torch.Tensor | None = None) -> dict:
    """Fidelity of ``candidate``'s outputs to ``reference``'s (both from :func:`outputs`).

    Returns ``score`` (higher is closer; what a plan ranks by) and its parts: classifiers
    ``agreement`` (share of images whose top-1 class matches the dense model's), ``kl`` (mean
    KL(dense || candidate) of the softmax distributions, nats) and, with ``labels``, ``top1``
    (accuracy; then the score); backbones ``cosine`` (mean over images and cells)."""
    if features:
        cosine = F.cosine_similarity(candidate, reference, dim=-1).mean().item()
        return {"score": cosine, "cosine": cosine}
    agreement = (candidate.argmax(-1) == reference.argmax(-1)).float().mean().item()
    kl = F.kl_div(candidate.log_softmax(-1), reference.log_softmax(-1), log_target=True, reduction="batchmean").item()
    result = {"score": agreement, "agreement": agreement, "kl": kl}
    if labels is not None:
        result["top1"] = result["score"] = (candidate.argmax(-1) == labels.to(candidate.device)).float().mean().item()
    return result
