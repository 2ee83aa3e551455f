"""The token state that flows from block to block (DESIGN.md, "Token state")."""
from __future__ import annotations

from typing import NamedTuple

import torch


class TokenState(NamedTuple):
    """Tokens of a batch, the cells they hold, and the plan this batch follows.

    x: ``(B, P+N, C)`` prefix tokens then ``N`` spatial tokens in raster order of their anchor.
    size: ``(B, P+N)`` float32 cells per token (prefix tokens: 1).
    owner: ``(B, H*W)`` int32 spatial token index (0..N-1) of every cell.
    grid: ``(H, W)``, the patch grid of this batch's images.
    schedule: tokens merged away by each block (by ``block.index``) on this grid.

    ``grid`` and ``schedule`` belong to one forward pass, not to the model: a model called from
    several threads with images of several sizes keeps each call's plan here, never in its modules.
    """

    x: torch.Tensor
    size: torch.Tensor
    owner: torch.Tensor
    grid: tuple[int, int]
    schedule: tuple[int, ...]

    def merged(self, x: torch.Tensor, size: torch.Tensor, owner: torch.Tensor) -> "TokenState":
        """The same pass with new tokens (after a merge step)."""
        return TokenState(x, size, owner, self.grid, self.schedule)
