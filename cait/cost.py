"""FLOPs: measured with torch's flop counter, and an analytic model that the schedule solver uses.

Convention: a multiply-add counts 2 FLOPs (``torch.utils.flop_counter``); only matrix products,
convolutions and attention count (norms, activations, merging are free), as in the papers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

import cait_kernels  # noqa: F401  (registers torch.ops.cait)


def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _pruned_attention_flops(qkv_shape, heads, d_qk, d_v, *args, **kwargs) -> int:
    batch, tokens, _ = qkv_shape
    return 2 * batch * heads * tokens * tokens * (d_qk + d_v)


# torch's registry lacks the fused CPU attention kernel and knows nothing of the Triton kernel (the
# op registered by cait_kernels), so a count would miss all attention FLOPs.
_MISSING_FORMULAS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops,
    torch.ops.cait.pruned_attention: _pruned_attention_flops,
}


def default_input_size(model: nn.Module) -> tuple[int, int, int]:
    """``(C, H, W)`` the model was built for, read off its patch embedding."""
    embed = getattr(model, "patch_embed", None)
    if embed is not None:
        return (embed.proj.in_channels, *embed.img_size)
    size = getattr(model, "input_size", None)  # e.g. cait.hf.FirstField (a Hugging Face model's first output field)
    if isinstance(size, tuple) and len(size) == 3:
        return size
    for inner in ("vit", "backbone"):  # a compressed model's timm parts, a segmentation model's backbone
        if isinstance(getattr(model, inner, None), nn.Module):
            return default_input_size(getattr(model, inner))
    raise ValueError(f"cannot tell the input size of {type(model).__name__}: pass input_size=(C, H, W)")


def flops(model: nn.Module, input_size: Sequence[int] | None = None) -> int:
    """FLOPs of one forward pass on one image, as executed, counted by ``torch.utils.flop_counter``.

    The count follows what runs: on CPU, pruned attention whose q/k are narrower than v runs with
    q/k zero-padded to v's width, and those FLOPs are counted (:func:`cost_model` gives the count
    without padding).

    Args:
        model: a timm ViT or a compressed model (any ``nn.Module`` taking ``(1, C, H, W)``).
        input_size: ``(C, H, W)``; defaults to the size the model was built for.
    """
    size = tuple(input_size) if input_size is not None else default_input_size(model)
    if len(size) != 3:
        raise ValueError(f"input_size must be (C, H, W), got {size}")
    weight = next(model.parameters())
    image = torch.randn(1, *size, device=weight.device, dtype=weight.dtype)
    # The counter's module tracker cannot hook a parameter view that enters a module under no_grad
    # (timm's AttentionPoolLatent feeds its latent query so): count with gradients off everywhere.
    trainable = [p for p in model.parameters() if p.requires_grad]
    try:
        for p in trainable:
            p.requires_grad_(False)
        with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=_MISSING_FORMULAS) as counter:
            model(image)
    finally:
        for p in trainable:
            p.requires_grad_(True)
    return counter.get_total_flops()


def linear_flops(module: nn.Module) -> int:
    """FLOPs per token of all ``nn.Linear`` layers inside ``module``."""
    return sum(2 * m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))


@dataclass(frozen=True)
class BlockCost:
    """FLOPs of one transformer block as a function of its token counts."""

    attn_linear: int  # per token: qkv, proj (and gate) projections
    attn_pairwise: int  # per (query, key) pair: 2 * heads * (d_qk + d_v)
    mlp_linear: int  # per token

    def flops(self, attn_tokens: int, mlp_tokens: int) -> int:
        return self.attn_linear * attn_tokens + self.attn_pairwise * attn_tokens**2 + self.mlp_linear * mlp_tokens


@dataclass(frozen=True)
class CostModel:
    """Analytic FLOPs of a ViT on one image under a merge schedule (matches :func:`flops`)."""

    blocks: tuple[BlockCost, ...]
    grid: tuple[int, int]
    prefix: int
    embed: int  # patch embedding, whole image
    head: int  # classifier, per pooled vector (or per token when head_per_token)
    head_per_token: bool
    pool: int = 0  # attention pooling (map): latent queries, projection and MLP
    pool_per_token: int = 0  # attention pooling: keys/values and attention per pooled token
    pool_prefix: bool = False  # the prefix tokens enter the attention pool

    @property
    def cells(self) -> int:
        return self.grid[0] * self.grid[1]

    def flops(self, schedule: Sequence[int]) -> int:
        """FLOPs when block ``i`` merges away ``schedule[i]`` tokens between its attention and MLP."""
        total, tokens = self.embed, self.prefix + self.cells
        for cost, r in zip(self.blocks, schedule, strict=True):
            total += cost.flops(tokens, tokens - r)
            tokens -= r
        pooled = tokens - (0 if self.pool_prefix else self.prefix)
        return total + self.head * (tokens if self.head_per_token else 1) + self.pool + self.pool_per_token * pooled


def cost_model(model: nn.Module, grid: tuple[int, int] | None = None, patch: tuple[int, int] | None = None) -> CostModel:
    """Cost model of a :class:`cait.CompressedViT` on ``grid`` (default: the grid it was built for)
    with ``patch`` px patches (default: its own), pruned channel counts included, schedule ignored."""
    blocks = tuple(
        BlockCost(
            attn_linear=linear_flops(block.attn),
            attn_pairwise=2 * block.attn.heads * (block.attn.d_qk + block.attn.d_v),
            mlp_linear=linear_flops(block.mlp),
        )
        for block in model.blocks
    )
    vit = model.vit
    conv = vit.patch_embed.proj
    grid = tuple(vit.patch_embed.grid_size if grid is None else grid)
    kernel = tuple(conv.kernel_size if patch is None else patch)
    embed = 2 * grid[0] * grid[1] * conv.out_channels * conv.in_channels * kernel[0] * kernel[1]
    head = linear_flops(vit.head) + linear_flops(getattr(vit, "head_dist", nn.Identity()))
    pool = getattr(vit, "attn_pool", None)
    if pool is None:
        return CostModel(blocks, grid, vit.num_prefix_tokens, embed, head, head_per_token=not vit.global_pool)
    latents = pool.latent_len
    return CostModel(
        blocks, grid, vit.num_prefix_tokens, embed, head, head_per_token=False,
        pool=latents * (linear_flops(pool) - linear_flops(pool.kv)),
        pool_per_token=linear_flops(pool.kv) + 4 * latents * pool.num_heads * pool.head_dim,
        pool_prefix=model.eva or getattr(vit, "pool_include_prefix", False),  # timm < 1.0.16 has no such setting
    )
