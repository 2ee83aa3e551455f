"""Degenerate inputs, every op and every backend (the PyTorch reference, the C++ ATME step on CPU, the
Triton kernels through the interpreter or on a GPU): an empty batch, one image, a 1x1 grid, r = 0,
identical tokens, NaN/Inf rows, strided inputs and a large batch of small images. Each returns what the
reference (or float64 math) returns, or refuses with a clear error; never a crash or a read out of bounds."""

import pytest
import torch

from atme_bruteforce import atme_bruteforce
from cait_kernels import (
    atme_step,
    atme_step_cpu,
    atme_step_reference,
    atme_step_triton,
    backend,
    block_count,
    pruned_attention_reference,
    pruned_attention_triton,
    unmerge,
    unmerge_reference,
    unmerge_triton,
)
from conftest import moved, rel_err
from test_atme import identity_state, merged_state
from test_attention import attention_float64, split_materialized

ATME = {"reference": atme_step_reference, "cpu": atme_step_cpu, "triton": atme_step_triton}
ATTENTION = {"reference": pruned_attention_reference, "triton": pruned_attention_triton}
UNMERGE = {"reference": unmerge_reference, "triton": unmerge_triton}


def call(ops: dict, name: str, device: torch.device, **kwargs):
    """Run backend ``name`` of ``ops`` (Triton on ``device``, the others on the CPU); outputs back on the CPU."""
    out = ops[name](**(moved(kwargs, device) if name == "triton" else kwargs))
    return tuple(t.cpu() for t in out) if isinstance(out, tuple) else out.cpu()


def assert_same_step(out, ref, name: str) -> None:
    """Owners and sizes exactly the reference's; features bit for bit, or within 1e-6 for the Triton kernel
    (it sums ``s * x`` and divides, the reference adds ``s_a / S * (x_a - x_root)`` to the root)."""
    assert torch.equal(out[2], ref[2]) and torch.equal(out[1], ref[1])
    if name == "triton":
        assert rel_err(out[0], ref[0]) < 1e-6
    else:
        assert torch.equal(out[0], ref[0])


def limit(grid, block):
    return grid[0] * grid[1] - block_count(grid, block)


# ---- ATME step -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ATME)
@pytest.mark.parametrize("block, prefix", [(2, 1), (4, 0)])
def test_atme_empty_batch(name, block, prefix, kernel_device, poisoned):
    grid = (5, 7)
    x, size, owner = torch.randn(0, prefix + 35, 6), torch.ones(0, prefix + 35), torch.zeros(0, 35, dtype=torch.int32)  # no storage
    r = limit(grid, block)
    out = call(ATME, name, kernel_device, x=x, metric=x, size=size, owner=owner, r=r, grid=grid, prefix=prefix, block=block)
    assert [tuple(t.shape) for t in out] == [(0, prefix + 35 - r, 6), (0, prefix + 35 - r), (0, 35)]
    assert [t.dtype for t in out] == [torch.float32, torch.float32, torch.int32]


def test_atme_cpu_empty_batch_into_given_outputs():
    x, size, owner = torch.randn(0, 17, 3, dtype=torch.float16), torch.ones(0, 17), torch.zeros(0, 16, dtype=torch.int32)
    out = (torch.empty(0, 14, 3, dtype=torch.float16), torch.empty(0, 14), torch.empty(0, 16, dtype=torch.int32))
    assert atme_step_cpu(x, x, size, owner, r=3, grid=(4, 4), prefix=1, out=out) == out


@pytest.mark.parametrize("name", ATME)
@pytest.mark.parametrize("block", [2, 4])
@pytest.mark.parametrize("prefix", [0, 2])
def test_atme_one_cell_grid(name, block, prefix, kernel_device):
    """A 1x1 grid holds one token in one block: nothing can merge, and r = 1 is refused before any work."""
    x, size, owner = identity_state(3, (1, 1), 5, prefix, torch.float32)
    args = dict(x=x, metric=torch.randn_like(x), size=size, owner=owner, grid=(1, 1), prefix=prefix, block=block)
    out = call(ATME, name, kernel_device, **args, r=0)
    assert all(torch.equal(a, b) for a, b in zip(out, (x, size, owner)))
    with pytest.raises(ValueError, match="can lose at most 0"):
        call(ATME, name, kernel_device, **args, r=1)


