"""Kernel benchmarks: the Triton ops against their peers, next to the FLOP and byte floors.

On a CUDA GPU every case is timed with ``triton.testing.do_bench`` (medians over hundreds of calls after
warm-up), and the device's ceilings are measured in the same run: copy bandwidth (bytes read plus
written by a 1 GiB device copy) and the fp16 matrix-product rate. FLOPs and the fewest bytes each
case must move are counted before timing; achieved TFLOP/s and GB/s are reported with their share of
those ceilings. Peers: ``scaled_dot_product_attention`` on timm's views of the packed qkv, plus the
transpose to ``(B, N, heads*d_v)`` that the fused kernel writes directly; with the size bias, SDPA with
an additive ``(B, 1, 1, N)`` float mask (the peer of the speedup column), SDPA without the bias (what the
bias costs it) and FlexAttention with a ``score_mod`` adding ``log(size_j)`` (compiled; once per shape,
so only at the merged token count :attr:`Shapes.flex_tokens`); the PyTorch references for ATME and unmerge.

:data:`TINY` shapes time the same cases on a CPU in seconds (the Triton kernels through the interpreter,
FlexAttention eager): a smoke run for ``bench/gpu_check.sh --dry-run``, not a measurement.
Without a GPU otherwise only the ahead-of-time resource table can be printed (:mod:`cait_kernels.aot`).
"""

from __future__ import annotations

import contextlib
import functools
import statistics
import time
from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

import cait_kernels as ck

ATTENTION_MODELS = {"DeiT-T": 3, "DeiT-S": 6, "DeiT-B": 12}  # heads; head_dim 64 in all three
ATTENTION_WIDTHS = ((64, 64), (48, 48), (32, 48), (32, 32))  # (d_qk, d_v): dense, and pruned
ATTENTION_TOKENS = (197, 99)  # DeiT at 224 px, and about half after merging
ATTENTION_BATCHES = (64, 256)
ATME_CASES = ((64, 2, 49), (256, 2, 49), (256, 2, 98), (256, 4, 98))  # (batch, block, r) on the 14x14 grid of DeiT-S


class Shapes(NamedTuple):
    """The cases of one run: attention over ``models`` (name -> heads) x ``batches`` x ``tokens`` x
    ``widths`` ((d_qk, d_v)), FlexAttention also timed at ``flex_tokens``; the ATME step and unmerge for
    each ``(batch, block, r)`` of ``atme`` on ``grid`` with ``channels`` features and ``metric`` channels."""

    models: dict
    widths: tuple
    tokens: tuple
    batches: tuple
    flex_tokens: tuple
    atme: tuple
    grid: tuple
    channels: int
    metric: int


FULL = Shapes(ATTENTION_MODELS, ATTENTION_WIDTHS, ATTENTION_TOKENS, ATTENTION_BATCHES, (99,), ATME_CASES, (14, 14), 384, 64)
TINY = Shapes({"tiny": 2}, ((16, 16), (8, 16)), (9,), (2,), (9,), ((2, 2, 3), (2, 4, 5)), (4, 5), 24, 8)


@dataclass
class KernelRow:
    """One timed case: ours against its peer, with the work it must do."""

    case: str
    gflop: float
    mbytes: float  # the fewest bytes the case must move
    ms: float
    peer_ms: float
    tflops: float
    gbps: float
    flop_share: float  # of the measured matmul rate
    byte_share: float  # of the measured copy bandwidth
    speedup: float  # peer_ms / ms
    floor_ms: float  # the larger of FLOPs / matmul rate and bytes / copy bandwidth
    gap: float  # ms / floor_ms
    nobias_ms: float | None = None  # with the size bias: SDPA without it (what the bias costs SDPA)
    flex_ms: float | None = None  # with the size bias: compiled FlexAttention adding log(size) in a score_mod


