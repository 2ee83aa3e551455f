"""The batch-1 deployment table: dense vs compressed in every runtime, on 1 and on 2 CPU threads.

Runtimes (:data:`cait.benchmarks.latency.RUNTIMES`): ``eager`` (PyTorch as is), ``compile``
(:func:`cait.optimize`: inductor with weight freezing) and ``onnxruntime`` (:func:`cait.export` to
ONNX, run by onnxruntime with as many intra-op threads as torch, not spinning). Every row's speedup
is against dense in the same runtime and thread count (compiled vs compiled): the models of one
runtime are timed interleaved, the runtimes one after the other, in one process. Compile and export
seconds are reported next to them.

Inductor bakes the thread count into its C++ kernels, so each thread count compiles again; the
ONNX file of a model is exported once and reused.
"""

from __future__ import annotations

import tempfile

import torch

from .latency import Row, build_variant, compare, parse_variant

MODELS = ("deit_tiny_patch16_224", "deit_small_patch16_224")
VARIANTS = ("merge=0.85,prune=0.5/0.75/0.75", "merge=0.7,prune=0.5/0.75/0.75")  # about 0.6x and 0.5x FLOPs
RUNTIMES = ("eager", "compile", "onnxruntime")
THREADS = (1, 2)


def run(models=MODELS, variants=VARIANTS, runtimes=RUNTIMES, threads=THREADS, repeats: int = 15, progress=None) -> list[Row]:
    """Rows of the table for timm ``models`` (random weights), dense and each of ``variants``
    (:func:`cait.benchmarks.latency.parse_variant` specs), batch 1. ``progress``: a tqdm-like bar
    advanced once per (model, thread count)."""
    import timm

    specs = [parse_variant(text) for text in variants]  # refuse a bad spec before any work
    previous, rows = torch.get_num_threads(), []
    try:
        with tempfile.TemporaryDirectory() as folder:
            exports = {"folder": folder}
            for name in models:
                dense = timm.create_model(name).eval()
                contenders = {"dense": dense, **{text: build_variant(dense, spec) for text, spec in zip(variants, specs)}}
                for count in threads:
                    torch.set_num_threads(count)
                    rows += compare(name, contenders, 1, repeats, runtimes=runtimes, progress=False, exports=exports)
                    if progress is not None:
                        progress.update(1)
    finally:
        torch.set_num_threads(previous)
    return rows
