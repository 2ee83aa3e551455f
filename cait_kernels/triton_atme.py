"""The ATME step (see :mod:`cait_kernels.atme`) in three Triton kernels and a few torch ops.

1. :func:`forest_kernel`, ``BLOCK_T`` blocks per program: each block's neighbour pairs, their cosine
   similarities and Kruskal's maximum spanning forest (a ``block**2``-slot union-find run once per
   edge in order of similarity, ties by (smaller token, larger token) exactly as the reference),
   written in the reference's canonical edge order with non-forest edges at ``-inf``;
2. torch: the ``r`` strongest forest edges per image (a stable sort, so ties break by block, then
   canonical order);
3. :func:`roots_kernel`: per block, the groups the chosen edges join: every token's root (the
   smallest token index of its group);
4. torch: survivors are their own roots; a cumulative sum numbers them in raster order;
5. :func:`merge_kernel`, one program per (block, image, channel tile): every surviving token is the
   size-weighted mean of its group, summed in a fixed order (no atomics, bit-identical on repeat),
   written once to its new place with its size and the rewritten ``owner`` of the block's cells.
``x`` is read once and written once; tokens that merge with nothing are copied bit for bit.

Launch limits (:mod:`cait_kernels._launch`): every grid has the image on axis x (up to ``2**31 - 1``)
and the blocks (at most :data:`MAX_CELLS` < 65535) on axis y; the merge kernel's channel tiles go on
axis z (a batch on axis y failed from 65536 images). Offsets: the image index is int64 before it meets
a batch stride or a per-image count, so any batch size works; offsets inside one image are int32
(``x``, ``metric`` and the merged ``x`` must span less than ``2**31`` elements per image, checked before
the first launch; ``size`` and ``owner`` are made contiguous; edge keys ``lo * N + hi`` fit int32 because
``N <= MAX_CELLS``).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._builds import Build
from ._launch import check_grid, check_offsets
from .atme import NORM_EPS, block_count, block_edges, check_atme_inputs

# Tile sizes by block side, chosen so no kernel spills registers (see ``cait bench --kernels``):
BLOCKS_PER_PROGRAM = {2: 16, 4: 4}  # forest and roots kernels: blocks per program
METRIC_CHANNELS = {2: 16, 4: 8}  # forest kernel: metric channels per step (it holds blocks x slots x channels)
MERGE_CHANNELS = {2: 128, 4: 32}  # merge kernel: channels per program (it holds cells^2 x channels)


MAX_CELLS = 46340  # canonical edge keys (smaller * N + larger token) must fit in int32


@functools.lru_cache(maxsize=64)
def block_tables(height: int, width: int, block: int, device: torch.device):
    """The kernels' view of the grid: ``first``, ``second`` int32 and ``valid`` int8 cell edges of
    every block (``(blocks, slots)``, as :func:`cait_kernels.atme.block_edges`), and ``cells``
    ``(blocks, block*block)`` int32, the cells of every block in raster order (``-1`` outside a
    smaller border block)."""
    first, second, valid = block_edges(height, width, block, device)
    rows, cols = torch.meshgrid(torch.arange(0, height, block), torch.arange(0, width, block), indexing="ij")
    dr, dc = torch.meshgrid(torch.arange(block), torch.arange(block), indexing="ij")
    r = rows.reshape(-1, 1) + dr.reshape(1, -1)
    c = cols.reshape(-1, 1) + dc.reshape(1, -1)
    cells = torch.where((r < height) & (c < width), r * width + c, -1)
    return first.to(torch.int32), second.to(torch.int32), valid.to(torch.int8), cells.to(torch.int32).to(device)


@triton.jit
def _column(t, j, SLOTS: tl.constexpr):
    """Column ``j`` of the 2-D int tensor ``t`` (``(rows, SLOTS)``) as a vector."""
    return tl.sum(tl.where(tl.arange(0, SLOTS)[None, :] == j, t, 0), 1)


@triton.jit
def _label_of(cell_token, labels, token):
    """The union-find label of ``token`` (per row), read from any of its cells; ``-1`` if absent."""
    return tl.max(tl.where(cell_token == token[:, None], labels, -1), 1)


@triton.jit
def _join(labels, a, b, ok):
    """Union of the groups labelled ``a`` and ``b`` where ``ok``: the larger label becomes the smaller."""
    hi = tl.maximum(a, b)
    lo = tl.minimum(a, b)
    return tl.where(ok[:, None] & (labels == hi[:, None]), lo[:, None], labels)


@triton.jit
def forest_kernel(
    metric,
    owner,
    first,
    second,
    valid,
    cells,
    lo_out,
    hi_out,
    sim_out,
    n_blocks,
    n,
    cells_total,
    metric_dim,
    stride_metric_b,
    stride_metric_t,
    SLOTS: tl.constexpr,
    SLOTS_PAD: tl.constexpr,
    CELLS: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
    NORM_EPS: tl.constexpr,
):
    """Grid :func:`forest_grid`, ``(B, cdiv(blocks, BLOCK_T))``. ``metric (B, N, Cm)``: the spatial tokens'
    metric rows; ``first``, ``second``, ``valid`` ``(blocks, SLOTS)`` cell edges; ``cells (blocks, CELLS)``.
    Writes ``lo``/``hi`` int32 and ``sim`` fp32 ``(B, blocks, SLOTS)`` in canonical order."""
    image = tl.program_id(0)
    blocks = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    slot = tl.arange(0, SLOTS_PAD)
    in_range = (blocks[:, None] < n_blocks) & (slot[None, :] < SLOTS)
    table = blocks[:, None] * SLOTS + slot[None, :]
    c1 = tl.load(first + table, mask=in_range, other=0)
    c2 = tl.load(second + table, mask=in_range, other=0)
    ok = tl.load(valid + table, mask=in_range, other=0) != 0
    owners = owner + image.to(tl.int64) * cells_total
    ta = tl.load(owners + c1)
    tb = tl.load(owners + c2)
    lo = tl.minimum(ta, tb)
    hi = tl.maximum(ta, tb)
    edge = ok & (ta != tb)

    # Cosine similarity in float64, rounded to float32: as the reference, so equal values tie exactly.
    rows = metric + image.to(tl.int64) * stride_metric_b
    dot = tl.zeros([BLOCK_T, SLOTS_PAD], tl.float64)
    uu = tl.zeros([BLOCK_T, SLOTS_PAD], tl.float64)
    vv = tl.zeros([BLOCK_T, SLOTS_PAD], tl.float64)
    for d0 in range(0, metric_dim, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)[None, None, :]
        keep = edge[:, :, None] & (d < metric_dim)
        u = tl.load(rows + lo[:, :, None] * stride_metric_t + d, mask=keep, other=0.0).to(tl.float64)
        v = tl.load(rows + hi[:, :, None] * stride_metric_t + d, mask=keep, other=0.0).to(tl.float64)
        dot += tl.sum(u * v, 2)
        uu += tl.sum(u * u, 2)
        vv += tl.sum(v * v, 2)
    sim = (dot / (tl.maximum(tl.sqrt(uu), NORM_EPS) * tl.maximum(tl.sqrt(vv), NORM_EPS))).to(tl.float32)

    # Canonical position: rank by (lo, hi) among real edges, then the rest, ties by slot.
    key = tl.where(edge, lo * n + hi, n * n)
    key = tl.where(slot[None, :] < SLOTS, key, n * n + 1)
    earlier = slot[None, None, :] < slot[None, :, None]
    canonical = tl.sum(((key[:, None, :] < key[:, :, None]) | ((key[:, None, :] == key[:, :, None]) & earlier)).to(tl.int32), 2)
    # Kruskal order: real edges by similarity, descending, NaN first (as torch's descending sort), ties by canonical position.
    nan = sim != sim
    tied = (sim[:, None, :] == sim[:, :, None]) | (nan[:, None, :] & nan[:, :, None])
    tied = tied & (canonical[:, None, :] < canonical[:, :, None])
    stronger = (sim[:, None, :] > sim[:, :, None]) | (nan[:, None, :] & ~nan[:, :, None]) | tied
    order = tl.where(edge, tl.sum((stronger & edge[:, None, :]).to(tl.int32), 2), SLOTS_PAD)

    cell = tl.load(cells + blocks[:, None] * CELLS + tl.arange(0, CELLS)[None, :], mask=blocks[:, None] < n_blocks, other=-1)
    cell_token = tl.load(owners + cell, mask=cell >= 0, other=-1)
    labels = cell_token
    forest = tl.zeros([BLOCK_T, SLOTS_PAD], tl.int1)
    for step in tl.static_range(SLOTS):
        now = order == step
        u = tl.sum(tl.where(now, lo, 0), 1)
        v = tl.sum(tl.where(now, hi, 0), 1)
        a = _label_of(cell_token, labels, u)
        b = _label_of(cell_token, labels, v)
        join = (tl.sum(now.to(tl.int32), 1) > 0) & (a != b)
        labels = _join(labels, a, b, join)
        forest = forest | (now & join[:, None])

    out = (image.to(tl.int64) * n_blocks + blocks[:, None]) * SLOTS + canonical
    tl.store(lo_out + out, lo, mask=in_range)
    tl.store(hi_out + out, hi, mask=in_range)
    tl.store(sim_out + out, tl.where(forest, sim, float("-inf")), mask=in_range)


@triton.jit
def roots_kernel(
    owner,
    cells,
    lo,
    hi,
    chosen,
    root_out,
    n_blocks,
    n,
    cells_total,
    SLOTS: tl.constexpr,
    SLOTS_PAD: tl.constexpr,
    CELLS: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """Grid :func:`forest_grid`, ``(B, cdiv(blocks, BLOCK_T))``. Joins the chosen edges (``(B, blocks, SLOTS)``)
    of each block and writes every token's root, ``root_out (B, N)`` int32."""
    image = tl.program_id(0)
    blocks = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    slot = tl.arange(0, SLOTS_PAD)
    in_range = (blocks[:, None] < n_blocks) & (slot[None, :] < SLOTS)
    edges = (image.to(tl.int64) * n_blocks + blocks[:, None]) * SLOTS + slot[None, :]
    lo = tl.load(lo + edges, mask=in_range, other=0)
    hi = tl.load(hi + edges, mask=in_range, other=0)
    pick = tl.load(chosen + edges, mask=in_range, other=0) != 0

    owners = owner + image.to(tl.int64) * cells_total
    cell = tl.load(cells + blocks[:, None] * CELLS + tl.arange(0, CELLS)[None, :], mask=blocks[:, None] < n_blocks, other=-1)
    cell_token = tl.load(owners + cell, mask=cell >= 0, other=-1)
    labels = cell_token
    for step in tl.static_range(SLOTS):
        a = _label_of(cell_token, labels, _column(lo, step, SLOTS_PAD))
        b = _label_of(cell_token, labels, _column(hi, step, SLOTS_PAD))
        labels = _join(labels, a, b, _column(pick.to(tl.int32), step, SLOTS_PAD) > 0)
    tl.store(root_out + image.to(tl.int64) * n + cell_token, labels, mask=cell >= 0)


