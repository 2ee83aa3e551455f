"""Token-reduction baselines that ATME is measured against, on the same compressed-model machinery:
ToMe (:mod:`.tome`), EViT-style token pruning (:mod:`.evit`) and ALGM-style local-then-global
merging for segmentation (:mod:`.algm`).

All run between attention and MLP like ATME, with a per-block count ``r``. :func:`compress_baseline`
gives a :class:`cait.CompressedViT` whose blocks use them (for benchmarks: :func:`cait.save` writes
ATME models only).
"""

from __future__ import annotations

from ..cost import cost_model
from ..model import CompressedViT, compress
from ..schedule import ATME
from . import tome
from .algm import ALGMBlock, algm_local_step, algm_schedule, compress_algm
from .evit import EViTBlock, evit_step
from .tome import ToMeBlock, tome_schedule, tome_step

METHODS = ("tome", "evit", "algm")
OPTIONS = {"tome": {"own_schedule"}, "evit": set(), "algm": {"local_share", "local_block", "global_block"}}
__all__ = [
    "METHODS", "ALGMBlock", "EViTBlock", "ToMeBlock", "algm_local_step", "algm_schedule", "compress_algm", "compress_baseline",
    "evit_step", "tome_schedule", "tome_step",
]  # fmt: skip


def compress_baseline(model, method: str, flops: float, **options) -> CompressedViT:
    """A compressed copy of the timm ``model`` reducing tokens with ``method`` at about ``flops`` (FLOPs
    ratio to the dense model).

    ``tome`` and ``evit`` use the per-block counts ATME solves for ``flops`` (so these token methods
    remove the same number of tokens in each block and cost the same FLOPs); ``tome`` with
    ``own_schedule=True`` uses ToMe's own constant ``r`` instead (:func:`cait.baselines.tome.tome_schedule`,
    for targets where ATME's counts exceed ToMe's half-per-layer limit). ``algm`` merges in two blocks
    (:func:`cait.baselines.algm.compress_algm`, whose ``local_share``, ``local_block`` and
    ``global_block`` it takes as ``options``). Raises ``ValueError`` for an unknown method, an option
    the method does not take, or a schedule the method cannot run.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    unknown = sorted(set(options) - OPTIONS[method])
    if unknown:
        raise ValueError(f"{method} takes no option {', '.join(unknown)} (it takes: {', '.join(sorted(OPTIONS[method])) or 'none'})")
    if method == "algm":
        return compress_algm(model, flops, **options)
    if options.get("own_schedule"):
        fast = compress(model)
        fast.set_schedule(tome.tome_schedule(cost_model(fast), flops))
    else:
        fast = compress(model, merge=ATME(flops=flops))
    if method == "evit":
        if fast.num_prefix_tokens < 1:
            raise ValueError("EViT-style pruning ranks tokens by the class token's attention: the model has no class token")
        for block in fast.blocks:
            EViTBlock.adopt(block)
    else:
        tome.check_schedule(fast.schedule, fast.grid[0] * fast.grid[1])
        for block in fast.blocks:
            block.__class__ = ToMeBlock
    return fast
