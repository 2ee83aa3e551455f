"""``cait info``: describe a saved compressed model next to its dense original."""

from __future__ import annotations

from .common import describe


def add_parser(commands) -> None:
    i = commands.add_parser(
        "info",
        help="describe a saved compressed model",
        description="Print the architecture, merge schedule, "
        "kept channels, FLOPs and parameters of a model saved by `cait compress` or `cait.save`.",
    )
    i.add_argument("file", help="a .safetensors file written by cait")
    i.set_defaults(run=run)


def run(args) -> None:
    import cait
    from cait import architecture
    from cait.hf import HFCompressed
    from cait.segmentation import Segmenter, head_kind

    model = cait.load(args.file)
    if isinstance(model, HFCompressed):
        describe(model, dense=None)
        fast = model = model.backbone
    else:
        fast = model.backbone if isinstance(model, Segmenter) else model
        describe(fast, dense=architecture.build(fast.architecture(), device=None))
    if fast.origin:
        print("origin    " + "\n          ".join(f"{key}: {value}" for key, value in fast.origin.items()))
    else:
        print("origin    merge and keep ratios given directly (no plan)")
    if fast is not model:
        params = sum(p.numel() for p in model.head.parameters())
        print(f"head      {head_kind(model.head)} segmentation head, {model.num_classes} classes, {params / 1e6:.2f} M params")
