"""ATME: asymmetric merging of neighbouring tokens inside aligned ``block x block`` cells of the patch grid.

Token state (DESIGN.md): ``x (B, P+N, C)`` with ``P`` prefix tokens first and ``N`` spatial tokens in
raster order of their anchor (smallest cell index), ``size (B, P+N)`` cells per token (prefix: 1),
``owner (B, H*W)`` int32 spatial token index of every cell.

One step with count ``r``:

1. similarity of two tokens = cosine of their metric rows (keys averaged over heads), computed in
   float64 and rounded to float32, so implementations that sum in different orders still agree
   exactly on the rounded values (and on every tie between them);
2. candidates: per block, the maximum spanning forest (Kruskal) over pairs of tokens whose cells share
   an edge inside the block;
3. per image, the ``r`` strongest forest edges; every tie, inside Kruskal too, breaks by
   (block raster index, smaller token index, larger token index), lowest first;
4. each joined group becomes one token: size-weighted mean of the features, summed size, the smallest
   anchor of the group; survivors keep raster order and ``owner`` is rewritten.

A block holding ``t`` tokens offers ``t - 1`` forest edges, so ``r <= N - blocks`` is the limit.
"""
from __future__ import annotations

import functools
import math

import torch

from ._checks import FLOAT_DTYPES, check_index_range, check_int, check_same_device, check_shape, check_tensor
from ._rows import take_rows

BLOCK_SIZES = (2, 4)
NORM_EPS = 1e-12  # as F.normalize: a zero metric row has similarity 0 with everything


def block_count(grid: tuple[int, int], block: int) -> int:
    """Number of aligned ``block x block`` tiles covering ``grid`` (border tiles may be smaller)."""
    return math.ceil(grid[0] / block) * math.ceil(grid[1] / block)


def check_atme_inputs(x, metric, size, owner, *, r, grid, prefix, block, owner_values: bool = True) -> None:
    """Validate the arguments of :func:`atme_step`; raise a clear error before any work.
    ``owner_values=False`` leaves the range of ``owner``'s values to the caller (the C++ kernel checks
    them while it reads them, which saves a reduction and two host reads per step)."""
    check_tensor("x", x, 3, FLOAT_DTYPES)
    check_tensor("metric", metric, 3, FLOAT_DTYPES)
    check_tensor("size", size, 2, FLOAT_DTYPES)
    check_tensor("owner", owner, 2, (torch.int32,))
    check_same_device(x=x, metric=metric, size=size, owner=owner)
    if block not in BLOCK_SIZES:
        raise ValueError(f"block must be one of {BLOCK_SIZES}, got {block!r}")
    if not (isinstance(grid, (tuple, list)) and len(grid) == 2):
        raise ValueError(f"grid must be a pair (H, W), got {grid!r}")
    check_int("grid height", grid[0], 1)
    check_int("grid width", grid[1], 1)
    B, T, _ = x.shape
    check_int("prefix", prefix, 0, T - 1)
    check_shape("metric", metric, (B, T, metric.shape[-1]), "(B, P+N, Cm)")
    check_shape("size", size, (B, T), "(B, P+N)")
    check_shape("owner", owner, (B, grid[0] * grid[1]), "(B, H*W)")
    n_tokens, n_blocks = T - prefix, block_count(grid, block)
    if not n_blocks <= n_tokens <= grid[0] * grid[1]:
        raise ValueError(
            f"x holds {n_tokens} spatial tokens; a {grid[0]}x{grid[1]} grid in {n_blocks} blocks allows {n_blocks}..{grid[0] * grid[1]}"
        )
    check_int("r", r, 0)
    if r > n_tokens - n_blocks:
        raise ValueError(
            f"r={r} merges too much: {n_tokens} tokens in {n_blocks} blocks of {block}x{block} "
            f"can lose at most {n_tokens - n_blocks} (one token must stay per block)"
        )
    if owner_values:
        check_index_range("owner", owner, n_tokens, "N")