@pytest.mark.parametrize("name", ATME)
def test_atme_one_image_and_r_zero(name, kernel_device, poisoned):
    grid = (7, 5)
    x, size, owner = merged_state(1, grid, 9, 1, 2, (6,))
    x, size, metric = x.float(), size.float(), torch.randn(1, x.shape[1], 4)
    out = call(ATME, name, kernel_device, x=x, metric=metric, size=size, owner=owner, r=7, grid=grid, prefix=1, block=2)
    exact = atme_bruteforce(x.double(), metric.double(), size.double(), owner, r=7, grid=grid, prefix=1, block=2)
    assert torch.equal(out[2], exact[2]) and torch.equal(out[1], exact[1].float()) and rel_err(out[0], exact[0]) < 1e-6
    same = call(ATME, name, kernel_device, x=x, metric=metric, size=size, owner=owner, r=0, grid=grid, prefix=1, block=2)
    assert all(torch.equal(a, b) for a, b in zip(same, (x, size, owner)))


@pytest.mark.parametrize("name", ATME)
@pytest.mark.parametrize("block", [2, 4])
@pytest.mark.parametrize("metric_value", [1.0, 0.0])
def test_atme_identical_tokens(name, block, metric_value, kernel_device, poisoned):
    """Every token the same (every similarity ties; a zero metric has similarity 0 everywhere): the tie
    rule alone decides, as in the brute force, and every merged token is the common row again."""
    grid = (6, 7)
    x, size, owner = merged_state(2, grid, 5, 1, block, (5,))
    row = torch.randn(5)
    x, size = row.expand_as(x).float().contiguous(), size.float()
    metric = torch.full((2, x.shape[1], 3), metric_value)
    r = limit(grid, block) - 5
    out = call(ATME, name, kernel_device, x=x, metric=metric, size=size, owner=owner, r=r, grid=grid, prefix=1, block=block)
    exact = atme_bruteforce(x.double(), metric.double(), size.double(), owner, r=r, grid=grid, prefix=1, block=block)
    assert torch.equal(out[2], exact[2]) and torch.equal(out[1], exact[1].float())
    assert rel_err(out[0], row.expand_as(out[0])) < 1e-6


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, inside the Triton interpreter
@pytest.mark.parametrize("name", ATME)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_atme_non_finite_rows_stay_in_their_group(name, bad, kernel_device, poisoned):
    """A NaN/Inf feature spoils only the merged token that holds it; owners and sizes are unaffected."""
    grid = (6, 6)
    x, size, owner = identity_state(3, grid, 8, 1, torch.float32)
    metric = torch.randn_like(x)
    clean = atme_step_reference(x, metric, size, owner, r=12, grid=grid, prefix=1)
    x[0, 5], x[1, 9, 3], x[2, 0, 1] = bad, bad, bad  # spatial rows 4 and 8, and the class token of image 2
    out = call(ATME, name, kernel_device, x=x, metric=metric, size=size, owner=owner, r=12, grid=grid, prefix=1, block=2)
    spoiled = torch.zeros(out[0].shape[:2], dtype=torch.bool)
    spoiled[0, 1 + clean[2][0, 4]] = spoiled[1, 1 + clean[2][1, 8]] = spoiled[2, 0] = True
    assert torch.equal((~out[0].isfinite()).any(-1), spoiled)
    assert_same_step((out[0][~spoiled], out[1], out[2]), (clean[0][~spoiled], clean[1], clean[2]), name)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, inside the Triton interpreter
@pytest.mark.parametrize("name", ATME)
def test_atme_nan_metric_rows_merge_like_the_reference(name, kernel_device):
    """A NaN similarity sorts first (torch's descending sort), in Kruskal and in the selection."""
    grid = (6, 5)
    x, size, owner = identity_state(2, grid, 4, 1, torch.float32)
    metric = torch.randn(2, x.shape[1], 3)
    metric[0, 4], metric[1, 7:12] = float("nan"), float("nan")
    metric[1, 20, 0] = float("inf")
    args = dict(x=x, metric=metric, size=size, owner=owner, r=9, grid=grid, prefix=1, block=2)
    ref = atme_step_reference(**args)
    out = call(ATME, name, kernel_device, **args)
    assert_same_step(out, ref, name)


