"""What the ``cait`` commands share: model and compression arguments, building the timm model and the
compression spec from them, describing a compressed model, data folders, JSON output.

Heavy modules (torch, timm, cait) are imported inside the functions, so ``cait --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

EXAMPLES = """examples:
  cait compress --model deit_small_patch16_224 --checkpoint deit_s.pth \\
      --merge-flops 0.7 --keep-qk 0.5 --keep-v 0.75 --keep-mlp 0.75 --out deit_s_cait.safetensors
  cait info deit_s_cait.safetensors
  cait export deit_s_cait.safetensors --format onnx --dynamic-batch   # also pt2 (torch.export), aoti (AOTInductor)
  cait bench --models deit_small_patch16_224 --batch 8 --variant merge=0.7,prune=0.5/0.75/0.75
  cait bench --models deit_small_patch16_224 --batch 1 --runtime eager compile onnxruntime
  cait bench --device cuda --dtype fp16 --batch 1 64 256 --cuda-graph --out models-gpu.json
  cait bench --kernels --out kernels.json
  cait bench --all                                   # every number: JSON, Markdown report and plots
  cait bench --segmentation --out segmentation.json  # digit canvases: dense vs CAIT vs ToMe vs token pruning
  cait visualize --model deit_s_cait.safetensors cat.jpg --scale 2 --out regions.png