def block_edges(height: int, width: int, block: int, device: torch.device):
    """Cell edges inside every block, as ``(first, second, valid)``, each ``(blocks, slots)``.

    Blocks are in raster order; a block has ``2*block*(block-1)`` edge slots (horizontal then
    vertical); slots reaching outside a smaller border block are invalid and point at cell 0.
    New tensors on every call from a cache of plain ints: a cached tensor made while ``torch.export``
    or ``torch.compile`` traces would be a fake tensor, and would leak into later eager calls.
    """
    first, second, valid = _block_edge_lists(height, width, block)
    return (
        torch.tensor(first, dtype=torch.int64, device=device),
        torch.tensor(second, dtype=torch.int64, device=device),
        torch.tensor(valid, dtype=torch.bool, device=device),
    )


@functools.lru_cache(maxsize=64)
def _block_edge_lists(height: int, width: int, block: int) -> tuple[list, list, list]:
    """:func:`block_edges` as nested lists of Python ints and bools."""
    b = block
    pairs = [((i, j), (i, j + 1)) for i in range(b) for j in range(b - 1)]
    pairs += [((i, j), (i + 1, j)) for i in range(b - 1) for j in range(b)]
    first, second, valid = [], [], []
    for top in range(0, height, b):
        for left in range(0, width, b):
            ends = [((top + i1, left + j1), (top + i2, left + j2)) for (i1, j1), (i2, j2) in pairs]
            inside = [r1 < height and c1 < width and r2 < height and c2 < width for (r1, c1), (r2, c2) in ends]
            first.append([r1 * width + c1 if ok else 0 for ((r1, c1), _), ok in zip(ends, inside)])
            second.append([r2 * width + c2 if ok else 0 for (_, (r2, c2)), ok in zip(ends, inside)])
            valid.append(inside)
    return first, second, valid


def _spanning_forest(lo, hi, edge, sim, n_tokens):
    """Kruskal's maximum spanning forest in every block at once.

    Args:
        lo, hi: ``(B, blocks, slots)`` token indices of each edge, slots in canonical order.
        edge: ``(B, blocks, slots)`` bool, real edges (not padding, not inside one token).
        sim: ``(B, blocks, slots)`` similarities, padding at ``-inf``.
    Returns:
        ``(B, blocks, slots)`` bool: the forest edges. A stable sort keeps canonical order on ties.
    """
    order = sim.argsort(dim=-1, descending=True, stable=True)
    lo, hi, edge = (t.gather(-1, order) for t in (lo, hi, edge))
    identity = torch.arange(n_tokens + 1, device=lo.device).expand(lo.shape[0], -1)
    labels, joined = identity[:, :n_tokens], []
    for step in range(order.shape[-1]):
        a, b = labels.gather(1, lo[..., step]), labels.gather(1, hi[..., step])
        join = edge[..., step] & (a != b)
        # Blocks own disjoint labels, so one write per block never collides; non-joins go to a sink column.
        labels = identity.scatter(1, torch.where(join, torch.maximum(a, b), n_tokens), torch.minimum(a, b)).gather(1, labels)
        joined.append(join)
    return torch.zeros_like(edge).scatter_(-1, order, torch.stack(joined, dim=-1))


def _group_labels(lo, hi, n_tokens, rounds):
    """Smallest token index of each token's group under the edges ``lo``-``hi`` (each ``(B, r)``).

    Min-label propagation: every round moves labels one edge further, and a group inside one
    ``block x block`` tile spans at most ``block**2 - 1`` edges, which is ``rounds``.
    """
    labels = torch.arange(n_tokens, device=lo.device).expand(lo.shape[0], -1).clone()
    for _ in range(rounds):
        low = torch.minimum(labels.gather(1, lo), labels.gather(1, hi))
        labels.scatter_reduce_(1, lo, low, "amin")
        labels.scatter_reduce_(1, hi, low, "amin")
    return labels


