"""timm's ``Eva`` family as cait blocks: EVA / EVA-02, DINOv3, RoPE-ViT, the SBB RoPE ViTs, Perception Encoder.

An ``EvaBlock`` is a pre-norm transformer block like timm's ``Block``; what differs is adapted here
so that :class:`cait.layers.CompressedBlock` runs it unchanged:

- q, k, v: ``EvaAttention`` keeps ``q_bias`` / ``v_bias`` beside a bias-free fused ``qkv`` (and a
  zero ``k_bias`` buffer), or three projections ``q_proj`` / ``k_proj`` / ``v_proj``;
  ``AttentionRope`` a fused ``qkv`` with its bias, or three projections. All become one packed
  ``nn.Linear`` ``qkv`` in timm's ``[q heads | k heads | v heads]`` order (the same product:
  ``F.linear(x, W, cat(q_bias, k_bias, v_bias))``), which CDCP slices like any ViT's. The k third of
  the packed bias starts at zero where timm has none (zero in timm too) and is a parameter like the
  rest, so fine-tuning may move it; :func:`timm_state_dict` refuses to hand such weights to timm.
- LayerScale ``gamma_1`` / ``gamma_2`` become timm ``LayerScale`` modules (``gamma * x``, the same product).
- The rope module moves from the timm model to the compressed model (``model.rope``), so timm's
  ``_pos_embed`` builds no table that cait would not use: cait evaluates the embedding at the
  positions of merged tokens (:mod:`cait.rope`).

Refused with one clear error each (:func:`check_eva`): post-norm blocks, grouped-query attention,
``rope_type='mrope'``, rope coordinate augmentation, patch dropout, attention dropout, attention
pooling with its own position embedding.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn


def is_eva(model: nn.Module) -> bool:
    from timm.models.eva import Eva

    return isinstance(model, Eva)


def check_eva(model: nn.Module) -> None:
    """Raise :class:`cait.support.Unsupported` (a ``NotImplementedError``) for the ``Eva`` settings
    cait cannot compress (module docstring)."""
    import timm
    from timm.models.eva import EvaAttention, EvaBlock

    from .rope import rope_kind
    from .support import Unsupported

    try:
        from timm.layers import AttentionRope
    except ImportError:  # what cait maps Eva onto came with the RoPE ViTs and DINOv3
        raise Unsupported(
            "timm version", f"compressing Eva models needs timm.layers.AttentionRope (timm 1.0.16 or newer), not in timm {timm.__version__}"
        ) from None

    if model.patch_drop is not None:
        raise Unsupported("patch dropout", "patch dropout is not supported: it breaks the patch grid that merging relies on")
    for i, block in enumerate(model.blocks):
        if type(block) is not EvaBlock:
            raise Unsupported(
                "block type", f"block {i} is a {type(block).__name__}: only the pre-norm EvaBlock is supported (no use_post_norm)"
            )
        attn = block.attn
        if type(attn) not in (EvaAttention, AttentionRope):
            raise Unsupported("attention type", f"block {i} uses {type(attn).__name__}: only EvaAttention and AttentionRope are supported")
        if getattr(attn, "num_kv_groups", 1) != 1:
            raise Unsupported(
                "grouped-query attention",
                f"block {i} uses grouped-query attention (num_kv_heads={attn.num_kv_heads}): cait needs one k/v head per q head",
            )
        if getattr(attn, "qkv_bias_separate", False):
            raise Unsupported("separate qkv bias", f"block {i} adds its qkv bias separately (qkv_bias_separate): not supported")
        if attn.attn_drop.p > 0:
            raise Unsupported(
                "attention dropout", f"block {i} has attention dropout {attn.attn_drop.p}: build the model with attn_drop_rate=0"
            )
    rope = model.rope
    if rope is not None:
        rope_kind(rope)
        if getattr(rope, "aug_active", False):
            raise Unsupported(
                "rope augmentation",
                "rope coordinate augmentation (rope_shift_coords / rope_jitter_coords / rope_rescale_coords) is not supported: "
                "build the model without it",
            )
        head_dim = model.blocks[0].attn.head_dim
        rope_dim = rope.dim // rope.num_heads if hasattr(rope, "num_heads") else rope.dim
        if rope_dim != head_dim:
            raise Unsupported("rope width", f"the rotary embedding spans {rope_dim} channels but heads have {head_dim}: not supported")


def packed_qkv(attn: nn.Module) -> nn.Linear:
    """One ``nn.Linear`` computing ``[q | k | v]`` of an ``EvaAttention`` / ``AttentionRope`` (module docstring)."""
    if attn.qkv is not None and getattr(attn, "q_bias", None) is None:
        return attn.qkv  # AttentionRope, or EvaAttention without bias: already timm's packed Linear
    if attn.qkv is not None:
        weight, biases = attn.qkv.weight, [attn.q_bias, attn.k_bias, attn.v_bias]
    else:
        projections = (attn.q_proj, attn.k_proj, attn.v_proj)
        weight = torch.cat([p.weight for p in projections])
        biases = [p.bias for p in projections]
    has_bias = any(b is not None for b in biases)
    out = nn.Linear(weight.shape[1], weight.shape[0], bias=has_bias, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        out.weight.copy_(weight)
        if has_bias:
            width = weight.shape[0] // 3
            out.bias.copy_(torch.cat([weight.new_zeros(width) if b is None else b.detach() for b in biases]))
    # frozen stays frozen: the packed weight is trainable if its source is, the bias if any of q/k/v's biases is
    out.weight.requires_grad_(weight.requires_grad)
    if has_bias:
        out.bias.requires_grad_(any(b is not None and b.requires_grad for b in biases))
    out.train(attn.training)
    return out


def _layer_scale(gamma: nn.Parameter | None) -> nn.Module:
    from timm.layers import LayerScale

    if gamma is None:
        return nn.Identity()
    scale = LayerScale(gamma.shape[0], device=gamma.device, dtype=gamma.dtype)
    scale.gamma = gamma
    return scale


def as_vit_block(block: nn.Module) -> SimpleNamespace:
    """The parts of an ``EvaBlock`` under the names of timm's ``Block`` / ``Attention`` (what
    :class:`cait.layers.CompressedBlock` reads)."""
    attn = block.attn
    attention = SimpleNamespace(
        qkv=packed_qkv(attn),
        q_norm=attn.q_norm,
        k_norm=attn.k_norm,
        norm=attn.norm,
        gate=attn.gate,
        proj=attn.proj,
        proj_drop=attn.proj_drop,
        num_heads=attn.num_heads,
        head_dim=attn.head_dim,
        scale=attn.scale,
    )
    return SimpleNamespace(
        norm1=block.norm1,
        attn=attention,
        ls1=_layer_scale(block.gamma_1),
        drop_path1=block.drop_path1,
        norm2=block.norm2,
        mlp=block.mlp,
        ls2=_layer_scale(block.gamma_2),
        drop_path2=block.drop_path2,
    )


def timm_state_dict(state: dict, timm_model: nn.Module) -> dict:
    """``state`` (a compressed Eva's ``state_dict`` with the ``vit.`` prefix removed) under the names of
    ``timm_model``'s ``state_dict``: the packed qkv split back, LayerScale back to ``gamma_1``/``gamma_2``."""
    out = {name: t for name, t in state.items() if ".attn.qkv." not in name and ".ls1." not in name and ".ls2." not in name}
    for i, block in enumerate(timm_model.blocks):
        prefix = f"blocks.{i}."
        for ls, gamma in (("ls1", "gamma_1"), ("ls2", "gamma_2")):
            if prefix + ls + ".gamma" in state:
                out[prefix + gamma] = state[prefix + ls + ".gamma"]
        weight, bias = state[prefix + "attn.qkv.weight"], state.get(prefix + "attn.qkv.bias")
        attn = block.attn
        if attn.qkv is not None and getattr(attn, "q_bias", None) is None:
            out[prefix + "attn.qkv.weight"] = weight
            if bias is not None:
                out[prefix + "attn.qkv.bias"] = bias
            continue
        biases = [None] * 3 if bias is None else list(bias.chunk(3))
        if attn.qkv is not None:
            out[prefix + "attn.qkv.weight"] = weight
            owners = [attn.q_bias, attn.k_bias, attn.v_bias]
            names = [prefix + "attn.q_bias", None, prefix + "attn.v_bias"]  # k_bias is a zero buffer, not saved
        else:
            for name, w in zip(("q_proj", "k_proj", "v_proj"), weight.chunk(3)):
                out[prefix + f"attn.{name}.weight"] = w
            owners = [p.bias for p in (attn.q_proj, attn.k_proj, attn.v_proj)]
            names = [prefix + f"attn.{name}.bias" for name in ("q_proj", "k_proj", "v_proj")]
        for name, owner, b in zip(names, owners, biases):
            if name is not None and owner is not None:
                out[name] = b
            elif b is not None and bool(b.ne(0).any()):
                raise ValueError(f"block {i}: the fine-tuned qkv bias has nonzero entries where timm's {type(attn).__name__} has no bias")
    return out
