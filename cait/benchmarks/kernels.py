"""Kernel benchmarks: the Triton ops against their peers, next to the FLOP and byte floors.

On a CUDA GPU every case is timed with ``triton.testing.do_bench`` (medians over repeats after
warm-up), and the device's ceilings are measured in the same run: copy bandwidth (bytes read plus
written by a 1 GiB device copy) and the fp16 matrix-product rate. FLOPs and the fewest bytes each
case must move are counted before timing; achieved TFLOP/s and GB/s are reported with their share of
those ceilings. Peers: ``scaled_dot_product_attention`` on timm's views of the packed qkv, plus the
transpose to ``(B, N, heads*d_v)`` that the fused kernel writes directly (with the size bias: SDPA
with an additive ``(B, 1, 1, N)`` mask); the PyTorch references for ATME and unmerge.

Without a GPU only the ahead-of-time resource table can be printed (:mod:`cait_kernels.aot`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

import cait_kernels as ck

ATTENTION_MODELS = {"DeiT-T": 3, "DeiT-S": 6, "DeiT-B": 12}  # heads; head_dim 64 in all three
ATTENTION_WIDTHS = ((64, 64), (48, 48), (32, 48), (32, 32))  # (d_qk, d_v): dense, and pruned
ATTENTION_TOKENS = (197, 99)  # DeiT at 224 px, and about half after merging
ATTENTION_BATCHES = (64, 256)
ATME_CASES = ((64, 2, 49), (256, 2, 49), (256, 2, 98), (256, 4, 98))  # (batch, block, r) on the 14x14 grid of DeiT-S


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


def ceilings(device: torch.device) -> dict:
    """Measured copy bandwidth (GB/s, read + write) and fp16 matmul rate (TFLOP/s) of ``device``."""
    from triton.testing import do_bench

    source = torch.randn(256 * 1024 * 1024, device=device)  # 1 GiB
    target = torch.empty_like(source)
    copy_ms = do_bench(lambda: target.copy_(source), return_mode="median")
    a = torch.randn(8192, 8192, device=device, dtype=torch.float16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.float16)
    mm_ms = do_bench(lambda: a @ b, return_mode="median")
    return {"copy_gbps": 2 * source.numel() * 4 / copy_ms / 1e6, "matmul_tflops": 2 * 8192**3 / mm_ms / 1e9}


def _row(case, flop, nbytes, ours, peer, peak) -> KernelRow:
    from triton.testing import do_bench

    ms, peer_ms = do_bench(ours, return_mode="median"), do_bench(peer, return_mode="median")
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
    )


def attention_rows(peak: dict, device, dtype=torch.float16, progress=None) -> list[KernelRow]:
    """Pruned attention vs SDPA over DeiT shapes, without and with the size bias."""
    cases = [
        (model, heads, batch, n, d_qk, d_v, biased)
        for model, heads in ATTENTION_MODELS.items()
        for batch in ATTENTION_BATCHES
        for n in ATTENTION_TOKENS
        for d_qk, d_v in ATTENTION_WIDTHS
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
            return ck.pruned_attention(qkv, heads=heads, d_qk=d_qk, d_v=d_v, scale=scale, size=size)

        def peer():
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale).transpose(1, 2).reshape(batch, n, -1)

        flop = 2 * batch * heads * n * n * (d_qk + d_v)
        nbytes = qkv.numel() * qkv.element_size() + batch * n * heads * d_v * qkv.element_size() + (0 if size is None else size.numel() * 4)
        name = f"attention {model} B={batch} N={n} d={d_qk}/{d_v}{' +size' if biased else ''}"
        rows.append(_row(name, flop, nbytes, ours, peer, peak))
    return rows


def atme_rows(peak: dict, device, dtype=torch.float16) -> list[KernelRow]:
    """The ATME step and unmerge vs their PyTorch references at DeiT-S shapes (14x14 grid, C=384)."""
    rows = []
    grid, channels, prefix = (14, 14), 384, 1
    for batch, block, r in ATME_CASES:
        cells = grid[0] * grid[1]
        x = torch.randn(batch, prefix + cells, channels, device=device, dtype=dtype)
        metric = torch.randn(batch, prefix + cells, 64, device=device, dtype=dtype)
        size = torch.ones(batch, prefix + cells, device=device)
        owner = torch.arange(cells, device=device, dtype=torch.int32).expand(batch, -1).contiguous()
        args = dict(r=r, grid=grid, prefix=prefix, block=block)

        def ours():
            return ck.atme_step(x, metric, size, owner, **args)

        def peer():
            return ck.atme_step_reference(x, metric, size, owner, **args)

        elt = x.element_size()
        nbytes = batch * ((2 * (prefix + cells) - r) * channels * elt + cells * 64 * elt + 2 * cells * 4 + (2 * (prefix + cells) - r) * 4)
        rows.append(_row(f"atme_step B={batch} {block}x{block} r={r}", 0, nbytes, ours, peer, peak))
        merged, _, merged_owner = ours()

        def unmerge_ours():
            return ck.unmerge(merged, merged_owner, prefix=prefix)

        def unmerge_peer():
            return ck.unmerge_reference(merged, merged_owner, prefix=prefix)

        nbytes = batch * ((prefix + cells - r) * channels * elt + cells * 4 + cells * channels * elt)
        rows.append(_row(f"unmerge B={batch} {block}x{block} r={r}", 0, nbytes, unmerge_ours, unmerge_peer, peak))
    return rows


def table(rows: list[KernelRow], peak: dict) -> str:
    """Markdown table of kernel rows, with the ceilings they are measured against."""
    lines = [
        f"ceilings measured in this run: copy {peak['copy_gbps']:.0f} GB/s (read + write), fp16 matmul {peak['matmul_tflops']:.0f} TFLOP/s",
        "",
        "| case | GFLOP | MB moved | floor ms | ms | gap | TFLOP/s | % matmul peak | GB/s | % copy BW | peer ms | speedup vs peer |",
        "|" + "---|" * 12,
    ]
    for r in rows:
        lines.append(
            f"| {r.case} | {r.gflop:.2f} | {r.mbytes:.1f} | {r.floor_ms:.4f} | {r.ms:.4f} | {r.gap:.1f}x | "
            f"{r.tflops:.1f} | {100 * r.flop_share:.0f}% | "
            f"{r.gbps:.0f} | {100 * r.byte_share:.0f}% | {r.peer_ms:.4f} | {r.speedup:.2f}x |"
        )
    return "\n".join(lines)


def as_json(rows: list[KernelRow]) -> list[dict]:
    return [asdict(r) for r in rows]
