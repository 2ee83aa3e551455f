"""ATME merge schedules: an explicit count per block, or a FLOPs target that a solver turns into one."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from cait_kernels import block_count

from .cost import CostModel
from .rope import DEFAULT_RULE, RULES


@dataclass(frozen=True)
class ATME:
    """Asymmetric token merging of neighbours inside ``block x block`` tiles of the patch grid.

    Give exactly one of:
        r: tokens merged away in each transformer block: an int (the same in every block, as in
            ToMe) or one int per block.
        flops: target FLOPs of the merged model as a fraction of the unmerged one at its input size,
            in ``(0, 1]``. The solver merges at a constant rate from the first block on (the
            cumulative count after block ``l`` is ``round((l + 1) * rate)``, capped at the most
            the grid allows) and picks the rate whose FLOPs ratio is nearest the target.
    block: tile side, 2 (up to 4x fewer spatial tokens) or 4 (up to 16x).
    position: where a merged token sits for rotary position embeddings (RoPE models only):
        ``centroid`` (the mean of its cells' coordinates; the default, measured better) or
        ``anchor`` (its earliest cell, where ATME keeps it); see :mod:`cait.rope`.

    A schedule is valid while ``sum(r) <= cells - tiles``: every tile keeps at least one token.
    """

    r: int | Sequence[int] | None = None
    flops: float | None = None
    block: int = 2
    position: str = DEFAULT_RULE

    def __post_init__(self):
        if (self.r is None) == (self.flops is None):
            raise ValueError("ATME takes exactly one of r= (tokens merged per block) and flops= (target FLOPs ratio)")
        if self.block not in (2, 4):
            raise ValueError(f"ATME block must be 2 or 4, got {self.block!r}")
        if self.position not in RULES:
            raise ValueError(f"ATME position must be one of {RULES}, got {self.position!r}")
        if self.flops is not None and not (isinstance(self.flops, (int, float)) and 0 < self.flops <= 1):
            raise ValueError(f"ATME flops must be a ratio in (0, 1], got {self.flops!r}")
        counts = list(self.r) if isinstance(self.r, Sequence) and not isinstance(self.r, str) else [self.r] if self.r is not None else []
        if any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in counts):
            raise ValueError(f"ATME r must be a non-negative int or a list of them, got {self.r!r}")
        if isinstance(self.r, Sequence):
            object.__setattr__(self, "r", tuple(self.r))

    def schedule(self, cost: CostModel) -> tuple[int, ...]:
        """Tokens merged away in each block of the model that ``cost`` describes."""
        depth, limit = len(cost.blocks), self.limit(cost.grid)
        if self.flops is not None:
            return solve(cost, self.flops, self.block)
        counts = (self.r,) * depth if isinstance(self.r, int) else self.r
        if len(counts) != depth:
            raise ValueError(f"ATME r lists {len(counts)} counts but the model has {depth} blocks")
        if sum(counts) > limit:
            raise ValueError(
                f"ATME r merges {sum(counts)} tokens in all, but a {cost.grid[0]}x{cost.grid[1]} grid in "
                f"{self.block}x{self.block} tiles allows at most {limit} (cells - tiles): lower r"
                + (" or use block=4" if self.block == 2 else "")
            )
        return tuple(counts)

    def limit(self, grid: tuple[int, int]) -> int:
        """Most tokens a schedule may merge away in all on ``grid``."""
        return grid[0] * grid[1] - block_count(grid, self.block)


def scale_schedule(schedule: Sequence[int], grid: tuple[int, int], to: tuple[int, int], block: int) -> tuple[int, ...]:
    """``schedule`` (merge counts per block on ``grid``) for the grid ``to``: the cumulative count
    after every block scaled by the ratio of cells and rounded, so each block merges about the same
    fraction of the tokens. Raises ``ValueError`` where the scaled counts exceed what ``to`` allows."""
    cells, target = grid[0] * grid[1], to[0] * to[1]
    merged, total = [], 0
    for r in schedule:
        total += r
        merged.append(math.floor(total * target / cells + 0.5))
    limit = target - block_count(to, block)
    if merged and merged[-1] > limit:
        raise ValueError(
            f"the merge counts {tuple(schedule)} for the {grid[0]}x{grid[1]} grid scale to {merged[-1]} tokens on a "
            f"{to[0]}x{to[1]} grid, which allows at most {limit} with {block}x{block} tiles: use ATME(flops=...), "
            f"which is solved per grid"
        )
    return tuple(b - a for a, b in zip([0] + merged, merged))


SHAPES = ("constant", "decreasing")


def shaped(shape: str, rate: float, depth: int, limit: int, start: int = 0) -> tuple[int, ...]:
    """Merge counts per block for ``depth`` blocks: ``constant`` merges ``rate`` tokens in every block
    from block ``start`` on; ``decreasing`` merges ``rate`` in block ``start`` and linearly less after
    (down to ``rate / (depth - start)`` in the last block: early blocks merge most, as the tokens that
    are left get more distinct with depth). The cumulative count is rounded and capped at ``limit``."""
    if shape not in SHAPES:
        raise ValueError(f"schedule shape must be one of {SHAPES}, got {shape!r}")
    if not 0 <= start < depth:
        raise ValueError(f"a schedule of {depth} blocks starts at a block in [0, {depth}), got {start}")
    span, merged = depth - start, []
    for layer in range(depth):
        done = max(0, layer + 1 - start)  # merging blocks so far
        total = rate * done if shape == "constant" else rate * done * (2 * span - done + 1) / (2 * span)
        merged.append(min(limit, math.floor(total + 0.5)))
    return tuple(b - a for a, b in zip([0] + merged, merged))


def solve(cost: CostModel, target: float, block: int, shape: str = "constant", start: int = 0) -> tuple[int, ...]:
    """Merge counts per block whose FLOPs under ``cost`` are nearest ``target`` (a fraction of the
    unmerged FLOPs) for a schedule of the given :func:`shaped` form, on ``block`` x ``block`` tiles.
    Raises ``ValueError`` where even merging all the grid allows stays above the target."""
    depth, limit = len(cost.blocks), cost.grid[0] * cost.grid[1] - block_count(cost.grid, block)
    dense = cost.flops((0,) * depth)

    def ratio(rate: float) -> float:
        return cost.flops(shaped(shape, rate, depth, limit, start)) / dense

    lowest = ratio(limit)
    if target < lowest:
        raise ValueError(
            f"ATME flops={target} is out of reach: merging gets this model (a {cost.grid[0]}x{cost.grid[1]} grid in "
            f"{block}x{block} tiles) down to {lowest:.3f} of its FLOPs at most"
            + (f" when merging starts at block {start}" if start else "")
            + "; "
            + ("use block=4, " if block == 2 else "")
            + "give larger images, or ask merging for less and take the rest from CDCP pruning (flops= is relative to "
            "the model's own channels)"
        )
    slow, fast = 0.0, float(limit)  # ratio(slow) > target >= ratio(fast) once the loop starts
    if ratio(slow) <= target:
        return (0,) * depth
    for _ in range(50):
        mid = (slow + fast) / 2
        slow, fast = (slow, mid) if ratio(mid) <= target else (mid, fast)
    best = min((slow, fast), key=lambda rate: abs(ratio(rate) - target))
    return shaped(shape, best, depth, limit, start)
