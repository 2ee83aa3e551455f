"""Export a dense or compressed model for deployment: ExportedProgram (``pt2``), ONNX, AOTInductor.

Every format is written from ``torch.export`` of the model's ``forward`` on images of one batch
size (or any batch size with ``dynamic_batch``), then **checked**: the written file is loaded the
way a deployment loads it and must reproduce the eager model's output on random probe images
(relative error within :data:`TOLERANCE`), else nothing is left at ``path`` and the export raises.

- ``pt2``: the ExportedProgram (``torch.export.save``). On CPU it calls the fused C++ ATME step
  ``torch.ops.cait_cpu.atme_step``: a fresh process loads it with ``torch.export.load`` after
  ``import cait_kernels`` (which defines the op; its kernel is built or loaded on the first call).
- ``onnx``: the dynamo exporter (``onnxscript``) on the PyTorch reference ops, so the file holds
  only standard ONNX operators (opset 18) and any ONNX runtime runs it with no plugin. Stable sorts
  (the ATME tie rule) become ``TopK``, whose ties ONNX breaks by the lower index, as a stable sort does.
  Checked in ``onnxruntime``.
- ``aoti``: an AOTInductor package (``torch._inductor.aoti_compile_and_package``): the model
  compiled ahead of time to a shared library (inductor with weight freezing, as
  :func:`cait.optimize`), for one input shape, which the package records: :func:`load_exported`
  refuses another (:class:`AotiRunner`; torch's own loader would read any input at that shape).
  On CPU it calls the C++ ATME step through the op registry, so the loading process imports
  ``cait_kernels`` first.

``pt2`` and ``aoti`` need nothing beyond torch; ``onnx`` needs the ``export`` extra
(``pip install 'cait[export]'``: onnx, onnxscript, onnxruntime).
"""

from __future__ import annotations

import contextlib
import json
import logging
import numbers
import os
import time
from dataclasses import dataclass

import torch
from torch import nn

import cait_kernels

from .compiled import relative_error
from .cost import default_input_size

FORMATS = ("pt2", "onnx", "aoti")
INPUT_KEY = "cait_input"  # an AOTInductor package's metadata entry: the input it was compiled for
SUFFIX = {"pt2": ".pt2", "onnx": ".onnx", "aoti": ".aoti.pt2"}  # what load_exported reads the format from
TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-10, torch.float16: 1e-2, torch.bfloat16: 3e-2}
EXTRA = "pip install 'cait[export]' (onnx, onnxscript, onnxruntime)"


@dataclass(frozen=True)
class Exported:
    """What :func:`export` wrote: the file, its format and batch, the seconds it took (export and
    check), the relative error of the loaded file against eager on the probe images, and the image
    size ``(H, W)`` in pixels the file takes."""

    path: str
    format: str
    batch: int
    dynamic_batch: bool
    seconds: float
    error: float
    img_size: tuple[int, int]


def _sort_stable(self, stable=None, dim: int = -1, descending: bool = False):
    """``aten.sort.stable`` as ONNX ``TopK`` over the whole axis: ONNX orders equal values by index,
    lower first, in both directions, which is what a stable sort does. (onnxscript's own ``aten.sort``
    is the same ``TopK``; it has no entry for the ``stable`` overload.)"""
    from onnxscript import opset18 as op

    count = op.Reshape(op.Gather(op.Shape(self), dim, axis=0), op.Constant(value_ints=[1]))
    return op.TopK(self, count, axis=dim, largest=descending, sorted=True)


def onnx_translations() -> dict:
    """What the dynamo ONNX exporter needs beyond its own table to export the reference ops."""
    return {torch.ops.aten.sort.stable: _sort_stable}


