"""Which timm models cait can compress; everything else gets a clear error naming the reason."""
from __future__ import annotations

from torch import nn

POOLS = ("", "token", "avg", "max", "avgmax", "map")


def check_supported(model: nn.Module) -> None:
    """Raise ``NotImplementedError`` unless ``model`` is a timm ViT that cait knows how to compress.

    Supported: timm ``VisionTransformer`` and its subclasses that keep its forward (DeiT, distilled
    DeiT, DeiT-3, CLIP, SigLIP, ViTs with register tokens, LayerScale, qk-norm) with timm's pre-norm
    ``Block`` / ``Attention``, and timm's ``Eva`` (EVA-02, DINOv3, RoPE-ViT, ... see :mod:`cait.eva`);
    ``global_pool`` of token/avg/max/avgmax/map (attention pooling)/none; any input size with
    ``dynamic_img_size``.
    """
    from timm.layers import AttentionPoolLatent, PatchEmbed
    from timm.models.vision_transformer import Attention, Block, VisionTransformer

    from .eva import check_eva, is_eva

    name = type(model).__name__
    eva = is_eva(model)
    if not isinstance(model, VisionTransformer) and not eva:
        raise NotImplementedError(
            f"{name} is not supported: cait compresses timm VisionTransformer models (ViT, DeiT, DeiT-3, CLIP, SigLIP, "
            f"ViTs with registers) and Eva models (EVA-02, DINOv3, RoPE ViTs), which keep a patch grid of plain transformer blocks"
        )
    if type(model.patch_embed) is not PatchEmbed:
        raise NotImplementedError(
            f"{name} embeds patches with {type(model.patch_embed).__name__}: hybrid CNN stems are not supported, "
            f"cait needs timm's PatchEmbed for its patch grid"
        )
    if model.global_pool not in POOLS:
        raise NotImplementedError(f"global_pool={model.global_pool!r} is not supported; use one of {POOLS}")
    pool = getattr(model, "attn_pool", None)
    if pool is not None and (type(pool) is not AttentionPoolLatent or pool.pos_embed is not None):
        raise NotImplementedError(
            f"attention pooling by {type(pool).__name__}{' with its own position embedding' if type(pool) is AttentionPoolLatent else ''} "
            f"is not supported: cait pools merged tokens with timm's AttentionPoolLatent (no position embedding)"
        )
    if eva:
        check_eva(model)
        return
    if not isinstance(model.patch_drop, nn.Identity):
        raise NotImplementedError("patch dropout is not supported: it breaks the patch grid that merging relies on")
    for i, block in enumerate(model.blocks):
        if type(block) is not Block:
            raise NotImplementedError(f"block {i} is a {type(block).__name__}: only timm's pre-norm Block is supported")
        if type(block.attn) is not Attention:
            raise NotImplementedError(f"block {i} uses {type(block.attn).__name__}: only timm's Attention is supported")
        if block.attn.attn_drop.p > 0:
            raise NotImplementedError(f"block {i} has attention dropout {block.attn.attn_drop.p}: build the model with attn_drop_rate=0")


def allow_any_size(model: nn.Module) -> None:
    """Switch a timm ``VisionTransformer`` / ``Eva`` to ``dynamic_img_size=True`` in place: the state
    timm's constructor sets for that flag (patch embedding without a size check, unflattened NHWC
    output; ``_pos_embed`` then interpolates the position embedding to the input's grid)."""
    from timm.layers import Format

    embed = model.patch_embed
    model.dynamic_img_size = True
    embed.strict_img_size, embed.flatten, embed.output_fmt = False, False, Format.NHWC


def timm_spec(model: nn.Module) -> dict:
    """How to rebuild the architecture of ``model`` with ``timm.create_model(name, **kwargs)``.

    timm does not record constructor overrides, so the ones that shape the weights are read off
    the model itself; :func:`cait.load` checks that the rebuilt model has exactly the saved tensors.
    """
    name = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
    if not name:
        raise ValueError(f"cannot tell which timm model this {type(model).__name__} is: build it with timm.create_model(name, ...)")
    block = model.blocks[0]
    common = dict(
        img_size=list(model.patch_embed.img_size),
        patch_size=list(model.patch_embed.patch_size),
        in_chans=model.patch_embed.proj.in_channels,
        num_classes=model.num_classes,
        global_pool=model.global_pool,
        embed_dim=model.embed_dim,
        depth=len(model.blocks),
        num_heads=block.attn.num_heads,
        dynamic_img_size=bool(model.dynamic_img_size),
        dynamic_img_pad=bool(model.patch_embed.dynamic_img_pad),
    )
    if not isinstance(getattr(block, "ls1", None), nn.Module):  # Eva: its name's defaults hold the rest
        return {"name": name, "kwargs": common}
    kwargs = dict(
        common,
        mlp_ratio=block.mlp.fc1.out_features / model.embed_dim,
        qkv_bias=block.attn.qkv.bias is not None,
        qk_norm=not isinstance(block.attn.q_norm, nn.Identity),
        init_values=1e-5 if not isinstance(block.ls1, nn.Identity) else None,
        class_token=model.cls_token is not None,
        reg_tokens=model.num_reg_tokens,
        no_embed_class=model.no_embed_class,
        pre_norm=not isinstance(model.norm_pre, nn.Identity),
        fc_norm=not isinstance(model.fc_norm, nn.Identity),
    )
    return {"name": name, "kwargs": kwargs}
