"""The ATME reference step against the brute-force definition, its invariants, and its errors."""
import pytest
import torch

from atme_bruteforce import atme_bruteforce, blocks_of
from cait_kernels import atme_step, atme_step_reference, block_count
from conftest import rel_err


def identity_state(batch, grid, channels, prefix, dtype=torch.float64):
    """A fresh token state: one token per cell, random features and metric."""
    tokens = prefix + grid[0] * grid[1]
    x = torch.randn(batch, tokens, channels, dtype=dtype)
    size = torch.ones(batch, tokens)
    owner = torch.arange(grid[0] * grid[1], dtype=torch.int32).expand(batch, -1).contiguous()
    return x, size, owner


def merged_state(batch, grid, channels, prefix, block, steps):
    """A state after ``steps`` random merges, so sizes and owners are not trivial."""
    x, size, owner = identity_state(batch, grid, channels, prefix)
    for r in steps:
        x, size, owner = atme_step_reference(x, torch.randn_like(x), size, owner, r=r, grid=grid, prefix=prefix, block=block)
    return x, size.double(), owner


CASES = [  # grid, block, batch, prefix, earlier merges, r
    ((4, 4), 2, 1, 1, (), 5),
    ((5, 7), 2, 3, 1, (4,), 6),
    ((7, 5), 2, 2, 2, (3, 3), 9),
    ((6, 6), 2, 2, 5, (), 27),  # everything a 2x2 tiling allows
    ((9, 11), 4, 2, 1, (), 20),
    ((8, 8), 4, 3, 0, (10, 10), 15),
    ((5, 6), 4, 2, 1, (6,), 18),
    ((1, 5), 2, 2, 1, (), 2),  # a single row: border tiles hold one or two cells
]


@pytest.mark.parametrize("grid, block, batch, prefix, steps, r", CASES)
def test_matches_bruteforce(grid, block, batch, prefix, steps, r):
    x, size, owner = merged_state(batch, grid, 12, prefix, block, steps)
    metric = torch.randn(x.shape[0], x.shape[1], 7, dtype=torch.float64)
    out = atme_step_reference(x, metric, size, owner, r=r, grid=grid, prefix=prefix, block=block)
    ref = atme_bruteforce(x, metric, size, owner, r=r, grid=grid, prefix=prefix, block=block)
    assert torch.equal(out[2], ref[2])
    assert torch.equal(out[1], ref[1])
    assert rel_err(out[0], ref[0]) < 1e-12


TIE_GRIDS = [((6, 6), 2), ((7, 9), 2), ((8, 8), 4), ((6, 7), 4)]
TIE_KINDS = ["constant", "few_values"]


def tie_case(grid, block, kind, dtype=torch.float64):
    """A state with exact ties: ``(x, size, owner, metric, r)`` with half the possible merges.
    ``constant``: every similarity is exactly 1, only the tie rule decides; ``few_values``: small
    integer vectors, many exact ties among different similarities."""
    x, size, owner = identity_state(2, grid, 5, 1, dtype)
    if kind == "constant":
        metric = torch.ones(x.shape[0], x.shape[1], 3, dtype=dtype)
    else:
        metric = torch.randint(-1, 2, (x.shape[0], x.shape[1], 2)).to(dtype)
        metric[metric.norm(dim=-1) == 0] = 1.0
    return x, size, owner, metric, (grid[0] * grid[1] - block_count(grid, block)) // 2


@pytest.mark.parametrize("grid, block", TIE_GRIDS)
@pytest.mark.parametrize("kind", TIE_KINDS)
def test_ties_break_by_block_then_token_index(grid, block, kind):
    x, size, owner, metric, r = tie_case(grid, block, kind)
    out = atme_step_reference(x, metric, size, owner, r=r, grid=grid, prefix=1, block=block)
    ref = atme_bruteforce(x, metric, size, owner, r=r, grid=grid, prefix=1, block=block)
    assert torch.equal(out[2], ref[2]) and torch.equal(out[1], ref[1].float())


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 1e-2)])
def test_low_precision_features(dtype, tol):
    grid = (7, 6)
    x, size, owner = merged_state(2, grid, 16, 1, 2, (5,))
    metric = torch.randn(x.shape[0], x.shape[1], 8, dtype=torch.float64)
    out = atme_step_reference(x.to(dtype), metric, size.float(), owner, r=8, grid=grid, prefix=1)
    ref = atme_bruteforce(x.to(dtype).double(), metric, size, owner, r=8, grid=grid, prefix=1, block=2)
    assert out[0].dtype == dtype and out[1].dtype == torch.float32 and out[2].dtype == torch.int32
    assert torch.equal(out[2], ref[2])
    assert rel_err(out[0], ref[0]) < tol


def cells_of_tokens(owner_row, n):
    return [torch.nonzero(owner_row == t).flatten().tolist() for t in range(n)]


def is_connected(cells, width):
    cells, seen, todo = set(cells), set(), [min(cells)]
    while todo:
        c = todo.pop()
        if c in seen:
            continue
        seen.add(c)
        i, j = divmod(c, width)
        todo += [d for d in (c - width, c + width, c - 1 if j else -1, c + 1 if j + 1 < width else -1) if d in cells]
    return seen == cells


