"""Property tests of the ATME step over the whole input space: grids 1..20 x 1..20 (odd, non-square),
tiles 2 and 4, prefix 0..5, batch 0..5, merge schedules up to the limit, feature dtypes, and metrics with
ties. The C++ step equals the reference bit for bit, the reference equals the brute force (owners and
sizes exactly, features within DESIGN.md's tolerances), and the token-state invariants hold.

Hypothesis runs a fixed, bounded set of examples by default (``derandomize``, see ``conftest.py``);
``HYPOTHESIS_PROFILE=long`` explores many more, with fresh randomness.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from atme_bruteforce import atme_bruteforce, blocks_of
from cait_kernels import atme_step_cpu, atme_step_reference, atme_step_triton, block_count
from conftest import moved, rel_err
from test_atme import cells_of_tokens, is_connected

TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


@st.composite
def atme_cases(draw, dtypes=tuple(TOLERANCE)):
    """``(x, metric, size, owner, kwargs)``: a token state after a random schedule of earlier merges, and
    the arguments of one more step (its ``r`` anywhere up to what is left of the limit)."""
    height, width = draw(st.integers(1, 20)), draw(st.integers(1, 20))
    block = draw(st.sampled_from([2, 4]))
    prefix, batch = draw(st.integers(0, 5)), draw(st.integers(0, 5))
    channels, metric_channels = draw(st.integers(1, 9)), draw(st.integers(1, 6))
    dtype = draw(st.sampled_from(dtypes))
    metric_kind = draw(st.sampled_from(["normal", "ties", "constant"]))
    limit = height * width - block_count((height, width), block)
    earlier = draw(st.lists(st.integers(0, limit), max_size=3).filter(lambda steps: sum(steps) <= limit))
    r = draw(st.integers(0, limit - sum(earlier)))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    grid, cells = (height, width), height * width

    def metric_for(tokens):
        if metric_kind == "normal":
            return torch.randn(batch, tokens, metric_channels, generator=generator, dtype=torch.float64)
        if metric_kind == "ties":  # small integer vectors: many exactly equal similarities
            return torch.randint(-1, 2, (batch, tokens, metric_channels), generator=generator).double()
        return torch.ones(batch, tokens, metric_channels, dtype=torch.float64)  # every similarity ties

    x = torch.randn(batch, prefix + cells, channels, generator=generator, dtype=torch.float64)
    size = torch.ones(batch, prefix + cells, dtype=torch.float64)
    owner = torch.arange(cells, dtype=torch.int32).expand(batch, -1).contiguous()
    for step in earlier:
        x, size, owner = atme_step_reference(x, metric_for(x.shape[1]), size, owner, r=step, grid=grid, prefix=prefix, block=block)
    metric = metric_for(x.shape[1])
    return x.to(dtype), metric.to(dtype), size.float(), owner, dict(r=r, grid=grid, prefix=prefix, block=block)


def check_invariants(x, size, owner, *, r, grid, prefix, block, tokens_before):
    """Shapes; every token holds its count of connected cells inside one tile; anchors in raster order."""
    batch, cells = owner.shape
    n = tokens_before - prefix - r
    assert x.shape[:2] == (batch, prefix + n) and size.shape == (batch, prefix + n)
    tile = blocks_of(grid, block)
    for image in range(batch):
        assert torch.equal(size[image].sum(), torch.tensor(float(prefix + cells)))
        token_cells = cells_of_tokens(owner[image], n)
        assert [float(len(c)) for c in token_cells] == size[image, prefix:].tolist(), "sizes count the cells"
        anchors = [min(c) for c in token_cells]
        assert anchors == sorted(anchors), "tokens stay in raster order of their anchor"
        for c in token_cells:
            assert len(set(tile[c].tolist())) == 1, "a token never leaves its tile"
            assert is_connected(c, grid[1]), "a token's cells are connected"


@given(case=atme_cases())
def test_cpu_step_equals_reference_equals_bruteforce(case):
    x, metric, size, owner, args = case
    ref = atme_step_reference(x, metric, size, owner, **args)
    out = atme_step_cpu(x, metric, size, owner, **args)
    assert all(torch.equal(a, b) for a, b in zip(out, ref)), "the C++ step is the reference, bit for bit"
    check_invariants(*ref, **args, tokens_before=x.shape[1])
    if x.shape[0]:
        exact = atme_bruteforce(x.double(), metric.double(), size.double(), owner, **args)
        assert torch.equal(ref[2], exact[2]) and torch.equal(ref[1], exact[1].float())
        assert rel_err(ref[0], exact[0]) < TOLERANCE[x.dtype]


@settings(max_examples=max(5, settings.default.max_examples // 3))  # the interpreter is slow: a third as many
@given(case=atme_cases(dtypes=(torch.float32, torch.float16)))
def test_triton_step_equals_reference(case, kernel_device):
    x, metric, size, owner, args = case
    ref = atme_step_reference(x, metric, size, owner, **args)
    out = [t.cpu() for t in atme_step_triton(**moved(dict(x=x, metric=metric, size=size, owner=owner), kernel_device), **args)]
    assert torch.equal(out[2], ref[2]) and torch.equal(out[1], ref[1])
    assert out[0].dtype == x.dtype and out[0].shape == ref[0].shape
    if x.shape[0]:
        exact = atme_bruteforce(x.double(), metric.double(), size.double(), owner, **args)
        assert rel_err(out[0], exact[0]) < TOLERANCE[x.dtype]


@pytest.mark.parametrize("block", [2, 4])
def test_cpu_step_stops_at_the_limit(block):
    """At the limit every tile holds one token; one more merge is refused before any work."""
    grid = (7, 9)
    cells, limit = 63, 63 - block_count(grid, block)
    x = torch.randn(2, 1 + cells, 3)
    owner = torch.arange(cells, dtype=torch.int32).expand(2, -1).contiguous()
    out = atme_step_cpu(x, torch.randn_like(x), torch.ones(2, 1 + cells), owner, r=limit, grid=grid, prefix=1, block=block)
    assert torch.equal(out[2], blocks_of(grid, block).int().expand(2, -1))
    with pytest.raises(ValueError, match=f"can lose at most {limit}"):
        atme_step_cpu(x, x, torch.ones(2, 1 + cells), owner, r=limit + 1, grid=grid, prefix=1, block=block)
