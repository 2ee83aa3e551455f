"""``cait bench``: time dense vs compressed models; ``--all`` the whole report, ``--kernels`` the
kernels, ``--accuracy`` / ``--segmentation`` / ``--rope-rule`` the training benchmarks."""

from __future__ import annotations

import argparse
import os

from .common import DTYPES, check_checkpoint, check_output, device_of, load_checkpoint, warn_random_weights, write_json


def add_parser(commands) -> None:
    b = commands.add_parser(
        "bench",
        help="time dense vs compressed models on this machine",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Time timm models dense and compressed side by side (interleaved repeats, medians after warm-up, random weights) "
        "and print a table: GFLOPs per image (multiply-add = 2), params, img/s, speedup, speedup x FLOPs ratio "
        "(1.0 means the whole FLOPs saving shows up as speed), and merge % (the share of the forward spent in the token "
        "merge steps, each replayed on the inputs it gets in a real forward).",
    )
    b.add_argument(
        "--all",
        action="store_true",
        help="reproduce every number: the model table (dense vs ToMe vs ATME/CDCP/CAIT at several FLOPs ratios; CPU fp32 "
        "batch 1 and 8, GPU fp16 batch 1/64/256 eager and CUDA graph), the kernel table on a GPU, and the accuracy and "
        "segmentation results read from --results; writes report.json, report.md and PNG plots to --out DIR "
        "(default: bench/results/report-<device>). --models/--batch/--repeats override the defaults",
    )
    b.add_argument("--quick", action="store_true", help="--all: fewer models, variants and repeats (a smoke check, minutes on a CPU)")
    b.add_argument(
        "--results",
        default="bench/results",
        metavar="DIR",
        help="--all: where the accuracy/segmentation JSON files are (default: bench/results)",
    )
    b.add_argument(
        "--models",
        nargs="+",
        metavar="NAME|FILE|DIR",
        help="timm model names, .safetensors files saved by cait and/or Hugging Face save_pretrained folders (default: "
        "DeiT-T/S/B at 224). A file is timed as saved, next to its architecture rebuilt from the file's config with random "
        "weights as the dense row (a Hugging Face file: next to its HF class); --variant applies to names and folders",
    )
    b.add_argument(
        "--variant",
        action="append",
        metavar="SPEC",
        help="a compressed variant, repeatable: merge=F (ATME FLOPs target), prune=QK/V/MLP (CDCP keep ratios), "
        "block=2|4, comma separated, e.g. merge=0.7,prune=0.5/0.75/0.75 (default: merge=0.8, merge=0.6, "
        "prune=0.5/0.75/0.75 and merge=0.7,prune=0.5/0.75/0.75)",
    )
    b.add_argument("--batch", nargs="+", type=int, help="batch sizes (default: 1 8)")
    b.add_argument(
        "--repeats", type=int, help="timed repeats per model after 2 warm-up runs (default: 15; --accuracy --curve: 30; --clutter: 20)"
    )
    b.add_argument("--checkpoint", metavar="FILE", help="weights for the (single) model in --models")
    b.add_argument(
        "--threads",
        type=int,
        nargs="+",
        metavar="T",
        help="torch (and onnxruntime) CPU threads (default: torch's choice); --deploy takes several (default: 1 2)",
    )
    b.add_argument(
        "--runtime",
        nargs="+",
        choices=("eager", "compile", "onnxruntime"),
        help="how the models run, several allowed, each row against dense in the same runtime: eager (PyTorch), compile "
        "(cait.optimize: torch.compile with inductor, weight freezing; CUDA graphs on cuda; compile seconds reported), "
        "onnxruntime (cait.export to ONNX, run by onnxruntime on the CPU; export seconds reported) (default: eager)",
    )
    b.add_argument("--compile", action="store_true", help="same as --runtime eager compile")
    b.add_argument(
        "--deploy",
        action="store_true",
        help="the batch-1 deployment table: DeiT-T/S dense vs CAIT at about 0.6x and 0.5x FLOPs, in eager, compile and "
        "onnxruntime, on 1 and 2 threads (--models/--variant/--runtime/--threads/--repeats override; about 15 minutes "
        "on 2 cores, most of it compiling)",
    )
    b.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        help="where to run (default: cuda when a GPU is visible, else cpu). On cuda every compressed variant "
        "is also timed on the PyTorch reference ops, as '<variant> [reference ops]'",
    )
    b.add_argument("--dtype", choices=sorted(DTYPES), help="weights and activations (default: fp16 on cuda, fp32 on cpu)")
    b.add_argument("--cuda-graph", action="store_true", help="also time every model captured in one CUDA graph (cuda only)")
    b.add_argument("--img-size", type=int, metavar="PX", help="square input size of the timed models (default: the model's)")
    b.add_argument(
        "--kernels",
        action="store_true",
        help="benchmark the Triton kernels instead of models: on a GPU, attention vs scaled_dot_product_attention at "
        "DeiT shapes and the ATME step / unmerge vs their references, with FLOP and byte floors and the measured "
        "peaks; on any machine, the ahead-of-time compile report (registers, spills, shared memory, tensor-core "
        "instructions) of every kernel configuration for sm_80 and sm_90",
    )
    b.add_argument(
        "--tiny",
        action="store_true",
        help="--kernels: tiny shapes, seconds on any device (on a CPU the Triton kernels run through the interpreter, "
        "TRITON_INTERPRET=1): a smoke run of the kernel table, no compile report",
    )
    b.add_argument(
        "--accuracy",
        action="store_true",
        help="run the accuracy benchmark instead of timing models: a small ViT trained from scratch on scikit-learn's digits, "
        "then dense vs ATME / CDCP / both (one-shot and fine-tuned with distillation) vs ToMe and EViT-style pruning "
        "at about 0.5x FLOPs: top-1 over --seeds, FLOPs ratio, CPU img/s (about 11 minutes on 2 cores)",
    )
    b.add_argument(
        "--segmentation",
        action="store_true",
        help="run the segmentation benchmark: a small ViT with a linear head trained from scratch on digit canvases "
        "(background + 10 digit classes per pixel), then at backbone FLOPs ratios 0.6, 0.5 and 0.4: CAIT (one-shot and "
        "fine-tuned, on the plans --tune chose) vs ALGM-style local-then-global merging vs ToMe with unmerge vs EViT-style "
        "token pruning (dropped cells filled from the nearest kept token), all fine-tuned alike, plus dense and CAIT on its "
        "earlier block-1 schedule: mIoU over --seeds, FLOPs ratio, CPU img/s (hours on 2 cores, resumable through --work)",
    )
    b.add_argument(
        "--rope-rule",
        action="store_true",
        help="measure where a merged token sits for RoPE: small RoPE ViTs (axial RoPE-ViT and DINOv3 layouts, no absolute "
        "position embedding) trained from scratch on scikit-learn's digits, compressed one-shot by ATME (0.6x, 0.5x) and "
        "ATME+CDCP (about 0.5x) with the anchor and the centroid rule: top-1 over --seeds side by side",
    )
    b.add_argument(
        "--plan",
        action="store_true",
        help="benchmark the planner (cait plan) against the fixed recipe: DeiT-T/S (random weights) planned for 1.7x/1.9x "
        "at batch 1 compiled on 1 and 2 threads and DeiT-S for 2.0x at batch 8 eager, the recipe and ToMe timed in the "
        "same run (--models keeps the settings of those models; --budget seconds per plan; plans and plots go to --work, "
        "default bench/runs/plans; about 30 minutes on 2 cores). With --accuracy: on the digits ViTs, the plan for the "
        "recipe's own speedup against the recipe, test top-1 one-shot and fine-tuned over --seeds. With --segmentation: on "
        "the segmentation benchmark's trained models (shared through --work), a plan for 1.5x with validation mIoU as "
        "fidelity, its choice fine-tuned like every method there, test mIoU against dense over --seeds",
    )
    b.add_argument(
        "--budget", type=float, metavar="S", help="--plan: seconds each plan may take (default: 300; with --accuracy/--segmentation 120)"
    )
    b.add_argument(
        "--weights",
        metavar="DIR",
        help="--rope-rule: keep the trained dense models in DIR and reuse them on the next run; --clutter: read the dense "
        "models from DIR/seed<k>.pt",
    )
    b.add_argument("--seeds", type=int, default=3, help="--accuracy/--segmentation/--rope-rule: seeds (default: 3)")
    b.add_argument("--epochs", type=int, help="--accuracy/--segmentation/--rope-rule: epochs of dense training (default: 40 / 30 / 30)")
    b.add_argument("--finetune-epochs", type=int, help="--accuracy/--segmentation: epochs of fine-tuning (default: 15 / 6)")
    b.add_argument("--picture", metavar="PNG", help="--segmentation: also draw CAIT's merged regions on test canvases to this file")
    b.add_argument(
        "--curve",
        action="store_true",
        help="--accuracy: the whole curve instead of one point: dense, ATME / ToMe / EViT-style one-shot and CAIT / ToMe / "
        "EViT-style fine-tuned alike at FLOPs ratios 0.9, 0.75, 0.6, 0.5, 0.4, 0.33 (as far as each reaches), top-1 over "
        "--seeds and CPU img/s (batch 64); hours on 2 cores, resumable through --work",
    )
    b.add_argument(
        "--clutter",
        action="store_true",
        help="--accuracy --curve: on the cluttered-digits proxy (64x64 canvases, 64 tokens; cait.benchmarks.clutter_curve) "
        "instead of the digits: dense, ATME (2x2 and 4x4 tiles) / ToMe / EViT-style one-shot and CAIT / ToMe / EViT-style "
        "fine-tuned with the deit recipe at 0.75, 0.6, 0.5, 0.4x FLOPs, and CAIT with the default recipe at 0.5 (the recipe's "
        "gain); --weights DIR: dense models DIR/seed<k>.pt from bench/clutter_dense.py (else trained, about 10 minutes per "
        "seed); about 25 minutes of fine-tuning per seed on 2 cores",
    )
    b.add_argument(
        "--tune",
        action="store_true",
        help="--accuracy --curve: choose CAIT's channel keep ratio per FLOPs ratio; --segmentation: choose CAIT's merge "
        "schedule (blocks, tile, pruning) and ALGM's local share per FLOPs ratio (the best validation mIoU among the candidates "
        "at least 0.9x as fast as the fastest). Both on a validation split of seed 0 after short fine-tunes (--finetune-epochs, "
        "default 3 / 2); prints and writes (--out) every candidate's score",
    )
    b.add_argument(
        "--work",
        metavar="DIR",
        help="--curve/--segmentation/--tune: keep trained models here (default bench/runs/<benchmark>): a stopped run "
        "resumes, --time-only re-times them; --plan: where the plans go (default bench/runs/plans; --segmentation: the "
        "segmentation benchmark's folder)",
    )
    b.add_argument(
        "--time-only",
        action="store_true",
        help="--curve/--segmentation: train nothing; time the models kept in --work again (for a quiet machine) and "
        "rebuild the table, --out and --plot",
    )
    b.add_argument(
        "--plot", metavar="PNG", help="--curve/--segmentation: also draw accuracy against img/s and FLOPs ratio (one line per method)"
    )
    b.add_argument(
        "--out", metavar="FILE", help="also write the rows and the machine description to this JSON file (--all: the report folder)"
    )
    b.set_defaults(run=run)