def milliseconds(fn, device: torch.device) -> float:
    """Median ms per call of ``fn``: ``triton.testing.do_bench`` on a GPU (10 ms of warm-up, 40 ms of calls:
    hundreds at these sizes); on a CPU (tiny smoke runs) the median of 5 calls after one."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=10, rep=40, return_mode="median")
    fn()
    seconds = []
    for _ in range(5):
        start = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - start)
    return 1e3 * statistics.median(seconds)


def ceilings(device: torch.device, tiny: bool = False) -> dict:
    """Measured copy bandwidth (GB/s, read + write) and matmul rate (TFLOP/s; fp16 on a GPU) of ``device``
    (``tiny``: small operands, a smoke run)."""
    numel, side = (4 * 1024 * 1024, 512) if tiny else (256 * 1024 * 1024, 8192)  # the copy: 1 GiB of fp32
    source = torch.randn(numel, device=device)
    target = torch.empty_like(source)
    copy_ms = milliseconds(lambda: target.copy_(source), device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    a, b = (torch.randn(side, side, device=device, dtype=dtype) for _ in range(2))
    mm_ms = milliseconds(lambda: a @ b, device)
    return {"copy_gbps": 2 * source.numel() * 4 / copy_ms / 1e6, "matmul_tflops": 2 * side**3 / mm_ms / 1e9}


def _row(case, flop, nbytes, ours, peer, peak, device, **peers) -> KernelRow:
    ms, peer_ms = milliseconds(ours, device), milliseconds(peer, device)
    tflops, gbps = flop / ms / 1e9, nbytes / ms / 1e6
    floor = max(flop / 1e9 / peak["matmul_tflops"], nbytes / 1e6 / peak["copy_gbps"])
    return KernelRow(
        case,
        flop / 1e9,
        nbytes / 1e6,
        ms,
        peer_ms,
        tflops,
        gbps,
        tflops / peak["matmul_tflops"],
        gbps / peak["copy_gbps"],
        peer_ms / ms,
        floor,
        ms / floor,
        **peers,
    )


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


@contextlib.contextmanager
def _room_to_recompile():
    """FlexAttention compiles once per shape: lift dynamo's recompile limit (8), which would silently fall back to eager."""
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    with config.patch(**{name: 512}):
        yield


def flex_peer(q, k, v, size, scale, device):
    """FlexAttention with ``score_mod`` adding ``log(size_j)`` to the logits, output as ``(B, N, heads*d_v)``:
    compiled on a GPU, eager on a CPU (tiny smoke runs)."""
    from torch.nn.attention.flex_attention import flex_attention

    attend = _compiled_flex() if device.type == "cuda" else flex_attention
    log_size = size.log().float()
    batch, _, n, _ = q.shape

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + log_size[b, kv_idx]

    return lambda: attend(q, k, v, score_mod=score_mod, scale=scale).transpose(1, 2).reshape(batch, n, -1)


def _flex_ms(q, k, v, size, scale, device) -> float | None:
    """ms per FlexAttention call, or None (with a printed reason) where this torch cannot run it."""
    try:
        with _room_to_recompile():
            return milliseconds(flex_peer(q, k, v, size, scale, device), device)
    except Exception as error:  # an old torch, a shape flex does not take: the row says "-", the log says why
        print(f"FlexAttention not timed for {tuple(q.shape)} x {tuple(v.shape)}: {type(error).__name__}: {str(error)[:200]}")
        return None


def attention_rows(peak: dict, device, shapes: Shapes = FULL, dtype=None, progress=None) -> list[KernelRow]:
    """Pruned attention (the Triton kernel) vs SDPA over ``shapes``, without and with the size bias
    (then also vs SDPA without the bias and vs FlexAttention); ``dtype``: fp16 on a GPU, fp32 on a CPU."""
    dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
    cases = [
        (model, heads, batch, n, d_qk, d_v, biased)
        for model, heads in shapes.models.items()
        for batch in shapes.batches
        for n in shapes.tokens
        for d_qk, d_v in shapes.widths
        for biased in (False, True)
    ]
    rows = []
    for model, heads, batch, n, d_qk, d_v, biased in progress(cases) if progress else cases:
        qkv = torch.randn(batch, n, heads * (2 * d_qk + d_v), device=device, dtype=dtype)
        size = torch.randint(1, 5, (batch, n), device=device).float() if biased else None
        q, k, v = (t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in qkv.split([heads * d_qk, heads * d_qk, heads * d_v], -1))
        mask = None if size is None else size.log().to(dtype)[:, None, None, :]
        scale = 64**-0.5

        def ours():
            with ck.backend("triton"):
                return ck.pruned_attention(qkv, heads=heads, d_qk=d_qk, d_v=d_v, scale=scale, size=size)

        def sdpa(bias):
            return lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale).transpose(1, 2).reshape(batch, n, -1)

        peers = {}
        if biased:
            peers["nobias_ms"] = milliseconds(sdpa(None), device)
            peers["flex_ms"] = _flex_ms(q, k, v, size, scale, device) if n in shapes.flex_tokens else None
        flop = 2 * batch * heads * n * n * (d_qk + d_v)
        nbytes = qkv.numel() * qkv.element_size() + batch * n * heads * d_v * qkv.element_size() + (0 if size is None else size.numel() * 4)
        name = f"attention {model} B={batch} N={n} d={d_qk}/{d_v}{' +size' if biased else ''}"
        rows.append(_row(name, flop, nbytes, ours, sdpa(mask), peak, device, **peers))
    return rows


