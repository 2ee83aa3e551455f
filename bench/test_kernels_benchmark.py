"""pytest-benchmark entry points for the Triton kernels (CUDA only; skipped elsewhere):

    pytest bench/test_kernels_benchmark.py --benchmark-only [--benchmark-save=NAME | --benchmark-compare]

One group per shape, one benchmark per implementation (ours, and its peer: SDPA or the PyTorch
reference), so `--benchmark-compare` across commits lines up case by case. `cait bench --kernels`
gives the same cases with FLOP/byte floors.
"""

import pytest
import torch
import torch.nn.functional as F

import cait_kernels as ck

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="kernel benchmarks need a CUDA GPU")

ATTENTION = [(64, 6, 197, 64, 64), (64, 6, 99, 32, 48), (256, 6, 99, 32, 48)]  # (batch, heads, N, d_qk, d_v): DeiT-S
ATME = [(64, 2, 49), (256, 2, 98)]  # (batch, block, r) on DeiT-S's 14x14 grid, C=384


def run_cuda(benchmark, fn):
    def synced():
        fn()
        torch.cuda.synchronize()

    benchmark.pedantic(synced, rounds=50, warmup_rounds=5)


@pytest.mark.parametrize("impl", ["triton", "sdpa"])
@pytest.mark.parametrize("batch, heads, n, d_qk, d_v", ATTENTION)
def test_attention(benchmark, batch, heads, n, d_qk, d_v, impl):
    qkv = torch.randn(batch, n, heads * (2 * d_qk + d_v), device="cuda", dtype=torch.float16)
    q, k, v = (t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in qkv.split([heads * d_qk, heads * d_qk, heads * d_v], -1))
    benchmark.group = f"attention B={batch} h={heads} N={n} d={d_qk}/{d_v}"
    benchmark.extra_info["gflop"] = 2 * batch * heads * n * n * (d_qk + d_v) / 1e9
    if impl == "triton":
        run_cuda(benchmark, lambda: ck.pruned_attention(qkv, heads=heads, d_qk=d_qk, d_v=d_v, scale=64**-0.5))
    else:
        run_cuda(benchmark, lambda: F.scaled_dot_product_attention(q, k, v, scale=64**-0.5).transpose(1, 2).reshape(batch, n, -1))


@pytest.mark.parametrize("impl", ["triton", "reference"])
@pytest.mark.parametrize("batch, block, r", ATME)
def test_atme_step(benchmark, batch, block, r, impl):
    grid, prefix, cells = (14, 14), 1, 196
    x = torch.randn(batch, prefix + cells, 384, device="cuda", dtype=torch.float16)
    metric = torch.randn(batch, prefix + cells, 64, device="cuda", dtype=torch.float16)
    size = torch.ones(batch, prefix + cells, device="cuda")
    owner = torch.arange(cells, device="cuda", dtype=torch.int32).expand(batch, -1).contiguous()
    step = ck.atme_step if impl == "triton" else ck.atme_step_reference
    benchmark.group = f"atme_step B={batch} {block}x{block} r={r}"
    run_cuda(benchmark, lambda: step(x, metric, size, owner, r=r, grid=grid, prefix=prefix, block=block))