def run(args) -> None:
    import torch
    from tqdm.auto import tqdm

    from cait.benchmarks.latency import DEFAULT_VARIANTS, as_json, is_saved_model, machine, parse_variant, run, table
    from cait.hf import is_folder

    if args.threads and (len(args.threads) > 1 and not args.deploy or min(args.threads) < 1):
        raise ValueError("--threads takes one count >= 1 (several only with --deploy)")
    if args.repeats is not None and args.repeats < 1:
        raise ValueError("--repeats must be at least 1")
    if args.batch and min(args.batch) < 1:
        raise ValueError("--batch sizes must be at least 1")
    if not args.all:
        check_output(args.out)
    check_output(args.picture, "--picture")
    if args.clutter and not (args.accuracy and args.curve):
        raise ValueError("--clutter is an accuracy curve: give --accuracy --curve --clutter")
    if args.deploy:
        return bench_deploy(args)
    if args.plan:
        return bench_plan(args)
    if args.budget is not None:
        raise ValueError("--budget sets the seconds of each plan: it needs --plan")
    if args.threads:
        torch.set_num_threads(args.threads[0])
    if (args.runtime or args.compile) and (args.all or args.kernels or args.accuracy or args.segmentation):
        raise ValueError("--runtime/--compile choose how the model table runs: drop --all/--kernels/--accuracy/--segmentation")
    if args.kernels:
        return bench_kernels(args)
    if args.accuracy:
        _refuse_model_table_flags(args, "--accuracy")
        return (bench_clutter_curve if args.clutter else bench_curve)(args) if args.curve else bench_accuracy(args)
    if args.segmentation:
        return bench_segmentation(args)
    if args.rope_rule:
        return bench_rope_rule(args)
    if args.all:
        return bench_all(args)
    runtimes = list(dict.fromkeys((args.runtime or ["eager"]) + (["eager", "compile"] if args.compile else [])))
    args.models = args.models or ["deit_tiny_patch16_224", "deit_small_patch16_224", "deit_base_patch16_224"]
    args.batch, args.repeats = args.batch or [1, 8], args.repeats or 15
    variants = args.variant or list(DEFAULT_VARIANTS)
    for text in variants:
        parse_variant(text)  # refuse a bad spec before any timing
    check_models(args.models)
    if args.variant and all(is_saved_model(m) for m in args.models):
        raise ValueError("--variant compresses timm models: a saved file is timed as it was saved (drop --variant)")
    if args.checkpoint and (len(args.models) != 1 or is_saved_model(args.models[0])):
        raise ValueError("--checkpoint needs exactly one timm model name in --models (a saved file holds its own weights)")
    check_checkpoint(args.checkpoint)
    if not args.checkpoint and not all(is_saved_model(m) or is_folder(m) for m in args.models):
        warn_random_weights("no --checkpoint: the timm models in --models have")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA GPU is visible")
    if args.cuda_graph and device != "cuda":
        raise ValueError("--cuda-graph needs --device cuda")
    if "onnxruntime" in runtimes and device != "cpu":
        raise ValueError("--runtime onnxruntime runs on the CPU: use --device cpu")
    dtype = getattr(torch, DTYPES[args.dtype or ("fp16" if device == "cuda" else "fp32")])
    if args.img_size is not None and args.img_size < 1:
        raise ValueError("--img-size must be a positive number of pixels")
    if args.img_size is not None and any(is_saved_model(m) for m in args.models):
        raise ValueError("--img-size builds timm models for another size: a saved file holds its own size")
    runtimes += ["cuda graph"] if args.cuda_graph else []
    timing = dict(runtimes=runtimes, img_size=args.img_size, load_weights=load_checkpoint)
    with tqdm(total=len(args.models) * len(args.batch), desc=f"timing on {device}") as bar:
        rows = run(args.models, args.batch, variants, args.repeats, args.checkpoint, device, dtype, progress=bar, **timing)
    info = dict(machine(), device=device, dtype=str(dtype).removeprefix("torch."))
    print(table(rows))
    print(f"\nmachine: {', '.join(f'{k} {v}' for k, v in info.items())}")
    write_json(args.out, {"machine": info, "repeats": args.repeats, "rows": as_json(rows)})


