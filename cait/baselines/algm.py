"""ALGM-style merging (Norouzi et al., "ALGM: Adaptive Local-then-Global Token Merging for Efficient
Semantic Segmentation with Plain Vision Transformers", CVPR 2024), written from the paper.

Two merge steps, each between the attention and the MLP of one block:

1. **Local** (the paper's conditional local average pooling) in an early block, block 0 by default
   (the paper's first layer): the patch grid is cut into aligned 2x2 windows, a window's similarity
   is the mean cosine similarity of the 6 pairs of its tokens, and the ``k`` most similar windows
   each become one token (the mean of its four, size 4) that keeps the window's top-left cell as
   its anchor. Only full windows take part (the last row or column of an odd grid stays as it is),
   and every token must still hold one cell: nothing may merge before this step.
2. **Global** (the paper's global bipartite merging) in a middle block, ``depth // 3`` by default
   (block 4 of 12, the paper's fifth layer): ToMe's bipartite matching
   (:func:`cait.baselines.tome_step`) merges ``r`` tokens anywhere in the image.

Similarity is taken on the tokens themselves (the residual stream after the attention), as in the
authors' release; attention is proportional to token size after the first merge; the head gets
every cell's token back through ``owner`` (``forward_dense``), as the paper unmerges before its
decoder. The paper sets both counts per batch from a similarity threshold; here they are fixed
(``k`` windows, ``r`` tokens) and solved for a FLOPs target (:func:`algm_schedule`), so ALGM is
compared with the other methods at equal FLOPs, with static shapes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cait_kernels._rows import take_rows

from ..cost import CostModel, cost_model
from ..layers import CompressedBlock
from ..model import CompressedViT, compress
from ..tokens import TokenState
from .tome import tome_step

_PAIRS = torch.triu_indices(4, 4, 1)  # the 6 pairs of a window's 4 tokens


def window_cells(grid: tuple[int, int]) -> torch.Tensor:
    """``(windows, 4)`` int64: the cells of every full aligned 2x2 window of ``grid`` (windows in
    raster order; cells top-left, top-right, bottom-left, bottom-right)."""
    height, width = grid
    top_left = (torch.arange(height // 2)[:, None] * 2 * width + torch.arange(width // 2)[None, :] * 2).flatten()
    return top_left[:, None] + torch.tensor([0, 1, width, width + 1])


def algm_local_step(x, metric, size, owner, *, k: int, grid: tuple[int, int], prefix: int):
    """Merge the ``k`` most similar 2x2 windows into one token each.

    ``x (B, P+N, C)``, ``metric (B, P+N, Cm)`` (prefix rows ignored), ``size (B, P+N)``,
    ``owner (B, H*W)`` int32 with ``N = H*W`` (one token per cell) -> the same with ``N - 3k`` spatial
    tokens, survivors in raster order of their anchors. Windows rank by the mean cosine similarity of
    their 6 token pairs, ties by window index (lowest first). Raises ``ValueError`` when tokens are
    already merged or ``k`` exceeds the number of full windows.
    """
    if k == 0:
        return x, size, owner
    batch, tokens, channels = x.shape
    n, cells = tokens - prefix, grid[0] * grid[1]
    if n != cells:
        raise ValueError(
            f"ALGM's local step pools 2x2 windows of single-cell tokens: it must come before any other merge ({n} tokens on {cells} cells)"
        )
    windows = window_cells(grid).to(x.device)
    if not 0 < k <= len(windows):
        raise ValueError(f"ALGM's local step merges 1 to {len(windows)} windows on a {grid[0]}x{grid[1]} grid, got k={k}")
    members = owner.long()[:, windows]  # (B, windows, 4) token of each cell
    unit = F.normalize(metric[:, prefix:].float(), dim=-1)
    vectors = take_rows(unit, members.flatten(1)).view(batch, len(windows), 4, -1)
    pair_sims = (vectors[:, :, _PAIRS[0]] * vectors[:, :, _PAIRS[1]]).sum(-1)  # (B, windows, 6)
    chosen = pair_sims.mean(-1).argsort(dim=-1, descending=True, stable=True)[:, :k]
    group = members.gather(1, chosen[..., None].expand(-1, -1, 4))  # (B, k, 4) tokens of the chosen windows
    anchor = group.min(-1, keepdim=True).values.expand(-1, -1, 4)
    target = torch.arange(n, device=x.device).expand(batch, n).scatter(1, group.flatten(1), anchor.flatten(1))
    keep = target == torch.arange(n, device=x.device)
    dest = (keep.cumsum(1) - 1).gather(1, target)  # (B, N): new index of every token

    acc = torch.promote_types(x.dtype, torch.float32)
    weight = size[:, prefix:].to(acc)
    weighted = x[:, prefix:].to(acc) * weight[..., None]
    sums = weighted.new_zeros(batch, n - 3 * k, channels).scatter_add(1, dest[..., None].expand(-1, -1, channels), weighted)
    new_size = weight.new_zeros(batch, n - 3 * k).scatter_add(1, dest, weight)
    new_x = (sums / new_size[..., None]).to(x.dtype)
    new_owner = dest.gather(1, owner.long()).to(torch.int32)
    return torch.cat([x[:, :prefix], new_x], 1), torch.cat([size[:, :prefix], new_size.to(size.dtype)], 1), new_owner


class ALGMBlock(CompressedBlock):
    """A :class:`cait.layers.CompressedBlock` merging by ALGM's local step (``step = "local"``, ``r = 3k``
    for ``k`` windows) or global step (``step = "global"``, ``r`` tokens), on the tokens' own similarity."""

    step: str | None = None

    @classmethod
    def adopt(cls, block: CompressedBlock, step: str | None) -> "ALGMBlock":
        """Turn ``block`` (same modules, same ``r``) into an :class:`ALGMBlock` doing ``step`` in place."""
        if step not in (None, "local", "global"):
            raise ValueError(f"ALGM step must be 'local', 'global' or None, got {step!r}")
        if step == "local" and block.r % 3:
            raise ValueError(f"ALGM's local step removes 3 tokens per window: r must be a multiple of 3, got {block.r}")
        block.__class__ = cls
        block.step = step
        return block

    def attend(self, state: TokenState) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The attention half; the merge needs no keys (it compares the tokens themselves)."""
        out, _ = self.attn(self.norm1(state.x), size=state.size if self.proportional(state) else None)
        return state.x + self.drop_path1(self.ls1(out)), None

    def merge(self, state: TokenState, metric: torch.Tensor | None) -> TokenState:
        """This block's ALGM step on ``state`` (unchanged when ``r = 0``)."""
        r = self.count(state)
        if not r:
            return state
        x, size, owner = state.x, state.size, state.owner
        if self.step == "local":
            return state.merged(*algm_local_step(x, x, size, owner, k=r // 3, grid=state.grid, prefix=self.prefix))
        return state.merged(*tome_step(x, x, size, owner, r=r, prefix=self.prefix))

    def extra_repr(self) -> str:
        return f"method=algm ({self.step}), " + super().extra_repr()


def algm_schedule(
    cost: CostModel, flops: float, local_share: float = 0.5, local_block: int = 0, global_block: int | None = None
) -> tuple[int, ...]:
    """Tokens merged away per block: ``3k`` in ``local_block``, ``r`` in ``global_block`` (default
    ``depth // 3``), with ``3k`` about ``local_share`` of all merged tokens, at the FLOPs ratio nearest
    ``flops``. Raises ``ValueError`` for a target out of reach or blocks out of order."""
    depth = len(cost.blocks)
    global_block = depth // 3 if global_block is None else global_block
    if not 0 <= local_block < global_block < depth:
        raise ValueError(f"ALGM needs 0 <= local_block < global_block < depth ({depth}), got {local_block} and {global_block}")
    if not 0 <= local_share <= 1:
        raise ValueError(f"ALGM local_share must lie in [0, 1], got {local_share}")
    windows = len(window_cells(cost.grid))
    dense = cost.flops((0,) * depth)
    best = None
    for total in range(cost.cells):
        k = min(windows, total // 3, round(local_share * total / 3))
        r = total - 3 * k
        if r > (cost.cells - 3 * k) // 2:  # ToMe's matching merges at most half the tokens
            continue
        schedule = [0] * depth
        schedule[local_block], schedule[global_block] = 3 * k, r
        gap = abs(cost.flops(schedule) / dense - flops)
        if best is None or gap < best[0]:
            best = (gap, tuple(schedule))
    if best[0] > 0.02:
        raise ValueError(f"ALGM cannot reach a FLOPs ratio of {flops} with local_share={local_share} (nearest is {best[0]:.3f} away)")
    return best[1]


def compress_algm(model, flops: float, *, local_share: float = 0.5, local_block: int = 0, global_block: int | None = None) -> CompressedViT:
    """A compressed copy of the timm ``model`` merging by ALGM at about ``flops`` (FLOPs ratio to the
    dense model): the local step in ``local_block``, the global step in ``global_block`` (default
    ``depth // 3``), counts from :func:`algm_schedule`."""
    fast = compress(model)
    global_block = len(fast.blocks) // 3 if global_block is None else global_block
    fast.set_schedule(algm_schedule(cost_model(fast), flops, local_share, local_block, global_block))
    for i, block in enumerate(fast.blocks):
        ALGMBlock.adopt(block, "local" if i == local_block else "global" if i == global_block else None)
    return fast
