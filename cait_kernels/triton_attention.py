"""Pruned-head attention as one fused Triton kernel (flash-attention forward).

One program computes ``BLOCK_M`` query rows of one (image, head): it loads the head's q rows straight
out of the packed ``qkv`` by strides (gather layout: only the kept columns), streams the keys and
values in tiles of ``BLOCK_N`` with an online softmax in fp32 (the ``N x N`` matrix never exists),
adds ``log2(size_j)`` to the base-2 logits when ``size`` is given, and writes its ``(BLOCK_M, d_v)``
tile into ``(B, N, heads*d_v)``, ready for ``proj``. Any ``N`` (rows and keys are masked) and any
``d <= 128`` (channels padded to a power of two >= 16 for ``tl.dot``, masked on load).

Block sizes come from :func:`attention_config`, a small table instead of autotuning (autotuning would
time kernels at first call, which breaks CUDA-graph capture and costs seconds per shape). fp16/bf16:
``(BLOCK_M, BLOCK_N, warps) = (128, 64, 8)``, or ``(64, 32, 4)`` when ``N <= 64`` and ``d <= 64`` (merged
late layers: fewer wasted rows); fp32 (no tensor cores in ieee mode, the product runs on FMA units):
``(32, 32, 4)``, ``(32, 16, 4)`` past 64 padded channels. The entries were picked from the
ahead-of-time compile report (``cait bench --kernels`` on any machine): they are the largest tiles
that build for sm_90 without spilling registers. ``tests/test_compile.py`` checks every entry.

Launch limits (:mod:`cait_kernels._launch`): the grid is ``(cdiv(N, BLOCK_M), images * heads)``, and CUDA
caps axis y at 65535 programs, so :func:`attention_launches` splits a larger batch into launches of at
most ``65535 // heads`` images (5461 at 12 heads; one launch below that, as before). The split keeps the
kernel as it was: a flat grid on axis x would need a division by the row-tile count in the kernel, and
that spilled registers in the widest configurations. Offsets: the image index is int64 before it meets
a batch stride, so any batch size works; offsets inside one image (token x token stride + channel) are
int32: ``qkv``, ``size`` and the output must span less than ``2**31`` elements per image, which
:func:`launch_attention` checks.
"""

from __future__ import annotations

import itertools
import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._builds import Build
from ._launch import MAX_GRID, check_grid, check_offsets
from .attention import check_attention_inputs, gather_columns

MAX_HEAD_DIM = 128


