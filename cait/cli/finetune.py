"""``cait finetune``: compress a timm model (or a dense segmentation model) and fine-tune it back to
accuracy with dynamic CDCP gates and distillation from the dense model."""

from __future__ import annotations

import argparse
import os

from .common import (
    add_compression_arguments,
    add_model_arguments,
    build_model,
    check_compression,
    compression,
    describe,
    device_of,
    image_folder,
    segmentation_folder,
)

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


def add_parser(commands) -> None:
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
    add_model_arguments(f, required=False)
    add_compression_arguments(f)
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
    f.set_defaults(run=run)


def run(args) -> None:
    import torch
    import torch.distributed as dist
    from torch.utils.data import DataLoader, DistributedSampler

    import cait
    from cait.train.finetune import Distillation, fit, resume

    if args.epochs < 1 or args.batch_size < 1:
        raise ValueError("--epochs and --batch-size must be at least 1")
    if args.task == "classification" and (args.teacher or args.head):
        raise ValueError("--teacher and --head are for --task segmentation")
    check_compression(args)  # a --plan also names the model
    if args.model is None and not (args.task == "segmentation" and args.teacher):
        raise ValueError("--model is required (for --task segmentation it may come from --teacher instead; with --plan, from the plan)")
    distill = Distillation(args.alpha, args.temperature)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = device_of(args.device)
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
        trained = student.materialize()
        if args.plan:
            origin = cait.Plan.load(args.plan).origin(args.plan, point=args.plan_point)
            getattr(trained, "backbone", trained).origin = origin | {"fine-tuned": args.out}
        cait.save(trained, path)
        print(f"wrote {path}\n")
        describe(getattr(student.model, "backbone", student.model), dense=getattr(model, "backbone", model))
    if world > 1:
        dist.destroy_process_group()


def _classification_setup(args):
    """``(timm model, teacher, train set, val set, metrics, student maker)`` for image classification."""
    from cait.train.finetune import evaluate, make_student, teacher_of

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
    from cait.train.finetune import teacher_of

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