def bench_deploy(args) -> None:
    """``cait bench --deploy``: the batch-1 deployment table (:mod:`cait.benchmarks.deploy`)."""
    from tqdm.auto import tqdm

    from cait.benchmarks import deploy
    from cait.benchmarks.latency import as_json, is_saved_model, machine, table

    modes = (args.all, args.kernels, args.accuracy, args.segmentation, args.plan)
    if any(modes) or args.cuda_graph or args.checkpoint or args.dtype or args.img_size:
        raise ValueError("--deploy runs on its own (CPU, fp32, batch 1, random weights): drop the other mode flags")
    if args.batch and args.batch != [1]:
        raise ValueError("--deploy times batch 1 only: drop --batch")
    if args.device == "cuda":
        raise ValueError("--deploy is the CPU deployment table: drop --device cuda")
    if args.models:
        check_models(args.models)
        if any(is_saved_model(m) for m in args.models):
            raise ValueError("--deploy compresses timm models itself: time a saved file with --models FILE --runtime ...")
    models, threads = args.models or list(deploy.MODELS), args.threads or list(deploy.THREADS)
    runtimes = args.runtime or (["eager", "compile"] if args.compile else list(deploy.RUNTIMES))
    variants, repeats = args.variant or list(deploy.VARIANTS), args.repeats or 15
    with tqdm(total=len(models) * len(threads), desc="compiling, exporting and timing") as bar:
        rows = deploy.run(models, variants, runtimes, threads, repeats, progress=bar)
    print(table(rows))
    info = machine()
    print(f"\nmachine: {', '.join(f'{k} {v}' for k, v in info.items())}")
    write_json(args.out, {"machine": info, "repeats": repeats, "rows": as_json(rows)})