def _check_arguments(model, path, format, batch, dynamic_batch) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    if not _whole(batch) or batch < 1:
        raise ValueError(f"batch must be a whole number >= 1, got {batch!r}")
    if not isinstance(dynamic_batch, bool):
        raise TypeError(f"dynamic_batch must be True or False, got {dynamic_batch!r}")
    if model.training:
        raise ValueError("the model is in training mode: call model.eval() first (an export records inference)")
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
        raise ValueError(f"path must name the file to write, got {path!r}")
    if _format_of(os.fspath(path)) != format:
        raise ValueError(f"a {format} file must end in {SUFFIX[format]} (what load_exported reads), got {os.fspath(path)!r}")
    if format == "aoti" and dynamic_batch:
        raise NotImplementedError("the aoti format is compiled for one batch size: drop dynamic_batch (or use pt2 / onnx)")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"no such folder for the export: {folder}")
    if format == "onnx":
        missing = [name for name in ("onnx", "onnxscript", "onnxruntime") if not _importable(name)]
        if missing:
            raise NotImplementedError(f"ONNX export needs {', '.join(missing)}: {EXTRA}")


def _whole(value) -> bool:
    """An integer (numpy's too), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _input_size(model: nn.Module, img_size) -> tuple[int, int, int]:
    """``(C, H, W)`` to trace: the model's own size, or ``img_size`` once the model is seen to take it
    (its own error otherwise, before any work)."""
    chans, *own = default_input_size(model)
    if img_size is None:
        return (chans, *own)
    pair = (img_size, img_size) if _whole(img_size) else img_size
    if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and all(_whole(v) for v in pair)) or min(pair) < 1:
        raise ValueError(f"img_size must be a whole number of pixels >= 1 or a pair (H, W) of them, got {img_size!r}")
    pair = tuple(int(v) for v in pair)
    weight = next(model.parameters())
    with torch.inference_mode():
        model(torch.zeros(1, chans, *pair, dtype=weight.dtype, device=weight.device))
    return (chans, *pair)


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def _program(model: nn.Module, example: torch.Tensor, dynamic_batch: bool) -> torch.export.ExportedProgram:
    """``torch.export`` of ``model.forward`` on ``example`` (inference: the kernels' path, not autograd's)."""
    shapes = ({0: torch.export.Dim("batch", min=1)},) if dynamic_batch else None
    with torch.no_grad():
        return torch.export.export(model, (example,), dynamic_shapes=shapes)


@contextlib.contextmanager
def _quiet_constant_folding():
    """onnxscript's optimizer warns once per TopK (the stable sort of the merge step) that it cannot fold
    an op with two outputs; that is expected (nothing to fold), so its warnings are held back."""
    folding = logging.getLogger("onnxscript.optimizer._constant_folding")
    level = folding.level
    folding.setLevel(logging.ERROR)
    try:
        yield
    finally:
        folding.setLevel(level)


def _write(model: nn.Module, path: str, format: str, example: torch.Tensor, dynamic_batch: bool) -> None:
    if format == "onnx":
        shapes = ({0: "batch"},) if dynamic_batch else None
        with torch.no_grad(), cait_kernels.backend("reference"), _quiet_constant_folding():
            program = torch.onnx.export(
                model,
                (example,),
                dynamo=True,
                dynamic_shapes=shapes,
                input_names=["images"],
                custom_translation_table=onnx_translations(),
                verbose=False,
            )
        program.save(path)
        return
    program = _program(model, example, dynamic_batch)
    if format == "pt2":
        torch.export.save(program, path)
    else:  # compiled as cait.optimize compiles: inductor with the weights frozen into constants
        with torch.no_grad(), torch._inductor.config.patch(freezing=True):
            configs = {"aot_inductor.metadata": {INPUT_KEY: json.dumps(_input_record(example))}}
            torch._inductor.aoti_compile_and_package(program, package_path=path, inductor_configs=configs)


def load_exported(path: str | os.PathLike, *, threads: int | None = None, spinning: bool = True):
    """A file written by :func:`export`, loaded as a deployment would: a callable ``images -> output``
    (torch tensors in and out). The format is read off the suffix (``.pt2`` ExportedProgram, ``.onnx``,
    ``.aoti.pt2`` AOTInductor package; what :func:`default_path` gives). ``threads``, ``spinning``: see
    :class:`OnnxRunner` (ONNX only; the torch formats use torch's thread setting)."""
    path = os.fspath(path)
    format = _format_of(path)
    if format is None:
        raise ValueError(f"{path}: unknown export format (expected a name ending in {', '.join(SUFFIX.values())})")
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path} is a folder: give a file written by cait.export")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such file: {path}")
    if format == "onnx":
        return OnnxRunner(path, threads, spinning)
    if format == "aoti":
        return AotiRunner(path)
    return torch.export.load(path).module()


