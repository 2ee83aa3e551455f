"""Latency measurement for dense vs compressed models: interleaved repeats, medians, a readable table."""

from __future__ import annotations

import os
import platform
import random
import statistics
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..cost import default_input_size, flops


def machine() -> dict:
    """What the numbers were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import timm

    info = {"cpu": cpu, "threads": torch.get_num_threads(), "torch": torch.__version__, "timm": timm.__version__}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def time_interleaved(
    models: dict[str, nn.Module], images: torch.Tensor, repeats: int, warmup: int = 2, progress: bool = True
) -> dict[str, list[float]]:
    """Seconds per forward of each model. Every repeat runs each model once, so drifts in clock
    speed or load hit all of them alike, in a fresh random order (fixed seed), so no model always
    runs after the same one: a predecessor with a large working set leaves the caches cold (a fixed
    order cost the model timed right after dense DeiT-T about 4% here). Warm-up runs come first and
    are not kept."""
    from tqdm.auto import tqdm

    sync = torch.cuda.synchronize if images.is_cuda else (lambda: None)
    seconds: dict[str, list[float]] = {name: [] for name in models}
    order, shuffle = list(models), random.Random(0).shuffle
    with torch.inference_mode():
        for rep in tqdm(range(warmup + repeats), desc="timing", disable=not progress, leave=False):
            shuffle(order)
            for name in order:
                model = models[name]
                sync()
                start = time.perf_counter()
                model(images)
                sync()
                if rep >= warmup:
                    seconds[name].append(time.perf_counter() - start)
    return seconds


@dataclass
class Row:
    """One line of the benchmark table; ratios are against the row named ``baseline`` (dense in the
    same runtime: compiled vs compiled)."""

    model: str
    variant: str
    batch: int
    gflops: float  # per image, multiply-add = 2
    params_m: float
    img_per_s: float  # median over repeats
    speedup: float
    flops_ratio: float
    efficiency: float  # speedup x flops_ratio: 1.0 means the whole FLOPs saving shows up as speed
    baseline: str = "dense"
    merge_share: float | None = None  # share of the forward spent in the token merge/prune steps (None: none, or not measurable)
    runtime: str = "eager"  # eager, compile, onnxruntime or cuda graph (RUNTIMES)
    setup_s: float | None = None  # seconds to compile / export and check (None: eager)
    threads: int | None = None  # torch (and onnxruntime) CPU threads


class ReferenceOps(nn.Module):
    """``model`` run on the PyTorch reference ops (``cait_kernels.backend("reference")``) on any device."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        from cait_kernels import backend

        with backend("reference"):
            return self.model(images)


RUNTIMES = ("eager", "compile", "onnxruntime", "cuda graph")


def prepare(model: nn.Module, images: torch.Tensor, runtime: str, exports: dict) -> tuple:
    """``(callable, seconds)``: ``model`` ready to run ``images`` in ``runtime`` and the seconds that
    took (None for eager). ``compile``: :func:`cait.optimize`; ``onnxruntime``: :func:`cait.export` to
    ONNX (reference ops, checked), run by onnxruntime on torch's thread count; ``cuda graph``:
    :func:`cait.cuda_graph`. ``exports``: ``{"folder": DIR}`` where ONNX files go; it also remembers
    them (path -> export seconds), so timing the same model again (e.g. on other threads) reuses the file.
    onnxruntime runs without spinning threads (see :class:`cait.exported.OnnxRunner`)."""
    from ..compiled import Optimized
    from ..exported import OnnxRunner, export
    from ..graphs import cuda_graph

    if runtime == "eager":
        return model, None
    start = time.perf_counter()
    if runtime == "compile":
        return Optimized(model, images), time.perf_counter() - start
    if runtime == "cuda graph":
        return cuda_graph(model, images), time.perf_counter() - start
    if runtime != "onnxruntime":
        raise ValueError(f"runtime must be one of {RUNTIMES}, got {runtime!r}")
    path = os.path.join(exports["folder"], f"{id(model)}-batch{images.shape[0]}.onnx")
    if path not in exports:
        export(model, path, format="onnx", batch=images.shape[0])
        exports[path] = time.perf_counter() - start
    return OnnxRunner(path, threads=torch.get_num_threads(), spinning=False), exports[path]