def bench_plan(args) -> None:
    """``cait bench --plan [--accuracy]``: :mod:`cait.planner.benchmark`."""
    import math

    from tqdm.auto import tqdm

    from cait.benchmarks.latency import machine
    from cait.planner import benchmark

    if args.accuracy and args.segmentation:
        raise ValueError("--plan takes --accuracy (the digits ViTs) or --segmentation (the digit canvases), not both")
    if any((args.all, args.kernels, args.curve, args.rope_rule, args.tune, args.time_only, args.plot, args.picture,
            args.variant, args.checkpoint, args.dtype, args.weights)):
        raise ValueError("--plan runs on its own (CPU, fp32, random weights or the digits ViTs): drop the other mode flags")
    if args.batch or args.runtime or args.compile or args.img_size or args.device == "cuda" or args.cuda_graph:
        raise ValueError("--plan times the settings of cait.planner.benchmark.SETTINGS on the CPU: drop --batch/--runtime/"
                         "--img-size/--device/--cuda-graph (--models keeps the settings of those models)")  # fmt: skip
    if args.threads and not (args.accuracy or args.segmentation):
        raise ValueError("--plan times each setting on its own thread count (1 and 2): --threads only with --accuracy/--segmentation")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads[0])
    budget = args.budget if args.budget is not None else 120.0 if args.accuracy or args.segmentation else 300.0
    if not math.isfinite(budget) or budget <= 0:
        raise ValueError(f"--budget must be positive, finite seconds, got {args.budget}")
    info = machine()
    if args.accuracy:
        if args.models:
            raise ValueError("--plan --accuracy plans the digits ViTs: drop --models")
        seeds, epochs, finetune_epochs = _training_settings(args, epochs=40, finetune_epochs=15)
        with tqdm(total=len(seeds) * (epochs + 2 * finetune_epochs), desc="training, planning, fine-tuning") as bar:
            rows = benchmark.digits(seeds, epochs, finetune_epochs, budget, progress=bar)
        print(benchmark.digits_table(rows))
        print(f"\nmachine: {', '.join(f'{k} {v}' for k, v in info.items())}")
        settings = {"seeds": seeds, "epochs": epochs, "finetune_epochs": finetune_epochs, "budget_s": budget}
        return write_json(args.out, {"machine": info, "settings": settings, "rows": rows})
    if args.segmentation:
        from cait.benchmarks import segmentation

        if args.models:
            raise ValueError("--plan --segmentation plans the segmentation benchmark's ViTs: drop --models")
        seeds, epochs, finetune_epochs = _training_settings(args, segmentation.EPOCHS, segmentation.FINETUNE_EPOCHS)
        work = args.work or os.path.join("bench", "runs", "segmentation")
        with tqdm(total=len(seeds) * (epochs + 2 * finetune_epochs), desc="training, planning, fine-tuning") as bar:
            rows = benchmark.segmentation(seeds, epochs, finetune_epochs, budget_s=budget, folder=work, progress=bar)
        print(benchmark.segmentation_table(rows))
        print(f"\nmachine: {', '.join(f'{k} {v}' for k, v in info.items())}")
        settings = {"seeds": seeds, "epochs": epochs, "finetune_epochs": finetune_epochs, "budget_s": budget,
                    "target": benchmark.SEGMENTATION_TARGET}  # fmt: skip
        return write_json(args.out, {"machine": info, "settings": settings, "rows": rows})
    settings = [s for s in benchmark.SETTINGS if not args.models or s.model in args.models]
    if not settings:
        raise ValueError(f"--plan plans {sorted({s.model for s in benchmark.SETTINGS})}: --models names none of them")
    folder = args.work or os.path.join("bench", "runs", "plans")
    with tqdm(total=len(settings), desc=f"planning ({budget:g} s each)") as bar:
        rows = benchmark.run(settings, budget, folder, progress=bar)
    print(benchmark.table(rows))
    print("\nspeedup [interquartile range of the per-run speedups] at FLOPs ratio, top-1 agreement with dense (random weights "
          f"and calibration images: the agreement says little); plans and plots in {folder}")  # fmt: skip
    print(f"machine: {', '.join(f'{k} {v}' for k, v in info.items())}")
    write_json(args.out, {"machine": info, "budget_s": budget, "rows": rows})