class AttentionConfig(NamedTuple):
    """Launch parameters of :func:`attention_kernel` (see the module docstring for the table)."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


def padded(d: int) -> int:
    """Channels as ``tl.dot`` and ``tl.arange`` see them: the next power of two, at least 16."""
    return max(16, triton.next_power_of_2(d))


def attention_config(n: int, d_qk: int, d_v: int, dtype: torch.dtype) -> AttentionConfig:
    """The launch configuration for ``n`` tokens, ``d_qk``/``d_v`` kept channels per head and ``dtype``."""
    wide = max(padded(d_qk), padded(d_v)) > 64
    if dtype == torch.float32:
        return AttentionConfig(32, 16 if wide else 32, 4, 3)
    return AttentionConfig(64, 32, 4, 3) if n <= 64 and not wide else AttentionConfig(128, 64, 8, 3)


@triton.jit
def attention_kernel(
    qkv,
    cols,
    size,
    out,
    N,
    heads,
    scale_log2,
    stride_qkv_b,
    stride_qkv_n,
    stride_size_b,
    stride_size_n,
    stride_out_b,
    stride_out_n,
    D_QK: tl.constexpr,
    D_V: tl.constexpr,
    D_QK_PAD: tl.constexpr,
    D_V_PAD: tl.constexpr,
    GATHER: tl.constexpr,
    HAS_SIZE: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Grid ``(cdiv(N, BLOCK_M), images * heads)`` (:func:`attention_launches`). ``cols``: the gather layout's
    column of every ``[q | k | v]`` channel (unused in the materialized layout, where columns are contiguous)."""
    image = tl.program_id(1) // heads
    head = tl.program_id(1) % heads
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    c_qk = tl.arange(0, D_QK_PAD)
    c_v = tl.arange(0, D_V_PAD)
    if GATHER:
        q_col = tl.load(cols + head * D_QK + c_qk, mask=c_qk < D_QK, other=0)
        k_col = tl.load(cols + (heads + head) * D_QK + c_qk, mask=c_qk < D_QK, other=0)
        v_col = tl.load(cols + 2 * heads * D_QK + head * D_V + c_v, mask=c_v < D_V, other=0)
    else:
        q_col = head * D_QK + c_qk
        k_col = (heads + head) * D_QK + c_qk
        v_col = 2 * heads * D_QK + head * D_V + c_v
    base = qkv + image.to(tl.int64) * stride_qkv_b

    q = tl.load(base + rows[:, None] * stride_qkv_n + q_col[None, :], mask=(rows[:, None] < N) & (c_qk[None, :] < D_QK), other=0.0)
    row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    row_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_V_PAD], tl.float32)
    for start in range(0, N, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        key_ok = keys < N
        k = tl.load(base + keys[None, :] * stride_qkv_n + k_col[:, None], mask=key_ok[None, :] & (c_qk[:, None] < D_QK), other=0.0)
        logits = tl.dot(q, k, input_precision=PRECISION) * scale_log2
        if HAS_SIZE:
            cells = tl.load(size + image.to(tl.int64) * stride_size_b + keys * stride_size_n, mask=key_ok, other=1.0)
            logits += tl.log2(cells.to(tl.float32))[None, :]
        logits = tl.where(key_ok[None, :], logits, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(logits, 1))
        p = tl.exp2(logits - new_max[:, None])
        rescale = tl.exp2(row_max - new_max)
        row_sum = row_sum * rescale + tl.sum(p, 1)
        v = tl.load(base + keys[:, None] * stride_qkv_n + v_col[None, :], mask=key_ok[:, None] & (c_v[None, :] < D_V), other=0.0)
        acc = acc * rescale[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        row_max = new_max
    acc = acc / row_sum[:, None]
    target = out + image.to(tl.int64) * stride_out_b + rows[:, None] * stride_out_n + (head * D_V + c_v)[None, :]
    tl.store(target, acc.to(out.dtype.element_ty), mask=(rows[:, None] < N) & (c_v[None, :] < D_V))


def pruned_attention_triton(qkv, *, heads, d_qk, d_v, scale, size=None, idx_qk=None, idx_v=None):
    """Same contract as :func:`cait_kernels.attention.pruned_attention_reference`, one kernel launch.

    ``qkv`` may have any batch stride (e.g. a slice of a larger buffer) but its channels must be
    contiguous; ``d_qk, d_v <= 128``; fp64 is not supported by the kernel (use the reference).
    """
    check_attention_inputs(qkv, heads=heads, d_qk=d_qk, d_v=d_v, scale=scale, size=size, idx_qk=idx_qk, idx_v=idx_v)
    check_kernel_inputs(qkv, d_qk, d_v)
    return launch_attention(qkv, heads, d_qk, d_v, scale, size, idx_qk, idx_v)


def launch_attention(qkv, heads, d_qk, d_v, scale, size, idx_qk, idx_v):
    """:func:`pruned_attention_triton` without the input checks (the caller ran them)."""
    B, N, W = qkv.shape
    head_dim = W // (3 * heads) if idx_qk is not None or idx_v is not None else None
    out = torch.empty(B, N, heads * d_v, dtype=qkv.dtype, device=qkv.device)
    if out.numel() == 0:  # an empty batch or no tokens: nothing to launch
        return out
    gather = head_dim is not None
    cols = gather_columns(heads, head_dim, idx_qk, idx_v, qkv.device).to(torch.int32) if gather else qkv
    sizes = size if size is not None else qkv
    config = attention_config(N, d_qk, d_v, qkv.dtype)
    check_offsets("attention_kernel", qkv=qkv, size=sizes, out=out)
    for start, stop, grid in attention_launches(B, N, heads, config.block_m):  # one launch unless B * heads > 65535
        attention_kernel[grid](
            qkv[start:stop],
            cols,
            sizes[start:stop],
            out[start:stop],
            N,
            heads,
            float(scale) * math.log2(math.e),
            qkv.stride(0),
            qkv.stride(1),
            sizes.stride(0),
            sizes.stride(1),
            out.stride(0),
            out.stride(1),
            D_QK=d_qk,
            D_V=d_v,
            D_QK_PAD=padded(d_qk),
            D_V_PAD=padded(d_v),
            GATHER=gather,
            HAS_SIZE=size is not None,
            PRECISION="ieee" if qkv.dtype == torch.float32 else "tf32",
            BLOCK_M=config.block_m,
            BLOCK_N=config.block_n,
            num_warps=config.num_warps,
            num_stages=config.num_stages,
        )
    return out


def attention_launches(batch: int, n: int, heads: int, block_m: int) -> list[tuple[int, int, tuple[int, int]]]:
    """The launches of :func:`attention_kernel` for ``batch`` images of ``n`` tokens: ``(start, stop, grid)``
    for each slice ``start:stop`` of the batch, as few as CUDA's 65535 programs on grid axis y allow (each
    grid checked against CUDA's limits)."""
    per_launch = max(1, MAX_GRID[1] // heads)
    return [
        (start, min(start + per_launch, batch), attention_grid(min(per_launch, batch - start), n, heads, block_m))
        for start in range(0, batch, per_launch)
    ]


def attention_grid(images: int, n: int, heads: int, block_m: int) -> tuple[int, int]:
    """The grid of one launch of :func:`attention_kernel` over ``images`` images (checked against CUDA's limits)."""
    grid = (triton.cdiv(n, block_m), images * heads)
    return check_grid("attention_kernel", grid, images=images, tokens=n, heads=heads, block_m=block_m)


def check_kernel_inputs(qkv, d_qk: int, d_v: int) -> None:
    """What the kernel needs beyond the op's contract: fp16/bf16/fp32, contiguous channels, ``d <= 128``."""
    if qkv.dtype == torch.float64:
        raise TypeError("the Triton attention kernel takes fp16, bf16 or fp32 qkv; run float64 through the reference")
    if qkv.stride(-1) != 1:
        raise ValueError(f"qkv channels must be contiguous (last stride 1), got strides {tuple(qkv.stride())}")
    if max(d_qk, d_v) > MAX_HEAD_DIM:
        raise ValueError(f"the Triton attention kernel takes d_qk, d_v <= {MAX_HEAD_DIM}, got d_qk={d_qk}, d_v={d_v}")


def aot_builds() -> list[Build]:
    """The configurations :func:`attention_config` can pick, at the channel widths that load them most
    (fp16 at DeiT's pruned 32/48, full 64 and the 128 maximum; bf16 and fp32 at 64 and the maximum),
    in each layout, with and without the size bias. Hot: fp16/bf16, materialized, ``d <= 64``."""
    widths = {torch.float16: ((32, 48), (64, 64), (128, 128)), torch.bfloat16: ((64, 64),), torch.float32: ((64, 64), (128, 128))}
    builds = {}
    for dtype, pairs in widths.items():
        name = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]
        for n, (d_qk, d_v), (gather, has_size) in itertools.product((64, 197), pairs, ((False, False), (False, True), (True, True))):
            config = attention_config(n, d_qk, d_v, dtype)
            layout = "gather" if gather else "materialized"
            tiles = f"{config.block_m}x{config.block_n} w{config.num_warps}"
            label = f"attention {name} {d_qk}/{d_v} {layout}{' +size' if has_size else ''} {tiles}"
            signature = {
                "qkv": f"*{name}",
                "cols": "*i32",
                "size": "*fp32",
                "out": f"*{name}",
                **dict.fromkeys(("N", "heads"), "i32"),
                "scale_log2": "fp32",
                **dict.fromkeys(("stride_qkv_b", "stride_qkv_n", "stride_size_b", "stride_size_n", "stride_out_b", "stride_out_n"), "i32"),
            }
            constants = dict(
                D_QK=d_qk, D_V=d_v, D_QK_PAD=padded(d_qk), D_V_PAD=padded(d_v), GATHER=gather, HAS_SIZE=has_size,
                PRECISION="ieee" if dtype == torch.float32 else "tf32", BLOCK_M=config.block_m, BLOCK_N=config.block_n,
            )  # fmt: skip
            hot = dtype != torch.float32 and not gather and max(d_qk, d_v) <= 64
            builds[label] = Build(label, attention_kernel, signature, constants, config.num_warps, config.num_stages, hot)
    return list(builds.values())