def merge_seconds(model: nn.Module, images: torch.Tensor, repeats: int) -> float | None:
    """Seconds per forward that ``model`` spends in its token merge (or pruning) steps, or None if it
    has none: every merging block's step replayed on the exact state and metric it gets in a real
    forward, all blocks in turn, median over ``repeats`` after a warm-up. Runs ``ReferenceOps``
    models on the reference ops, as they are timed."""
    from cait_kernels import backend

    from ..model import CompressedViT

    reference = isinstance(model, ReferenceOps)
    model = model.model if reference else model
    if not isinstance(model, CompressedViT) or not any(model.schedule):
        return None
    sync = torch.cuda.synchronize if images.is_cuda else (lambda: None)
    with torch.inference_mode(), backend("reference" if reference else "auto"):
        steps, state = [], model.embed(images)
        for block in model.blocks:
            x, metric = block.attend(state)
            if block.r:
                steps.append((block, state.merged(x, state.size, state.owner), metric))
            state = block(state)
        seconds = []
        for _ in range(repeats + 2):
            sync()
            start = time.perf_counter()
            for block, before, metric in steps:
                block.merge(before, metric)
            sync()
            seconds.append(time.perf_counter() - start)
    return statistics.median(seconds[2:])


def compare(
    name: str,
    models: dict[str, nn.Module],
    batch: int,
    repeats: int,
    runtimes=("eager",),
    progress: bool = True,
    exports: dict | None = None,
) -> list[Row]:
    """Time ``models`` (the first one is the baseline) on one random batch in every runtime of
    ``runtimes`` (:data:`RUNTIMES`); one :class:`Row` per (runtime, model), each against the baseline
    in its own runtime. The models of one runtime are timed interleaved (:func:`time_interleaved`),
    the runtimes one after the other (each runtime's thread pool then has the cores to itself). A model
    that a runtime cannot prepare is left out with a printed line (the whole runtime when it is the
    baseline); the other rows are still timed. ``exports``: see :func:`prepare` (default: a temporary folder for this call)."""
    import tempfile

    first = next(iter(models.values()))
    weight = next(first.parameters())
    size = default_input_size(first)
    images = torch.randn(batch, *size, device=weight.device, dtype=weight.dtype)
    base_variant = next(iter(models))
    runners, setup = {}, {}
    if "compile" in runtimes:  # compiled runners of earlier calls are gone: free dynamo's entries (8 per forward at most)
        torch._dynamo.reset()
    with tempfile.TemporaryDirectory() as folder:
        exports = exports if exports is not None else {"folder": folder}
        for runtime in runtimes:
            for variant, model in models.items():
                try:
                    runners[runtime, variant], setup[runtime, variant] = prepare(model, images, runtime, exports)
                except Exception as error:  # one runtime failing on one model leaves the other rows standing
                    print(f"{variant} [{runtime}] not timed: {type(error).__name__}: {str(error)[:300]}", flush=True)
                    if variant == base_variant:
                        break
        runners = {key: runner for key, runner in runners.items() if (key[0], base_variant) in runners}
        seconds = {}
        for runtime in runtimes:
            mine = {key: runner for key, runner in runners.items() if key[0] == runtime}
            seconds.update(time_interleaved(mine, images, repeats, progress=progress) if mine else {})
    merging = {variant: merge_seconds(model, images, repeats) for variant, model in models.items()}
    counts = {variant: flops(m, size) for variant, m in models.items()}
    rows = []
    for runtime, variant in runners:
        model = models[variant]
        speed = batch / statistics.median(seconds[runtime, variant])
        base_speed = batch / statistics.median(seconds[runtime, base_variant])
        ratio = counts[variant] / counts[base_variant]
        share = merging[variant] / statistics.median(seconds[runtime, variant]) if runtime == "eager" and merging[variant] else None
        rows.append(
            Row(
                name,
                variant,
                batch,
                counts[variant] / 1e9,
                sum(p.numel() for p in model.parameters()) / 1e6,
                speed,
                speed / base_speed,
                ratio,
                speed / base_speed * ratio,
                base_variant if runtime == "eager" else f"{base_variant} [{runtime}]",
                share,
                runtime,
                setup[runtime, variant],
                torch.get_num_threads() if not images.is_cuda else None,
            )
        )
    return rows


