"""Semantic segmentation on ViT backbones, dense or compressed: the model (backbone + decode head).

A backbone is a timm ``VisionTransformer`` or a :class:`cait.CompressedViT`; :func:`patch_features`
gives its final features on the patch grid, ``(B, C, H / p, W / p)`` with ``C = embed_dim`` and
stride ``p`` (the patch size), after the final norm, prefix tokens dropped. For a compressed model
this is ``forward_dense``: every cell carries the feature of the merged token that holds it, so any
decode head written for a plain ViT (SETR, Segmenter, UPerNet on one scale, ...) works unchanged::

    features = fast.forward_dense(images)          # (B, embed_dim, H / 16, W / 16) for DeiT
    logits = my_head(features)

The decode heads are in :mod:`.heads`. :class:`Segmenter` upsamples the head's logits bilinearly
to the input size and drops what of its backbone the dense features never pass through (timm's
classifier, :func:`drop_classifier`), so every parameter of a segmentation model gets a gradient
(``DistributedDataParallel`` without ``find_unused_parameters`` needs that). Labels are class
indices per pixel; ``IGNORE`` (-100, as in ``F.cross_entropy``) marks pixels that count nowhere.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .heads import make_head

IGNORE = -100

# timm's parts after the final norm: pooling and classifier, never on the path of the dense features
CLASSIFIER_PARTS = ("attn_pool", "fc_norm", "head", "head_dist")


def drop_classifier(backbone: nn.Module) -> nn.Module:
    """Strip ``backbone`` (a timm ViT or :class:`cait.CompressedViT`, in place) of the parts
    :func:`patch_features` never reaches, as timm's ``prune_intermediate_layers(prune_head=True)``
    does: attention pooling, the norm after pooling (``fc_norm``) and the classifier head(s) (a
    distilled DeiT's too) go, the pooling becomes ``""``. Returns ``backbone``."""
    if getattr(backbone, "attn_pool", None) is not None:
        backbone.attn_pool = None
    if hasattr(backbone, "fc_norm"):
        backbone.fc_norm = nn.Identity()
    backbone.reset_classifier(0, "")
    return backbone


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
    logits ``(B, K, H, W)`` (the head's logits upsampled bilinearly to the input size).

    The backbone loses its pooling and classifier (:func:`drop_classifier`, in place): every model
    built for segmentation (:func:`segmenter`, the distillation student, :func:`cait.load`, ...) is
    built here, and carries no parameter its loss never reaches."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone, self.head = drop_classifier(backbone), head

    @property
    def num_classes(self) -> int:
        return self.head.classify.out_channels

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = self.head(patch_features(self.backbone, images))
        return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)


def segmenter(backbone: nn.Module, classes: int, head: str = "linear") -> Segmenter:
    """A :class:`Segmenter` on ``backbone`` with a new ``head`` (``linear`` or ``upsample``) for ``classes``;
    ``backbone`` loses its classifier (:func:`drop_classifier`)."""
    from ..support import check_supported

    if not hasattr(backbone, "forward_dense"):
        check_supported(backbone)
    return Segmenter(backbone, make_head(head, backbone.embed_dim, classes))
