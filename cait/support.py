"""What cait can compress, in one place; everything else gets one clear error naming the reason.

Supported: timm ``VisionTransformer`` and ``VisionTransformerDistilled`` (ViT, DeiT, distilled DeiT,
DeiT-3, CLIP/SigLIP/DINOv2-style ViTs, AIMv2, register tokens, LayerScale, qk-norm, gated
attention) with timm's ``PatchEmbed`` (any input size with ``dynamic_img_size``), timm's pre-norm
``Block`` and ``Attention``, an MLP from :data:`MLP_LAYOUTS` (``Mlp``, ``SwiGLU``, ``GluMlp`` incl.
``SwiGLUPacked``), and ``global_pool`` one of :data:`POOLS` (``map``: timm's ``AttentionPoolLatent``);
and timm's ``Eva`` (EVA-02, DINOv3, RoPE ViTs, PE; see :mod:`cait.eva`).

To support a new family, extend the tables here (model classes in :func:`model_classes`, blocks and
attention in :func:`block_classes`, MLPs in :func:`mlp_layouts`), add its block adapter in
:mod:`cait.layers`, and teach :mod:`cait.architecture` the constructor settings it reads and rebuilds.
A refusal raises :class:`Unsupported` (a ``NotImplementedError``) whose ``feature`` names what is
missing in a few words; the sweep (``tests/test_sweep.py``) counts refusals by it.
"""

from __future__ import annotations

import functools
import inspect
from typing import NamedTuple

from torch import nn

POOLS = ("", "token", "avg", "max", "avgmax", "map")

# Where non-timm vision transformers come from: the top-level package of the class -> the library's name.
FOREIGN_LIBRARIES = {
    "torchvision": "torchvision",
    "transformers": "Hugging Face transformers",
    "open_clip": "OpenCLIP",
    "mmpretrain": "MMPretrain",
    "mmcls": "MMClassification",
    "vit_pytorch": "vit-pytorch",
}


class Unsupported(NotImplementedError):
    """A model or setting cait cannot compress (yet). ``feature``: what, in a few words (e.g.
    ``"block type"``, ``"attention pooling"``); the message says why and what to do instead."""

    def __init__(self, feature: str, message: str):
        super().__init__(message)
        self.feature = feature


class MlpLayout(NamedTuple):
    """How an MLP holds its hidden units: ``inputs`` are the linears whose output rows are the
    hidden units (each unit is one row of each), ``packed``: the single input linear holds two
    halves ``[first | second]``, unit ``i`` in rows ``i`` and ``hidden + i`` (timm ``GluMlp``,
    ``SwiGLUPacked``). ``fc2`` reads the hidden units as its input columns in every layout."""

    inputs: tuple[str, ...]
    packed: bool = False


@functools.cache
def model_classes() -> tuple[type, ...]:
    """The timm model classes cait compresses (exact types; subclasses may change the forward)."""
    from timm.models.deit import VisionTransformerDistilled
    from timm.models.vision_transformer import VisionTransformer

    return (VisionTransformer, VisionTransformerDistilled)


@functools.cache
def block_classes() -> dict[type, type]:
    """Supported transformer block class -> the attention class it must hold."""
    from timm.models.vision_transformer import Attention, Block

    return {Block: Attention}


@functools.cache
def mlp_layouts() -> dict[type, MlpLayout]:
    """Supported MLP classes and where their hidden units live (CDCP prunes them consistently)."""
    from timm.layers import GluMlp, Mlp, SwiGLU

    return {Mlp: MlpLayout(("fc1",)), SwiGLU: MlpLayout(("fc1_g", "fc1_x")), GluMlp: MlpLayout(("fc1",), packed=True)}


def mlp_layout(mlp: nn.Module) -> MlpLayout:
    """The :class:`MlpLayout` of a supported MLP; :class:`Unsupported` for any other."""
    layout = mlp_layouts().get(type(mlp))
    if layout is None:
        names = ", ".join(c.__name__ for c in mlp_layouts())
        raise Unsupported("MLP type", f"{type(mlp).__name__} MLPs are not supported: cait knows timm's {names}")
    if not all(isinstance(getattr(mlp, name, None), nn.Linear) for name in (*layout.inputs, "fc2")):
        raise Unsupported("MLP type", f"this {type(mlp).__name__} uses convolutions (use_conv=True): cait needs nn.Linear layers")
    return layout