def table(rows: list[Row]) -> str:
    """Markdown table of benchmark rows (runtime, threads and setup columns when some row has them)."""
    extra = any(r.runtime != "eager" for r in rows)
    head = "| model | variant | batch | GFLOPs | params (M) | img/s | speedup | FLOPs ratio | speedup x FLOPs ratio | merge % |"
    head = head.replace("| variant |", "| variant | runtime | threads |") + " setup s |" if extra else head
    lines = [head, "|" + "---|" * head[1:].count("|")]
    for r in rows:
        where = f" {r.runtime} | {r.threads or '-'} |" if extra else ""
        setup = f" {r.setup_s:.1f} |" if extra and r.setup_s is not None else " - |" if extra else ""
        lines.append(
            f"| {r.model} | {r.variant} |{where} {r.batch} | {r.gflops:.2f} | {r.params_m:.1f} | {r.img_per_s:.1f} | "
            f"{r.speedup:.2f}x | {r.flops_ratio:.3f} | {r.efficiency:.2f} | {percent(r.merge_share)} |{setup}"
        )
    return "\n".join(lines)


def percent(share: float | None) -> str:
    """``0.034`` -> ``3.4``; None (nothing to measure) -> ``-``."""
    return "-" if share is None else f"{100 * share:.1f}"


def as_json(rows: list[Row]) -> list[dict]:
    return [asdict(r) for r in rows]


DEFAULT_VARIANTS = ("merge=0.8", "merge=0.6", "prune=0.5/0.75/0.75", "merge=0.7,prune=0.5/0.75/0.75")


def parse_variant(text: str):
    """``merge=F`` (ATME FLOPs target), ``prune=QK/V/MLP`` (CDCP keep ratios), ``align=N`` or
    ``align=HEAD/MLP`` (CDCP multiples, default :data:`cait.cdcp.ALIGN`) and ``block=2|4``, comma
    separated, e.g. ``merge=0.7,prune=0.5/0.75/0.75`` -> ``(ATME | None, CDCP | None)``; or ``tome=F``,
    the ToMe baseline (:mod:`cait.baselines`) at FLOPs ratio ``F`` -> ``("tome", F)``."""
    from ..cdcp import ALIGN, CDCP
    from ..schedule import ATME

    if text.startswith("tome="):
        try:
            return "tome", float(text.removeprefix("tome="))
        except ValueError:
            raise ValueError(f"variant {text!r} must look like tome=0.6 (a FLOPs ratio)") from None
    fields = dict(part.split("=", 1) for part in text.split(",") if "=" in part)
    if not fields or set(fields) - {"merge", "prune", "block", "align"} or text.count("=") != len(fields):
        raise ValueError(f"variant {text!r} must look like merge=0.7,prune=0.5/0.75/0.75[,align=8][,block=2]")
    if "align" in fields and "prune" not in fields:
        raise ValueError(f"variant {text!r}: align applies to pruning, give prune= too")
    try:
        merge = ATME(flops=float(fields["merge"]), block=int(fields.get("block", 2))) if "merge" in fields else None
        ratios = [float(v) for v in fields["prune"].split("/")] if "prune" in fields else None
        align = tuple(int(v) for v in fields["align"].split("/")) if "align" in fields else (ALIGN,)
    except ValueError as error:
        raise ValueError(f"variant {text!r}: {error}") from error
    if ratios is not None and len(ratios) != 3:
        raise ValueError(f"variant {text!r}: prune takes three keep ratios QK/V/MLP")
    if len(align) > 2:
        raise ValueError(f"variant {text!r}: align takes one multiple or two (HEAD/MLP)")
    return merge, None if ratios is None else CDCP(*ratios, align=align[0] if len(align) == 1 else align)


def build_variant(dense: nn.Module, spec):
    """The compressed copy of ``dense`` that a :func:`parse_variant` result describes."""
    from ..baselines import compress_baseline
    from ..model import compress

    if spec[0] == "tome":
        return compress_baseline(dense, "tome", spec[1])
    return compress(dense, merge=spec[0], prune=spec[1])


def method_of(variant: str) -> str:
    """The method a variant name belongs to, for plots: ``dense``, ``ToMe``, ``CAIT`` (both axes),
    ``ATME`` (merging only), ``CDCP`` (pruning only) or ``saved file``; CUDA-graph and reference-op suffixes are kept."""
    suffix = variant[variant.index(" [") :] if " [" in variant else ""
    base = variant.removesuffix(suffix)
    if base == "dense":
        name = "dense"
    elif base.startswith("tome="):
        name = "ToMe"
    elif base == "saved":
        name = "saved file"
    else:
        name = {(True, True): "CAIT", (True, False): "ATME", (False, True): "CDCP"}[("merge=" in base, "prune=" in base)]
    return name + suffix


