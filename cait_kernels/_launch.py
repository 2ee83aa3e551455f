"""CUDA's launch limits, in one place, and the checks every Triton launch in ``cait_kernels`` runs first.

A CUDA grid holds at most ``2**31 - 1`` programs on axis x and ``65535`` on axes y and z; a launch past
that fails on the GPU only (the interpreter enforces nothing). So the batch goes on axis x (ATME's
kernels; unmerge flattens images x cell tiles onto it) or the batch is split into launches that fit
(attention, whose axis y holds images x heads), each launch's grid comes from a small pure ``*_grid``
(or ``*_launches``) function of the shapes, and that function passes it through :func:`check_grid`,
which names the shape in a ``ValueError`` if some axis would still be over (``tests/test_launch_limits.py``
walks every grid function at huge shapes and scans the ``triton_*`` modules for launches without one).

Offsets inside the kernels: the image index is cast to int64 before it meets a batch stride or a
per-image count (any batch size works); offsets inside one image stay int32 (the hot loops keep their
registers), so :func:`check_offsets` refuses a tensor whose rows of one image span ``2**31`` elements
or more (a contiguous tensor of any real model is far below; a strided view of a larger buffer may not be).
"""

from __future__ import annotations

import torch

MAX_GRID = (2**31 - 1, 65535, 65535)  # programs per grid axis x, y, z (every CUDA GPU since compute capability 3.0)
MAX_OFFSET = 2**31 - 1  # the largest element offset an int32 holds


def check_grid(kernel: str, grid: tuple[int, ...], **shape: int) -> tuple[int, ...]:
    """Return ``grid`` (``kernel``'s launch grid for ``shape``) if every axis fits CUDA's limits, else raise
    a ``ValueError`` that names the kernel, the shape and the axis."""
    if not 1 <= len(grid) <= len(MAX_GRID):
        raise ValueError(f"{kernel}: a CUDA grid has 1 to {len(MAX_GRID)} axes, got {grid}")
    for axis, (programs, limit) in enumerate(zip(grid, MAX_GRID)):
        if programs > limit:
            described = ", ".join(f"{name}={value}" for name, value in shape.items())
            raise ValueError(
                f"{kernel}: {described} needs {programs} programs on grid axis {'xyz'[axis]} (grid {grid}), "
                f"over CUDA's limit of {limit}; split the batch into smaller calls"
            )
    return grid


def span(t: torch.Tensor) -> int:
    """The largest element offset inside one image of ``t`` (every dimension after the first, the batch)."""
    if t.numel() == 0:
        return 0
    return sum((n - 1) * stride for n, stride in zip(t.shape[1:], t.stride()[1:]))


def check_offsets(kernel: str, **tensors: torch.Tensor) -> None:
    """Raise a ``ValueError`` unless every offset inside one image of each tensor fits int32 (the kernels
    compute those in int32; batch offsets are int64)."""
    for name, t in tensors.items():
        if span(t) > MAX_OFFSET:
            raise ValueError(
                f"{kernel}: {name} of shape {tuple(t.shape)} and strides {tuple(t.stride())} spans {span(t)} elements "
                f"within one image, over the kernel's int32 offsets ({MAX_OFFSET}); pass it contiguous"
            )
