"""Unmerge (reference and Triton kernel) against a per-cell loop, and its errors."""

import pytest
import torch

from cait_kernels import atme_step_reference, backend, unmerge, unmerge_reference, unmerge_triton


@pytest.mark.parametrize("batch, grid, prefix, r", [(1, (4, 4), 1, 5), (3, (7, 5), 2, 9), (2, (6, 9), 0, 0)])
def test_every_cell_gets_its_token(batch, grid, prefix, r):
    cells = grid[0] * grid[1]
    x = torch.randn(batch, prefix + cells, 6, dtype=torch.float64)
    owner = torch.arange(cells, dtype=torch.int32).expand(batch, -1).contiguous()
    x, _, owner = atme_step_reference(x, torch.randn_like(x), torch.ones(batch, prefix + cells), owner, r=r, grid=grid, prefix=prefix)
    out = unmerge_reference(x, owner, prefix=prefix)
    assert out.shape == (batch, cells, 6)
    for b in range(batch):
        for c in range(cells):
            assert torch.equal(out[b, c], x[b, prefix + int(owner[b, c])])
    assert torch.equal(unmerge(x, owner, prefix=prefix), out)


@pytest.mark.parametrize("batch, grid, prefix, r, channels", [(1, (4, 4), 1, 5, 6), (3, (7, 5), 2, 9, 130), (2, (6, 9), 0, 0, 33)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_kernel_equals_reference(batch, grid, prefix, r, channels, dtype, poisoned, kernel_device):
    cells = grid[0] * grid[1]
    x = torch.randn(batch, prefix + cells, channels)
    owner = torch.arange(cells, dtype=torch.int32).expand(batch, -1).contiguous()
    x, _, owner = atme_step_reference(x, torch.randn_like(x), torch.ones(batch, prefix + cells), owner, r=r, grid=grid, prefix=prefix)
    x, owner = x.to(kernel_device, dtype), owner.to(kernel_device)
    assert torch.equal(unmerge_triton(x, owner, prefix=prefix), unmerge_reference(x, owner, prefix=prefix))
    with backend("triton"):
        assert torch.equal(unmerge(x, owner, prefix=prefix), unmerge_reference(x, owner, prefix=prefix))


@pytest.mark.parametrize("impl", [unmerge_reference, unmerge_triton])
def test_bad_input_is_refused_by_both(impl, kernel_device):
    x, owner = torch.randn(2, 5, 3, device=kernel_device), torch.zeros(2, 9, dtype=torch.int32, device=kernel_device)
    with pytest.raises(ValueError, match="owner values must lie in"):
        impl(x, owner + 4, prefix=1)
    with pytest.raises(TypeError, match="owner must have dtype"):
        impl(x, owner.long(), prefix=1)
    with pytest.raises(ValueError, match="batch"):
        impl(x, owner[:1], prefix=1)
    with pytest.raises(ValueError, match="prefix must be"):
        impl(x, owner, prefix=5)