def check_models(entries: list[str]) -> None:
    """Refuse, before any timing, an unknown timm name or a file that is not a classifier saved by cait."""
    import timm

    from cait.benchmarks.latency import is_saved_model
    from cait.hf import is_folder
    from cait.serialize import read_config

    for entry in entries:
        if is_folder(entry):  # a Hugging Face save_pretrained folder (cait.hf.from_folder names what is wrong with it)
            continue
        if is_saved_model(entry):
            if "head" in read_config(entry):
                raise ValueError(f"{entry} holds a segmentation model: cait bench times classifiers (see cait bench --segmentation)")
        elif not timm.is_model(entry):
            raise ValueError(
                f"--models {entry}: not a timm model name (see timm.list_models()), a .safetensors file saved by cait "
                f"nor a Hugging Face save_pretrained folder"
            )


def bench_all(args) -> None:
    """``cait bench --all``: the report (:mod:`cait.benchmarks.report`)."""
    from tqdm.auto import tqdm

    from cait.benchmarks import report

    if args.variant or args.checkpoint or args.dtype or args.cuda_graph or args.compile or args.img_size:
        raise ValueError(
            "--all picks variants, dtype, sizes and graphs itself (random weights): "
            "drop --variant/--checkpoint/--dtype/--cuda-graph/--compile/--img-size"
        )
    if args.models:
        check_models(args.models)
    device = device_of(args.device).type
    models = args.models or list(report.MODELS[:2] if args.quick else report.MODELS)
    batches = args.batch or list(report.BATCHES[device][: 2 if args.quick else None])
    folder = args.out or os.path.join("bench", "results", f"report-{device}")
    with tqdm(total=len(models) * len(batches), desc=f"timing models on {device}") as bar:
        result = report.collect(device, args.quick, args.results, models=models, batches=batches, repeats=args.repeats, progress=bar)
    report.write(result, folder)
    print(report.markdown(result))
    print(f"wrote {folder}/report.json, report.md, {', '.join(report.PLOTS)}")


