"""ToMe (Bolya et al., "Token Merging: Your ViT but Faster", ICLR 2023), written from the paper.

Spatial tokens alternate into sets A and B (by index); each A token links to its most similar B token
(cosine of the keys averaged over heads, the same metric ATME uses); the ``r`` strongest links merge
(size-weighted means, summed sizes): global, no locality, at most half the tokens per layer.
Proportional attention as in ATME; ``owner`` follows the merges, so ToMe unmerges exactly too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cait_kernels._rows import take_rows

from ..cost import CostModel
from ..layers import CompressedBlock
from ..tokens import TokenState


def tome_step(x, metric, size, owner, *, r: int, prefix: int):
    """One ToMe merge of ``r`` spatial tokens: ``x (B, P+N, C)``, ``metric (B, P+N, Cm)``, ``size (B, P+N)``,
    ``owner (B, H*W)`` -> the same with ``N - r`` spatial tokens (order: unmerged A, then B)."""
    if r == 0:
        return x, size, owner
    n = x.shape[1] - prefix
    if r > n // 2:
        raise ValueError(f"ToMe merges at most half the tokens per layer: r={r} > {n // 2}")
    batch, _, channels = x.shape
    unit = F.normalize(metric[:, prefix:].float(), dim=-1)
    a, b = unit[:, 0::2], unit[:, 1::2]
    best, partner = (a @ b.transpose(1, 2)).max(dim=-1)  # (B, |A|)
    order = best.argsort(dim=-1, descending=True)
    merged, kept = order[:, :r], order[:, r:]  # indices into A
    a_idx, b_idx = torch.arange(0, n, 2, device=x.device), torch.arange(1, n, 2, device=x.device)
    src = a_idx[merged]  # spatial index of merged A tokens
    dst = b_idx[partner.gather(1, merged)]
    keep = torch.cat([a_idx[kept], b_idx.expand(batch, -1)], dim=1)  # surviving spatial tokens, new order

    acc = torch.promote_types(x.dtype, torch.float32)
    spatial = x[:, prefix:].to(acc) * size[:, prefix:, None].to(acc)
    weight = size[:, prefix:].clone()
    spatial = spatial.scatter_add(1, dst[..., None].expand(-1, -1, channels), take_rows(spatial, src))
    weight = weight.scatter_add(1, dst, weight.gather(1, src))
    new_size = weight.gather(1, keep)
    new_x = (take_rows(spatial, keep) / new_size[..., None]).to(x.dtype)

    new_index = torch.full((batch, n), -1, dtype=torch.long, device=x.device)
    new_index.scatter_(1, keep, torch.arange(n - r, device=x.device).expand(batch, -1))
    new_index.scatter_(1, src, new_index.gather(1, dst))
    new_owner = new_index.gather(1, owner.long()).to(torch.int32)
    return torch.cat([x[:, :prefix], new_x], 1), torch.cat([size[:, :prefix], new_size], 1), new_owner


class ToMeBlock(CompressedBlock):
    """A :class:`cait.layers.CompressedBlock` whose merge step is :func:`tome_step` (same attention and metric)."""

    def merge(self, state: TokenState, metric: torch.Tensor | None) -> TokenState:
        """This block's ToMe merge (unchanged when ``r = 0``)."""
        r = self.count(state)
        if not r:
            return state
        return state.merged(*tome_step(state.x, metric, state.size, state.owner, r=r, prefix=self.prefix))

    def extra_repr(self) -> str:
        return "method=tome, " + super().extra_repr()


def check_schedule(schedule, cells: int) -> None:
    """Refuse a schedule (tokens merged per block) that asks ToMe to merge more than half the spatial
    tokens left in some block."""
    tokens = cells
    for r in schedule:
        if r > tokens // 2:
            raise ValueError(f"ToMe merges at most half the tokens per layer; the schedule asks {r} of {tokens}")
        tokens -= r


def tome_schedule(cost: CostModel, flops: float) -> tuple[int, ...]:
    """ToMe's own schedule: the same ``r`` in every block, clipped to half the spatial tokens left
    there (as the ToMe code clips it), with ``r`` chosen for the FLOPs ratio nearest ``flops``."""
    depth = len(cost.blocks)
    dense = cost.flops((0,) * depth)
    best = None
    for r in range(cost.cells // 2 + 1):
        tokens, schedule = cost.cells, []
        for _ in range(depth):
            schedule.append(min(r, tokens // 2))
            tokens -= schedule[-1]
        gap = abs(cost.flops(schedule) / dense - flops)
        if best is None or gap < best[0]:
            best = (gap, tuple(schedule))
    return best[1]
