"""The Triton ATME step (through the interpreter on CPU) against the reference and the brute force."""

import pytest
import torch

import test_atme
from atme_bruteforce import atme_bruteforce
from cait_kernels import atme_step, atme_step_reference, atme_step_triton, backend
from conftest import moved, rel_err
from test_atme import CASES, TIE_GRIDS, TIE_KINDS, identity_state, merged_state, tie_case

TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3}


@pytest.mark.parametrize("grid, block, batch, prefix, steps, r", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_matches_reference_and_float64(grid, block, batch, prefix, steps, r, dtype, poisoned, kernel_device):
    x, size, owner = merged_state(batch, grid, 12, prefix, block, steps)
    metric = torch.randn(x.shape[0], x.shape[1], 7)
    x, size = x.to(dtype), size.float()
    args = moved(dict(x=x, metric=metric, size=size, owner=owner), kernel_device)
    out = [t.cpu() for t in atme_step_triton(**args, r=r, grid=grid, prefix=prefix, block=block)]
    ref = atme_step_reference(x, metric, size, owner, r=r, grid=grid, prefix=prefix, block=block)
    exact = atme_bruteforce(x.double(), metric.double(), size.double(), owner, r=r, grid=grid, prefix=prefix, block=block)
    assert torch.equal(out[2], ref[2]) and torch.equal(out[1], ref[1])
    assert out[0].dtype == dtype and out[0].shape == ref[0].shape
    assert rel_err(out[0], exact[0]) < TOLERANCE[dtype]


@pytest.mark.parametrize("grid, block", TIE_GRIDS)
@pytest.mark.parametrize("kind", TIE_KINDS)
def test_ties_break_like_the_reference(grid, block, kind, kernel_device):
    x, size, owner, metric, r = tie_case(grid, block, kind, torch.float32)
    out = [
        t.cpu()
        for t in atme_step_triton(
            **moved(dict(x=x, metric=metric, size=size, owner=owner), kernel_device), r=r, grid=grid, prefix=1, block=block
        )
    ]
    ref = atme_step_reference(x, metric, size, owner, r=r, grid=grid, prefix=1, block=block)
    assert torch.equal(out[2], ref[2]) and torch.equal(out[1], ref[1])


def test_repeat_is_bit_identical_and_lone_tokens_are_copied_exactly(kernel_device):
    x, size, owner = merged_state(3, (14, 14), 40, 1, 2, (12,))
    x, size, metric = x.float(), size.float(), torch.randn(3, x.shape[1], 16)
    args = moved(dict(x=x, metric=metric, size=size, owner=owner), kernel_device)
    first = atme_step_triton(**args, r=13, grid=(14, 14), prefix=1)
    second = atme_step_triton(**args, r=13, grid=(14, 14), prefix=1)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    new_x, new_size, new_owner = (t.cpu() for t in first)
    assert torch.equal(new_x[:, :1], x[:, :1])  # prefix rows copied through
    cells = torch.arange(new_owner.shape[1]).expand(3, -1)
    anchor = torch.full(new_size[:, 1:].shape, cells.shape[1]).scatter_reduce(1, new_owner.long(), cells, "amin")
    old = owner.long().gather(1, anchor)  # the old token at each new token's anchor
    lone = new_size[:, 1:] == size[:, 1:].gather(1, old)  # it absorbed nothing
    assert lone.any() and (~lone).any()
    assert torch.equal(new_x[:, 1:][lone], x[:, 1:].gather(1, old[..., None].expand(-1, -1, 40))[lone])


def test_public_op_under_the_triton_backend_and_r_zero(kernel_device):
    x, size, owner = (t.to(kernel_device) for t in identity_state(2, (5, 5), 8, 1, torch.float32))
    metric = torch.randn_like(x)
    with backend("triton"):
        assert atme_step(x, metric, size, owner, r=0, grid=(5, 5), prefix=1) == (x, size, owner)
        out = atme_step(x, metric, size, owner, r=7, grid=(5, 5), prefix=1)
    ref = atme_step_reference(x, metric, size, owner, r=7, grid=(5, 5), prefix=1)
    assert torch.equal(out[2], ref[2]) and rel_err(out[0], ref[0]) < 1e-6


def kernel_bad_inputs():
    x, size, owner = identity_state(2, (4, 4), 3, 1, torch.float32)
    ok = dict(x=x, metric=x, size=size, owner=owner, r=3, grid=(4, 4), prefix=1, block=2)
    yield "float64", dict(ok, x=x.double()), TypeError, "run float64 through the reference"
    yield "strided channels", dict(ok, x=torch.randn(2, 17, 6)[..., ::2]), ValueError, "channels must be contiguous"


@pytest.mark.parametrize("case", list(test_atme.bad_inputs()) + list(kernel_bad_inputs()), ids=lambda c: c[0])
def test_bad_input_is_refused_before_launch(case, kernel_device):
    _, kwargs, error, message = case
    kwargs = moved(kwargs, kernel_device)
    with pytest.raises(error, match=message):
        atme_step_triton(**kwargs)
    if case[0] == "strided channels":  # the public op copies such inputs for the kernel (tested with the public op)
        return
    with backend("triton"), pytest.raises(error, match=message):
        atme_step(**kwargs)