def _format_of(path: str) -> str | None:
    """The format a file name says (``.aoti.pt2`` before ``.pt2``), or None."""
    return next((f for f in ("aoti", "pt2", "onnx") if path.endswith(SUFFIX[f])), None)


def _input_record(images: torch.Tensor) -> dict:
    """What an AOTInductor package records of the input it was compiled for (JSON-ready)."""
    return {"shape": list(images.shape), "dtype": str(images.dtype).removeprefix("torch."), "device": images.device.type}


class AotiRunner:
    """An AOTInductor package, called like the model: ``runner(images)`` -> the output. The compiled
    code reads its input at the shape it was traced with whatever it is given, so the runner refuses
    (``ValueError``) images of another shape, dtype or device, and files without the record of that
    input (not written by :func:`export`)."""

    def __init__(self, path: str):
        try:
            self.model = torch._inductor.aoti_load_package(path)
        except RuntimeError as error:  # torch's own multi-line message for a foreign or damaged file
            raise ValueError(f"{path} is not an AOTInductor package that loads here ({str(error).splitlines()[0]})") from error
        record = self.model.get_metadata().get(INPUT_KEY)
        if record is None:
            raise ValueError(f"{path} does not record the input it was compiled for (not written by cait.export): export it again")
        self.input = json.loads(record)
        self.path = path

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        got = _input_record(images) if torch.is_tensor(images) else None
        if got != self.input:
            want = self.input
            raise ValueError(
                f"{self.path} was compiled for {want['dtype']} images of shape {tuple(want['shape'])} on {want['device']}, got "
                + (f"{got['dtype']} images of shape {tuple(got['shape'])} on {got['device']}" if got else type(images).__name__)
                + " (an AOTInductor package takes one input shape: export again for another)"
            )
        return self.model(images.contiguous())  # the compiled code assumes the traced (contiguous) strides


