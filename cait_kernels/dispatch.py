"""Device dispatch of the public ops, and their ``torch.library`` registration.

Backends (pick one for a ``with`` block: ``with cait_kernels.backend("reference"): ...``):

- ``auto`` (the default): CUDA tensors run the Triton kernels; CPU tensors run the fused C++ ATME
  step (:mod:`cait_kernels.cpu_atme`, built on first use; where it cannot be built a warning says
  why, once, and the reference runs: same results, slower) and the PyTorch reference of the other
  ops (already one fused torch op each on CPU); any other device raises (never a silent fallback on
  an accelerator). The kernels are inference kernels (no backward): while autograd records (an
  input requires grad, grad mode on), the ops run the differentiable reference on every device, so
  training and fine-tuning work anywhere;
- ``reference``: the PyTorch reference on any device;
- ``triton``: the Triton kernels on any device; on CPU only under the interpreter
  (``TRITON_INTERPRET=1`` set before import), which is how the tests run them; refused while
  autograd records.

Wherever the Triton kernels run, an input whose channels are strided (a timm model without a class
token feeds the transposed view of its patch embedding into the blocks) is copied first: the kernels
read unit-stride channels, the ``*_triton`` functions refuse anything else.

The Triton implementations are the custom ops ``torch.ops.cait.pruned_attention``, ``.atme_step``
and ``.unmerge`` with fake (shape-only) implementations, so ``torch.compile`` traces a compressed
model in one graph and a CUDA graph captures its whole forward. The references are plain torch code
and need no registration.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence

import torch

from . import cpu_atme, triton_atme, triton_attention, triton_unmerge
from .atme import atme_step_reference, check_atme_inputs
from .attention import check_attention_inputs, pruned_attention_reference
from .unmerge import check_unmerge_inputs, unmerge_reference

BACKENDS = ("auto", "reference", "triton")
_active = "auto"


@contextlib.contextmanager
def backend(name: str):
    """Select the implementation of the public ops inside a ``with`` block: ``auto``, ``reference`` or ``triton``."""
    global _active
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    previous, _active = _active, name
    try:
        yield
    finally:
        _active = previous


def _recording(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd records an op on ``tensors`` (grad mode on and one of them requires grad)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _use_triton(op: str, device: torch.device, *tensors: torch.Tensor | None) -> bool:
    """Whether ``op`` runs its Triton kernel for ``tensors`` on ``device`` under the active backend."""
    if _active == "reference":
        return False
    if _recording(*tensors):
        if _active == "triton":
            raise RuntimeError(f"cait_kernels.{op}: the Triton kernels have no backward; run training on the reference ops")
        return False
    if _active == "triton" or device.type == "cuda":
        if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(f"cait_kernels.{op}: Triton kernels run on CPU tensors only under the interpreter (TRITON_INTERPRET=1)")
        return True
    if device.type == "cpu":
        return False
    raise NotImplementedError(
        f"cait_kernels.{op} has no kernel for {device.type} tensors; to run the PyTorch reference there, "
        f"say so: `with cait_kernels.backend('reference'): ...`"
    )


@torch.library.custom_op("cait::pruned_attention", mutates_args=())
def _attention_op(
    qkv: torch.Tensor,
    heads: int,
    d_qk: int,
    d_v: int,
    scale: float,
    size: torch.Tensor | None,
    idx_qk: torch.Tensor | None,
    idx_v: torch.Tensor | None,
) -> torch.Tensor:
    return triton_attention.launch_attention(qkv, heads, d_qk, d_v, scale, size, idx_qk, idx_v)


@_attention_op.register_fake
def _(qkv, heads, d_qk, d_v, scale, size, idx_qk, idx_v):
    return qkv.new_empty(qkv.shape[0], qkv.shape[1], heads * d_v)


@torch.library.custom_op("cait::atme_step", mutates_args=())
def _atme_op(
    x: torch.Tensor, metric: torch.Tensor, size: torch.Tensor, owner: torch.Tensor, r: int, grid: Sequence[int], prefix: int, block: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return triton_atme.launch_atme(x, metric, size, owner, r, tuple(grid), prefix, block)


@_atme_op.register_fake
def _(x, metric, size, owner, r, grid, prefix, block):
    batch, tokens, channels = x.shape
    return x.new_empty(batch, tokens - r, channels), size.new_empty(batch, tokens - r), torch.empty_like(owner)


@torch.library.custom_op("cait::unmerge", mutates_args=())
def _unmerge_op(x: torch.Tensor, owner: torch.Tensor, prefix: int) -> torch.Tensor:
    return triton_unmerge.launch_unmerge(x, owner, prefix)


@_unmerge_op.register_fake
def _(x, owner, prefix):
    return x.new_empty(x.shape[0], owner.shape[1], x.shape[2])


def _channels_contiguous(t):
    """The Triton kernels read channels with unit stride (any batch/token strides): copy only when they are not.
    A timm model without a class token feeds its patch embedding's transposed view straight into the blocks."""
    return t if t.stride(-1) == 1 else t.contiguous()


def pruned_attention(qkv, *, heads, d_qk, d_v, scale, size=None, idx_qk=None, idx_v=None):
    """Pruned-head attention; see :func:`cait_kernels.attention.pruned_attention_reference`."""
    if _use_triton("pruned_attention", qkv.device, qkv):
        check_attention_inputs(qkv, heads=heads, d_qk=d_qk, d_v=d_v, scale=scale, size=size, idx_qk=idx_qk, idx_v=idx_v)
        qkv = _channels_contiguous(qkv)
        triton_attention.check_kernel_inputs(qkv, d_qk, d_v)
        return _attention_op(qkv, heads, d_qk, d_v, float(scale), size, idx_qk, idx_v)
    return pruned_attention_reference(qkv, heads=heads, d_qk=d_qk, d_v=d_v, scale=scale, size=size, idx_qk=idx_qk, idx_v=idx_v)


def atme_step(x, metric, size, owner, *, r, grid, prefix, block=2):
    """One ATME merge step; see :func:`cait_kernels.atme.atme_step_reference`. ``r = 0`` returns the inputs."""
    if _use_triton("atme_step", x.device, x):
        check_atme_inputs(x, metric, size, owner, r=r, grid=grid, prefix=prefix, block=block)
        rows = _channels_contiguous(x)
        triton_atme.check_kernel_inputs(rows, grid)
        if r == 0:
            return x, size, owner
        return _atme_op(rows, metric, size, owner, r, list(grid), prefix, block)
    if _active == "auto" and x.device.type == "cpu" and not _recording(x) and cpu_atme.available():
        return cpu_atme.atme_step_cpu(x, metric, size, owner, r=r, grid=grid, prefix=prefix, block=block)
    return atme_step_reference(x, metric, size, owner, r=r, grid=grid, prefix=prefix, block=block)


def unmerge(x, owner, *, prefix):
    """Spatial tokens back on their cells; see :func:`cait_kernels.unmerge.unmerge_reference`."""
    if _use_triton("unmerge", x.device, x):
        check_unmerge_inputs(x, owner, prefix=prefix)
        x = _channels_contiguous(x)
        triton_unmerge.check_kernel_inputs(x)
        return _unmerge_op(x, owner, prefix)
    return unmerge_reference(x, owner, prefix=prefix)
