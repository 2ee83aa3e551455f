"""The pruned-attention reference against float64 attention written out by hand, and its errors."""
import pytest
import torch

from cait_kernels import pruned_attention, pruned_attention_reference
from cait_kernels.attention import EXPLICIT_LOGITS
from conftest import rel_err


def attention_float64(q, k, v, scale, size):
    """q, k ``(B, heads, N, d_qk)``, v ``(B, heads, N, d_v)`` -> ``(B, N, heads*d_v)``."""
    logits = (q.double() @ k.double().transpose(-1, -2)) * scale
    if size is not None:
        logits = logits + size.double().log()[:, None, None, :]
    out = logits.softmax(-1) @ v.double()
    return out.transpose(1, 2).flatten(2)


def split_materialized(qkv, heads, d_qk, d_v):
    q, k, v = qkv.split([heads * d_qk, heads * d_qk, heads * d_v], dim=-1)
    return [t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in (q, k, v)]


def split_gathered(qkv, heads, idx_qk, idx_v):
    parts = qkv.unflatten(-1, (3, heads, -1)).permute(2, 0, 3, 1, 4)  # (3, B, heads, N, head_dim)
    take = lambda t, idx: torch.stack([t[:, h, :, idx[h].long()] for h in range(heads)], dim=1)  # noqa: E731
    return take(parts[0], idx_qk), take(parts[1], idx_qk), take(parts[2], idx_v)


SHAPES = [  # B, N, heads, d_qk, d_v; on CPU in fp32 the first five are multiplied out, the last two run
    (1, 1, 1, 8, 8),  # torch's fused kernel (more than EXPLICIT_LOGITS logits), narrow q/k or v zero-padded
    (2, 50, 3, 16, 16),
    (1, 197, 2, 24, 40),
    (3, 33, 4, 7, 5),
    (2, 65, 6, 64, 48),
    (3, 197, 3, 24, 40),
    (2, 203, 4, 40, 24),
]


def test_shapes_cover_both_cpu_paths():
    logits = [B * heads * N * N for B, N, heads, _, _ in SHAPES]
    assert max(logits[:5]) <= EXPLICIT_LOGITS < min(logits[5:])


@pytest.mark.parametrize("B, N, heads, d_qk, d_v", SHAPES)
@pytest.mark.parametrize("with_size", [False, True])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 1e-2)])
def test_materialized_layout(B, N, heads, d_qk, d_v, with_size, dtype, tol):
    qkv = torch.randn(B, N, heads * (2 * d_qk + d_v), dtype=dtype)
    size = torch.randint(1, 5, (B, N)).float() if with_size else None
    scale = 64**-0.5
    out = pruned_attention_reference(qkv, heads=heads, d_qk=d_qk, d_v=d_v, scale=scale, size=size)
    ref = attention_float64(*split_materialized(qkv, heads, d_qk, d_v), scale, size)
    assert out.shape == (B, N, heads * d_v) and out.dtype == dtype
    assert rel_err(out, ref) < tol


@pytest.mark.parametrize("B, N, heads, d_qk, d_v", SHAPES)
@pytest.mark.parametrize("with_size", [False, True])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_gather_layout(B, N, heads, d_qk, d_v, with_size, index_dtype):
    head_dim = max(d_qk, d_v) + 3
    qkv = torch.randn(B, N, 3 * heads * head_dim)
    idx_qk = torch.stack([torch.randperm(head_dim)[:d_qk] for _ in range(heads)]).to(index_dtype)
    idx_v = torch.stack([torch.randperm(head_dim)[:d_v] for _ in range(heads)]).to(index_dtype)
    size = torch.rand(B, N) * 4 + 0.5 if with_size else None
    out = pruned_attention_reference(qkv, heads=heads, d_qk=d_qk, d_v=d_v, scale=0.125, size=size, idx_qk=idx_qk, idx_v=idx_v)
    ref = attention_float64(*split_gathered(qkv, heads, idx_qk, idx_v), 0.125, size)
    assert rel_err(out, ref) < 1e-5


