"""The ``cait`` command line: ``compress``, ``finetune``, ``eval``, ``info``, ``bench`` and ``visualize``."""

from __future__ import annotations

import argparse
import json
import os

EXAMPLES = """examples:
  cait compress --model deit_small_patch16_224 --checkpoint deit_s.pth \\
      --merge-flops 0.7 --keep-qk 0.5 --keep-v 0.75 --keep-mlp 0.75 --out deit_s_cait.safetensors
  cait info deit_s_cait.safetensors
  cait bench --models deit_small_patch16_224 --batch 8 --variant merge=0.7,prune=0.5/0.75/0.75
  cait bench --device cuda --dtype fp16 --batch 1 64 256 --cuda-graph --out models-gpu.json
  cait bench --kernels --out kernels.json
  cait bench --all                                   # every number: JSON, Markdown report and plots
  cait bench --segmentation --out segmentation.json  # digit canvases: dense vs CAIT vs ToMe vs token pruning
  cait visualize --model deit_s_cait.safetensors cat.jpg --scale 2 --out regions.png
"""

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
FINETUNE_EXAMPLES = """examples:
  cait finetune --model deit_small_patch16_224 --checkpoint deit_s.pth --data imagenet \\
      --merge-flops 0.7 --keep-qk 0.5 --keep-v 0.75 --keep-mlp 0.75 --epochs 30 --out runs/deit_s
  torchrun --nproc-per-node 8 -m cait finetune ...          # the same on 8 GPUs
  cait eval --data imagenet runs/deit_s/model.safetensors

  # segmentation: train the dense model (a head on the backbone), then compress it with distillation
  cait finetune --task segmentation --model deit_small_patch16_224 --checkpoint deit_s.pth --img-size 512 \\
      --num-classes 150 --head upsample --data ade20k --epochs 40 --out runs/seg_dense
  cait finetune --task segmentation --teacher runs/seg_dense/model.safetensors --data ade20k \\
      --merge-flops 0.8 --keep-qk 0.5 --keep-v 0.75 --keep-mlp 0.75 --epochs 20 --out runs/seg_cait
"""
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm")