def atme_step_reference(x, metric, size, owner, *, r, grid, prefix, block=2):
    """One ATME merge step (see the module docstring).

    Args:
        x: ``(B, P+N, C)`` token features.
        metric: ``(B, P+N, Cm)`` similarity features (prefix rows ignored).
        size: ``(B, P+N)`` cells per token.
        owner: ``(B, H*W)`` int32 spatial token of every cell, values in ``0..N-1``.
        r: tokens to remove per image, ``0 <= r <= N - blocks``.
        grid: ``(H, W)`` patch grid; prefix: ``P``; block: 2 or 4.
    Returns:
        ``x (B, P+N-r, C)`` in the dtype of ``x`` (means accumulated in at least fp32),
        ``size (B, P+N-r)``, ``owner (B, H*W)`` int32.
    """
    check_atme_inputs(x, metric, size, owner, r=r, grid=grid, prefix=prefix, block=block)
    if r == 0:
        return x, size, owner
    n = x.shape[1] - prefix
    first, second, valid = block_edges(grid[0], grid[1], block, x.device)
    cells = owner.long()
    ta, tb = cells[:, first], cells[:, second]
    lo, hi = torch.minimum(ta, tb), torch.maximum(ta, tb)
    edge = valid & (ta != tb)

    ends = take_rows(metric[:, prefix:].double(), torch.stack([lo, hi], dim=1))
    norms = ends.norm(dim=-1).clamp_min(NORM_EPS)
    sim = ((ends[:, 0] * ends[:, 1]).sum(-1) / (norms[:, 0] * norms[:, 1])).float()

    # Canonical order inside each block is (smaller, larger token); blocks are already in raster order.
    canonical = torch.where(edge, lo * n + hi, n * n).argsort(dim=-1, stable=True)
    lo, hi, edge, sim = (t.gather(-1, canonical) for t in (lo, hi, edge, sim))
    sim = sim.masked_fill(~edge, -math.inf)
    forest = _spanning_forest(lo, hi, edge, sim, n)

    strongest = sim.masked_fill(~forest, -math.inf).flatten(1).argsort(dim=1, descending=True, stable=True)[:, :r]
    labels = _group_labels(lo.flatten(1).gather(1, strongest), hi.flatten(1).gather(1, strongest), n, block * block - 1)
    return _merge_groups(x, size, cells, labels, prefix, r, torch.promote_types(x.dtype, torch.float32))


def _merge_groups(x, size, cells, labels, prefix, r, acc):
    """Collapse every group of ``labels`` (smallest token index of the group) into one token.

    A merged token is ``sum(s_i x_i) / sum(s_i)``, written as ``x_root + sum_a (s_a / S) (x_a - x_root)``
    over the absorbed tokens ``a``: one gather copies prefix and surviving rows, and only the absorbed
    rows are read again, in ``acc`` precision. Returns ``(x, size, owner)`` as :func:`atme_step`.
    """
    batch, total, channels = x.shape
    n = total - prefix
    survivor = labels == torch.arange(n, device=x.device)
    target = (survivor.cumsum(1) - 1).gather(1, labels)
    kept, absorbed = (~survivor).to(torch.uint8).argsort(dim=1, stable=True).split([n - r, r], dim=1)
    rows = torch.cat([torch.arange(prefix, device=x.device).expand(batch, -1), kept + prefix], dim=1)
    new_x = take_rows(x, rows)
    new_size = size.gather(1, rows)
    into = target.gather(1, absorbed) + prefix
    absorbed_size = size[:, prefix:].gather(1, absorbed)
    new_size.scatter_add_(1, into, absorbed_size)

    share = (absorbed_size / new_size.gather(1, into)).to(acc)[..., None]
    roots = labels.gather(1, absorbed)
    update = share * (take_rows(x, absorbed + prefix).to(acc) - take_rows(x, roots + prefix).to(acc))
    new_x.scatter_add_(1, into[..., None].expand(-1, -1, channels), update.to(x.dtype))
    return new_x, new_size, target.gather(1, cells).to(torch.int32)