def atme_rows(peak: dict, device, shapes: Shapes = FULL, dtype=None) -> list[KernelRow]:
    """The ATME step and unmerge (Triton) vs their PyTorch references over ``shapes`` (DeiT-S: 14x14 grid, C=384)."""
    dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
    rows = []
    grid, channels, prefix, width = shapes.grid, shapes.channels, 1, shapes.metric
    for batch, block, r in shapes.atme:
        cells = grid[0] * grid[1]
        x = torch.randn(batch, prefix + cells, channels, device=device, dtype=dtype)
        metric = torch.randn(batch, prefix + cells, width, device=device, dtype=dtype)
        size = torch.ones(batch, prefix + cells, device=device)
        owner = torch.arange(cells, device=device, dtype=torch.int32).expand(batch, -1).contiguous()
        args = dict(r=r, grid=grid, prefix=prefix, block=block)

        def ours():
            with ck.backend("triton"):
                return ck.atme_step(x, metric, size, owner, **args)

        def peer():
            return ck.atme_step_reference(x, metric, size, owner, **args)

        elt = x.element_size()
        rows_moved = 2 * (prefix + cells) - r  # tokens read and written
        nbytes = batch * (rows_moved * channels * elt + cells * width * elt + 2 * cells * 4 + rows_moved * 4)
        rows.append(_row(f"atme_step B={batch} {block}x{block} r={r}", 0, nbytes, ours, peer, peak, device))
        merged, _, merged_owner = ours()

        def unmerge_ours():
            with ck.backend("triton"):
                return ck.unmerge(merged, merged_owner, prefix=prefix)

        def unmerge_peer():
            return ck.unmerge_reference(merged, merged_owner, prefix=prefix)

        nbytes = batch * ((prefix + cells - r) * channels * elt + cells * 4 + cells * channels * elt)
        rows.append(_row(f"unmerge B={batch} {block}x{block} r={r}", 0, nbytes, unmerge_ours, unmerge_peer, peak, device))
    return rows


def table(rows: list[KernelRow], peak: dict) -> str:
    """Markdown table of kernel rows, with the ceilings they are measured against. Peer: SDPA (with the
    float mask on ``+size`` rows) or the PyTorch reference; the last two columns only on ``+size`` rows."""
    lines = [
        f"ceilings measured in this run: copy {peak['copy_gbps']:.0f} GB/s (read + write), matmul {peak['matmul_tflops']:.0f} TFLOP/s",
        "",
        "| case | GFLOP | MB moved | floor ms | ms | gap | TFLOP/s | % matmul peak | GB/s | % copy BW | peer ms | speedup vs peer "
        "| SDPA no-bias ms | flex ms |",
        "|" + "---|" * 14,
    ]
    for r in rows:
        lines.append(
            f"| {r.case} | {r.gflop:.2f} | {r.mbytes:.1f} | {r.floor_ms:.4f} | {r.ms:.4f} | {r.gap:.1f}x | "
            f"{r.tflops:.1f} | {100 * r.flop_share:.0f}% | "
            f"{r.gbps:.0f} | {100 * r.byte_share:.0f}% | {r.peer_ms:.4f} | {r.speedup:.2f}x | {_ms(r.nobias_ms)} | {_ms(r.flex_ms)} |"
        )
    return "\n".join(lines)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def as_json(rows: list[KernelRow]) -> list[dict]:
    return [asdict(r) for r in rows]