def _counts(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected whole numbers separated by commas, got {text!r}") from None


def _add_model_arguments(p: argparse.ArgumentParser, required: bool = True, model_help: str = "") -> None:
    p.add_argument("--model", required=required, help=model_help or "timm model name, e.g. deit_small_patch16_224")
    p.add_argument("--checkpoint", metavar="FILE", help="weights for the timm model (a timm/PyTorch checkpoint); random init without it")
    p.add_argument("--pretrained", action="store_true", help="load timm's pretrained weights instead (needs network access)")
    p.add_argument(
        "--img-size", type=int, nargs="+", metavar="PX", help="input size: one number for square images or H W (default: the model's)"
    )
    p.add_argument("--num-classes", type=int, metavar="K", help="classifier outputs (default: the model's)")


def _add_compression_arguments(p: argparse.ArgumentParser) -> None:
    merge = p.add_mutually_exclusive_group()
    merge.add_argument(
        "--merge-flops",
        type=float,
        metavar="F",
        help="ATME: merge until the FLOPs are F times those of the unmerged (pruned) model, F in (0, 1]",
    )
    merge.add_argument(
        "--merge-r", type=_counts, metavar="R[,R...]", help="ATME: tokens merged away per block, one count for every block or one per block"
    )
    p.add_argument(
        "--block", type=int, choices=(2, 4), default=2, help="ATME tile side: tokens only merge inside aligned tiles (default: 2)"
    )
    p.add_argument(
        "--keep-qk", type=float, default=1.0, metavar="Q", help="CDCP: share of q/k channels kept per head, shared by q and k (default: 1)"
    )
    p.add_argument("--keep-v", type=float, default=1.0, metavar="V", help="CDCP: share of v channels kept per head (default: 1)")
    p.add_argument("--keep-mlp", type=float, default=1.0, metavar="M", help="CDCP: share of MLP hidden units kept (default: 1)")
    p.add_argument(
        "--importance",
        choices=("weight", "activation"),
        help="CDCP channel ranking: weight norms, or activations on --calibration images (default: activation if --calibration is given)",
    )
    p.add_argument("--calibration", metavar="DIR", help="folder of images (searched recursively) for activation importance")
    p.add_argument("--calibration-images", type=int, default=64, metavar="N", help="how many calibration images to use (default: 64)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cait",
        description="Compress timm Vision Transformers: merge neighbouring tokens (ATME) and prune channels consistently (CDCP). "
        "Every command explains its flags: cait COMMAND --help.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    c = commands.add_parser(
        "compress",
        help="compress a timm model and save it",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Build a timm model, merge tokens and/or prune channels, and save the compressed model "
        "(weights and config in one .safetensors file that `cait.load` reads without the original weights).",
    )
    _add_model_arguments(c)
    _add_compression_arguments(c)
    c.add_argument("--out", required=True, metavar="FILE", help="where to write the compressed model (.safetensors)")

    f = commands.add_parser(
        "finetune",
        help="compress a timm model and fine-tune it back to accuracy, with distillation from the dense model",
        epilog=FINETUNE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Merge tokens (ATME, on during training with the final schedule) and prune channels with dynamic CDCP "
        "gates (the kept set is re-chosen from learnable scores every step while the keep ratios anneal from 1 to the "
        "targets), training on an ImageFolder with the dense model as teacher; then save the compact model. "
        "Multi-GPU: run under torchrun (DistributedDataParallel).",
    )
    _add_model_arguments(f, required=False)
    _add_compression_arguments(f)
    f.add_argument(
        "--task",
        choices=("classification", "segmentation"),
        default="classification",
        help="classification (the default): --data is an ImageFolder and the dense --model is the teacher; segmentation: "
        "--data holds SPLIT/images/NAME.jpg|png and SPLIT/masks/NAME.png (class index per pixel, 255 ignored), a decode "
        "head on the backbone's dense features; train the dense segmentation model first (no compression flags), then "
        "compress it with --teacher DIR/model.safetensors",
    )
    f.add_argument("--head", choices=("linear", "upsample"), help="segmentation: decode head of a new model (default: linear)")
    f.add_argument(
        "--teacher",
        metavar="FILE",
        help="segmentation: a dense segmentation model saved by cait finetune --task segmentation; it initializes the student "
        "(backbone and head) and is the distillation teacher (then --model, --checkpoint and --num-classes are not needed)",
    )
    f.add_argument(
        "--data",
        required=True,
        metavar="DIR",
        help="classification: ImageFolder root with train/ and val/ (one folder per class in each); segmentation: see --task",
    )
    f.add_argument("--epochs", type=int, default=30, help="training epochs (default: 30)")
    f.add_argument(
        "--anneal-epochs", type=float, metavar="E", help="epochs over which keep ratios go from 1 to the targets (default: a third)"
    )
    f.add_argument("--batch-size", type=int, default=64, help="images per step and process (default: 64)")
    f.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate of the weights (default: 1e-4)")
    f.add_argument("--score-lr", type=float, default=1e-2, help="AdamW learning rate of the CDCP scores (default: 1e-2)")
    f.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay of the weights (default: 0.05)")
    f.add_argument("--alpha", type=float, default=0.5, help="weight of the teacher's soft targets, 0 for labels only (default: 0.5)")
    f.add_argument("--temperature", type=float, default=1.0, help="distillation temperature (default: 1)")
    f.add_argument("--workers", type=int, default=2, help="data loading processes (default: 2)")
    f.add_argument("--device", choices=["cpu", "cuda"], help="where to train (default: cuda when visible, else cpu)")
    f.add_argument("--no-amp", action="store_true", help="train in fp32 on CUDA (default: fp16 autocast there)")
    f.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    f.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt (same arguments)")
    f.add_argument("--out", required=True, metavar="DIR", help="writes checkpoint.pt every epoch, log.json and the final model.safetensors")

    e = commands.add_parser(
        "eval",
        help="top-1/top-5 accuracy of a saved compressed model on an ImageFolder",
        description="Evaluate a .safetensors model written by cait on DIR/val (or --split) and print top-1, top-5, images/s.",
    )
    e.add_argument("file", help="a .safetensors file written by cait")
    e.add_argument("--data", required=True, metavar="DIR", help="ImageFolder root")
    e.add_argument("--split", default="val", help="sub-folder of DIR to evaluate (default: val)")
    e.add_argument("--batch-size", type=int, default=64, help="images per batch (default: 64)")
    e.add_argument("--workers", type=int, default=2, help="data loading processes (default: 2)")
    e.add_argument("--device", choices=["cpu", "cuda"], help="where to run (default: cuda when visible, else cpu)")

    i = commands.add_parser(
        "info",
        help="describe a saved compressed model",
        description="Print the architecture, merge schedule, "
        "kept channels, FLOPs and parameters of a model saved by `cait compress` or `cait.save`.",
    )
    i.add_argument("file", help="a .safetensors file written by cait")

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
    b.add_argument("--models", nargs="+", help="timm model names (default: DeiT-T/S/B at 224)")
    b.add_argument(
        "--variant",
        action="append",
        metavar="SPEC",
        help="a compressed variant, repeatable: merge=F (ATME FLOPs target), prune=QK/V/MLP (CDCP keep ratios), "
        "block=2|4, comma separated, e.g. merge=0.7,prune=0.5/0.75/0.75 (default: merge=0.8, merge=0.6, "
        "prune=0.5/0.75/0.75 and merge=0.7,prune=0.5/0.75/0.75)",
    )
    b.add_argument("--batch", nargs="+", type=int, help="batch sizes (default: 1 8)")
    b.add_argument("--repeats", type=int, help="timed repeats per model after 2 warm-up runs (default: 15)")
    b.add_argument("--checkpoint", metavar="FILE", help="weights for the (single) model in --models")
    b.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    b.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        help="where to run (default: cuda when a GPU is visible, else cpu). On cuda every compressed variant "
        "is also timed on the PyTorch reference ops, as '<variant> [reference ops]'",
    )
    b.add_argument("--dtype", choices=sorted(DTYPES), help="weights and activations (default: fp16 on cuda, fp32 on cpu)")
    b.add_argument("--cuda-graph", action="store_true", help="also time every model captured in one CUDA graph (cuda only)")
    b.add_argument(
        "--kernels",
        action="store_true",
        help="benchmark the Triton kernels instead of models: on a GPU, attention vs scaled_dot_product_attention at "
        "DeiT shapes and the ATME step / unmerge vs their references, with FLOP and byte floors and the measured "
        "peaks; on any machine, the ahead-of-time compile report (registers, spills, shared memory, tensor-core "
        "instructions) of every kernel configuration for sm_80 and sm_90",
    )
    b.add_argument(
        "--accuracy",
        action="store_true",
        help="run the accuracy benchmark instead of timing models: a small ViT trained from scratch on scikit-learn's digits, "
        "then dense vs ATME / CDCP / both (one-shot and fine-tuned with distillation) vs ToMe and EViT-style pruning "
        "at about 0.5x FLOPs: top-1 over --seeds, FLOPs ratio, CPU img/s (about 20 minutes on 2 cores)",
    )
    b.add_argument(
        "--segmentation",
        action="store_true",
        help="run the segmentation benchmark: a small ViT with a linear head trained from scratch on digit canvases "
        "(background + 10 digit classes per pixel), then dense vs CAIT (one-shot and fine-tuned) vs ToMe with unmerge vs "
        "EViT-style token pruning (dropped cells filled from the nearest kept token), all fine-tuned alike: mIoU over "
        "--seeds, FLOPs ratio, CPU img/s (about 21 minutes on 2 cores)",
    )
    b.add_argument("--seeds", type=int, default=3, help="--accuracy/--segmentation: seeds (default: 3)")
    b.add_argument("--epochs", type=int, help="--accuracy/--segmentation: epochs of dense training (default: 40 / 30)")
    b.add_argument("--finetune-epochs", type=int, help="--accuracy/--segmentation: epochs of fine-tuning (default: 15 / 6)")
    b.add_argument("--picture", metavar="PNG", help="--segmentation: also draw CAIT's merged regions on test canvases to this file")
    b.add_argument(
        "--out", metavar="FILE", help="also write the rows and the machine description to this JSON file (--all: the report folder)"
    )

    v = commands.add_parser(
        "visualize",
        help="draw the merged regions of a compressed model on an image",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run IMAGE (resized to the model's input) through a compressed model and draw which cells every token "
        "holds: by default the input and one panel per merging block side by side.",
        epilog="examples:\n  cait visualize --model runs/seg_cait/model.safetensors street.jpg --out regions.png\n"
        "  cait visualize --model deit_small_patch16_224 --checkpoint deit_s.pth --merge-flops 0.6 --style mean cat.jpg --out cat.png",
    )
    _add_model_arguments(v, model_help="a .safetensors file written by cait, or a timm model name (then give --merge-flops or --merge-r)")
    _add_compression_arguments(v)
    v.add_argument("image", metavar="IMAGE", help="the picture to draw on (any format PIL reads)")
    v.add_argument("--out", required=True, metavar="PNG", help="where to write the picture")
    v.add_argument(
        "--layer", type=int, metavar="I", help="only the regions after block I (-1: the final tokens); default: every merging block"
    )
    v.add_argument(
        "--style", choices=("outline", "mean"), default="outline", help="region borders, or mean colours with borders (default: outline)"
    )
    v.add_argument("--scale", type=int, default=1, metavar="S", help="upscale the picture S times before drawing (default: 1)")
    return parser


def load_images(folder: str, model, count: int):
    """Up to ``count`` images from ``folder`` (sorted paths), preprocessed as the model expects: ``(B, C, H, W)``."""
    import timm.data
    import torch
    from PIL import Image
    from tqdm.auto import tqdm

    if not os.path.isdir(folder):
        raise ValueError(f"--calibration {folder!r} is not a folder")
    paths = sorted(
        os.path.join(root, name) for root, _, names in os.walk(folder) for name in names if name.lower().endswith(IMAGE_SUFFIXES)
    )
    if not paths:
        raise ValueError(f"--calibration {folder!r} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    config = timm.data.resolve_model_data_config(model)
    config["input_size"] = (model.patch_embed.proj.in_channels, *model.patch_embed.img_size)
    config["crop_pct"] = 1.0
    transform = timm.data.create_transform(**config)
    return torch.stack([transform(Image.open(p).convert("RGB")) for p in tqdm(paths[:count], desc="calibration images", leave=False)])


def build_model(args):
    """The timm model the arguments name, in eval mode."""
    import timm

    if args.img_size and len(args.img_size) > 2:
        raise ValueError("--img-size takes one number or two (H W)")
    overrides = {}
    if args.img_size:
        overrides["img_size"] = tuple(args.img_size) if len(args.img_size) == 2 else args.img_size[0]
    if args.num_classes is not None:
        overrides["num_classes"] = args.num_classes
    return timm.create_model(args.model, pretrained=args.pretrained, checkpoint_path=args.checkpoint or "", **overrides).eval()


def compression(args, model, calibration_folder: str | None):
    """``(ATME | None, CDCP | None)`` from the compression arguments; activation importance reads
    calibration images from ``calibration_folder``."""
    import cait

    prune_requested = (args.keep_qk, args.keep_v, args.keep_mlp) != (1.0, 1.0, 1.0)
    importance = args.importance or ("activation" if args.calibration else "weight")
    if importance == "activation" and not calibration_folder:
        raise ValueError("--importance activation needs --calibration DIR")
    merge = None
    if args.merge_flops is not None:
        merge = cait.ATME(flops=args.merge_flops, block=args.block)
    elif args.merge_r is not None:
        merge = cait.ATME(r=args.merge_r[0] if len(args.merge_r) == 1 else args.merge_r, block=args.block)
    prune = None
    if prune_requested:
        calibration = load_images(calibration_folder, model, args.calibration_images) if importance == "activation" else None
        prune = cait.CDCP(qk=args.keep_qk, v=args.keep_v, mlp=args.keep_mlp, method=importance, calibration=calibration)
    return merge, prune


def cmd_compress(args) -> None:
    import cait

    prune_requested = (args.keep_qk, args.keep_v, args.keep_mlp) != (1.0, 1.0, 1.0)
    if args.merge_flops is None and args.merge_r is None and not prune_requested:
        raise ValueError("nothing to compress: give --merge-flops or --merge-r, and/or --keep-qk/--keep-v/--keep-mlp below 1")
    model = build_model(args)
    merge, prune = compression(args, model, args.calibration)
    fast = cait.compress(model, merge=merge, prune=prune)
    cait.save(fast, args.out)
    print(f"wrote {args.out}\n")
    describe(fast, dense=model)


def describe(fast, dense) -> None:
    """Print what a compressed model keeps, next to its dense original."""
    import cait

    spec = fast.source
    grid = fast.grid
    tokens = fast.num_prefix_tokens + grid[0] * grid[1]
    print(
        f"model     {spec['name']}  ({spec['kwargs']['img_size'][0]}x{spec['kwargs']['img_size'][1]} px, "
        f"{grid[0]}x{grid[1]} patches, {len(fast.blocks)} blocks, {fast.blocks[0].attn.heads} heads)"
    )
    print(f"tiles     {fast.tile}x{fast.tile}, merged {sum(fast.schedule)} tokens in all")
    print("\nblock  merged  tokens(attn->mlp)  qk/head  v/head  mlp")
    for i, block in enumerate(fast.blocks):
        attn, hidden = block.attn, block.mlp.fc1.out_features
        print(f"{i:5d}  {block.r:6d}  {tokens:6d} -> {tokens - block.r:<6d}  {attn.d_qk:7d}  {attn.d_v:6d}  {hidden:4d}")
        tokens -= block.r
    dense_flops, flops = cait.flops(dense), cait.flops(fast)
    dense_params, params = (sum(p.numel() for p in m.parameters()) for m in (dense, fast))
    print(f"\nGFLOPs    {flops / 1e9:.2f}  ({flops / dense_flops:.3f} of dense {dense_flops / 1e9:.2f}; per image, multiply-add = 2)")
    print(f"params    {params / 1e6:.1f} M  ({params / dense_params:.3f} of dense {dense_params / 1e6:.1f} M)")


def cmd_info(args) -> None:
    import timm

    import cait
    from cait.segmentation import Segmenter, head_kind

    model = cait.load(args.file)
    fast = model.backbone if isinstance(model, Segmenter) else model
    describe(fast, dense=timm.create_model(fast.source["name"], **fast.source["kwargs"]).eval())
    if fast is not model:
        params = sum(p.numel() for p in model.head.parameters())
        print(f"head      {head_kind(model.head)} segmentation head, {model.num_classes} classes, {params / 1e6:.2f} M params")


def cmd_bench(args) -> None:
    import torch

    from cait.benchmark import DEFAULT_VARIANTS, as_json, machine, parse_variant, run, table

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.kernels:
        return bench_kernels(args)
    if args.accuracy:
        return bench_accuracy(args)
    if args.segmentation:
        return bench_segmentation(args)
    if args.repeats is not None and args.repeats < 1:
        raise ValueError("--repeats must be at least 1")
    if args.all:
        return bench_all(args)
    args.models = args.models or ["deit_tiny_patch16_224", "deit_small_patch16_224", "deit_base_patch16_224"]
    args.batch, args.repeats = args.batch or [1, 8], args.repeats or 15
    variants = args.variant or list(DEFAULT_VARIANTS)
    for text in variants:
        parse_variant(text)  # refuse a bad spec before any timing
    if args.checkpoint and len(args.models) != 1:
        raise ValueError("--checkpoint needs exactly one model in --models")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA GPU is visible")
    if args.cuda_graph and device != "cuda":
        raise ValueError("--cuda-graph needs --device cuda")
    dtype = getattr(torch, DTYPES[args.dtype or ("fp16" if device == "cuda" else "fp32")])
    rows = run(args.models, args.batch, variants, args.repeats, args.checkpoint, device, dtype, args.cuda_graph)
    info = dict(machine(), device=device, dtype=str(dtype).removeprefix("torch."))
    print(table(rows))
    print(f"\nmachine: {', '.join(f'{k} {v}' for k, v in info.items())}")
    write_json(args.out, {"machine": info, "repeats": args.repeats, "rows": as_json(rows)})


def bench_all(args) -> None:
    """``cait bench --all``: the report (:mod:`cait.report`)."""
    from tqdm.auto import tqdm

    from cait import report

    if args.variant or args.checkpoint or args.dtype or args.cuda_graph:
        raise ValueError("--all picks variants, dtype and graphs itself (random weights): drop --variant/--checkpoint/--dtype/--cuda-graph")
    device = _device(args.device).type
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

    from cait import kernel_bench
    from cait.benchmark import machine
    from cait_kernels import aot

    result = {"machine": machine()}
    if torch.cuda.is_available():
        device = torch.device("cuda")
        peak = kernel_bench.ceilings(device)
        rows = kernel_bench.attention_rows(peak, device, progress=lambda cases: tqdm(cases, desc="attention cases", leave=False))
        rows += kernel_bench.atme_rows(peak, device)
        print(kernel_bench.table(rows, peak), "\n")
        result.update(ceilings=peak, rows=kernel_bench.as_json(rows))
    else:
        print("kernel timings need a CUDA GPU and this machine has none: printing the ahead-of-time compile report only.\n")
    resources = aot.report(progress=lambda jobs, total: tqdm(jobs, total=total, desc="compiling for sm_80/sm_90", leave=False))
    print(aot.table(resources))
    print(f"\nmachine: {', '.join(f'{k} {v}' for k, v in result['machine'].items())}")
    write_json(args.out, dict(result, compile_report=[r._asdict() for r in resources]))


def bench_accuracy(args) -> None:
    """``cait bench --accuracy``: the digits benchmark (:mod:`cait.accuracy_bench`)."""
    from tqdm.auto import tqdm

    from cait import accuracy_bench
    from cait.benchmark import machine

    seeds, epochs, finetune_epochs = _training_settings(args, epochs=40, finetune_epochs=15)
    with tqdm(total=len(seeds) * (epochs + finetune_epochs), desc="training (dense, then fine-tuning)") as bar:
        rows = accuracy_bench.run(seeds, epochs, finetune_epochs, progress=bar)
    print(accuracy_bench.table(rows, len(seeds)))
    info = machine()
    print(f"\nmachine: {', '.join(f'{k} {v}' for k, v in info.items())}")
    settings = {"seeds": seeds, "epochs": epochs, "finetune_epochs": finetune_epochs}
    write_json(args.out, {"machine": info, "settings": settings, "rows": accuracy_bench.as_json(rows)})


def _training_settings(args, epochs: int, finetune_epochs: int):
    """``(seeds, epochs, finetune_epochs)`` of a training benchmark, the defaults where not given."""
    epochs = args.epochs if args.epochs is not None else epochs
    finetune_epochs = args.finetune_epochs if args.finetune_epochs is not None else finetune_epochs
    if args.seeds < 1 or epochs < 1 or finetune_epochs < 1:
        raise ValueError("--seeds, --epochs and --finetune-epochs must be at least 1")
    return list(range(args.seeds)), epochs, finetune_epochs


def bench_segmentation(args) -> None:
    """``cait bench --segmentation``: the digit-canvas benchmark (:mod:`cait.segmentation_bench`)."""
    from tqdm.auto import tqdm

    from cait import segmentation_bench
    from cait.benchmark import machine

    seeds, epochs, finetune_epochs = _training_settings(args, segmentation_bench.EPOCHS, segmentation_bench.FINETUNE_EPOCHS)
    methods = len(segmentation_bench.FINE_TUNED)
    with tqdm(total=len(seeds) * (epochs + methods * finetune_epochs), desc="training (dense, then each method)") as bar:
        result = segmentation_bench.run(seeds, epochs, finetune_epochs, progress=bar)
    print(segmentation_bench.table(result.rows, len(seeds)))
    info = machine()
    print(f"\nmachine: {', '.join(f'{k} {v}' for k, v in info.items())}")
    settings = {"seeds": seeds, "epochs": epochs, "finetune_epochs": finetune_epochs}
    write_json(args.out, {"machine": info, "settings": settings, "rows": segmentation_bench.as_json(result.rows)})
    if args.picture:
        segmentation_bench.picture(result).save(args.picture)
        print(f"wrote {args.picture}")


def write_json(path: str | None, payload: dict) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(payload, f, indent=2)
        print(f"wrote {path}")


def image_folder(root: str, split: str, model, training: bool):
    """``root/split`` as a torchvision ImageFolder with timm's transforms for ``model``'s input size."""
    import timm.data
    from torchvision.datasets import ImageFolder

    folder = os.path.join(root, split)
    if not os.path.isdir(folder):
        raise ValueError(f"--data {root!r} has no {split}/ folder (an ImageFolder root holds train/ and val/)")
    config = timm.data.resolve_model_data_config(model)
    config["input_size"] = tuple(model.input_size) if hasattr(model, "input_size") else (3, *model.patch_embed.img_size)
    return ImageFolder(folder, transform=timm.data.create_transform(**config, is_training=training))


def _device(name: str | None):
    import torch

    device = name or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA GPU is visible")
    return torch.device(device)


def cmd_finetune(args) -> None:
    import torch
    import torch.distributed as dist
    from torch.utils.data import DataLoader, DistributedSampler

    import cait
    from cait.finetune import Distillation, fit, resume

    if args.epochs < 1 or args.batch_size < 1:
        raise ValueError("--epochs and --batch-size must be at least 1")
    if args.task == "classification" and (args.teacher or args.head):
        raise ValueError("--teacher and --head are for --task segmentation")
    if args.model is None and not (args.task == "segmentation" and args.teacher):
        raise ValueError("--model is required (for --task segmentation it may come from --teacher instead)")
    distill = Distillation(args.alpha, args.temperature)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = _device(args.device)
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
    main_process = world == 1 or dist.get_rank() == 0
    torch.manual_seed(args.seed)
    setup = _segmentation_setup if args.task == "segmentation" else _classification_setup
    model, teacher, train_set, val_set, metrics, make = setup(args)
    if teacher is None and distill.alpha > 0:
        distill = Distillation(0.0)
        if main_process:
            print("no --teacher: training on the labels only (--alpha ignored)")
    backbone = getattr(model, "backbone", model)
    merge, prune = compression(args, getattr(backbone, "vit", backbone), args.calibration)
    sampler = DistributedSampler(train_set, seed=args.seed) if world > 1 else None
    drop_last = len(train_set) > args.batch_size  # equal batches, but never an empty epoch
    train_loader = DataLoader(
        train_set, args.batch_size, shuffle=sampler is None, sampler=sampler, num_workers=args.workers, drop_last=drop_last
    )
    val_loader = DataLoader(val_set, args.batch_size, num_workers=args.workers)
    anneal = args.anneal_epochs if args.anneal_epochs is not None else args.epochs / 3
    student = make(model, merge, prune, warmup=round(anneal * len(train_loader))).to(device)
    teacher = teacher.to(device) if teacher is not None else None
    groups = [{"params": student.model.parameters(), "lr": args.lr, "weight_decay": args.weight_decay}]
    if student.gates is not None:
        groups.append({"params": student.gates.parameters(), "lr": args.score_lr, "weight_decay": 0.0})
    optimizer = torch.optim.AdamW(groups)
    os.makedirs(args.out, exist_ok=True)
    checkpoint = os.path.join(args.out, "checkpoint.pt")
    start = 0
    if args.resume:
        if not os.path.exists(checkpoint):
            raise FileNotFoundError(f"--resume: no {checkpoint}")
        start = resume(student, optimizer, checkpoint)
    amp = device.type == "cuda" and not args.no_amp
    fit(student, teacher, train_loader, val_loader, epochs=args.epochs, optimizer=optimizer, distill=distill, out_dir=args.out,
        start_epoch=start, amp=amp, ddp=world > 1, main_process=main_process, metrics=metrics)  # fmt: skip
    if main_process:
        path = os.path.join(args.out, "model.safetensors")
        cait.save(student.materialize(), path)
        print(f"wrote {path}\n")
        describe(getattr(student.model, "backbone", student.model), dense=getattr(model, "backbone", model))
    if world > 1:
        dist.destroy_process_group()


def _classification_setup(args):
    """``(timm model, teacher, train set, val set, metrics, student maker)`` for image classification."""
    from cait.finetune import evaluate, make_student, teacher_of

    model = build_model(args)
    train_set = image_folder(args.data, "train", model, training=True)
    val_set = image_folder(args.data, "val", model, training=False)
    if len(train_set.classes) != model.num_classes:
        raise ValueError(
            f"{args.data}/train holds {len(train_set.classes)} classes but the model has {model.num_classes} outputs: the teacher "
            f"must be trained for these classes (pass --checkpoint of such a model and --num-classes {len(train_set.classes)})"
        )
    return model, teacher_of(model), train_set, val_set, evaluate, make_student


def _segmentation_setup(args):
    """``(segmentation model, teacher or None, train set, val set, metrics, student maker)``: the model
    is the ``--teacher`` segmenter (trained dense) or a new head on the ``--model`` backbone."""
    import cait
    from cait import segmentation
    from cait.finetune import teacher_of

    if args.teacher:
        model = cait.load(args.teacher)
        if not isinstance(model, segmentation.Segmenter):
            raise ValueError(f"--teacher {args.teacher} is a classifier: give a model saved by cait finetune --task segmentation")
        if any(block.r for block in model.backbone.blocks) or any(v is not None for b in model.backbone.blocks for v in b.kept.values()):
            raise ValueError(f"--teacher {args.teacher} is compressed: the teacher must be the dense segmentation model")
        if args.head and args.head != segmentation.head_kind(model.head):
            raise ValueError(f"--head {args.head}: the teacher's head is {segmentation.head_kind(model.head)!r}")
        teacher = teacher_of(model)
    else:
        if args.num_classes is None:
            raise ValueError("--task segmentation needs --num-classes K (classes in the masks, background included)")
        backbone = build_model(argparse.Namespace(**{**vars(args), "num_classes": 0}))
        model, teacher = segmentation.segmenter(backbone, args.num_classes, args.head or "linear"), None
    train_set, val_set = segmentation_folder(args.data, "train", model, training=True), segmentation_folder(args.data, "val", model)
    return model, teacher, train_set, val_set, segmentation.evaluate, segmentation.make_student


def cmd_eval(args) -> None:
    import time

    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    import cait
    from cait import finetune, segmentation

    model = cait.load(args.file, device=_device(args.device))
    segmenting = isinstance(model, segmentation.Segmenter)
    data = segmentation_folder(args.data, args.split, model) if segmenting else image_folder(args.data, args.split, model, training=False)
    loader = DataLoader(data, args.batch_size, num_workers=args.workers)
    start = time.perf_counter()
    with tqdm(total=len(loader), desc="evaluating", leave=False) as bar:
        result = (segmentation.evaluate if segmenting else finetune.evaluate)(model, loader, progress=bar)
    seconds = time.perf_counter() - start
    if segmenting:
        scores = f"mIoU {100 * result['miou']:.2f}%  pixel accuracy {100 * result['pixel_accuracy']:.2f}%"
    else:
        scores = f"top-1 {100 * result['top1']:.2f}%  top-5 {100 * result['top5']:.2f}%"
    where = os.path.join(args.data, args.split)
    print(f"{args.file} on {where}: {scores}  ({result['images']} images, {result['images'] / seconds:.1f} img/s including loading)")


def segmentation_folder(root: str, split: str, model, training: bool = False):
    """``root/split`` as a :class:`cait.segmentation_data.SegmentationFolder` for the segmentation ``model``."""
    import timm.data

    from cait.cost import default_input_size
    from cait.segmentation_data import SegmentationFolder

    config = timm.data.resolve_model_data_config(getattr(model.backbone, "vit", model.backbone))
    return SegmentationFolder(root, split, default_input_size(model), config["mean"], config["std"], training=training)


def cmd_visualize(args) -> None:
    from PIL import Image

    import cait

    if os.path.isfile(args.model) and args.model.endswith(".safetensors"):
        model = cait.load(args.model)
    else:
        if args.merge_flops is None and args.merge_r is None:
            raise ValueError("--model is a timm name: give --merge-flops or --merge-r to say how to merge")
        dense = build_model(args)
        merge, prune = compression(args, dense, args.calibration)
        model = cait.compress(dense, merge=merge, prune=prune)
    if not any(block.r for block in getattr(model, "backbone", model).blocks):
        raise ValueError(f"{args.model} merges no tokens: there are no regions to draw")
    if not os.path.isfile(args.image):
        raise FileNotFoundError(f"no such image: {args.image}")
    blocks = "all" if args.layer is None else args.layer
    picture = cait.visualize(model, Image.open(args.image), blocks=blocks, style=args.style, scale=args.scale)
    picture.save(args.out)
    print(f"wrote {args.out} ({picture.width}x{picture.height} px)")


COMMANDS = {
    "compress": cmd_compress,
    "finetune": cmd_finetune,
    "eval": cmd_eval,
    "info": cmd_info,
    "bench": cmd_bench,
    "visualize": cmd_visualize,
}


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        COMMANDS[args.command](args)
    except (ValueError, NotImplementedError, FileNotFoundError) as error:
        parser.exit(2, f"cait {args.command}: error: {error}\n")
    except RuntimeError as error:
        if "Unknown model" not in str(error):
            raise
        parser.exit(2, f"cait {args.command}: error: {error}\n")
