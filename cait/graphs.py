"""Fixed-shape inference in one CUDA graph: every kernel of a forward pass replayed by one launch."""

from __future__ import annotations

import torch
from torch import nn


class CudaGraph:
    """A model's forward captured for one input shape, dtype and device; call it like the model.

    ``graph(images)`` copies ``images`` into the captured input buffer, replays the graph and returns
    a copy of the output (pass ``copy=False`` to get the graph's own output buffer, which the next
    call overwrites). Inputs of another shape, dtype or device are refused.
    """

    def __init__(self, model: nn.Module, example: torch.Tensor, warmup: int = 3):
        if not isinstance(example, torch.Tensor) or example.device.type != "cuda":
            raise ValueError("cait.cuda_graph needs an example input on a CUDA device")
        if next(model.parameters()).device != example.device:
            raise ValueError(f"the model is on {next(model.parameters()).device} but the example input on {example.device}")
        self.model, self.input = model, example.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.inference_mode(), torch.cuda.stream(stream):
            for _ in range(warmup):  # compiles the kernels and checks the inputs outside the capture
                model(self.input)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(self.graph):
            self.output = model(self.input)

    def __call__(self, images: torch.Tensor, copy: bool = True) -> torch.Tensor:
        if images.shape != self.input.shape or images.dtype != self.input.dtype or images.device != self.input.device:
            raise ValueError(
                f"this graph was captured for {tuple(self.input.shape)} {self.input.dtype} on {self.input.device}, "
                f"got {tuple(images.shape)} {images.dtype} on {images.device}"
            )
        self.input.copy_(images)
        self.graph.replay()
        return self.output.clone() if copy else self.output


def cuda_graph(model: nn.Module, example: torch.Tensor, warmup: int = 3) -> CudaGraph:
    """Capture ``model(example)`` (inference) in a CUDA graph; see :class:`CudaGraph`.

    A compressed model keeps every shape static (a fixed merge count per layer), so its whole forward
    (attention, ATME steps, MLPs, head) is one graph: at batch 1 this removes the host's launch cost.
    A model that takes several input sizes (``dynamic_img_size``) needs one graph per size (and batch).
    """
    return CudaGraph(model, example, warmup)