def test_gather_with_one_index_keeps_the_other_group_whole():
    heads, head_dim = 2, 8
    qkv = torch.randn(2, 9, 3 * heads * head_dim)
    idx_v = torch.tensor([[1, 4, 6], [0, 2, 7]])
    out = pruned_attention_reference(qkv, heads=heads, d_qk=head_dim, d_v=3, scale=0.3, idx_v=idx_v)
    every = torch.arange(head_dim).expand(heads, -1)
    ref = attention_float64(*split_gathered(qkv, heads, every, idx_v), 0.3, None)
    assert rel_err(out, ref) < 1e-5


def test_unit_size_is_plain_attention_and_duplicated_keys_equal_size():
    """A key of size s weighs as much as s identical keys: the meaning of proportional attention."""
    heads, d = 2, 8
    qkv = torch.randn(1, 5, 3 * heads * d)
    duplicated = torch.cat([qkv, qkv[:, 4:].expand(-1, 2, -1)], dim=1)  # token 4 three times
    size = torch.tensor([[1.0, 1, 1, 1, 3]])
    merged = pruned_attention_reference(qkv, heads=heads, d_qk=d, d_v=d, scale=0.35, size=size)
    plain = pruned_attention_reference(duplicated, heads=heads, d_qk=d, d_v=d, scale=0.35)
    assert rel_err(merged, plain[:, :5]) < 1e-6
    ones = pruned_attention_reference(qkv, heads=heads, d_qk=d, d_v=d, scale=0.35, size=torch.ones(1, 5))
    assert rel_err(ones, pruned_attention_reference(qkv, heads=heads, d_qk=d, d_v=d, scale=0.35)) < 1e-6


def test_non_contiguous_input_and_public_op():
    base = torch.randn(3, 20, 2 * 3 * 16 + 7)
    qkv = base[:, :, 7:]  # strided rows
    out = pruned_attention(qkv, heads=2, d_qk=16, d_v=16, scale=0.25)
    ref = attention_float64(*split_materialized(qkv, 2, 16, 16), 0.25, None)
    assert rel_err(out, ref) < 1e-5


def bad_inputs():
    qkv = torch.randn(2, 10, 2 * (2 * 8 + 8))
    ok = dict(qkv=qkv, heads=2, d_qk=8, d_v=8, scale=0.3)
    gather = dict(ok, qkv=torch.randn(2, 10, 3 * 2 * 8), d_qk=4, idx_qk=torch.zeros(2, 4, dtype=torch.long))
    yield "width", dict(ok, d_v=4), ValueError, "materialized layout needs qkv width"
    yield "rank", dict(ok, qkv=qkv[0]), ValueError, "qkv must have 3 dimensions"
    yield "int qkv", dict(ok, qkv=qkv.long()), TypeError, "qkv must have dtype"
    yield "heads zero", dict(ok, heads=0), ValueError, "heads must be"
    yield "scale", dict(ok, scale=-1.0), ValueError, "scale must be a positive"
    yield "size shape", dict(ok, size=torch.ones(2, 9)), ValueError, "size must have shape"
    yield "size zero", dict(ok, size=torch.zeros(2, 10)), ValueError, "size must be positive"
    yield "size device", dict(ok, size=torch.ones(2, 10, device="meta")), ValueError, "one device"
    yield "gather width", dict(gather, qkv=torch.randn(2, 10, 47)), ValueError, "gather layout needs qkv width"
    yield "idx range", dict(gather, idx_qk=torch.full((2, 4), 8)), ValueError, "idx_qk values must lie in"
    yield "idx negative", dict(gather, idx_qk=torch.full((2, 4), -1)), ValueError, "idx_qk values must lie in"
    yield "idx shape", dict(gather, idx_qk=torch.zeros(3, 4, dtype=torch.long)), ValueError, "idx_qk must have shape"
    yield "idx dtype", dict(gather, idx_qk=torch.zeros(2, 4)), TypeError, "idx_qk must have dtype"
    yield "missing idx_v", dict(gather, d_v=5), ValueError, "idx_v is None"


@pytest.mark.parametrize("case", list(bad_inputs()), ids=lambda c: c[0])
def test_bad_input_is_refused(case):
    _, kwargs, error, message = case
    with pytest.raises(error, match=message):
        pruned_attention_reference(**kwargs)
