"""Semantic segmentation on ViT backbones, dense or compressed: the model (backbone + decode head).

A backbone is a timm ``VisionTransformer`` or a :class:`cait.CompressedViT`; :func:`patch_features`
gives its final features on the patch grid, ``(B, C, H / p, W / p)`` with ``C = embed_dim`` and
stride ``p`` (the patch size), after the final norm, prefix tokens dropped. For a compressed model
this is ``forward_dense``: every cell carries the feature of the merged token that holds it, so any
decode head written for a plain ViT (SETR, Segmenter, UPerNet on one scale, ...) works unchanged::

    features = fast.forward_dense(images)          # (B, embed_dim, H / 16, W / 16) for DeiT
    logits = my_head(features)

The decode heads are in :mod:`.heads`. :class:`Segmenter` upsamples the head's logits bilinearly
to the input size. Labels are class indices per pixel; ``IGNORE`` (-100, as in
``F.cross_entropy``) marks pixels that count nowhere.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .heads import make_head

IGNORE = -100


def patch_features(backbone: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """images ``(B, C_in, H, W)`` -> final features ``(B, embed_dim, H / p, W / p)`` of a timm ViT or
    a :class:`cait.CompressedViT` (its ``forward_dense``)."""
    from ..model import CompressedViT

    if isinstance(backbone, CompressedViT):
        return backbone.forward_dense(images)
    tokens = backbone.forward_features(images)[:, backbone.num_prefix_tokens :]
    embed = backbone.patch_embed
    grid = embed.dynamic_feat_size(images.shape[-2:]) if backbone.dynamic_img_size else embed.grid_size
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], *grid)


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
    from ..support import check_supported

    if not hasattr(backbone, "forward_dense"):
        check_supported(backbone)
    return Segmenter(backbone, make_head(head, backbone.embed_dim, classes))
