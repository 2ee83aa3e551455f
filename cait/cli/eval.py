"""``cait eval``: accuracy (classification) or mIoU (segmentation) of a saved model on a data folder."""

from __future__ import annotations

import os

from .common import device_of, image_folder, segmentation_folder


def add_parser(commands) -> None:
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
    e.set_defaults(run=run)


def run(args) -> None:
    import time

    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    import cait
    from cait import segmentation
    from cait.train import finetune

    model = cait.load(args.file, device=device_of(args.device))
    if type(model).__name__ == "HFCompressed":  # cait.hf's wrapper (not imported: it would import transformers)
        raise NotImplementedError(
            f"{args.file} is a compressed Hugging Face model, which cait eval does not take yet (its image preprocessing is "
            f"the HF image processor's, not in the file): evaluate it with the Python API"
        )
    segmenting = isinstance(model, segmentation.Segmenter)
    data = segmentation_folder(args.data, args.split, model) if segmenting else image_folder(args.data, args.split, model, training=False)
    if not segmenting and len(data.classes) != model.num_classes:
        raise ValueError(
            f"{args.file} has {model.num_classes} classes but {os.path.join(args.data, args.split)} holds {len(data.classes)} class "
            f"folders: ImageFolder numbers the folders 0..{len(data.classes) - 1} in sorted order, which must be the model's classes"
        )
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
