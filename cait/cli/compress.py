"""``cait compress``: build a timm model, merge and/or prune it, save the compressed model."""

from __future__ import annotations

import argparse
import os

from .common import (
    EXAMPLES,
    add_compression_arguments,
    add_model_arguments,
    build_hf_model,
    build_model,
    check_compression,
    check_output,
    compression,
    describe,
)


def add_parser(commands) -> None:
    c = commands.add_parser(
        "compress",
        help="compress a timm model and save it",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Build a timm model, merge tokens and/or prune channels, and save the compressed model "
        "(weights and config in one .safetensors file that `cait.load` reads without the original weights).",
    )
    add_model_arguments(
        c,
        required=False,
        model_help="timm model name, e.g. deit_small_patch16_224 (default with --plan: the plan's), or a Hugging Face "
        "save_pretrained folder (ViT, DeiT, DINOv2, DINOv3, CLIP and SigLIP vision; needs pip install 'cait[hf]')",
    )
    add_compression_arguments(c)
    c.add_argument(
        "--dynamic-img-size",
        action="store_true",
        help="the compressed model also takes images of other sizes (position embeddings interpolated as timm does, "
        "the merge schedule solved per grid)",
    )
    c.add_argument("--out", required=True, metavar="FILE", help="where to write the compressed model (.safetensors)")
    c.set_defaults(run=run)


def run(args) -> None:
    import cait

    prune_requested = (args.keep_qk, args.keep_v, args.keep_mlp) != (1.0, 1.0, 1.0)
    merge_requested = (args.merge_flops is not None and args.merge_flops != 1) or (args.merge_r is not None and any(args.merge_r))
    if not merge_requested and not prune_requested and not args.plan:
        given = " (--merge-flops 1 and --merge-r 0 merge nothing)" if args.merge_flops is not None or args.merge_r is not None else ""
        raise ValueError(
            f"nothing to compress{given}: give --merge-flops below 1 or --merge-r above 0, and/or --keep-qk/--keep-v/--keep-mlp "
            "below 1, or --plan FILE"
        )
    check_output(args.out, suffix=".safetensors")
    check_compression(args)
    if args.model is None:
        raise ValueError("give --model (a timm name), or --plan FILE (its model)")
    from cait.hf import is_folder

    if is_folder(args.model):  # a Hugging Face save_pretrained folder
        if args.plan or args.calibration or args.dynamic_img_size:
            flag = "--plan" if args.plan else "--calibration" if args.calibration else "--dynamic-img-size"
            raise ValueError(f"{flag} is not supported with a Hugging Face folder yet (--model {args.model})")
        model = build_hf_model(args)
    elif "/" in args.model and ":" not in args.model:  # a path, not a timm name (timm's own error suggests its local-dir: prefix)
        what = "a file, not a folder (weights go to --checkpoint)" if os.path.exists(args.model) else "no such folder"
        raise FileNotFoundError(
            f"--model {args.model}: {what} (give a Hugging Face save_pretrained folder, a timm name, or hf-hub:{args.model} "
            f"for a timm model on the Hub)"
        )
    else:
        model = build_model(args)
    merge, prune = compression(args, model, args.calibration)
    fast = cait.compress(model, merge=merge, prune=prune, dynamic_img_size=args.dynamic_img_size)
    if args.plan:
        fast.origin = cait.Plan.load(args.plan).origin(args.plan, point=args.plan_point)
    cait.save(fast, args.out)
    print(f"wrote {args.out}\n")
    describe(fast, dense=model)
