"""Pruned-head attention over the packed output of a qkv projection.

Two layouts of the packed input ``qkv`` of shape ``(B, N, W)``:

- **materialized**: ``W = heads * (2 * d_qk + d_v)``, ordered ``[q heads | k heads | v heads]``,
  each head's channels contiguous (the output of a pruned ``nn.Linear``; ``d_qk = d_v = head_dim``
  is exactly timm's unpruned layout);
- **gather**: ``W = 3 * heads * head_dim`` (the unpruned projection) plus ``idx_qk (heads, d_qk)``
  and/or ``idx_v (heads, d_v)``, the kept channels of each head. A missing index keeps every
  channel of that group (its ``d`` must then equal ``head_dim``).

With ``size (B, N)`` (cell counts of merged tokens) the logits get ``+ log(size_j)`` for every key
``j`` (proportional attention). The softmax scale is given explicitly: pruning keeps the original
``head_dim ** -0.5``.

On CPU the reference picks how to compute (same math, float32/float64): up to
:data:`EXPLICIT_LOGITS` logits (``B * heads * N * N``, a static count) it multiplies out
``softmax(q k^T * scale + bias) v`` in three ops; above it, torch's fused kernel
(``scaled_dot_product_attention``), which needs equal q/k and v widths, so narrower q/k are
zero-padded (except while ``torch.export`` traces: padding exports as transposes and scatters).
Measured on one core of an Intel Xeon (AVX-512), ``d_qk = 32``, ``d_v = 48``: the explicit form
took 0.84-0.88x the padded fused kernel's time at batch 1 (heads 3 and 6, N = 50..197; 0.53-0.79x
under ``torch.compile``), even at 0.5M logits (B 2, 6 heads, N 197), and 1.6-2.3x at 1.9M and more.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._checks import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    check_index_range,
    check_int,
    check_same_device,
    check_shape,
    check_tensor,
    values_checkable,
)

EXPLICIT_LOGITS = 2**18  # up to this many logits (B * heads * N * N) the CPU reference multiplies out attention


def check_attention_inputs(qkv, *, heads, d_qk, d_v, scale, size, idx_qk, idx_v) -> int | None:
    """Validate the arguments of :func:`pruned_attention`.

    Returns ``head_dim`` of the gather layout, or ``None`` for the materialized layout.
    """
    check_tensor("qkv", qkv, 3, FLOAT_DTYPES)
    check_int("heads", heads, 1)
    check_int("d_qk", d_qk, 1)
    check_int("d_v", d_v, 1)
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not scale > 0:
        raise ValueError(f"scale must be a positive number, got {scale!r}")
    check_same_device(qkv=qkv, size=size, idx_qk=idx_qk, idx_v=idx_v)
    B, N, W = qkv.shape
    if size is not None:
        check_tensor("size", size, 2, FLOAT_DTYPES)
        check_shape("size", size, (B, N), "(B, N)")
        if values_checkable() and not bool((size > 0).all()):
            raise ValueError("size must be positive: it counts the cells each token holds")
    if idx_qk is None and idx_v is None:
        if W != heads * (2 * d_qk + d_v):
            raise ValueError(
                f"materialized layout needs qkv width heads*(2*d_qk + d_v) = {heads}*(2*{d_qk} + {d_v}) "
                f"= {heads * (2 * d_qk + d_v)}, got {W}"
            )
        return None
    if W % (3 * heads):
        raise ValueError(f"gather layout needs qkv width 3*heads*head_dim, got {W} for heads={heads}")
    head_dim = W // (3 * heads)
    for name, idx, d in (("idx_qk", idx_qk, d_qk), ("idx_v", idx_v, d_v)):
        if idx is None:
            if d != head_dim:
                raise ValueError(f"{name} is None, so every channel is kept: {name[4:]} width must be head_dim = {head_dim}, got {d}")
            continue
        check_tensor(name, idx, 2, INDEX_DTYPES)
        check_shape(name, idx, (heads, d), f"(heads, d_{name[4:]})")
        check_index_range(name, idx, head_dim, "head_dim")
    return head_dim


def gather_columns(heads: int, head_dim: int, idx_qk, idx_v, device) -> torch.Tensor:
    """Columns of the unpruned packed qkv that form the materialized layout, shape ``(heads*(2*d_qk+d_v),)``."""
    every = torch.arange(head_dim, device=device).expand(heads, head_dim)
    idx_qk = every if idx_qk is None else idx_qk.long()
    idx_v = every if idx_v is None else idx_v.long()
    base = torch.arange(heads, device=device)[:, None] * head_dim
    width = heads * head_dim
    return torch.cat([(base + idx_qk).flatten(), (base + idx_qk).flatten() + width, (base + idx_v).flatten() + 2 * width])


def _split_heads(qkv, heads, d_qk, d_v):
    """Materialized ``qkv (B, N, W)`` -> ``q, k, v`` views, each ``(B, heads, N, d)``."""
    return (t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in qkv.split([heads * d_qk, heads * d_qk, heads * d_v], dim=-1))


def _static_count(count) -> float:
    """``count`` if it is a plain int; infinite for a symbolic one (a dynamic batch in ``torch.export``)."""
    return count if isinstance(count, int) else float("inf")


def pruned_attention_reference(qkv, *, heads, d_qk, d_v, scale, size=None, idx_qk=None, idx_v=None):
    """Multi-head attention on packed qkv; see the module docstring for the layouts.

    Args:
        qkv: ``(B, N, W)`` packed projection output.
        heads, d_qk, d_v: head count and kept channels per head (q/k share ``d_qk``).
        scale: softmax scale (the original ``head_dim ** -0.5``).
        size: optional ``(B, N)`` cell counts; adds ``log(size_j)`` to the logits.
        idx_qk, idx_v: optional ``(heads, d)`` int32/int64 kept channels (gather layout).

    Returns:
        ``(B, N, heads * d_v)`` in the dtype of ``qkv``, heads in order, ready for ``proj``.
    """
    head_dim = check_attention_inputs(qkv, heads=heads, d_qk=d_qk, d_v=d_v, scale=scale, size=size, idx_qk=idx_qk, idx_v=idx_v)
    B, N, _ = qkv.shape
    if head_dim is not None:
        qkv = qkv.index_select(-1, gather_columns(heads, head_dim, idx_qk, idx_v, qkv.device))
    bias = None if size is None else size.log().to(qkv.dtype).view(B, 1, 1, N)
    if qkv.device.type == "cpu" and qkv.dtype in (torch.float32, torch.float64) and _static_count(B * heads * N * N) <= EXPLICIT_LOGITS:
        q, k, v = _split_heads(qkv, heads, d_qk, d_v)
        logits = (q * scale) @ k.transpose(-1, -2)
        out = (logits if bias is None else logits + bias).softmax(dim=-1) @ v
        return out.transpose(1, 2).reshape(B, N, heads * d_v)
    if d_qk < d_v and qkv.device.type == "cpu" and not torch.compiler.is_exporting():
        # torch's fused CPU kernel needs equal widths (else a 2x slower path): zero q/k channels
        # change no logit. One zero-filled buffer and one copy for both.
        qk = qkv.new_zeros(B, N, 2, heads, d_v)
        qk.narrow(-1, 0, d_qk).copy_(qkv.narrow(-1, 0, 2 * heads * d_qk).view(B, N, 2, heads, d_qk))
        q, k = qk.permute(2, 0, 3, 1, 4)
        v = qkv.narrow(-1, 2 * heads * d_qk, heads * d_v).view(B, N, heads, d_v).transpose(1, 2)
    else:
        q, k, v = _split_heads(qkv, heads, d_qk, d_v)
        if d_v < d_qk and qkv.device.type == "cpu":  # zero v channels only add output columns, dropped below
            v = F.pad(v, (0, d_qk - d_v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=float(scale))
    if out.shape[-1] != d_v:
        out = out.narrow(-1, 0, d_v)
    return out.transpose(1, 2).reshape(B, N, heads * d_v)