def bench_kernels(args) -> None:
    """``cait bench --kernels``: kernel timings on a GPU, the compile report everywhere."""
    import torch
    from tqdm.auto import tqdm

    from cait.benchmarks import kernels
    from cait.benchmarks.latency import machine
    from cait_kernels import aot

    result = {"machine": machine()}
    shapes = kernels.TINY if args.tiny else kernels.FULL
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" or args.tiny:
        if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("--tiny on a CPU runs the Triton kernels through the interpreter: set TRITON_INTERPRET=1")
        peak = kernels.ceilings(device, tiny=args.tiny)
        with torch.inference_mode():
            rows = kernels.attention_rows(peak, device, shapes, progress=lambda cases: tqdm(cases, desc="attention cases", leave=False))
            rows += kernels.atme_rows(peak, device, shapes)
        print(kernels.table(rows, peak), "\n")
        result.update(device=device.type, tiny=args.tiny, ceilings=peak, rows=kernels.as_json(rows))
        write_json(args.out, result)  # kept even if the compile report below is cut short
    else:
        print("kernel timings need a CUDA GPU and this machine has none: printing the ahead-of-time compile report only.\n")
    if args.tiny:
        return
    resources = aot.report(progress=lambda jobs, total: tqdm(jobs, total=total, desc="compiling for sm_80/sm_90", leave=False))
    print(aot.table(resources))
    print(f"\nmachine: {', '.join(f'{k} {v}' for k, v in result['machine'].items())}")
    write_json(args.out, dict(result, compile_report=[r._asdict() for r in resources]))


def bench_accuracy(args) -> None:
    """``cait bench --accuracy``: the digits benchmark (:mod:`cait.benchmarks.accuracy`)."""
    from tqdm.auto import tqdm

    from cait.benchmarks import accuracy
    from cait.benchmarks.latency import machine

    seeds, epochs, finetune_epochs = _training_settings(args, epochs=40, finetune_epochs=15)
    with tqdm(total=len(seeds) * (epochs + finetune_epochs), desc="training (dense, then fine-tuning)") as bar:
        rows = accuracy.run(seeds, epochs, finetune_epochs, progress=bar)
    print(accuracy.table(rows, len(seeds)))
    info = machine()
    print(f"\nmachine: {', '.join(f'{k} {v}' for k, v in info.items())}")
    settings = {"seeds": seeds, "epochs": epochs, "finetune_epochs": finetune_epochs}
    write_json(args.out, {"machine": info, "settings": settings, "rows": accuracy.as_json(rows)})


def bench_rope_rule(args) -> None:
    """``cait bench --rope-rule``: anchor against centroid for RoPE models (:mod:`cait.benchmarks.rope_rule`)."""
    from tqdm.auto import tqdm

    from cait.benchmarks import rope_rule
    from cait.benchmarks.latency import machine

    seeds, epochs, _ = _training_settings(args, epochs=rope_rule.EPOCHS, finetune_epochs=1)
    with tqdm(total=len(seeds) * epochs * len(rope_rule.MODELS), desc="training RoPE ViTs") as bar:
        rows = rope_rule.run(seeds, epochs, weights=args.weights, progress=bar)
    print(rope_rule.table(rows, len(seeds)))
    info = machine()
    print(f"\nmachine: {', '.join(f'{k} {v}' for k, v in info.items())}")
    write_json(args.out, {"machine": info, "settings": {"seeds": seeds, "epochs": epochs}, "rows": rope_rule.as_json(rows)})


def _refuse_model_table_flags(args, mode: str) -> None:
    """Refuse, before any training, the model table's flags in a training benchmark (they would be ignored)."""
    given = [flag for flag, on in (("--all", args.all), ("--segmentation", args.segmentation), ("--rope-rule", args.rope_rule),
             ("--models", args.models), ("--variant", args.variant), ("--batch", args.batch), ("--checkpoint", args.checkpoint),
             ("--device", args.device), ("--dtype", args.dtype), ("--img-size", args.img_size), ("--picture", args.picture),
             ("--kernels", args.kernels), ("--tiny", args.tiny)) if on]  # fmt: skip
    if given:
        raise ValueError(f"{mode} trains small ViTs on the CPU with fixed settings: drop {', '.join(given)}")
    if args.plot and not args.curve:
        raise ValueError("--plot draws a curve: give --accuracy --curve")
    check_output(args.plot, "--plot")