class OnnxRunner:
    """An ONNX file in an onnxruntime CPU session, called like the model: ``runner(images)`` -> the
    first output as a torch tensor. ``threads``: intra-op threads (None: onnxruntime's choice).
    ``spinning``: whether idle onnxruntime threads busy-wait for the next run (its default; turn it
    off when other thread pools share the cores, e.g. torch's while benchmarking side by side: with
    2 cores, spinning threads of one runtime slowed the other's OpenMP barriers a hundredfold)."""

    def __init__(self, path: str, threads: int | None = None, spinning: bool = True):
        try:
            import onnxruntime
        except ImportError:
            raise NotImplementedError(f"running ONNX files needs onnxruntime: {EXTRA}") from None
        options = onnxruntime.SessionOptions()
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads is not None:
            options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        if not spinning:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.outputs(images)[0]

    def outputs(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Every output of the graph, in order, as torch tensors."""
        results = self.session.run(None, {self.input: images.detach().cpu().numpy()})
        return [torch.from_numpy(r) for r in results]


def default_path(source: str | os.PathLike, format: str) -> str:
    """``deit_s.safetensors`` -> ``deit_s.pt2`` / ``deit_s.onnx`` / ``deit_s.aoti.pt2``."""
    return os.path.splitext(os.fspath(source))[0] + SUFFIX[format]


def export(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    format: str = "pt2",
    batch: int = 1,
    dynamic_batch: bool = False,
    img_size: int | tuple[int, int] | None = None,
) -> Exported:
    """Write ``model`` for deployment in ``format`` and check the written file; see the module docstring.

    Args:
        model: a timm ViT, a compressed model or a segmentation model, in eval mode (any ``nn.Module``
            whose ``forward`` takes images ``(B, C, H, W)``). A compressed Hugging Face model
            (:class:`cait.hf.HFCompressed`) is written as the map from ``pixel_values`` to the first field
            of its output (:meth:`~cait.hf.HFCompressed.first_field`: logits of a classifier,
            ``last_hidden_state`` of a backbone, ``image_embeds`` of CLIP with projection).
        path: the file to write; its suffix must be what :func:`load_exported` reads for ``format``
            (``.pt2``, ``.onnx``, ``.aoti.pt2``).
        format: ``pt2``, ``onnx`` or ``aoti``.
        batch: the batch size traced (and the only one the file takes without ``dynamic_batch``).
        dynamic_batch: the file takes any batch size >= 1 (not for ``aoti``); traced at ``max(batch, 2)``
            (``torch.export`` would specialize a batch of 1), checked at ``batch`` and ``batch + 1``.
        img_size: the image size the file takes, ``H`` or ``(H, W)`` in pixels (default: the size the
            model was built for). Another size needs a model that takes it (``dynamic_img_size=True``);
            the file then holds that size's merge schedule and takes that size only.

    Returns:
        :class:`Exported`.

    Raises:
        TypeError / ValueError: a bad argument (before any work); FileNotFoundError: no such folder;
        NotImplementedError: ``onnx`` without the ``export`` extra, ``aoti`` with ``dynamic_batch``;
        RuntimeError: the written file does not reproduce the model (the file is removed).
    """
    _check_arguments(model, path, format, batch, dynamic_batch)
    path = os.fspath(path)
    weight = next(model.parameters())
    generator = torch.Generator().manual_seed(0)
    size = _input_size(model, img_size)
    from .hf import HFCompressed

    if isinstance(model, HFCompressed):  # a compressed Hugging Face model: the file computes HF's first output field
        model = model.first_field()
    # torch.export specializes a batch of 1 (and 0): a dynamic batch is traced at 2 at least
    example = torch.randn(max(batch, 2) if dynamic_batch else batch, *size, generator=generator).to(weight)
    probes = [torch.randn(batch, *size, generator=generator).to(weight)]
    if dynamic_batch:
        probes.append(torch.randn(batch + 1, *size, generator=generator).to(weight))
    start = time.perf_counter()
    _write(model, path, format, example, dynamic_batch)
    try:
        error = _check(model, path, probes)
    except BaseException:
        os.remove(path)
        raise
    return Exported(path, format, batch, dynamic_batch, time.perf_counter() - start, error, tuple(size[1:]))


def _check(model: nn.Module, path: str, probes: list[torch.Tensor]) -> float:
    """Largest relative error of the file at ``path``, loaded afresh, against eager on ``probes``."""
    runner = load_exported(path, spinning=False)
    worst = 0.0
    with torch.inference_mode():
        for images in probes:
            expected = model(images)
            try:
                out = runner(images)
            except Exception as error:  # the runtime's own error types (onnxruntime, AOTInductor)
                raise RuntimeError(f"the exported file {path} fails on a batch of {images.shape[0]}: {error}") from error
            error = relative_error(out, expected)
            tolerance = TOLERANCE.get(expected.dtype, 1e-4)
            if not error <= tolerance:  # NaN fails too
                raise RuntimeError(
                    f"the exported file {path} differs from the model by {error:.2e} (relative, limit {tolerance:.0e}) "
                    f"on a batch of {images.shape[0]}: not keeping it"
                )
            worst = max(worst, error)
    return worst