"""

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm")


def _counts(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected whole numbers separated by commas, got {text!r}") from None


def add_model_arguments(p: argparse.ArgumentParser, required: bool = True, model_help: str = "") -> None:
    p.add_argument("--model", required=required, help=model_help or "timm model name, e.g. deit_small_patch16_224")
    p.add_argument("--checkpoint", metavar="FILE", help="weights for the timm model (a timm/PyTorch checkpoint); random init without it")
    p.add_argument("--pretrained", action="store_true", help="load timm's pretrained weights instead (needs network access)")
    p.add_argument(
        "--img-size", type=int, nargs="+", metavar="PX", help="input size: one number for square images or H W (default: the model's)"
    )
    p.add_argument("--num-classes", type=int, metavar="K", help="classifier outputs (default: the model's)")


def add_compression_arguments(p: argparse.ArgumentParser) -> None:
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
        "--align",
        type=int,
        nargs="+",
        metavar="N",
        help="CDCP: kept counts are multiples of N (one N for every group, or two: per-head channels, MLP units); "
        "1 keeps the exact ratios (default: 8, what GPU tensor cores need)",
    )
    p.add_argument(
        "--importance",
        choices=("weight", "activation"),
        help="CDCP channel ranking: weight norms, or activations on --calibration images (default: activation if --calibration is given)",
    )
    p.add_argument("--calibration", metavar="DIR", help="folder of images (searched recursively) for activation importance")
    p.add_argument("--calibration-images", type=int, default=64, metavar="N", help="how many calibration images to use (default: 64)")
    p.add_argument(
        "--plan",
        metavar="FILE",
        help="the configuration a `cait plan` file chose (instead of the merge and keep flags; --model and --img-size "
        "default to the plan's)",
    )
    p.add_argument(
        "--plan-point",
        metavar="KEY",
        help="with --plan: another measured configuration of the plan instead of its choice, by its name in the plan's table "
        "(e.g. a faster or more faithful point of its Pareto front)",
    )


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
    images = []
    for path in tqdm(paths[:count], desc="calibration images", leave=False):
        try:
            with Image.open(path) as image:
                images.append(transform(image.convert("RGB")))
        except (OSError, SyntaxError) as error:  # PIL's UnidentifiedImageError is an OSError; truncated files raise either
            raise ValueError(f"--calibration: cannot read {path}: {error}") from None
    return torch.stack(images)


def check_output(path: str | None, flag: str = "--out", suffix: str | None = None) -> None:
    """Refuse, before any work, an output file whose folder does not exist, that is a folder, or
    (with ``suffix``) whose name has another extension."""
    if path:
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"{flag} {path}: the folder {folder} does not exist")
        if os.path.isdir(path):
            raise ValueError(f"{flag} {path} is a folder: give a file name")
        extension = os.path.splitext(path)[1]
        if suffix and extension and extension != suffix:
            raise ValueError(f"{flag} {path}: a cait model file ends in {suffix}, not {extension}")


def check_checkpoint(path: str | None) -> None:
    """Refuse, before any work, a ``--checkpoint`` that is missing or is a model saved by cait."""
    from cait.serialize import is_cait_file

    if not path:
        return
    if os.path.isdir(path):
        raise IsADirectoryError(f"--checkpoint {path} is a folder: give the checkpoint file")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--checkpoint {path}: no such file")
    if is_cait_file(path):
        raise ValueError(
            f"--checkpoint {path} is a compressed model saved by cait, not timm weights: pass it to `cait bench --models`, "
            f"`cait eval`, `cait info` or cait.load"
        )


def warn_random_weights(subject: str) -> None:
    """One line on stderr: ``subject`` has random weights, so only speed and shapes mean something."""
    print(f"warning: {subject} random weights: timings and shapes hold, accuracy does not", file=sys.stderr)


def _checkpoint_error(path: str, model: str, error: Exception) -> ValueError:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    mismatches = [line for line in lines if line.startswith(("size mismatch", "Missing key", "Unexpected key"))]
    detail = f"{len(mismatches)} problems, first: {mismatches[0]}" if mismatches else (lines[0] if lines else type(error).__name__)
    return ValueError(f"--checkpoint {path} does not fit {model} as built here: {detail[:300]}")


def build_model(args):
    """The timm model the arguments name, in eval mode (``--checkpoint`` checked first). NotImplementedError for a
    Hugging Face folder (only ``cait compress`` and ``cait bench`` take those: :func:`build_hf_model`)."""
    import timm

    from cait.hf import is_folder

    if is_folder(args.model):
        raise NotImplementedError(
            f"--model {args.model} is a Hugging Face folder, which cait {args.command} does not take yet "
            f"(cait compress and cait bench do; or use the Python API)"
        )

    if args.img_size and len(args.img_size) > 2:
        raise ValueError("--img-size takes one number or two (H W)")
    check_checkpoint(args.checkpoint)
    overrides = {}
    if args.img_size:
        overrides["img_size"] = tuple(args.img_size) if len(args.img_size) == 2 else args.img_size[0]
    if args.num_classes is not None:
        overrides["num_classes"] = args.num_classes
    try:
        model = timm.create_model(args.model, pretrained=args.pretrained, **overrides)
    except TypeError as error:  # a setting the model's class has no argument for (e.g. img_size of a CNN)
        flags = " / ".join(f"--{k.replace('_', '-')}" for k in overrides)
        raise ValueError(f"{args.model} cannot be built with {flags} ({error}): cait takes timm ViTs (VisionTransformer, Eva)") from None
    if args.checkpoint:
        load_checkpoint(model, args.checkpoint, args.model)
    elif not args.pretrained:
        warn_random_weights(f"no --checkpoint or --pretrained: {args.model} has")
    return model.eval()


def build_hf_model(args):
    """The Hugging Face model saved in the folder ``args.model`` (:func:`cait.hf.from_folder`), in eval mode."""
    given = [flag for flag, value in (("--checkpoint", args.checkpoint), ("--pretrained", getattr(args, "pretrained", False)),
                                      ("--img-size", args.img_size), ("--num-classes", args.num_classes)) if value]  # fmt: skip
    if given:
        raise ValueError(f"--model {args.model} is a Hugging Face folder, which holds its weights and settings: drop {', '.join(given)}")
    from cait.hf import from_folder

    return from_folder(args.model)


def load_checkpoint(model, path: str, name: str) -> None:
    """timm's ``load_checkpoint``, its many-line or empty errors turned into one ValueError line."""
    from timm.models import load_checkpoint as timm_load

    try:
        timm_load(model, path)
    except Exception as error:  # torch.load, safetensors and load_state_dict raise many kinds
        raise _checkpoint_error(path, name, error) from error