def _training_settings(args, epochs: int, finetune_epochs: int):
    """``(seeds, epochs, finetune_epochs)`` of a training benchmark, the defaults where not given."""
    epochs = args.epochs if args.epochs is not None else epochs
    finetune_epochs = args.finetune_epochs if args.finetune_epochs is not None else finetune_epochs
    if args.seeds < 1 or epochs < 1 or finetune_epochs < 1:
        raise ValueError("--seeds, --epochs and --finetune-epochs must be at least 1")
    return list(range(args.seeds)), epochs, finetune_epochs


def bench_segmentation(args) -> None:
    """``cait bench --segmentation [--tune]``: the digit-canvas benchmark (:mod:`cait.benchmarks.segmentation`)
    or the choice of its plans (:mod:`cait.benchmarks.seg_plans`)."""
    from tqdm.auto import tqdm

    from cait.benchmarks import pareto, seg_plans, segmentation
    from cait.benchmarks.latency import machine
    from cait.benchmarks.runs import RunFolder

    work = args.work or os.path.join("bench", "runs", "segmentation")
    info = machine()
    if args.tune:
        _, epochs, finetune_epochs = _training_settings(args, segmentation.EPOCHS, 2)
        candidates = len(segmentation.TARGETS) * (len(seg_plans.plans()) + len(seg_plans.ALGM_SHARES))
        with tqdm(total=epochs + candidates * finetune_epochs, desc="tuning CAIT's plans and ALGM's shares") as bar:
            store = RunFolder(os.path.join(work, "tuning"))
            results = seg_plans.tune(store, segmentation.TARGETS, 0, epochs, finetune_epochs, progress=bar)
        chosen = seg_plans.choose(results)
        for r in results:
            print(r)
        for method, per_target in chosen.items():
            print(f"chosen for {method}: " + "; ".join(f"{t:g}: {r['name']}" for t, r in per_target.items()))
        settings = {"seed": 0, "epochs": epochs, "finetune_epochs": finetune_epochs, "speed_floor": seg_plans.SPEED_FLOOR}
        return write_json(args.out, {"machine": info, "settings": settings, "candidates": results,
                                     "chosen": {m: {str(t): r["name"] for t, r in c.items()} for m, c in chosen.items()}})  # fmt: skip
    seeds, epochs, finetune_epochs = _training_settings(args, segmentation.EPOCHS, segmentation.FINETUNE_EPOCHS)
    tuned = sum(segmentation.fine_tuned(m) for _, m, _ in segmentation.methods())
    total = 0 if args.time_only else len(seeds) * (epochs + tuned * finetune_epochs)
    with tqdm(total=total, desc="training (dense, then each method)") as bar:
        result = segmentation.run(seeds, epochs, finetune_epochs, args.repeats or 15, work, args.time_only, progress=bar)
    print(segmentation.table(result.rows, len(seeds)))
    rows = segmentation.as_json(result.rows)
    print("\nCAIT (fine-tuned) against every other point at the same speed:\n")
    print(pareto.equal_speed_table(rows, "CAIT (fine-tuned)", "miou"))
    print(f"\nmachine: {', '.join(f'{k} {v}' for k, v in info.items())}")
    settings = {"seeds": seeds, "epochs": epochs, "finetune_epochs": finetune_epochs, "targets": list(segmentation.TARGETS),
                "plans": {str(t): str(p) for t, p in segmentation.PLANS.items()}, "algm_shares": segmentation.ALGM_SHARES,
                "repeats": args.repeats or 15}  # fmt: skip
    write_json(args.out, {"machine": info, "settings": settings, "rows": rows})
    if args.picture:
        segmentation.picture(result).save(args.picture)
        print(f"wrote {args.picture}")
    if args.plot:
        pareto.plot(rows, "miou", args.plot, f"digit canvases, {len(seeds)} seeds ({info['cpu']}, {info['threads']} threads)")
        print(f"wrote {args.plot}")