@triton.jit
def merge_kernel(
    x,
    size,
    owner,
    cells,
    root,
    dest,
    x_out,
    size_out,
    owner_out,
    n_blocks,
    n,
    cells_total,
    prefix,
    channels,
    stride_x_b,
    stride_x_t,
    stride_out_b,
    stride_out_t,
    stride_size_b,
    stride_size_out_b,
    CELLS: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Grid :func:`merge_grid`, ``(B, blocks, cdiv(C, BLOCK_C))``. ``root``, ``dest`` ``(B, N)`` int32: each
    token's root and the new index of that root. The channel-tile-0 program also writes sizes and ``owner``."""
    image = tl.program_id(0)
    block = tl.program_id(1)
    c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    slot = tl.arange(0, CELLS)
    cell = tl.load(cells + block * CELLS + slot)
    owners = owner + image.to(tl.int64) * cells_total
    token = tl.load(owners + cell, mask=cell >= 0, other=-1)
    # One slot per token: its first cell in the block.
    first = (cell >= 0) & (tl.sum(((token[None, :] == token[:, None]) & (slot[None, :] < slot[:, None])).to(tl.int32), 1) == 0)
    tokens = image.to(tl.int64) * n + token
    top = tl.load(root + tokens, mask=first, other=-1)
    to = tl.load(dest + tokens, mask=cell >= 0, other=0)
    s = tl.load(size + image.to(tl.int64) * stride_size_b + prefix + token, mask=first, other=0.0).to(tl.float32)

    member = first[None, :] & (top[None, :] == token[:, None])  # member[i, j]: token j joins the group rooted at token i
    survivor = first & (top == token)
    total = tl.sum(tl.where(member, s[None, :], 0.0), 1)
    count = tl.sum(member.to(tl.int32), 1)
    rows = x + image.to(tl.int64) * stride_x_b + (prefix + token)[:, None] * stride_x_t + c[None, :]
    feats = tl.load(rows, mask=first[:, None] & (c[None, :] < channels), other=0.0)
    # where, not a zero weight: 0 * NaN (or inf) of another group's token would leak into this one
    weighted = tl.sum(tl.where(member[:, :, None], s[None, :, None] * feats.to(tl.float32)[None, :, :], 0.0), 1)
    mean = tl.where(count[:, None] == 1, feats.to(tl.float32), weighted / tl.where(total > 0, total, 1.0)[:, None])
    target = x_out + image.to(tl.int64) * stride_out_b + (prefix + to)[:, None] * stride_out_t + c[None, :]
    tl.store(target, mean.to(x_out.dtype.element_ty), mask=survivor[:, None] & (c[None, :] < channels))
    if tl.program_id(2) == 0:
        tl.store(size_out + image.to(tl.int64) * stride_size_out_b + prefix + to, total.to(size_out.dtype.element_ty), mask=survivor)
        tl.store(owner_out + image.to(tl.int64) * cells_total + cell, to, mask=cell >= 0)


def atme_step_triton(x, metric, size, owner, *, r, grid, prefix, block=2):
    """Same contract as :func:`cait_kernels.atme.atme_step_reference`; three kernels and a few torch ops.

    ``x`` and ``size`` may have any batch/token strides but contiguous channels; fp64 is not
    supported by the kernels (use the reference).
    """
    check_atme_inputs(x, metric, size, owner, r=r, grid=grid, prefix=prefix, block=block)
    check_kernel_inputs(x, grid)
    if r == 0:
        return x, size, owner
    return launch_atme(x, metric, size, owner, r, grid, prefix, block)


def check_kernel_inputs(x, grid) -> None:
    """What the kernels need beyond the op's contract: no fp64, contiguous channels, a grid whose edge keys fit int32."""
    if x.dtype == torch.float64:
        raise TypeError("the Triton ATME kernels take fp16, bf16 or fp32 x; run float64 through the reference")
    if x.stride(-1) != 1:
        raise ValueError(f"x channels must be contiguous (last stride 1), got strides {tuple(x.stride())}")
    if grid[0] * grid[1] > MAX_CELLS:
        raise ValueError(f"the Triton ATME kernels take grids up to {MAX_CELLS} cells, got {grid[0]}x{grid[1]}")


def launch_atme(x, metric, size, owner, r, grid, prefix, block):
    """:func:`atme_step_triton` for ``r >= 1`` without the input checks (the caller ran them)."""
    batch, total, channels = x.shape
    if batch == 0:  # nothing to launch
        return x.new_empty(0, total - r, channels), size.new_empty(0, total - r), torch.empty_like(owner)
    n, blocks, cells_total = total - prefix, block_count(grid, block), grid[0] * grid[1]
    owner, size = owner.contiguous(), size.contiguous()
    first, second, valid, cells = block_tables(grid[0], grid[1], block, x.device)
    slots, n_cells = first.shape[1], block * block
    metric = metric[:, prefix:]
    if metric.stride(-1) != 1:
        metric = metric.contiguous()
    new_x = torch.empty(batch, total - r, channels, dtype=x.dtype, device=x.device)
    new_size = torch.empty(batch, total - r, dtype=size.dtype, device=x.device)
    new_owner = torch.empty_like(owner)
    # every grid and offset is checked before the first launch (owner and size are contiguous: short rows)
    check_offsets("ATME kernels", x=x, metric=metric, x_out=new_x)
    tiles = forest_grid(batch, blocks, block)
    merge_tiles = merge_grid(batch, blocks, channels, MERGE_CHANNELS[block])

    lo = torch.empty(batch, blocks, slots, dtype=torch.int32, device=x.device)
    hi = torch.empty_like(lo)
    sim = torch.empty(batch, blocks, slots, dtype=torch.float32, device=x.device)
    forest_kernel[tiles](
        metric, owner, first, second, valid, cells, lo, hi, sim,
        blocks, n, cells_total, metric.shape[-1], metric.stride(0), metric.stride(1),
        SLOTS=slots, SLOTS_PAD=triton.next_power_of_2(slots), CELLS=n_cells, BLOCK_T=BLOCKS_PER_PROGRAM[block],
        BLOCK_D=min(METRIC_CHANNELS[block], triton.next_power_of_2(metric.shape[-1])), NORM_EPS=NORM_EPS,
    )  # fmt: skip

    strongest = sim.flatten(1).argsort(dim=1, descending=True, stable=True)[:, :r]
    chosen = torch.zeros(batch, blocks * slots, dtype=torch.int8, device=x.device).scatter_(1, strongest, 1)
    root = torch.empty(batch, n, dtype=torch.int32, device=x.device)
    roots_kernel[tiles](
        owner, cells, lo, hi, chosen, root, blocks, n, cells_total,
        SLOTS=slots, SLOTS_PAD=triton.next_power_of_2(slots), CELLS=n_cells, BLOCK_T=BLOCKS_PER_PROGRAM[block],
    )  # fmt: skip

    survivor = root == torch.arange(n, dtype=torch.int32, device=x.device)
    dest = (survivor.cumsum(1, dtype=torch.int32) - 1).gather(1, root.long())
    new_x[:, :prefix] = x[:, :prefix]
    new_size[:, :prefix] = size[:, :prefix]
    merge_kernel[merge_tiles](
        x, size, owner, cells, root, dest, new_x, new_size, new_owner,
        blocks, n, cells_total, prefix, channels, x.stride(0), x.stride(1), new_x.stride(0), new_x.stride(1),
        size.stride(0), new_size.stride(0), CELLS=n_cells, BLOCK_C=MERGE_CHANNELS[block],
    )  # fmt: skip
    return new_x, new_size, new_owner


def forest_grid(batch: int, blocks: int, block: int) -> tuple[int, int]:
    """The launch grid of :func:`forest_kernel` and :func:`roots_kernel` for ``batch`` images of ``blocks``
    blocks of side ``block`` (checked against CUDA's limits)."""
    grid = (batch, triton.cdiv(blocks, BLOCKS_PER_PROGRAM[block]))
    return check_grid("forest_kernel/roots_kernel", grid, batch=batch, blocks=blocks, block=block)


def merge_grid(batch: int, blocks: int, channels: int, block_c: int) -> tuple[int, int, int]:
    """The launch grid of :func:`merge_kernel` for ``batch`` images of ``blocks`` blocks and ``channels``
    channels in tiles of ``block_c`` (checked against CUDA's limits)."""
    grid = (batch, blocks, triton.cdiv(channels, block_c))
    return check_grid("merge_kernel", grid, batch=batch, blocks=blocks, channels=channels, block_c=block_c)


def aot_builds() -> list[Build]:
    """The three kernels for both block sides (the merge kernel for every feature dtype). Hot: all."""
    tables = {"owner": "*i32", "first": "*i32", "second": "*i32", "valid": "*i8", "cells": "*i32"}
    sizes = dict.fromkeys(("n_blocks", "n", "cells_total"), "i32")
    builds = []
    for block in (2, 4):
        slots = 2 * block * (block - 1)
        shape = dict(SLOTS=slots, SLOTS_PAD=triton.next_power_of_2(slots), CELLS=block * block, BLOCK_T=BLOCKS_PER_PROGRAM[block])
        forest = {"metric": "*fp16", **tables, "lo_out": "*i32", "hi_out": "*i32", "sim_out": "*fp32", **sizes}
        forest.update(dict.fromkeys(("metric_dim", "stride_metric_b", "stride_metric_t"), "i32"))
        constants = dict(shape, BLOCK_D=METRIC_CHANNELS[block], NORM_EPS=NORM_EPS)
        builds.append(Build(f"atme forest {block}x{block}", forest_kernel, forest, constants, 4, 3, True))
        roots = {"owner": "*i32", "cells": "*i32", "lo": "*i32", "hi": "*i32", "chosen": "*i8", "root_out": "*i32", **sizes}
        builds.append(Build(f"atme roots {block}x{block}", roots_kernel, roots, shape, 4, 3, True))
        for name in ("fp16", "bf16", "fp32"):
            merge = {"x": f"*{name}", "size": "*fp32", "owner": "*i32", "cells": "*i32", "root": "*i32", "dest": "*i32"}
            merge.update({"x_out": f"*{name}", "size_out": "*fp32", "owner_out": "*i32", **sizes})
            merge.update(dict.fromkeys(("prefix", "channels", "stride_x_b", "stride_x_t", "stride_out_b", "stride_out_t"), "i32"))
            merge.update(dict.fromkeys(("stride_size_b", "stride_size_out_b"), "i32"))
            constants = dict(CELLS=block * block, BLOCK_C=MERGE_CHANNELS[block])
            builds.append(Build(f"atme merge {name} {block}x{block} C{MERGE_CHANNELS[block]}", merge_kernel, merge, constants, 4, 3, True))
    return builds