def check_supported(model: nn.Module) -> None:
    """Raise :class:`Unsupported` (``NotImplementedError``) unless cait can compress ``model``
    (see the module docstring), ``TypeError`` if it is not a module at all."""
    from timm.layers import AttentionPoolLatent, PatchEmbed

    from .eva import check_eva, is_eva

    if not isinstance(model, nn.Module):
        raise TypeError(f"cait compresses torch modules (timm models), got {type(model).__name__}")
    if getattr(type(model), "__module__", "").startswith("cait."):
        raise Unsupported(
            "model",
            f"this {type(model).__name__} is already compressed by cait: compress the timm model it came from "
            f"(its merge schedule: set_merge / set_schedule; its pruning is fixed)",
        )
    eva = is_eva(model)
    if not eva:
        _check_model_class(model)
    if type(model.patch_embed) is not PatchEmbed:
        raise Unsupported(
            "patch embedding",
            f"{type(model).__name__} embeds patches with {type(model.patch_embed).__name__}: hybrid CNN stems are not "
            f"supported, cait needs timm's PatchEmbed for its patch grid",
        )
    if model.global_pool not in POOLS:
        raise Unsupported("pooling", f"global_pool={model.global_pool!r} is not supported; use one of {POOLS}")
    pool = getattr(model, "attn_pool", None)
    if pool is not None and (type(pool) is not AttentionPoolLatent or pool.pos_embed is not None):
        raise Unsupported(
            "attention pooling",
            f"attention pooling by {type(pool).__name__}{' with its own position embedding' if type(pool) is AttentionPoolLatent else ''} "
            f"is not supported: cait pools merged tokens with timm's AttentionPoolLatent (no position embedding)",
        )
    if pool is not None and "attn_mask" not in inspect.signature(pool.forward).parameters:
        raise Unsupported(
            "attention pooling",
            "attention pooling of merged tokens needs an AttentionPoolLatent that takes attn_mask (timm 1.0.16 or newer)",
        )
    if eva:
        check_eva(model)
        return
    if not isinstance(model.patch_drop, nn.Identity):
        raise Unsupported("patch dropout", "patch dropout is not supported: it breaks the patch grid that merging relies on")
    blocks = block_classes()
    for i, block in enumerate(model.blocks):
        if type(block) not in blocks:
            raise Unsupported("block type", f"block {i} is a {type(block).__name__}: only timm's pre-norm Block is supported")
        if type(block.attn) is not blocks[type(block)]:
            raise Unsupported("attention type", f"block {i} uses {type(block.attn).__name__}: only timm's Attention is supported")
        if block.attn.attn_drop.p > 0:
            raise Unsupported(
                "attention dropout", f"block {i} has attention dropout {block.attn.attn_drop.p}: build the model with attn_drop_rate=0"
            )
        mlp_layout(block.mlp)


def _check_model_class(model: nn.Module) -> None:
    cls = type(model)
    if cls in model_classes():
        return
    library = cls.__module__.split(".")[0]
    supported = (
        "cait compresses timm's VisionTransformer family (ViT, DeiT, DeiT-3, CLIP/SigLIP/DINOv2-style ViTs) "
        "and Eva (EVA-02, DINOv3, RoPE ViTs)"
    )
    if library == "timm":
        raise Unsupported("model class", f"timm's {cls.__name__} ({cls.__module__}) is not supported yet: {supported}")
    if library in FOREIGN_LIBRARIES:
        raise Unsupported(
            "non-timm model",
            f"this {cls.__name__} comes from {FOREIGN_LIBRARIES[library]}, not timm: {supported}; build the same architecture "
            f"with timm.create_model (timm converts the common checkpoints) and compress that",
        )
    raise Unsupported("model class", f"{cls.__name__} ({cls.__module__}) is not supported: {supported}")


def allow_any_size(model: nn.Module) -> None:
    """Switch a timm ``VisionTransformer`` / ``Eva`` to ``dynamic_img_size=True`` in place: the state
    timm's constructor sets for that flag (patch embedding without a size check, unflattened NHWC
    output; ``_pos_embed`` then interpolates the position embedding to the input's grid)."""
    from timm.layers import Format

    embed = model.patch_embed
    model.dynamic_img_size = True
    embed.strict_img_size, embed.flatten, embed.output_fmt = False, False, Format.NHWC
