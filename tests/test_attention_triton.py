"""The Triton pruned-attention kernel (through the interpreter on CPU) against float64 attention."""

import pytest
import torch

import test_attention
from cait_kernels import backend, pruned_attention, pruned_attention_triton
from conftest import moved, rel_err
from test_attention import attention_float64, split_gathered, split_materialized

SHAPES = test_attention.SHAPES + [(2, 70, 2, 96, 128), (1, 129, 1, 48, 33)]  # B, N, heads, d_qk, d_v
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3}


def on(t, device):
    return None if t is None else t.to(device)


@pytest.mark.parametrize("B, N, heads, d_qk, d_v", SHAPES)
@pytest.mark.parametrize("with_size", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_materialized_layout(B, N, heads, d_qk, d_v, with_size, dtype, poisoned, kernel_device):
    qkv = torch.randn(B, N, heads * (2 * d_qk + d_v)).to(dtype)
    size = torch.randint(1, 5, (B, N)).float() if with_size else None
    out = pruned_attention_triton(qkv.to(kernel_device), heads=heads, d_qk=d_qk, d_v=d_v, scale=0.125, size=on(size, kernel_device)).cpu()
    ref = attention_float64(*split_materialized(qkv, heads, d_qk, d_v), 0.125, size)
    assert out.shape == (B, N, heads * d_v) and out.dtype == dtype
    assert rel_err(out, ref) < TOLERANCE[dtype]


@pytest.mark.parametrize("B, N, heads, d_qk, d_v", SHAPES)
@pytest.mark.parametrize("with_size", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gather_layout(B, N, heads, d_qk, d_v, with_size, dtype, poisoned, kernel_device):
    head_dim = max(d_qk, d_v) + 3
    qkv = torch.randn(B, N, 3 * heads * head_dim).to(dtype)
    idx_qk = torch.stack([torch.randperm(head_dim)[:d_qk] for _ in range(heads)]).int()
    idx_v = torch.stack([torch.randperm(head_dim)[:d_v] for _ in range(heads)])
    size = torch.rand(B, N) * 4 + 0.5 if with_size else None
    dev = kernel_device
    out = pruned_attention_triton(
        qkv.to(dev), heads=heads, d_qk=d_qk, d_v=d_v, scale=0.2, size=on(size, dev), idx_qk=idx_qk.to(dev), idx_v=idx_v.to(dev)
    ).cpu()
    ref = attention_float64(*split_gathered(qkv, heads, idx_qk, idx_v), 0.2, size)
    assert rel_err(out, ref) < TOLERANCE[dtype]


def test_strided_batch_and_public_op_under_the_triton_backend(poisoned, kernel_device):
    base = torch.randn(3, 21, 2 * 3 * 24 + 5)
    qkv = base[:, 1:, 5:]  # batch and token strides of the larger buffer
    size = torch.randint(1, 4, (3, 20)).float()
    with backend("triton"):
        out = pruned_attention(base.to(kernel_device)[:, 1:, 5:], heads=2, d_qk=24, d_v=24, scale=0.25, size=size.to(kernel_device)).cpu()
    ref = attention_float64(*split_materialized(qkv, 2, 24, 24), 0.25, size)
    assert rel_err(out, ref) < 1e-5


def test_agrees_with_the_reference_op(kernel_device):
    qkv = torch.randn(2, 37, 3 * (2 * 20 + 12), device=kernel_device)
    size = torch.randint(1, 4, (2, 37), device=kernel_device).float()
    args = dict(heads=3, d_qk=20, d_v=12, scale=0.3, size=size)
    with backend("reference"):
        ref = pruned_attention(qkv, **args)
    assert rel_err(pruned_attention_triton(qkv, **args), ref) < 1e-5


def kernel_bad_inputs():
    qkv = torch.randn(2, 10, 2 * (2 * 8 + 8))
    ok = dict(qkv=qkv, heads=2, d_qk=8, d_v=8, scale=0.3)
    yield "float64", dict(ok, qkv=qkv.double()), TypeError, "run float64 through the reference"
    yield "strided channels", dict(ok, qkv=torch.randn(2, 10, 96)[..., ::2]), ValueError, "channels must be contiguous"
    yield "head too wide", dict(ok, qkv=torch.randn(1, 3, 3 * 130), heads=1, d_qk=130, d_v=130), ValueError, "d_qk, d_v <= 128"


@pytest.mark.parametrize("case", list(test_attention.bad_inputs()) + list(kernel_bad_inputs()), ids=lambda c: c[0])
def test_bad_input_is_refused_before_launch(case, kernel_device):
    _, kwargs, error, message = case
    kwargs = moved(kwargs, kernel_device)
    with pytest.raises(error, match=message):
        pruned_attention_triton(**kwargs)
    if case[0] == "strided channels":  # the public op copies such inputs for the kernel (tested with the public op)
        return
    with backend("triton"), pytest.raises(error, match=message):
        pruned_attention(**kwargs)
