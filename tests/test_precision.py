"""Precision at the extremes: fp16/bf16 inputs carrying one "massive activation" channel (real ViTs carry
hundreds, up to near the fp16 limit). Every reduction over tokens, cells or channels accumulates in fp32
and rounds once (DESIGN.md, "Precision"), so each op stays finite and close to float64 math on the same
rounded inputs, in every backend."""

import pytest
import torch

from atme_bruteforce import atme_bruteforce
from conftest import INTERPRET, rel_err
from test_atme import merged_state
from test_attention import attention_float64, split_materialized
from test_degenerate import ATME, ATTENTION, UNMERGE, call

MASSIVE = [400.0, 4000.0, 60000.0]  # 60000: just under the fp16 maximum (65504)
TOLERANCE = {torch.float16: 2e-3, torch.bfloat16: 1e-2}
TRITON_DTYPES = [torch.float16] if INTERPRET else [torch.float16, torch.bfloat16]  # the interpreter mishandles bf16
BACKEND_DTYPES = [("reference", d) for d in TOLERANCE] + [("cpu", d) for d in TOLERANCE] + [("triton", d) for d in TRITON_DTYPES]


@pytest.mark.parametrize("name, dtype", BACKEND_DTYPES)
@pytest.mark.parametrize("massive", MASSIVE)
@pytest.mark.parametrize("block", [2, 4])
def test_atme_means_round_once(name, dtype, massive, block, kernel_device, poisoned):
    """Merged features are the size-weighted means rounded once: finite, within the dtype's tolerance of
    float64, and equal to the rounded exact mean almost everywhere (rounding every partial sum, as an
    fp16 accumulation does, misses it in ~7% of the elements)."""
    grid = (9, 8)
    x, size, owner = merged_state(3, grid, 12, 1, block, (10,))
    x[..., 5] += massive
    x, size, metric = x.to(dtype), size.float(), torch.randn(3, x.shape[1], 6)
    r = 15
    out = call(ATME, name, kernel_device, x=x, metric=metric, size=size, owner=owner, r=r, grid=grid, prefix=1, block=block)
    exact = atme_bruteforce(x.double(), metric.double(), size.double(), owner, r=r, grid=grid, prefix=1, block=block)
    assert torch.equal(out[2], exact[2]) and torch.equal(out[1], exact[1].float())
    assert out[0].dtype == dtype and out[0].isfinite().all()
    assert rel_err(out[0], exact[0]) < TOLERANCE[dtype]
    assert rel_err(out[0][..., :5], exact[0][..., :5]) < TOLERANCE[dtype]  # the ordinary channels too
    assert (out[0] == exact[0].to(dtype)).double().mean() > 0.99


@pytest.mark.parametrize("name, dtype", [("reference", d) for d in TOLERANCE] + [("triton", d) for d in TRITON_DTYPES])
@pytest.mark.parametrize("massive_v", MASSIVE)
@pytest.mark.parametrize("with_size", [False, True])
def test_attention_accumulates_in_fp32(name, dtype, massive_v, with_size, kernel_device, poisoned):
    """q and k share a channel of 256 in every token (so q.k alone passes the fp16 maximum: an fp16
    accumulation overflows), one v channel is massive: the output stays finite and close to float64."""
    heads, d = 3, 64
    qkv = torch.randn(2, 50, heads * 3 * d)
    qkv[..., : 2 * heads * d : d] += 256.0  # channel 0 of every q and k head
    qkv[..., 2 * heads * d + 1] += massive_v  # channel 1 of the first v head
    qkv = qkv.to(dtype)
    size = torch.randint(1, 5, (2, 50)).float() if with_size else None
    out = call(ATTENTION, name, kernel_device, qkv=qkv, heads=heads, d_qk=d, d_v=d, scale=d**-0.5, size=size)
    ref = attention_float64(*split_materialized(qkv.double(), heads, d, d), d**-0.5, size)
    ordinary = torch.arange(heads * d) != 1
    assert out.dtype == dtype and out.isfinite().all()
    assert rel_err(out[..., ordinary], ref[..., ordinary]) < TOLERANCE[dtype]
    assert rel_err(out[..., 1], ref[..., 1]) < TOLERANCE[dtype]


@pytest.mark.parametrize("name, dtype", [("reference", d) for d in TOLERANCE] + [("triton", d) for d in TRITON_DTYPES])
def test_unmerge_passes_massive_values_through(name, dtype, kernel_device, poisoned):
    x = torch.randn(2, 1 + 20, 9)
    x[..., 3] = 65000.0
    x = x.to(dtype)
    owner = torch.randint(0, 20, (2, 30), dtype=torch.int32)
    out = call(UNMERGE, name, kernel_device, x=x, owner=owner, prefix=1)
    assert torch.equal(out, x[:, 1:].gather(1, owner.long()[..., None].expand(-1, -1, 9)))
