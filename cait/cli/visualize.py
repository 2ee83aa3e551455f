"""``cait visualize``: draw the merged regions of a compressed model on an image."""

from __future__ import annotations

import argparse
import os

from .common import add_compression_arguments, add_model_arguments, build_model, check_compression, check_output, compression


def add_parser(commands) -> None:
    v = commands.add_parser(
        "visualize",
        help="draw the merged regions of a compressed model on an image",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run IMAGE (resized to the model's input) through a compressed model and draw which cells every token "
        "holds: by default the input and one panel per merging block side by side.",
        epilog="examples:\n  cait visualize --model runs/seg_cait/model.safetensors street.jpg --out regions.png\n"
        "  cait visualize --model deit_small_patch16_224 --checkpoint deit_s.pth --merge-flops 0.6 --style mean cat.jpg --out cat.png",
    )
    add_model_arguments(v, model_help="a .safetensors file written by cait, or a timm model name (then give --merge-flops or --merge-r)")
    add_compression_arguments(v)
    v.add_argument("image", metavar="IMAGE", help="the picture to draw on (any format PIL reads)")
    v.add_argument("--out", required=True, metavar="PNG", help="where to write the picture")
    v.add_argument(
        "--layer", type=int, metavar="I", help="only the regions after block I (-1: the final tokens); default: every merging block"
    )
    v.add_argument(
        "--style", choices=("outline", "mean"), default="outline", help="region borders, or mean colours with borders (default: outline)"
    )
    v.add_argument("--scale", type=int, default=1, metavar="S", help="upscale the picture S times before drawing (default: 1)")
    v.set_defaults(run=run)


def run(args) -> None:
    from PIL import Image

    import cait

    check_output(args.out)
    if not os.path.isfile(args.image):
        raise FileNotFoundError(f"no such image: {args.image}")
    if os.path.isfile(args.model) and args.model.endswith(".safetensors"):
        model = cait.load(args.model)
    else:
        if args.merge_flops is None and args.merge_r is None:
            raise ValueError("--model is a timm name: give --merge-flops or --merge-r to say how to merge")
        check_compression(args)
        dense = build_model(args)
        merge, prune = compression(args, dense, args.calibration)
        model = cait.compress(dense, merge=merge, prune=prune)
    if not any(block.r for block in getattr(model, "backbone", model).blocks):
        raise ValueError(f"{args.model} merges no tokens: there are no regions to draw")
    blocks = "all" if args.layer is None else args.layer
    picture = cait.visualize(model, Image.open(args.image), blocks=blocks, style=args.style, scale=args.scale)
    picture.save(args.out)
    print(f"wrote {args.out} ({picture.width}x{picture.height} px)")