def check_compression(args) -> None:
    """Refuse bad merge and pruning arguments before any model is built (the specs validate themselves)."""
    import cait

    if getattr(args, "plan", None):
        _check_plan(args)
    elif getattr(args, "plan_point", None):
        raise ValueError("--plan-point names a configuration of a plan: it needs --plan FILE")
    importance = args.importance or ("activation" if args.calibration else "weight")
    if importance == "activation" and not args.calibration:
        raise ValueError("--importance activation needs --calibration DIR")
    if args.calibration_images < 1:
        raise ValueError(f"--calibration-images must be 1 or more, got {args.calibration_images}")
    if args.merge_flops is not None:
        cait.ATME(flops=args.merge_flops, block=args.block)
    elif args.merge_r is not None:
        cait.ATME(r=args.merge_r[0] if len(args.merge_r) == 1 else args.merge_r, block=args.block)
    if (args.keep_qk, args.keep_v, args.keep_mlp) != (1.0, 1.0, 1.0):
        cait.CDCP(qk=args.keep_qk, v=args.keep_v, mlp=args.keep_mlp, align=_align(args.align))
    if getattr(args, "num_classes", None) is not None and args.num_classes < 0:
        raise ValueError(f"--num-classes must be 0 (no head) or more, got {args.num_classes}")


def _check_plan(args) -> None:
    """``--plan``: a plan that chose something, no flag that would change its configuration; ``--model``
    and ``--img-size`` default to the plan's (and must agree with it when given)."""
    from cait.planner import Plan

    if not os.path.isfile(args.plan):
        raise FileNotFoundError(f"--plan {args.plan}: no such file")
    given = [flag for flag, value, default in (
        ("--merge-flops", args.merge_flops, None), ("--merge-r", args.merge_r, None), ("--block", args.block, 2),
        ("--keep-qk", args.keep_qk, 1.0), ("--keep-v", args.keep_v, 1.0), ("--keep-mlp", args.keep_mlp, 1.0),
        ("--align", args.align, None), ("--importance", args.importance, None), ("--calibration", args.calibration, None),
    ) if value != default]  # fmt: skip
    if given:
        raise ValueError(f"--plan fixes the configuration it measured: drop {', '.join(given)}")
    plan = Plan.load(args.plan)
    if plan.model.startswith("Segmenter("):
        raise ValueError(f"--plan {args.plan} is for a segmentation model: build it in Python, plan.compress(segmenter)")
    plan.candidate_at(args.plan_point)  # refuses a plan whose target was out of reach (with what it found), or an unknown point
    if args.model is None:
        args.model = plan.model
    elif args.model != plan.model:
        raise ValueError(f"--plan {args.plan} was made for {plan.model}, not --model {args.model}")
    size = list(plan.input_size[1:])
    if not args.img_size:
        args.img_size = size
    elif (args.img_size * 2)[:2] != size:
        raise ValueError(f"--plan {args.plan} was made for {size[0]}x{size[1]} images, not --img-size {' '.join(map(str, args.img_size))}")


def compression(args, model, calibration_folder: str | None):
    """``(ATME | None, CDCP | None)`` from the compression arguments; activation importance reads
    calibration images from ``calibration_folder``."""
    import cait

    check_compression(args)
    if getattr(args, "plan", None):
        from cait.planner import Plan

        plan = Plan.load(args.plan)
        plan.check(model)
        candidate = plan.candidate_at(args.plan_point)
        return candidate.atme(), candidate.cdcp()
    prune_requested = (args.keep_qk, args.keep_v, args.keep_mlp) != (1.0, 1.0, 1.0)
    importance = args.importance or ("activation" if args.calibration else "weight")
    merge = None
    if args.merge_flops is not None:
        merge = cait.ATME(flops=args.merge_flops, block=args.block)
    elif args.merge_r is not None:
        merge = cait.ATME(r=args.merge_r[0] if len(args.merge_r) == 1 else args.merge_r, block=args.block)
    prune = None
    if prune_requested:
        calibration = load_images(calibration_folder, model, args.calibration_images) if importance == "activation" else None
        prune = cait.CDCP(
            qk=args.keep_qk, v=args.keep_v, mlp=args.keep_mlp, method=importance, calibration=calibration, align=_align(args.align)
        )
    return merge, prune


def _align(values: list[int] | None):
    """``--align`` values -> ``CDCP(align=...)`` (the default where not given)."""
    from cait.cdcp import ALIGN

    if values is None:
        return ALIGN
    if len(values) > 2:
        raise ValueError("--align takes one number (every group) or two (per-head channels, MLP units)")
    return values[0] if len(values) == 1 else tuple(values)


