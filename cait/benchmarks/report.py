"""``cait bench --all``: every number in one run, as JSON, a Markdown report and two plots.

Timed in the run: the model table (DeiT-T/S/B dense vs ToMe vs ATME/CDCP/CAIT at several FLOPs
ratios; CPU: fp32, batch 1 and 8; GPU: fp16, batch 1/64/256, eager and CUDA graph), on a CPU the
batch-1 deployment table (:mod:`.deploy`: eager, compiled and onnxruntime, 1 and 2 threads) and, on
a GPU, the kernel table. Read from earlier runs (they train models, so they are run on their own with
``cait bench --accuracy`` / ``--accuracy --curve`` / ``--segmentation``): the accuracy point, the
accuracy curve and the segmentation results, when their JSON files are in the results folder.
``--quick`` times fewer models, variants and repeats (minutes on a laptop CPU) for a smoke check, not
for quoting, and skips the deployment table (it compiles).

Output folder: ``report.json`` (validates against :data:`SCHEMA`), ``report.md``,
``throughput_vs_gflops.png`` (per model, img/s against GFLOPs per image, one line per method, at
the largest batch) and ``accuracy_vs_throughput.png`` (top-1 / mIoU against img/s, one line per method:
the Pareto picture of the accuracy point, the accuracy curve and segmentation).
"""

from __future__ import annotations

import json
import os
import platform

VERSION = "cait-report/1"
MODELS = ("deit_tiny_patch16_224", "deit_small_patch16_224", "deit_base_patch16_224")
VARIANTS = (
    "tome=0.75",
    "tome=0.6",
    "tome=0.5",
    "merge=0.6",
    "prune=0.5/0.75/0.75",
    "merge=0.9,prune=0.75/0.875/0.875",
    "merge=0.85,prune=0.5/0.75/0.75",
    "merge=0.7,prune=0.5/0.75/0.75",
)
QUICK_VARIANTS = ("tome=0.5", "merge=0.85,prune=0.5/0.75/0.75", "merge=0.7,prune=0.5/0.75/0.75")
BATCHES = {"cpu": (1, 8), "cuda": (1, 64, 256)}
PLOTS = ("throughput_vs_gflops.png", "accuracy_vs_throughput.png")
READ = {"accuracy": "accuracy-digits.json", "curve": "accuracy-curve-digits.json", "segmentation": "segmentation-digits.json"}
COMMANDS = {"accuracy": "--accuracy", "curve": "--accuracy --curve", "segmentation": "--segmentation"}
RESULTS = (
    ("accuracy", "Accuracy (digits)", "top1"),
    ("curve", "Accuracy curve (digits)", "top1"),
    ("segmentation", "Segmentation (digit canvases)", "miou"),
)  # key, title, metric

