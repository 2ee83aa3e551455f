"""Device dispatch of the public ops.

``auto`` (the default): CPU tensors run the PyTorch reference; CUDA tensors run the Triton kernels,
which are not built yet, so they raise instead of silently running the reference on a GPU.
``with cait_kernels.backend("reference"):`` runs the references on any device, explicitly.
"""
from __future__ import annotations

import contextlib

from .atme import atme_step_reference
from .attention import pruned_attention_reference
from .unmerge import unmerge_reference

BACKENDS = ("auto", "reference")
_active = "auto"


@contextlib.contextmanager
def backend(name: str):
    """Select the implementation of the public ops inside a ``with`` block: ``auto`` or ``reference``."""
    global _active
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    previous, _active = _active, name
    try:
        yield
    finally:
        _active = previous


def _resolve(op: str, reference, device):
    if _active == "reference" or device.type == "cpu":
        return reference
    raise NotImplementedError(
        f"cait_kernels.{op} has no Triton kernel for {device.type} tensors yet; to run the PyTorch "
        f"reference there, say so: `with cait_kernels.backend('reference'): ...`"
    )


def pruned_attention(qkv, *, heads, d_qk, d_v, scale, size=None, idx_qk=None, idx_v=None):
    """Pruned-head attention; see :func:`cait_kernels.attention.pruned_attention_reference`."""
    impl = _resolve("pruned_attention", pruned_attention_reference, qkv.device)
    return impl(qkv, heads=heads, d_qk=d_qk, d_v=d_v, scale=scale, size=size, idx_qk=idx_qk, idx_v=idx_v)


def atme_step(x, metric, size, owner, *, r, grid, prefix, block=2):
    """One ATME merge step; see :func:`cait_kernels.atme.atme_step_reference`."""
    impl = _resolve("atme_step", atme_step_reference, x.device)
    return impl(x, metric, size, owner, r=r, grid=grid, prefix=prefix, block=block)


def unmerge(x, owner, *, prefix):
    """Spatial tokens back on their cells; see :func:`cait_kernels.unmerge.unmerge_reference`."""
    impl = _resolve("unmerge", unmerge_reference, x.device)
    return impl(x, owner, prefix=prefix)