@pytest.mark.parametrize("name", ATME)
def test_atme_strided_inputs(name, kernel_device, poisoned):
    """Views with batch/token strides of a larger buffer give the contiguous answer; a channel stride
    is read right by the reference and the C++ kernel and refused by the Triton kernel."""
    grid = (5, 6)
    x, size, owner = merged_state(3, grid, 10, 1, 2, (4,))
    x, size, metric = x.float(), size.float(), torch.randn(3, x.shape[1], 6)
    args = dict(r=8, grid=grid, prefix=1, block=2)
    ref = atme_step_reference(x, metric, size, owner, **args)
    views = dict(
        x=x.transpose(0, 1).contiguous().transpose(0, 1),
        metric=torch.cat([metric, metric], -1)[..., :6],
        size=size.t().contiguous().t(),
        owner=torch.stack([owner, owner], 1)[:, 0],
    )
    assert_same_step(call(ATME, name, kernel_device, **views, **args), ref, name)
    channel_strided = torch.stack([x, x], -1).flatten(-2)[..., ::2]
    if name == "triton":
        with pytest.raises(ValueError, match="channels must be contiguous"):
            call(ATME, name, kernel_device, x=channel_strided, metric=metric, size=size, owner=owner, **args)
        with backend("triton"):  # the public op copies such an input first
            out = atme_step(**moved(dict(x=channel_strided, metric=metric, size=size, owner=owner), kernel_device), **args)
        assert_same_step([t.cpu() for t in out], ref, name)
    else:
        assert_same_step(call(ATME, name, kernel_device, x=channel_strided, metric=metric, size=size, owner=owner, **args), ref, name)


@pytest.mark.parametrize("name", ATME)
@pytest.mark.parametrize("grid", [(2, 3), (1, 2)])
def test_atme_large_batch_of_small_grids(name, grid, kernel_device, poisoned):
    x, size, owner = identity_state(300, grid, 7, 1, torch.float32)
    metric = torch.randn(300, x.shape[1], 4)
    r = limit(grid, 2)
    args = dict(x=x, metric=metric, size=size, owner=owner, r=r, grid=grid, prefix=1, block=2)
    ref = atme_step_reference(**args)
    assert_same_step(call(ATME, name, kernel_device, **args), ref, name)


# ---- pruned attention ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ATTENTION)
@pytest.mark.parametrize("B, N", [(0, 9), (3, 0), (0, 0)])
def test_attention_empty(name, B, N, kernel_device, poisoned):
    qkv = torch.randn(B, N, 2 * (2 * 8 + 6))
    size = torch.ones(B, N)
    out = call(ATTENTION, name, kernel_device, qkv=qkv, heads=2, d_qk=8, d_v=6, scale=0.3, size=size)
    assert out.shape == (B, N, 12) and out.dtype == torch.float32


@pytest.mark.parametrize("name", ATTENTION)
@pytest.mark.parametrize("B, N", [(1, 1), (1, 5), (3, 1)])
def test_attention_one_image_or_one_token(name, B, N, kernel_device, poisoned):
    qkv = torch.randn(B, N, 3 * (2 * 16 + 8))
    size = torch.randint(1, 5, (B, N)).float()
    out = call(ATTENTION, name, kernel_device, qkv=qkv, heads=3, d_qk=16, d_v=8, scale=0.25, size=size)
    assert rel_err(out, attention_float64(*split_materialized(qkv, 3, 16, 8), 0.25, size)) < 1e-5