_NUMBER = {"type": "number"}
_MODEL_ROW = {
    "type": "object",
    "required": ["model", "variant", "method", "batch", "gflops", "params_m", "img_per_s", "speedup", "flops_ratio", "efficiency"],
    "properties": {
        "model": {"type": "string"},
        "variant": {"type": "string"},
        "method": {"type": "string"},
        "batch": {"type": "integer", "minimum": 1},
        "gflops": _NUMBER,
        "params_m": _NUMBER,
        "img_per_s": {"type": "number", "exclusiveMinimum": 0},
        "speedup": _NUMBER,
        "flops_ratio": _NUMBER,
        "efficiency": _NUMBER,
        "merge_share": {"type": ["number", "null"], "minimum": 0},
        "runtime": {"type": "string"},
        "setup_s": {"type": ["number", "null"]},
        "threads": {"type": ["integer", "null"]},
    },
}
_DEPLOY_ROW = dict(_MODEL_ROW, required=[*_MODEL_ROW["required"], "runtime", "threads", "setup_s"])
_READ_RESULT = {
    "type": ["object", "null"],
    "required": ["source", "machine", "rows"],
    "properties": {"source": {"type": "string"}, "machine": {"type": "object"}, "rows": {"type": "array", "items": {"type": "object"}}},
}
SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "cait benchmark report",
    "type": "object",
    "required": ["version", "machine", "settings", "models", "kernels", "accuracy", "segmentation", "files"],
    "properties": {
        "version": {"const": VERSION},
        "machine": {
            "type": "object",
            "required": ["cpu", "cores", "threads", "python", "torch", "triton", "timm"],
            "properties": {"gpu": {"type": "string"}, "cores": {"type": "integer"}, "threads": {"type": "integer"}},
        },
        "settings": {
            "type": "object",
            "required": ["device", "dtype", "quick", "models", "batches", "variants", "repeats", "cuda_graph"],
        },
        "models": {"type": "array", "minItems": 1, "items": _MODEL_ROW},
        "deployment": {"type": "array", "items": _DEPLOY_ROW},
        "kernels": {"type": "array", "items": {"type": "object", "required": ["case", "ms", "peer_ms", "speedup"]}},
        "kernel_ceilings": {"type": ["object", "null"]},
        "accuracy": _READ_RESULT,
        "curve": _READ_RESULT,
        "segmentation": _READ_RESULT,
        "files": {"type": "object", "required": ["report", "plots"]},
    },
}


def machine() -> dict:
    """The machine and software the numbers come from."""
    import triton

    from .latency import machine as basics

    return dict(basics(), cores=os.cpu_count(), python=platform.python_version(), triton=triton.__version__)


def read_results(folder: str) -> dict:
    """The accuracy and segmentation results found in ``folder`` (None where a file is missing)."""
    found = {}
    for key, name in READ.items():
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            with open(path) as f:
                data = json.load(f)
            found[key] = {"source": path, "machine": data.get("machine", {}), "settings": data.get("settings", {}), "rows": data["rows"]}
        else:
            found[key] = None
    return found


def collect(device: str, quick: bool, results: str, *, models=None, batches=None, repeats=None, progress=None) -> dict:
    """Run the timed parts and gather the rest into the report dict (see :data:`SCHEMA`)."""
    import torch

    from . import latency

    models = list(models or (MODELS[:2] if quick else MODELS))
    batches = list(batches or BATCHES[device][: 2 if quick else None])
    variants = list(QUICK_VARIANTS if quick else VARIANTS)
    repeats = repeats or (5 if quick else 15)
    dtype = torch.float16 if device == "cuda" else torch.float32
    graphs = device == "cuda"
    runtimes = ("eager", "cuda graph") if graphs else ("eager",)
    rows = latency.run(models, batches, variants, repeats, device=device, dtype=dtype, runtimes=runtimes, progress=progress)
    report = {
        "version": VERSION,
        "machine": machine(),
        "settings": {
            "device": device,
            "dtype": str(dtype).removeprefix("torch."),
            "quick": quick,
            "models": models,
            "batches": batches,
            "variants": variants,
            "repeats": repeats,
            "cuda_graph": graphs,
        },  # fmt: skip
        "models": [dict(r, method=method(r)) for r in latency.as_json(rows)],
        "deployment": [],
        "kernels": [],
        "kernel_ceilings": None,
    }
    if device == "cuda":
        from . import kernels

        cuda = torch.device("cuda")
        peak = kernels.ceilings(cuda)
        report["kernels"] = kernels.as_json(kernels.attention_rows(peak, cuda) + kernels.atme_rows(peak, cuda))
        report["kernel_ceilings"] = peak
    if device == "cpu" and not quick:
        from . import deploy

        report["deployment"] = [dict(r, method=method(r)) for r in latency.as_json(deploy.run(repeats=repeats))]
    report.update(read_results(results))
    return report


def method(row: dict) -> str:
    """The method of a model row (:func:`.latency.method_of`), with its runtime unless eager: ``CAIT [compile]``."""
    from .latency import method_of

    runtime = row.get("runtime", "eager")
    return method_of(row["variant"]) + ("" if runtime == "eager" else f" [{runtime}]")