def is_saved_model(entry: str) -> bool:
    """Whether a ``--models`` entry names a file saved by :func:`cait.save` rather than a timm model."""
    import os

    return entry.endswith(".safetensors") or os.path.isfile(entry)


def contenders_for(entry: str, specs: dict, checkpoint: str | None = None, load_weights=None, **kwargs) -> dict[str, nn.Module]:
    """``{"dense": model, variant: compressed, ...}`` for one ``--models`` entry. A timm name: the model
    (``checkpoint`` loaded by ``load_weights(model, path, name)``, timm's loader by default) and one
    compressed copy per variant spec. A saved file: the model it holds, as ``"saved"``, next to the
    same architecture rebuilt from the file's config with random weights as ``"dense"`` (variants
    apply to timm names and Hugging Face folders only). A Hugging Face ``save_pretrained`` folder: the HF
    model as ``"dense"`` and its compressed copies, each as the map to HF's first output field
    (:class:`cait.hf.FirstField`); a compressed HF file next to its HF class with random weights. ``kwargs`` go to
    ``timm.create_model`` (timm names only)."""
    import timm

    from .. import hf
    from ..serialize import load

    if hf.is_folder(entry):  # a Hugging Face save_pretrained folder: the HF model and compressed copies, HF's first field each
        model = hf.from_folder(entry)
        if any(spec[0] == "tome" for spec in specs.values()):
            raise ValueError(f"{entry}: ToMe variants take timm models; a Hugging Face folder takes merge=/prune= variants")
        variants = {text: build_variant(model, spec).eval().first_field() for text, spec in specs.items()}
        return {"dense": hf.FirstField(model, hf.input_size(model)), **variants}
    if is_saved_model(entry):
        from ..architecture import build

        saved = load(entry)
        if isinstance(saved, hf.HFCompressed):  # next to the HF class itself, random weights, from the saved HF config
            transformers = hf.require_transformers("timing a compressed Hugging Face file")
            dense = getattr(transformers, saved.class_name)(saved.hf_config).eval()
            return {"dense": hf.FirstField(dense, saved.backbone.input_size), "saved": saved.first_field().eval()}
        return {"dense": build(saved.architecture(), device=None), "saved": saved}
    dense = timm.create_model(entry, **kwargs).eval()
    if checkpoint:
        (load_weights or (lambda model, path, name: timm.models.load_checkpoint(model, path)))(dense, checkpoint, entry)
    return {"dense": dense, **{text: build_variant(dense, spec) for text, spec in specs.items()}}


def run(
    models: list[str],
    batches: list[int],
    variants: list[str],
    repeats: int,
    checkpoint: str | None = None,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    runtimes=("eager",),
    progress=None,
    img_size: int | None = None,
    load_weights=None,
) -> list[Row]:
    """The model table: each ``models`` entry (a timm name or a file saved by :func:`cait.save`, see
    :func:`contenders_for`) dense and compressed, timed side by side on ``device`` in ``dtype`` in every
    runtime of ``runtimes`` (:data:`RUNTIMES`; ``cuda graph`` rows for CUDA graphs). On a GPU every
    compressed variant also runs on the reference ops (``<variant> [reference ops]``). ``img_size``:
    build the timm models for square images of that many pixels (default: the model's size).
    ``progress``: a tqdm-like bar advanced once per (model, batch); without one, each table is printed
    as it is done."""
    specs = {text: parse_variant(text) for text in variants}
    sizing = {} if img_size is None else {"img_size": img_size}
    rows: list[Row] = []
    for name in models:
        contenders = contenders_for(name, specs, checkpoint, load_weights, **sizing)
        compressed = [text for text in contenders if text != "dense"]
        if device != "cpu":
            contenders.update({f"{text} [reference ops]": ReferenceOps(contenders[text]) for text in compressed})
        contenders = {text: model.to(device=device, dtype=dtype) for text, model in contenders.items()}
        for batch in batches:
            rows += compare(name, contenders, batch, repeats, runtimes=runtimes, progress=progress is None)
            if progress is None:
                print(table(rows[-len(contenders) * len(runtimes) :]), "\n", flush=True)
            else:
                progress.update(1)
    return rows
