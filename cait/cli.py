"""The ``cait`` command line: ``compress``, ``info`` and ``bench``."""

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
"""

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm")


def _counts(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected whole numbers separated by commas, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cait",
        description="Compress timm Vision Transformers: merge neighbouring tokens (ATME) and prune channels consistently (CDCP).",
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
    c.add_argument("--model", required=True, help="timm model name, e.g. deit_small_patch16_224")
    c.add_argument("--checkpoint", metavar="FILE", help="weights for the timm model (a timm/PyTorch checkpoint); random init without it")
    c.add_argument("--pretrained", action="store_true", help="load timm's pretrained weights instead (needs network access)")
    c.add_argument(
        "--img-size", type=int, nargs="+", metavar="PX", help="input size: one number for square images or H W (default: the model's)"
    )
    c.add_argument("--num-classes", type=int, metavar="K", help="classifier outputs (default: the model's)")
    merge = c.add_mutually_exclusive_group()
    merge.add_argument(
        "--merge-flops",
        type=float,
        metavar="F",
        help="ATME: merge until the FLOPs are F times those of the unmerged (pruned) model, F in (0, 1]",
    )
    merge.add_argument(
        "--merge-r", type=_counts, metavar="R[,R...]", help="ATME: tokens merged away per block, one count for every block or one per block"
    )
    c.add_argument(
        "--block", type=int, choices=(2, 4), default=2, help="ATME tile side: tokens only merge inside aligned tiles (default: 2)"
    )
    c.add_argument(
        "--keep-qk", type=float, default=1.0, metavar="Q", help="CDCP: share of q/k channels kept per head, shared by q and k (default: 1)"
    )
    c.add_argument("--keep-v", type=float, default=1.0, metavar="V", help="CDCP: share of v channels kept per head (default: 1)")
    c.add_argument("--keep-mlp", type=float, default=1.0, metavar="M", help="CDCP: share of MLP hidden units kept (default: 1)")
    c.add_argument(
        "--importance",
        choices=("weight", "activation"),
        help="CDCP channel ranking: weight norms, or activations on --calibration images (default: activation if --calibration is given)",
    )
    c.add_argument("--calibration", metavar="DIR", help="folder of images (searched recursively) for activation importance")
    c.add_argument("--calibration-images", type=int, default=64, metavar="N", help="how many calibration images to use (default: 64)")
    c.add_argument("--out", required=True, metavar="FILE", help="where to write the compressed model (.safetensors)")

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
        "and print a table: GFLOPs per image (multiply-add = 2), params, img/s, speedup, and speedup x FLOPs ratio "
        "(1.0 means the whole FLOPs saving shows up as speed).",
    )
    b.add_argument(
        "--models",
        nargs="+",
        default=["deit_tiny_patch16_224", "deit_small_patch16_224", "deit_base_patch16_224"],
        help="timm model names (default: DeiT-T/S/B at 224)",
    )
    b.add_argument(
        "--variant",
        action="append",
        metavar="SPEC",
        help="a compressed variant, repeatable: merge=F (ATME FLOPs target), prune=QK/V/MLP (CDCP keep ratios), "
        "block=2|4, comma separated, e.g. merge=0.7,prune=0.5/0.75/0.75 (default: merge=0.8, merge=0.6, "
        "prune=0.5/0.75/0.75 and merge=0.7,prune=0.5/0.75/0.75)",
    )
    b.add_argument("--batch", nargs="+", type=int, default=[1, 8], help="batch sizes (default: 1 8)")
    b.add_argument("--repeats", type=int, default=15, help="timed repeats per model after 2 warm-up runs (default: 15)")
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
    b.add_argument("--out", metavar="FILE", help="also write the rows and the machine description to this JSON file")
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


def cmd_compress(args) -> None:
    import timm

    import cait

    prune_requested = (args.keep_qk, args.keep_v, args.keep_mlp) != (1.0, 1.0, 1.0)
    if args.merge_flops is None and args.merge_r is None and not prune_requested:
        raise ValueError("nothing to compress: give --merge-flops or --merge-r, and/or --keep-qk/--keep-v/--keep-mlp below 1")
    importance = args.importance or ("activation" if args.calibration else "weight")
    if importance == "activation" and not args.calibration:
        raise ValueError("--importance activation needs --calibration DIR")
    if args.img_size and len(args.img_size) > 2:
        raise ValueError("--img-size takes one number or two (H W)")
    merge = None
    if args.merge_flops is not None:
        merge = cait.ATME(flops=args.merge_flops, block=args.block)
    elif args.merge_r is not None:
        merge = cait.ATME(r=args.merge_r[0] if len(args.merge_r) == 1 else args.merge_r, block=args.block)
    overrides = {}
    if args.img_size:
        overrides["img_size"] = tuple(args.img_size) if len(args.img_size) == 2 else args.img_size[0]
    if args.num_classes is not None:
        overrides["num_classes"] = args.num_classes
    model = timm.create_model(args.model, pretrained=args.pretrained, checkpoint_path=args.checkpoint or "", **overrides).eval()
    prune = None
    if prune_requested:
        calibration = load_images(args.calibration, model, args.calibration_images) if importance == "activation" else None
        prune = cait.CDCP(qk=args.keep_qk, v=args.keep_v, mlp=args.keep_mlp, method=importance, calibration=calibration)
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

    fast = cait.load(args.file)
    describe(fast, dense=timm.create_model(fast.source["name"], **fast.source["kwargs"]).eval())


def cmd_bench(args) -> None:
    import torch

    from cait.benchmark import DEFAULT_VARIANTS, as_json, machine, parse_variant, run, table

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.kernels:
        return bench_kernels(args)
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


def write_json(path: str | None, payload: dict) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(payload, f, indent=2)
        print(f"wrote {path}")


COMMANDS = {"compress": cmd_compress, "info": cmd_info, "bench": cmd_bench}


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