def describe(fast, dense) -> None:
    """Print what a compressed model keeps, next to its dense original (for a compressed Hugging Face
    model: its backbone next to the timm model that computes the HF model's trunk)."""
    import cait
    from cait.hf import HFCompressed

    if isinstance(fast, HFCompressed):
        heads = ", ".join(fast.heads) or "none"
        print(f"hf        Hugging Face {fast.class_name} (heads: {heads}), compressed through timm's VisionTransformer")
        fast = fast.backbone
        if dense is not None and type(dense).__module__.startswith("transformers."):
            dense = cait.hf.to_timm(dense)
        elif dense is None:
            from cait import architecture

            dense = architecture.build(fast.architecture(), device=None)

    spec = fast.architecture()
    grid = fast.grid
    tokens = fast.num_prefix_tokens + grid[0] * grid[1]
    print(
        f"model     {spec['name'] or spec['class']}  ({spec['kwargs']['img_size'][0]}x{spec['kwargs']['img_size'][1]} px, "
        f"{grid[0]}x{grid[1]} patches, {len(fast.blocks)} blocks, {fast.blocks[0].attn.heads} heads)"
    )
    print(f"tiles     {fast.tile}x{fast.tile}, merged {sum(fast.schedule)} tokens in all")
    solved = fast.merge is not None and fast.merge.flops is not None
    rule = f"; RoPE: a merged token at its cells' {fast.position}" if fast.rope is not None else ""
    print(f"schedule  {f'FLOPs target {fast.merge.flops:g}, solved per input size' if solved else 'counts as set, scaled to other sizes'}; "
          f"{'any input size' if fast.dynamic_img_size else 'its own input size only'}{rule}")  # fmt: skip
    print("\nblock  merged  tokens(attn->mlp)  qk/head  v/head  mlp")
    for i, block in enumerate(fast.blocks):
        attn, hidden = block.attn, block.mlp.fc2.in_features
        print(f"{i:5d}  {block.r:6d}  {tokens:6d} -> {tokens - block.r:<6d}  {attn.d_qk:7d}  {attn.d_v:6d}  {hidden:4d}")
        tokens -= block.r
    dense_flops, flops = cait.flops(dense), cait.flops(fast)
    dense_params, params = (sum(p.numel() for p in m.parameters()) for m in (dense, fast))
    print(f"\nGFLOPs    {flops / 1e9:.2f}  ({flops / dense_flops:.3f} of dense {dense_flops / 1e9:.2f}; per image, multiply-add = 2)")
    print(f"params    {params / 1e6:.1f} M  ({params / dense_params:.3f} of dense {dense_params / 1e6:.1f} M)")


def write_json(path: str | None, payload: dict) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(payload, f, indent=2)
        print(f"wrote {path}")


def image_folder(root: str, split: str, model, training: bool, augment: dict | None = None):
    """``root/split`` as a torchvision ImageFolder with timm's transforms for ``model``'s input size;
    ``augment``: more ``timm.data.create_transform`` arguments for training (RandAugment, random erasing)."""
    import timm.data
    from torchvision.datasets import ImageFolder

    folder = os.path.join(root, split)
    if not os.path.isdir(folder):
        raise ValueError(f"--data {root!r} has no {split}/ folder (an ImageFolder root holds train/ and val/)")
    config = timm.data.resolve_model_data_config(model)
    config["input_size"] = tuple(model.input_size) if hasattr(model, "input_size") else (3, *model.patch_embed.img_size)
    return ImageFolder(
        folder, transform=timm.data.create_transform(**config, is_training=training, **((augment or {}) if training else {}))
    )


def segmentation_folder(root: str, split: str, model, training: bool = False):
    """``root/split`` as a :class:`cait.segmentation.SegmentationFolder` for the segmentation ``model``."""
    import timm.data

    from cait.cost import default_input_size
    from cait.segmentation import SegmentationFolder

    config = timm.data.resolve_model_data_config(getattr(model.backbone, "vit", model.backbone))
    return SegmentationFolder(root, split, default_input_size(model), config["mean"], config["std"], training=training)


def device_of(name: str | None):
    import torch

    device = name or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA GPU is visible")
    return torch.device(device)
