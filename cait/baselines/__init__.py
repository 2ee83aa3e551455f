"""Token-reduction baselines that ATME is measured against, on the same compressed-model machinery:
ToMe (:mod:`.tome`) and EViT-style token pruning (:mod:`.evit`).

Both run between attention and MLP like ATME, with a per-block count ``r``. :func:`compress_baseline`
gives a :class:`cait.CompressedViT` whose blocks use them (for benchmarks: :func:`cait.save` writes
ATME models only).
"""

from __future__ import annotations

from ..model import CompressedViT, compress
from ..schedule import ATME
from . import tome
from .evit import EViTBlock, evit_step
from .tome import ToMeBlock, tome_step

METHODS = ("tome", "evit")
__all__ = ["METHODS", "EViTBlock", "ToMeBlock", "compress_baseline", "evit_step", "tome_step"]


def compress_baseline(model, method: str, flops: float) -> CompressedViT:
    """A compressed copy of the timm ``model`` reducing tokens with ``method`` (``tome`` or ``evit``)
    on the per-block counts ATME solves for ``flops`` (so all token methods remove the same number of
    tokens in each block and cost the same FLOPs)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    fast = compress(model, merge=ATME(flops=flops))
    if method == "evit":
        if fast.num_prefix_tokens < 1:
            raise ValueError("EViT-style pruning ranks tokens by the class token's attention: the model has no class token")
        for block in fast.blocks:
            EViTBlock.adopt(block)
    else:
        tome.check_schedule(fast.blocks, fast.grid[0] * fast.grid[1])
        for block in fast.blocks:
            block.__class__ = ToMeBlock
    return fast
