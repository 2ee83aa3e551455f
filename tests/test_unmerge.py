"""Unmerge reference against a per-cell loop, and its errors."""
import pytest
import torch

from cait_kernels import atme_step_reference, unmerge, unmerge_reference


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


def test_bad_input_is_refused():
    x, owner = torch.randn(2, 5, 3), torch.zeros(2, 9, dtype=torch.int32)
    with pytest.raises(ValueError, match="owner values must lie in"):
        unmerge_reference(x, owner + 4, prefix=1)
    with pytest.raises(TypeError, match="owner must have dtype"):
        unmerge_reference(x, owner.long(), prefix=1)
    with pytest.raises(ValueError, match="batch"):
        unmerge_reference(x, owner[:1], prefix=1)
    with pytest.raises(ValueError, match="prefix must be"):
        unmerge_reference(x, owner, prefix=5)