@pytest.mark.parametrize("grid, block, schedule", [((8, 8), 2, (10, 20, 18)), ((9, 7), 2, (14, 14, 3)), ((10, 10), 4, (40, 30, 20))])
def test_invariants_over_several_steps(grid, block, schedule):
    prefix, batch = 2, 3
    x, size, owner = identity_state(batch, grid, 6, prefix, torch.float32)
    tile = blocks_of(grid, block)
    for r in schedule:
        before = x.shape[1]
        x, size, owner = atme_step_reference(x, torch.randn_like(x), size, owner, r=r, grid=grid, prefix=prefix, block=block)
        n = x.shape[1] - prefix
        assert x.shape[1] == before - r and size.shape == (batch, prefix + n)
        assert torch.equal(size.sum(1), torch.full((batch,), float(prefix + grid[0] * grid[1])))
        assert torch.equal(size[:, :prefix], torch.ones(batch, prefix))
        for img in range(batch):
            cells = cells_of_tokens(owner[img], n)
            assert all(cells), "every token holds at least one cell"
            assert [float(len(c)) for c in cells] == size[img, prefix:].tolist()
            anchors = [min(c) for c in cells]
            assert anchors == sorted(anchors), "tokens stay in raster order of their anchor"
            for c in cells:
                assert len(set(tile[c].tolist())) == 1, "a token never leaves its tile"
                assert is_connected(c, grid[1]), "a token's cells are connected"


def test_merged_features_are_size_weighted_means():
    grid = (6, 6)
    x, size, owner = merged_state(2, grid, 4, 1, 2, (7,))
    metric = torch.randn(2, x.shape[1], 3, dtype=torch.float64)
    out, new_size, new_owner = atme_step_reference(x, metric, size, owner, r=9, grid=grid, prefix=1)
    cells_x = x[:, 1:].gather(1, owner.long()[..., None].expand(-1, -1, 4))  # every cell's old feature
    for img in range(2):
        for t in range(out.shape[1] - 1):
            cells = new_owner[img] == t
            assert torch.allclose(out[img, 1 + t], cells_x[img][cells].mean(0))


def test_repeat_is_bit_identical():
    x, size, owner = merged_state(4, (14, 14), 32, 1, 2, (12,))
    metric = torch.randn_like(x)
    first = atme_step_reference(x, metric, size, owner, r=13, grid=(14, 14), prefix=1)
    second = atme_step_reference(x, metric, size, owner, r=13, grid=(14, 14), prefix=1)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_r_zero_changes_nothing_and_public_op_dispatches_to_reference():
    x, size, owner = identity_state(2, (4, 4), 3, 1)
    assert atme_step(x, x, size, owner, r=0, grid=(4, 4), prefix=1) == (x, size, owner)
    metric = torch.randn_like(x)
    out = atme_step(x, metric, size, owner, r=3, grid=(4, 4), prefix=1)
    ref = atme_step_reference(x, metric, size, owner, r=3, grid=(4, 4), prefix=1)
    assert all(torch.equal(a, b) for a, b in zip(out, ref))


def test_gradients_flow_through_merged_features():
    x, size, owner = identity_state(2, (4, 4), 3, 1, torch.float32)
    x.requires_grad_(True)
    out, _, _ = atme_step_reference(x, x.detach(), size, owner, r=5, grid=(4, 4), prefix=1)
    out.sum().backward()
    assert torch.allclose(x.grad.sum(), torch.tensor(float(out.numel())), rtol=1e-5)


def bad_inputs():
    x, size, owner = identity_state(2, (4, 4), 3, 1, torch.float32)
    ok = dict(x=x, metric=x, size=size, owner=owner, r=3, grid=(4, 4), prefix=1, block=2)
    yield "merges too much", dict(ok, r=13), ValueError, "at most 12"
    yield "4x4 tiles", dict(ok, r=16, block=4), ValueError, "at most 15"
    yield "negative r", dict(ok, r=-1), ValueError, "r must be"
    yield "float r", dict(ok, r=2.0), TypeError, "r must be an int"
    yield "block 3", dict(ok, block=3), ValueError, "block must be one of"
    yield "grid mismatch", dict(ok, grid=(4, 5)), ValueError, "owner must have shape"
    yield "owner int64", dict(ok, owner=owner.long()), TypeError, "owner must have dtype"
    yield "owner out of range", dict(ok, owner=owner.clone().fill_(16)), ValueError, "owner values must lie in"
    yield "metric rows", dict(ok, metric=x[:, :5]), ValueError, "metric must have shape"
    yield "size shape", dict(ok, size=size[:, 1:]), ValueError, "size must have shape"
    yield "x rank", dict(ok, x=x[0]), ValueError, "x must have 3 dimensions"
    yield "x int", dict(ok, x=x.long()), TypeError, "x must have dtype"
    yield "prefix too big", dict(ok, prefix=17), ValueError, "prefix must be"
    yield "too few tokens", dict(ok, x=x[:, :4], metric=x[:, :4], size=size[:, :4]), ValueError, "spatial tokens"
    yield "meta device", dict(ok, size=size.to("meta")), ValueError, "one device"


@pytest.mark.parametrize("case", list(bad_inputs()), ids=lambda c: c[0])
def test_bad_input_is_refused(case):
    _, kwargs, error, message = case
    with pytest.raises(error, match=message):
        atme_step_reference(**kwargs)