@pytest.mark.parametrize("name", ATTENTION)
def test_attention_identical_tokens_return_their_value(name, kernel_device, poisoned):
    row = torch.randn(2 * (2 * 12 + 10))
    qkv = row.expand(2, 23, -1).contiguous()
    out = call(ATTENTION, name, kernel_device, qkv=qkv, heads=2, d_qk=12, d_v=10, scale=0.3, size=torch.rand(2, 23) + 0.5)
    assert rel_err(out, row[-20:].expand_as(out)) < 1e-6


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, inside the Triton interpreter
@pytest.mark.parametrize("name", ATTENTION)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_attention_non_finite_keys_and_values_spoil_their_image(name, bad, kernel_device, poisoned):
    """A non-finite key or value spoils every query of its image and head (all attend to it), a
    non-finite token (as a NaN pixel makes one) its whole image; other images stay exact."""
    heads, d = 2, 8
    qkv = torch.randn(4, 11, heads * 3 * d)
    qkv[1, 6, heads * d + 1] = bad  # key of token 6, head 0
    qkv[2, 2, 2 * heads * d + d] = bad  # value of token 2, head 1
    qkv[3, 5] = bad  # every channel of token 5
    out = call(ATTENTION, name, kernel_device, qkv=qkv, heads=heads, d_qk=d, d_v=d, scale=0.35)
    ref = attention_float64(*split_materialized(qkv, heads, d, d), 0.35, None)
    finite = ref.isfinite()
    assert torch.equal(out.isfinite(), finite) and finite[0].all()
    assert rel_err(out[finite], ref[finite]) < 1e-5


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, inside the Triton interpreter
@pytest.mark.parametrize("name", ATTENTION)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_attention_non_finite_query(name, bad, kernel_device, poisoned):
    """A non-finite query alone spoils that row, as float64 math does, on every backend (the CPU
    reference multiplies small attentions out; torch's fused SDPA, which timm uses, returns zeros for a
    NaN query row on CPU instead: pytorch/pytorch#141128)."""
    heads, d = 2, 8
    qkv = torch.randn(2, 11, heads * 3 * d)
    qkv[0, 4, 0] = bad  # query of token 4, head 0
    out = call(ATTENTION, name, kernel_device, qkv=qkv, heads=heads, d_qk=d, d_v=d, scale=0.35)
    ref = attention_float64(*split_materialized(qkv, heads, d, d), 0.35, None)
    assert torch.equal(out.isfinite(), ref.isfinite()) and not out[0, 4, :d].isfinite().any()
    assert rel_err(out[ref.isfinite()], ref[ref.isfinite()]) < 1e-5


# ---- unmerge ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", UNMERGE)
@pytest.mark.parametrize("batch, grid, channels", [(0, (4, 5), 6), (3, (1, 1), 5), (2, (3, 3), 0), (1, (7, 3), 130)])
def test_unmerge_degenerate_shapes(name, batch, grid, channels, kernel_device, poisoned):
    cells = grid[0] * grid[1]
    x = torch.randn(batch, 1 + cells, channels)
    owner = torch.randint(0, cells, (batch, cells), dtype=torch.int32)
    out = call(UNMERGE, name, kernel_device, x=x, owner=owner, prefix=1)
    assert out.shape == (batch, cells, channels)
    assert torch.equal(out, x[:, 1:].gather(1, owner.long()[..., None].expand(-1, -1, channels)))


@pytest.mark.parametrize("name", UNMERGE)
def test_unmerge_strided_inputs(name, kernel_device, poisoned):
    x = torch.randn(4, 30, 9).transpose(0, 1).contiguous().transpose(0, 1)[:, 1:]  # batch/token strides
    owner = torch.randint(0, 27, (8, 16), dtype=torch.int32)[::2]
    out = call(UNMERGE, name, kernel_device, x=x, owner=owner, prefix=2)
    assert torch.equal(out, x[:, 2:].gather(1, owner.long()[..., None].expand(-1, -1, 9)))
    channel_strided = torch.randn(4, 9, 29).transpose(1, 2)  # as timm's patch embedding leaves it
    device = kernel_device if name == "triton" else torch.device("cpu")
    with backend(name):
        out = unmerge(channel_strided.to(device), owner.to(device), prefix=2)
    assert torch.equal(out.cpu(), channel_strided[:, 2:].gather(1, owner.long()[..., None].expand(-1, -1, 9)))