def bench_clutter_curve(args) -> None:
    """``cait bench --accuracy --curve --clutter``: :mod:`cait.benchmarks.clutter_curve`."""
    from tqdm.auto import tqdm

    from cait.benchmarks import clutter_curve, curve, pareto
    from cait.benchmarks.latency import machine
    from cait.benchmarks.runs import RunFolder

    if args.tune or args.epochs is not None:
        raise ValueError("--clutter takes no --tune or --epochs (the dense proxy trains as bench/clutter_dense.py does)")
    seeds, _, finetune_epochs = _training_settings(args, epochs=1, finetune_epochs=clutter_curve.FINETUNE_EPOCHS)
    if args.weights:
        clutter_curve.check_weights(args.weights, seeds)
    work = args.work or os.path.join("bench", "runs", "clutter-curve")
    if args.time_only:
        clutter_curve.check_trained(work, seeds)
    per_seed = len(clutter_curve.RATIOS) * len(clutter_curve.FINE_TUNED) * finetune_epochs + finetune_epochs
    with tqdm(total=0 if args.time_only else len(seeds) * per_seed, desc="fine-tuning") as bar:
        rows, unreachable = clutter_curve.run(seeds, clutter_curve.RATIOS, finetune_epochs, work, args.repeats or 20, args.time_only,
                                              args.weights, bar)  # fmt: skip
    gain = clutter_curve.recipe_gain(RunFolder(work), seeds)
    print(curve.table(rows, unreachable, len(seeds)))
    print("\nCAIT (fine-tuned) against every other point at the same speed:\n")
    print(pareto.equal_speed_table(curve.as_json(rows), "CAIT (fine-tuned)", "top1"))
    if gain is not None:
        print(f"\nthe deit recipe against the default one (CAIT at {gain['ratio']}, same epochs): {100 * gain['mean']:+.2f} ± "
              f"{100 * gain['std']:.2f} top-1 points (per seed: {', '.join(f'{100 * g:+.1f}' for g in gain['per_seed'])})")  # fmt: skip
    info = machine()
    print(f"\nmachine: {', '.join(f'{k} {v}' for k, v in info.items())}")
    settings = {"seeds": seeds, "finetune_epochs": finetune_epochs, "ratios": list(clutter_curve.RATIOS), "keep": curve.KEEP,
                "repeats": args.repeats or 20}  # fmt: skip
    write_json(args.out, {"machine": info, "settings": settings, "rows": curve.as_json(rows), "unreachable": unreachable,
                          "recipe_gain": gain})  # fmt: skip
    if args.plot:
        title = f"cluttered digits, {len(seeds)} seeds ({info['cpu']}, {info['threads']} threads)"
        pareto.plot(curve.as_json(rows), "top1", args.plot, title)
        print(f"wrote {args.plot}")


def bench_curve(args) -> None:
    """``cait bench --accuracy --curve [--tune]``: :mod:`cait.benchmarks.curve`."""
    from tqdm.auto import tqdm

    from cait.benchmarks import curve, pareto
    from cait.benchmarks.latency import machine

    work = args.work or os.path.join("bench", "runs", "accuracy-curve")
    if args.tune:
        seeds, epochs, finetune_epochs = _training_settings(args, epochs=40, finetune_epochs=3)
        candidates = len(curve.RATIOS) * len(curve.KEEP_OPTIONS)
        with tqdm(total=epochs + candidates * finetune_epochs, desc="tuning CAIT's keep ratios") as bar:
            results = curve.tune(os.path.join(work, "tuning"), curve.RATIOS, curve.KEEP_OPTIONS, epochs, finetune_epochs, progress=bar)
        chosen = curve.choose(results)
        for r in results:
            print(r)
        print(f"chosen keep ratio per FLOPs ratio: {chosen}")
        settings = {"seed": 0, "epochs": epochs, "finetune_epochs": finetune_epochs, "train": 1000, "validation": 297}
        return write_json(args.out, {"machine": machine(), "settings": settings, "candidates": results, "chosen": chosen})
    seeds, epochs, finetune_epochs = _training_settings(args, epochs=40, finetune_epochs=15)
    per_seed = epochs + len(curve.RATIOS) * len(curve.FINE_TUNED) * finetune_epochs
    with tqdm(total=0 if args.time_only else len(seeds) * per_seed, desc="training (dense, then fine-tuning)") as bar:
        rows, unreachable = curve.run(seeds, curve.RATIOS, epochs, finetune_epochs, work, args.repeats or 30, args.time_only, bar)
    print(curve.table(rows, unreachable, len(seeds)))
    print("\nCAIT (fine-tuned) against every other point at the same speed:\n")
    print(pareto.equal_speed_table(curve.as_json(rows), "CAIT (fine-tuned)", "top1"))
    info = machine()
    print(f"\nmachine: {', '.join(f'{k} {v}' for k, v in info.items())}")
    settings = {"seeds": seeds, "epochs": epochs, "finetune_epochs": finetune_epochs, "ratios": list(curve.RATIOS), "keep": curve.KEEP,
                "repeats": args.repeats or 30}  # fmt: skip
    write_json(args.out, {"machine": info, "settings": settings, "rows": curve.as_json(rows), "unreachable": unreachable})
    if args.plot:
        pareto.plot(curve.as_json(rows), "top1", args.plot, f"digits, {len(seeds)} seeds ({info['cpu']}, {info['threads']} threads)")
        print(f"wrote {args.plot}")
