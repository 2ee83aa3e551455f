"""What a Triton kernel module declares about its configurations for ahead-of-time compilation.

Each kernel module lists its builds (``aot_builds()``) with this record; :mod:`cait_kernels.aot`
compiles them. Kept apart from ``aot`` so that the kernel modules do not import the compiler driver
(and ``aot`` can import the kernel modules without a cycle).
"""

from __future__ import annotations

from typing import NamedTuple


class Build(NamedTuple):
    """One kernel configuration: the kernel, its argument types, its compile-time constants.

    ``hot``: on the inference hot path (it must not spill registers).
    """

    label: str
    kernel: object
    signature: dict
    constants: dict
    num_warps: int
    num_stages: int
    hot: bool
