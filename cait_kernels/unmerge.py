"""Unmerge: put every spatial token back on the cells it holds (the dense map for segmentation)."""
from __future__ import annotations

import torch

from ._checks import FLOAT_DTYPES, check_index_range, check_int, check_same_device, check_tensor
from ._rows import take_rows


def check_unmerge_inputs(x, owner, *, prefix) -> None:
    """Validate the arguments of :func:`unmerge`; raise a clear error before any work."""
    check_tensor("x", x, 3, FLOAT_DTYPES)
    check_tensor("owner", owner, 2, (torch.int32,))
    check_same_device(x=x, owner=owner)
    check_int("prefix", prefix, 0, x.shape[1] - 1)
    if owner.shape[0] != x.shape[0]:
        raise ValueError(f"owner has batch {owner.shape[0]} but x has batch {x.shape[0]}")
    check_index_range("owner", owner, x.shape[1] - prefix, "N")


def unmerge_reference(x, owner, *, prefix):
    """Spatial features per cell.

    Args:
        x: ``(B, P+N, C)`` tokens; owner: ``(B, H*W)`` int32 token of every cell; prefix: ``P``.
    Returns:
        ``(B, H*W, C)``: row ``c`` is the feature of the token holding cell ``c``.
    """
    check_unmerge_inputs(x, owner, prefix=prefix)
    return take_rows(x, owner.long() + prefix)
