"""The token state that flows from block to block (DESIGN.md, "Token state")."""
from __future__ import annotations

from typing import NamedTuple

import torch


class TokenState(NamedTuple):
    """Tokens of a batch and the cells they hold.

    x: ``(B, P+N, C)`` prefix tokens then ``N`` spatial tokens in raster order of their anchor.
    size: ``(B, P+N)`` float32 cells per token (prefix tokens: 1).
    owner: ``(B, H*W)`` int32 spatial token index (0..N-1) of every cell.
    """

    x: torch.Tensor
    size: torch.Tensor
    owner: torch.Tensor
