"""EViT-style token pruning (Liang et al., "Not All Patches are What You Need", ICLR 2022).

Keep the spatial tokens the class token attends to most (attention averaged over heads) and drop the
``r`` others (no fused token). A dropped cell takes the nearest kept token in ``owner``, so dense maps
still come out, filled from neighbours.
"""

from __future__ import annotations

import torch

from cait_kernels._rows import take_rows

from ..layers import CompressedBlock
from ..tokens import TokenState


def evit_step(x, cls_attention, size, owner, *, r: int, prefix: int, grid: tuple[int, int]):
    """Drop the ``r`` spatial tokens the class token attends to least. ``cls_attention (B, N)``; the
    kept tokens stay in their order; a dropped cell's ``owner`` becomes the nearest kept token's."""
    if r == 0:
        return x, size, owner
    n = x.shape[1] - prefix
    keep = cls_attention.topk(n - r, dim=-1).indices.sort(dim=-1).values  # (B, N - r)
    new_x = torch.cat([x[:, :prefix], take_rows(x[:, prefix:], keep)], 1)
    new_size = torch.cat([size[:, :prefix], size[:, prefix:].gather(1, keep)], 1)
    # Nearest kept token for every cell: the token holding the nearest cell that a kept token holds.
    new_index = torch.full((x.shape[0], n), -1, dtype=torch.long, device=x.device)
    new_index.scatter_(1, keep, torch.arange(n - r, device=x.device).expand(x.shape[0], -1))
    cell_token = new_index.gather(1, owner.long())  # (B, H*W): the cell's token after the step, -1 if dropped
    cells = torch.arange(grid[0] * grid[1], device=x.device)
    coords = torch.stack([cells // grid[1], cells % grid[1]], -1).float()  # (H*W, 2)
    distance = torch.cdist(coords, coords).expand(x.shape[0], -1, -1)  # (B, cell, cell)
    nearest = distance.masked_fill(cell_token[:, None, :] < 0, torch.inf).argmin(dim=-1)  # (B, H*W): nearest kept cell
    return new_x, new_size, cell_token.gather(1, nearest).to(torch.int32)


class EViTBlock(CompressedBlock):
    """A :class:`cait.layers.CompressedBlock` that drops tokens by :func:`evit_step`; its metric is the
    class token's attention ``(B, N)``, computed from the qkv output the attention just produced (a
    forward hook keeps it, see :meth:`adopt`)."""

    @classmethod
    def adopt(cls, block: CompressedBlock) -> "EViTBlock":
        """Turn ``block`` (same modules, same ``r``) into an :class:`EViTBlock` in place."""
        block.__class__ = cls
        block.last_qkv = None
        if block.r:
            block.attn.qkv.register_forward_hook(_KeepQKV(block))
        return block

    def attend(self, state: TokenState) -> tuple[torch.Tensor, torch.Tensor | None]:
        """As :meth:`CompressedBlock.attend`, with the class token's attention as the metric."""
        proportional = self.proportional(state)
        out, _ = self.attn(self.norm1(state.x), size=state.size if proportional else None)
        metric = self._cls_attention(state.size, proportional) if self.count(state) else None
        return state.x + self.drop_path1(self.ls1(out)), metric

    def merge(self, state: TokenState, metric: torch.Tensor | None) -> TokenState:
        """This block's pruning step (unchanged when ``r = 0``)."""
        r = self.count(state)
        if not r:
            return state
        return state.merged(*evit_step(state.x, metric, state.size, state.owner, r=r, prefix=self.prefix, grid=state.grid))

    def _cls_attention(self, size: torch.Tensor, proportional: bool) -> torch.Tensor:
        """``(B, N)``: the class token's attention to each spatial token, averaged over heads."""
        attn = self.attn
        qkv, self.last_qkv = self.last_qkv, None
        q = qkv[:, :1, : attn.heads * attn.d_qk].unflatten(-1, (attn.heads, attn.d_qk))  # (B, 1, h, d)
        k = qkv[..., attn.heads * attn.d_qk : 2 * attn.heads * attn.d_qk].unflatten(-1, (attn.heads, attn.d_qk))
        logits = torch.einsum("bqhd,bkhd->bhk", q.float(), k.float()) * attn.scale  # fp32: q.k overflows fp16 past ~256 per channel
        if proportional:
            logits = logits + size.log()[:, None, :]
        return logits.softmax(-1).mean(1)[:, self.prefix :]

    def extra_repr(self) -> str:
        return "method=evit, " + super().extra_repr()


class _KeepQKV:
    """Forward hook on ``qkv`` that keeps its output on the block (a class, not a lambda, so a model
    holding it can be pickled with ``torch.save``)."""

    def __init__(self, block: EViTBlock):
        self.block = block

    def __call__(self, module, args, out) -> None:
        self.block.last_qkv = out