def _table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """Markdown table: ``columns`` are ``(header, key, format)``."""
    lines = ["| " + " | ".join(c[0] for c in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(format(r[key], fmt) for _, key, fmt in columns) + " |" for r in rows]
    return "\n".join(lines)


def markdown(report: dict) -> str:
    """The report as Markdown: machine, model table, kernel table, accuracy and segmentation tables, plots."""
    from .latency import percent

    m, s = report["machine"], report["settings"]
    where = f"{m['cpu']}, {m['threads']} threads" + (f", {m['gpu']}" if "gpu" in m else "")
    parts = [
        "# cait benchmark report",
        f"Machine: {where}; Python {m['python']}, torch {m['torch']}, triton {m['triton']}, timm {m['timm']}.",
        f"Models on `{s['device']}` in {s['dtype']}, random weights, medians of {s['repeats']} interleaved repeats after warm-up"
        + (" (`--quick`: a smoke check, not for quoting)." if s["quick"] else "."),
        "GFLOPs per image (multiply-add = 2); speedup against dense in the same run; speedup x FLOPs ratio 1.0 means "
        "the whole FLOPs saving shows up as speed; merge % is the share of the forward spent in the token merge steps "
        "(each replayed on the inputs it gets in a real forward; - for models without merging and for CUDA-graph rows).",
        "## Models",
        _table(
            [dict(r, merge=percent(r.get("merge_share"))) for r in report["models"]],
            [
                ("model", "model", ""),
                ("method", "method", ""),
                ("variant", "variant", ""),
                ("batch", "batch", "d"),
                ("GFLOPs", "gflops", ".2f"),
                ("params (M)", "params_m", ".1f"),
                ("img/s", "img_per_s", ".1f"),
                ("speedup", "speedup", ".2f"),
                ("FLOPs ratio", "flops_ratio", ".3f"),
                ("speedup x FLOPs", "efficiency", ".2f"),
                ("merge %", "merge", ""),
            ],
        ),  # fmt: skip
        f"![throughput vs GFLOPs]({PLOTS[0]})",
    ]
    parts += deployment_section(report)
    if report["kernels"]:
        parts += ["## Kernels", _table(report["kernels"], [("case", "case", ""), ("ms", "ms", ".3f"), ("peer ms", "peer_ms", ".3f"),
                                                            ("speedup", "speedup", ".2f"), ("TFLOP/s", "tflops", ".1f"),
                                                            ("GB/s", "gbps", ".0f"), ("x floor", "gap", ".2f")])]  # fmt: skip
    else:
        parts += ["## Kernels", "Not timed: kernel timings need a CUDA GPU (`cait bench --kernels` prints the compile report anywhere)."]
    for key, title, metric in RESULTS:
        result = report.get(key)
        if result is None:
            parts += [f"## {title}", f"No results: run `cait bench {COMMANDS[key]} --out <results>/{READ[key]}`."]
            continue
        seeds = len(result["settings"].get("seeds", [])) or "?"
        rows = [dict(r, score=f"{100 * r[metric + '_mean']:.2f} ± {100 * r[metric + '_std']:.2f}") for r in result["rows"]]
        parts += [
            f"## {title}",
            f"From `{result['source']}`, measured on {result['machine'].get('cpu', 'an unnamed machine')}.",
            _table(
                rows,
                [
                    ("method", "method", ""),
                    ("FLOPs ratio", "flops_ratio", ".3f"),
                    (f"{'top-1' if metric == 'top1' else 'mIoU'} % ({seeds} seeds)", "score", ""),
                    ("img/s", "img_per_s", ".0f"),
                ],
            ),  # fmt: skip
        ]
    if any(report.get(key) for key, _, _ in RESULTS):
        parts.append(f"![accuracy vs throughput]({PLOTS[1]})")
    return "\n\n".join(parts) + "\n"


def deployment_section(report: dict) -> list[str]:
    """The batch-1 deployment table as Markdown parts (empty on a GPU report)."""
    rows = report.get("deployment") or []
    if report["settings"]["device"] != "cpu":
        return []
    if not rows:
        return ["## Batch-1 deployment (CPU)", "Not run (`--quick`): `cait bench --deploy` times it on its own."]
    shown = [dict(r, setup="-" if r["setup_s"] is None else f"{r['setup_s']:.0f}") for r in rows]
    return [
        "## Batch-1 deployment (CPU)",
        "Batch 1, fp32: eager PyTorch, `compile` (`cait.optimize`: inductor with weight freezing) and `onnxruntime` "
        "(`cait.export` to ONNX); each speedup is against dense in the same runtime and thread count (compiled vs "
        "compiled), dense and compressed timed interleaved in each runtime; setup s = compile or export seconds.",
        _table(
            shown,
            [
                ("model", "model", ""),
                ("variant", "variant", ""),
                ("runtime", "runtime", ""),
                ("threads", "threads", "d"),
                ("GFLOPs", "gflops", ".2f"),
                ("img/s", "img_per_s", ".1f"),
                ("speedup", "speedup", ".2f"),
                ("FLOPs ratio", "flops_ratio", ".3f"),
                ("speedup x FLOPs", "efficiency", ".2f"),
                ("setup s", "setup", ""),
            ],
        ),  # fmt: skip
    ]


def plot(report: dict, folder: str) -> list[str]:
    """Write the two PNG plots into ``folder``; returns their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from . import pareto

    rows = report["models"]
    models = list(dict.fromkeys(r["model"] for r in rows))
    batch = max(r["batch"] for r in rows)
    figure, axes = plt.subplots(1, len(models), figsize=(4.5 * len(models), 3.8), squeeze=False)
    for ax, model in zip(axes[0], models):
        mine = [r for r in rows if r["model"] == model and r["batch"] == batch]
        for method in dict.fromkeys(r["method"] for r in mine):
            points = sorted((r["gflops"], r["img_per_s"]) for r in mine if r["method"] == method)
            ax.plot(*zip(*points), marker="o", label=method)
        ax.set(title=f"{model}, batch {batch}", xlabel="GFLOPs per image", ylabel="images / s")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    figure.suptitle(f"{report['settings']['device']} ({report['machine'].get('gpu') or report['machine']['cpu']})", fontsize=9)
    figure.tight_layout()
    figure.savefig(os.path.join(folder, PLOTS[0]), dpi=110)
    plt.close(figure)

    panels = [(key, metric) for key, _, metric in RESULTS if report.get(key)]
    figure, axes = plt.subplots(1, max(1, len(panels)), figsize=(5.5 * max(1, len(panels)), 4.4), squeeze=False)
    for ax, (key, metric) in zip(axes[0], panels):
        pareto.draw(ax, report[key]["rows"], metric)  # one line per method, dense as a star
        ax.set_title(f"{key} ({report[key]['machine'].get('cpu', '?')})", fontsize=9)
        ax.legend(fontsize=6)
    if not panels:
        axes[0][0].text(0.5, 0.5, "no accuracy or segmentation results", ha="center", va="center")
        axes[0][0].set_axis_off()
    figure.tight_layout()
    figure.savefig(os.path.join(folder, PLOTS[1]), dpi=110)
    plt.close(figure)
    return list(PLOTS)


def write(report: dict, folder: str) -> None:
    """``report.json``, ``report.md`` and the plots into ``folder`` (created if missing)."""
    os.makedirs(folder, exist_ok=True)
    report["files"] = {"report": "report.md", "plots": plot(report, folder)}
    with open(os.path.join(folder, "report.md"), "w") as f:
        f.write(markdown(report))
    with open(os.path.join(folder, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
