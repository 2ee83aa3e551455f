"""Unmerge as a Triton gather: every cell reads the row of the token that holds it.

Launch limits (:mod:`cait_kernels._launch`): axis x holds ``B * cdiv(H*W, BLOCK_ROWS)`` programs (cell
tiles fastest, the order of the former ``(cell tiles, B, channel tiles)`` grid), axis y the channel
tiles; any batch up to ``2**31 - 1`` programs runs (a batch on axis y failed from 65536 images).
Offsets: the image index is int64, so any batch size works; offsets inside one image are int32
(``x`` and the output span less than ``2**31`` elements per image, checked before launch).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._builds import Build
from ._launch import check_grid, check_offsets
from .unmerge import check_unmerge_inputs

BLOCK_ROWS = 32


@triton.jit
def unmerge_kernel(
    x,
    owner,
    out,
    cells_total,
    prefix,
    channels,
    stride_x_b,
    stride_x_t,
    stride_out_b,
    stride_out_t,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Grid :func:`unmerge_grid`: program ``(image * cdiv(H*W, BLOCK_ROWS) + cell tile, channel tile)``;
    ``out[b, cell] = x[b, P + owner[b, cell]]``."""
    tiles = tl.cdiv(cells_total, BLOCK_ROWS)
    image = (tl.program_id(0) // tiles).to(tl.int64)
    cell = (tl.program_id(0) % tiles) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    token = tl.load(owner + image * cells_total + cell, mask=cell < cells_total, other=0)
    mask = (cell[:, None] < cells_total) & (c[None, :] < channels)
    rows = tl.load(x + image * stride_x_b + (prefix + token)[:, None] * stride_x_t + c[None, :], mask=mask)
    tl.store(out + image * stride_out_b + cell[:, None] * stride_out_t + c[None, :], rows, mask=mask)


def unmerge_triton(x, owner, *, prefix):
    """Same contract as :func:`cait_kernels.unmerge.unmerge_reference`; one kernel launch.
    ``x`` needs contiguous channels; any batch/token strides."""
    check_unmerge_inputs(x, owner, prefix=prefix)
    check_kernel_inputs(x)
    return launch_unmerge(x, owner, prefix)


def check_kernel_inputs(x) -> None:
    """What the kernel needs beyond the op's contract: contiguous channels."""
    if x.stride(-1) != 1:
        raise ValueError(f"x channels must be contiguous (last stride 1), got strides {tuple(x.stride())}")


def launch_unmerge(x, owner, prefix):
    """:func:`unmerge_triton` without the input checks (the caller ran them)."""
    batch, _, channels = x.shape
    owner = owner.contiguous()
    cells = owner.shape[1]
    out = torch.empty(batch, cells, channels, dtype=x.dtype, device=x.device)
    if out.numel() == 0:  # an empty batch or no channels: nothing to launch
        return out
    check_offsets("unmerge_kernel", x=x, out=out)
    unmerge_kernel[unmerge_grid(batch, cells, channels)](
        x, owner, out, cells, prefix, channels, x.stride(0), x.stride(1), out.stride(0), out.stride(1),
        BLOCK_ROWS=BLOCK_ROWS, BLOCK_C=channel_tile(channels),
    )  # fmt: skip
    return out


def channel_tile(channels: int) -> int:
    """Channels per program (``BLOCK_C``)."""
    return min(128, triton.next_power_of_2(channels))


def unmerge_grid(batch: int, cells: int, channels: int) -> tuple[int, int]:
    """The launch grid of :func:`unmerge_kernel` for ``batch`` images of ``cells`` cells and ``channels``
    channels (checked against CUDA's limits)."""
    grid = (batch * triton.cdiv(cells, BLOCK_ROWS), triton.cdiv(channels, channel_tile(channels)))
    return check_grid("unmerge_kernel", grid, batch=batch, cells=cells, channels=channels)


def aot_builds() -> list[Build]:
    """The kernel at its widest channel tile, for every feature dtype. Hot: all."""
    signature = {"x": "*fp16", "owner": "*i32", "out": "*fp16", **dict.fromkeys(("cells_total", "prefix", "channels"), "i32")}
    signature.update(dict.fromkeys(("stride_x_b", "stride_x_t", "stride_out_b", "stride_out_t"), "i32"))
    return [
        Build(
            f"unmerge {name} {BLOCK_ROWS}x128",
            unmerge_kernel,
            dict(signature, x=f"*{name}", out=f"*{name}"),
            dict(BLOCK_ROWS=BLOCK_ROWS, BLOCK_C=128),
            4,
            3,
            True,
        )
        for name in ("fp16", "bf16", "fp32")
    ]
