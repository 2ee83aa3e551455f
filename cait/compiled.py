"""Compiled inference: one call that compiles a dense timm ViT or a compressed model the same way.

``cait.optimize(model, example)`` runs ``torch.compile`` (inductor) on the whole forward as one graph
(``fullgraph=True``: the ATME step and the attention are custom ops with fake implementations, so
nothing breaks the graph), compiles it for the example's shape at once and checks the compiled
output against eager before returning it:

- CPU: inductor with weight freezing (``torch._inductor.config.freezing``): the weights become
  constants, packed once for MKL/oneDNN, and constant work is folded away.
- CUDA: the same, plus CUDA graphs (``triton.cudagraphs``, what ``mode="reduce-overhead"`` sets):
  a compressed model's shapes are static, so the whole forward replays as one graph.

Inference only: calls run under ``torch.inference_mode()``. The compiled model keeps the weights it
was compiled with (freezing): call ``optimize`` again after changing them. Another input shape
compiles again (shapes stay static, ``dynamic=False``).
"""

from __future__ import annotations

import time

import torch
from torch import nn

# Relative error of the compiled output against eager that the check accepts, per dtype: the
# compiled graph fuses and reorders float sums, nothing more.
TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-10, torch.float16: 1e-2, torch.bfloat16: 3e-2}


def _config(device: torch.device) -> dict:
    """Inductor settings for ``device`` (see the module docstring)."""
    return {"freezing": True, "triton.cudagraphs": device.type == "cuda"}


class Optimized:
    """A model compiled for inference by :func:`optimize`; call it like the model's ``forward``.

    Attributes:
        model: the eager model it was compiled from (unchanged).
        compile_seconds: wall time of the first (compiling) call on the example.
        error: relative error of the compiled output against eager on the example.
    """

    def __init__(self, model: nn.Module, example: torch.Tensor):
        self.model, self.device = model, example.device
        self.compiled = torch.compile(model, fullgraph=True, dynamic=False)
        with torch.inference_mode():
            expected = model(example)
            start = time.perf_counter()
            out = self(example)
            self.compile_seconds = time.perf_counter() - start
        self.error = relative_error(out, expected)
        tolerance = TOLERANCE.get(out.dtype, 1e-4)
        if not self.error <= tolerance:  # NaN fails too
            raise RuntimeError(f"the compiled model differs from eager by {self.error:.2e} (relative, limit {tolerance:.0e}): not using it")

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(), torch._inductor.config.patch(_config(self.device)):
            if self.device.type != "cuda":
                return self.compiled(images)
            torch.compiler.cudagraph_mark_step_begin()  # a new inference step: the graph may reuse its buffers
            return self.compiled(images).clone()  # the next replay overwrites the graph's own output


def relative_error(out: torch.Tensor, expected: torch.Tensor) -> float:
    """``||out - expected|| / ||expected||`` in float64 (0 for two empty tensors)."""
    out, expected = out.detach().double().cpu(), expected.detach().double().cpu()
    if out.shape != expected.shape:
        raise RuntimeError(f"outputs of shape {tuple(out.shape)} and {tuple(expected.shape)} cannot be compared")
    norm = float(expected.norm())
    return float((out - expected).norm()) / norm if norm else float((out - expected).norm())


def optimize(model: nn.Module, example: torch.Tensor) -> Optimized:
    """Compile ``model`` for inference on inputs shaped like ``example``; see the module docstring.

    Args:
        model: a timm ViT or a compressed model (any ``nn.Module`` taking images), in eval mode,
            (a compressed Hugging Face model compiles as ``pixel_values ->`` its first output field:
            :meth:`cait.hf.HFCompressed.first_field`),
            on the device and in the dtype of ``example``.
        example: ``(B, C, H, W)`` images; compilation runs on it before this returns (CPU: about
            20 s for DeiT-S dense and 40-60 s compressed on 2 cores; cached by inductor afterwards).

    Returns:
        :class:`Optimized`, callable as ``compiled(images)`` -> the model's output.

    Raises:
        TypeError: ``example`` is not a tensor or ``model`` not a module.
        ValueError: the model is in training mode, or on another device or dtype than ``example``.
        RuntimeError: the compiled output differs from eager beyond :data:`TOLERANCE`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(example, torch.Tensor):
        raise TypeError(f"example must be a tensor of images (B, C, H, W), got {type(example).__name__}")
    if model.training:
        raise ValueError("the model is in training mode: call model.eval() first (compiled models are for inference)")
    weight = next(model.parameters())
    if weight.device != example.device or weight.dtype != example.dtype:
        raise ValueError(f"the model is {weight.dtype} on {weight.device} but the example {example.dtype} on {example.device}")
    from .hf import HFCompressed

    if isinstance(model, HFCompressed):  # compiled as the map to HF's first output field (cait.hf.HFCompressed.first_field)
        model = model.first_field()
    return Optimized(model, example)
