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
  torchrun --nproc-per-node 8 -m cait finetune --fsdp --ema-decay none ...   # FSDP2: a backbone too large for DDP
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
        "Multi-GPU: run under torchrun (DistributedDataParallel; --fsdp shards with FSDP2 instead).",
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
    add_recipe_arguments(f)
    f.add_argument("--workers", type=int, default=2, help="data loading processes, 0: in the main process (default: 2)")
    f.add_argument("--device", choices=["cpu", "cuda"], help="where to train (default: cuda when visible, else cpu)")
    f.add_argument("--seed", type=int, default=0, help="random seed, 0 or more (default: 0)")
    f.add_argument(
        "--fsdp",
        action="store_true",
        help="under torchrun: shard the student over the processes with FSDP2 (fully_shard per block) instead of DDP, for "
        "backbones too large to hold once per GPU; checkpoints and the saved model hold the gathered weights; bf16 or fp32, "
        "no EMA yet (--ema-decay none)",
    )
    f.add_argument(
        "--resume",
        action="store_true",
        help="continue from OUT/checkpoint.pt exactly where the last finished epoch left it (same arguments: the model, "
        "compression and recipe arguments and --seed are checked against OUT/recipe.json); without it, an --out that holds "
        "a checkpoint.pt is refused",
    )
    f.add_argument(
        "--out",
        required=True,
        metavar="DIR",
        help="a folder: writes recipe.json at the start (the recipe, its resolved values, the seed and the arguments that "
        "shape the student), checkpoint.pt, log.json and log.csv every epoch, the final model.safetensors "
        "(and model_ema.safetensors with an EMA)",
    )
    f.set_defaults(run=run)


STUDENT_ARGUMENTS = ("task", "model", "img_size", "num_classes", "head", "merge_flops", "merge_r", "block", "keep_qk", "keep_v",
                     "keep_mlp", "align", "plan", "plan_point")  # fmt: skip
"""The arguments that shape the student, recorded in OUT/recipe.json and checked on ``--resume`` (not the
files of the teacher's weights and the data, which may move; the student's weights come from the checkpoint)."""

RECIPE_FLAGS = {  # recipe field: (type, help); every flag overrides the --recipe preset's value
    "epochs": (int, "training epochs"),
    "batch_size": (int, "images per batch and process"),
    "lr": ("optional float", "the weights' learning rate; none: --lr-base x global batch / --lr-base-size"),
    "lr_base": (float, "learning rate per --lr-base-size images of global batch (batch size x accumulation x processes)"),
    "lr_base_size": (int, "the global batch --lr-base is given for"),
    "score_lr": (float, "learning rate of the CDCP gate scores (their own parameter group, no weight decay)"),
    "weight_decay": (float, "AdamW weight decay (none on norms, biases, class/distillation/position tokens)"),
    "layer_decay": ("optional float", "layer-wise learning-rate decay in (0, 1] (timm/BEiT), none: off"),
    "sched": (("constant", "cosine"), "learning-rate schedule, stepped every optimizer update"),
    "warmup_epochs": (float, "linear warm-up from --warmup-lr, in epochs (counted in updates; fractions allowed)"),
    "warmup_lr": (float, "learning rate at the start of the warm-up, at most the weights' (--lr, or as --lr-base resolves it)"),
    "min_lr": (float, "cosine: the final learning rate, at most the weights' (--lr, or as --lr-base resolves it)"),
    "clip_grad": ("optional float", "largest total gradient norm, none: no clipping"),
    "accumulate": (int, "batches per optimizer update (gradient accumulation)"),
    "auto_augment": ("optional str", "timm augmentation policy for image folders, e.g. rand-m9-mstd0.5-inc1 (RandAugment); none: off"),
    "reprob": (float, "random erasing probability"),
    "remode": (("const", "rand", "pixel"), "random erasing fill"),
    "recount": (int, "random erasing: boxes per image"),
    "mixup": (float, "Mixup Beta alpha, 0: off"),
    "cutmix": (float, "CutMix Beta alpha, 0: off"),
    "mixup_prob": (float, "probability of mixing a batch"),
    "mixup_switch_prob": (float, "probability of CutMix instead of Mixup when both are on"),
    "smoothing": (float, "label smoothing"),
    "repeated_aug": (int, "repeated augmentation: each image this many times per epoch (timm's RepeatAugSampler), 0: off"),
    "ema_decay": (
        "optional float",
        "EMA of the weights with this decay per update (evaluated and saved as model_ema.safetensors), none: off",
    ),
    "distillation": (("soft", "hard"), "soft: KL to the teacher at --temperature; hard: cross entropy to the teacher's top-1 (DeiT)"),
    "alpha": (float, "weight of the teacher's term, 0 for labels only"),
    "temperature": (float, "soft distillation temperature"),
    "anneal_epochs": ("optional float", "epochs over which CDCP keep ratios go from 1 to the targets; none: a third of --epochs"),
    "precision": (("auto", "fp32", "bf16", "fp16"), "auto: bf16 autocast on GPUs that have it, else fp16 with a loss scaler; fp32 on CPU"),
    "channels_last": (bool, "images and patch embedding in channels-last memory layout"),
    "compile": (bool, "torch.compile the student"),
}


def _optional(kind):
    def parse(text: str):
        if text.lower() == "none":
            return None
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__} or none, got {text!r}") from None

    return parse


def add_recipe_arguments(f) -> None:
    """``--recipe`` and one flag per :class:`cait.train.recipe.Recipe` field (absent: the preset's value)."""
    from cait.train.recipe import PRESETS, Recipe

    f.add_argument(
        "--recipe",
        choices=tuple(PRESETS),
        default="default",
        help="hyperparameter preset (default: default, the constant-rate AdamW loop; deit: DeiT's recipe for 30 epochs, lr 5e-4 x "
        "global batch / 512, cosine, RandAugment, random erasing, Mixup/CutMix, label smoothing, repeated augmentation, EMA, hard "
        "distillation); every flag below overrides one value; the recipe is printed at the start and written to OUT/recipe.json",
    )
    default = Recipe()
    for field, (kind, text) in RECIPE_FLAGS.items():
        flag = "--" + field.replace("_", "-")
        shown = f"{text} (default recipe: {getattr(default, field)}; deit: {PRESETS['deit'].get(field, getattr(default, field))})"
        if kind is bool:
            f.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=shown)
        elif isinstance(kind, tuple):
            f.add_argument(flag, choices=kind, default=argparse.SUPPRESS, help=shown)
        elif isinstance(kind, str):
            f.add_argument(
                flag, type=_optional({"optional float": float, "optional str": str}[kind]), default=argparse.SUPPRESS, help=shown
            )
        else:
            f.add_argument(flag, type=kind, default=argparse.SUPPRESS, help=shown)


def recipe_of(args):
    """The :class:`Recipe` of ``--recipe`` with the flags given; ValueError names a bad or unfitting value."""
    from cait.train.recipe import Recipe

    recipe = Recipe.preset(args.recipe, **{field: getattr(args, field) for field in RECIPE_FLAGS if hasattr(args, field)})
    if args.task == "segmentation":
        unfitting = [flag for flag, on in (("--mixup/--cutmix", recipe.mixing), ("--auto-augment", recipe.auto_augment),
                     ("--reprob", recipe.reprob), ("--layer-decay", recipe.layer_decay is not None)) if on]  # fmt: skip
        if unfitting:
            raise ValueError(f"--task segmentation takes no {', '.join(unfitting)} (image-level augmentations; recipe {recipe.name!r})")
    return recipe


def run(args) -> None:
    import json

    import torch
    import torch.distributed as dist
    from torch.utils.data import DataLoader

    import cait
    from cait.train import components
    from cait.train.finetune import Distillation, Loop, ema_student, fit

    recipe = recipe_of(args)
    for flag, value in (("--seed", args.seed), ("--workers", args.workers)):
        if value < 0:
            raise ValueError(f"{flag} must be >= 0, got {value}")
    _check_out(args.out, args.resume)
    if args.task == "classification" and (args.teacher or args.head):
        raise ValueError("--teacher and --head are for --task segmentation")
    check_compression(args)  # a --plan also names the model
    if args.model is None and not (args.task == "segmentation" and args.teacher):
        raise ValueError("--model is required (for --task segmentation it may come from --teacher instead; with --plan, from the plan)")
    distill = Distillation(recipe.alpha, recipe.temperature, recipe.distillation)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    _check_rates(recipe, world)
    device = device_of(args.device)
    precision = components.precision(recipe, device)
    if args.fsdp:
        _check_fsdp(world, recipe, precision)
    record_path = os.path.join(args.out, "recipe.json")
    student_arguments = {name: getattr(args, name) for name in STUDENT_ARGUMENTS}
    if args.resume:
        _check_resumable(record_path, recipe, args.seed, student_arguments)
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
    rank = dist.get_rank() if world > 1 else 0
    main_process = rank == 0
    torch.manual_seed(args.seed)
    setup = _segmentation_setup if args.task == "segmentation" else _classification_setup
    model, teacher, train_set, val_set, metrics, make = setup(args, components.transform_arguments(recipe))
    if teacher is None and distill.alpha > 0:
        distill = Distillation(0.0)
        if main_process:
            print("no --teacher: training on the labels only (--alpha ignored)")
    backbone = getattr(model, "backbone", model)
    merge, prune = compression(args, getattr(backbone, "vit", backbone), args.calibration)
    sampler = components.sampler(train_set, recipe, world, rank, args.seed)
    per_process = len(sampler) if sampler is not None else len(train_set)
    drop_last = per_process > recipe.batch_size  # equal batches, but never an empty epoch
    if recipe.mixing and not drop_last and per_process % 2:
        raise ValueError(f"--mixup/--cutmix pair images: the one batch of {per_process} training images per process must be even")
    train_loader = DataLoader(
        train_set, recipe.batch_size, shuffle=sampler is None, sampler=sampler, num_workers=args.workers, drop_last=drop_last
    )
    val_loader = DataLoader(val_set, recipe.batch_size, num_workers=args.workers)
    loop = Loop(smoothing=recipe.smoothing, accumulate=recipe.accumulate, clip_grad=recipe.clip_grad, precision=precision,
                channels_last=recipe.channels_last)  # fmt: skip
    updates_per_epoch = loop.updates_per_epoch(len(train_loader))
    anneal = recipe.anneal_epochs if recipe.anneal_epochs is not None else recipe.epochs / 3
    student = make(model, merge, prune, warmup=round(anneal * updates_per_epoch)).to(device)
    if recipe.channels_last:
        student.to(memory_format=torch.channels_last)
    if args.fsdp:
        from torch.distributed.device_mesh import init_device_mesh

        from cait.train.finetune import fully_shard_student

        fully_shard_student(student, init_device_mesh(device.type, (world,)))
    teacher = teacher.to(device) if teacher is not None else None
    optimizer = components.optimizer(student, recipe, world)
    loop.scheduler = components.scheduler(optimizer, recipe, updates_per_epoch)
    loop.ema = components.ema(student, recipe)
    loop.mixup = components.mixup(recipe, model.num_classes) if args.task == "classification" else None
    resolved = {"lr": recipe.learning_rate(world), "global_batch": recipe.batch_size * recipe.accumulate * world, "processes": world,
                "updates_per_epoch": updates_per_epoch, "warmup_updates": recipe.warmup_epochs * updates_per_epoch,
                "anneal_updates": round(anneal * updates_per_epoch), "precision": precision, "device": str(device)}  # fmt: skip
    if main_process:
        os.makedirs(args.out, exist_ok=True)
        print(f"recipe {recipe.name}: " + ", ".join(f"{k} {v}" for k, v in recipe.as_dict().items() if k != "name"))
        print("resolved: " + ", ".join(f"{k} {v}" for k, v in resolved.items()))
        with open(record_path, "w") as f:
            json.dump({"recipe": recipe.as_dict(), "resolved": resolved, "seed": args.seed, "arguments": student_arguments}, f, indent=2)
    fit(student, teacher, train_loader, val_loader, epochs=recipe.epochs, optimizer=optimizer, distill=distill, out_dir=args.out,
        loop=loop, resume=args.resume, seed=args.seed, ddp=world > 1 and not args.fsdp, fsdp=args.fsdp, compile=recipe.compile,
        main_process=main_process, metrics=metrics)  # fmt: skip
    if args.fsdp:  # the saved model is built from the gathered weights, on the main process
        student = _gathered(student, lambda: make(model, merge, prune, warmup=round(anneal * updates_per_epoch)), main_process)
    if main_process:
        origin = cait.Plan.load(args.plan).origin(args.plan, point=args.plan_point) | {"fine-tuned": args.out} if args.plan else None
        outputs = [(student, "model.safetensors")]
        if loop.ema is not None:
            outputs.append((ema_student(loop.ema, student), "model_ema.safetensors"))
        for trained_student, name in outputs:
            path = os.path.join(args.out, name)
            trained = trained_student.materialize()
            if origin is not None:
                getattr(trained, "backbone", trained).origin = origin
            cait.save(trained, path)
            print(f"wrote {path}")
        print()
        describe(getattr(student.model, "backbone", student.model), dense=getattr(model, "backbone", model))
    if world > 1:
        dist.destroy_process_group()


def _check_rates(recipe, world: int) -> None:
    """Refuse a schedule that would rise: a cosine ``--min-lr`` or a warm-up's ``--warmup-lr`` above the
    weights' learning rate as resolved for ``world`` processes."""
    lr = recipe.learning_rate(world)
    ends = (("--min-lr", recipe.min_lr, recipe.sched == "cosine"), ("--warmup-lr", recipe.warmup_lr, recipe.warmup_epochs > 0))
    for flag, rate, used in ends:
        if used and rate > lr:
            global_batch = recipe.batch_size * recipe.accumulate * world
            how = "--lr" if recipe.lr is not None else f"--lr-base {recipe.lr_base:g} x global batch {global_batch} / {recipe.lr_base_size}"
            raise ValueError(f"{flag} {rate:g} is above the learning rate {lr:.3g} ({how}): give a larger --lr or a smaller {flag}")


def _check_fsdp(world: int, recipe, precision: str) -> None:
    """Refuse ``--fsdp`` where it cannot run as asked (one process, an EMA, fp16), in one line."""
    if world < 2:
        raise ValueError("--fsdp shards the student over processes: run under torchrun with --nproc-per-node 2 or more")
    if recipe.ema_decay is not None:
        raise ValueError(f"--fsdp keeps no EMA yet: give --ema-decay none (recipe {recipe.name!r} has {recipe.ema_decay})")
    if precision == "fp16":
        raise ValueError("--fsdp trains in bf16 or fp32 (no fp16 loss scaling with FSDP2 yet): give --precision bf16 or fp32")


def _gathered(student, blank, main_process: bool):
    """The FSDP2-sharded ``student``'s full weights in a new unsharded student from ``blank()`` on the
    main process (None elsewhere); every process takes part in the gathering."""
    from cait.train.finetune import full_state

    weights, _ = full_state(student)
    if not main_process:
        return None
    full = blank()
    full.load_state_dict(weights)
    if full.gates is not None:
        full.gates.set_steps(student.gates.steps)
    return full


def _check_out(out: str, resume: bool) -> None:
    """Refuse, before any work, an ``--out`` that cannot be a folder, ``--resume`` where no epoch was saved,
    and a new run over a saved one."""
    existing = os.path.abspath(out)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ValueError(f"--out {out}: {existing} is a file, not a folder")
    checkpoint = os.path.join(out, "checkpoint.pt")
    if resume and not os.path.isfile(checkpoint):
        raise FileNotFoundError(f"--resume: no {checkpoint} (no epoch of a run in --out {out} was saved)")
    if not resume and os.path.exists(checkpoint):
        raise ValueError(f"--out {out} holds a run: give --resume to continue it, or another --out")


def _check_resumable(record_path: str, recipe, seed: int, arguments: dict) -> None:
    """Refuse ``--resume`` with another recipe, seed or :data:`STUDENT_ARGUMENTS` than the run's (``epochs``
    may grow under a constant schedule with ``--anneal-epochs`` given)."""
    import json

    if not os.path.exists(record_path):
        raise FileNotFoundError(f"--resume: no {record_path} (was the run started by this version of cait finetune?)")
    with open(record_path) as f:
        record = json.load(f)
    if record["seed"] != seed:
        raise ValueError(f"--resume with --seed {seed}: the run was started with --seed {record['seed']}")
    if "arguments" not in record:
        raise ValueError(f"--resume: {record_path} does not record the model and compression arguments (an older cait finetune "
                         "started the run): start it again in another --out")  # fmt: skip
    changed = [k for k, v in arguments.items() if record["arguments"].get(k) != v]
    if changed:
        flags = ", ".join(f"--{k.replace('_', '-')} {_shown(record['arguments'].get(k))} -> {_shown(arguments[k])}" for k in changed)
        raise ValueError(f"--resume with other model or compression arguments than the run's ({flags}): give the run's values")
    saved = record["recipe"]
    # more epochs keep a constant schedule, but move a cosine one and an annealing given as a third of the epochs
    allowed = {"name", "epochs"} if recipe.sched == "constant" and recipe.anneal_epochs is not None else {"name"}
    changed = [k for k, v in recipe.as_dict().items() if k not in allowed and saved.get(k) != v]
    if changed:
        flags = ", ".join(f"--{k.replace('_', '-')} {saved.get(k)} -> {getattr(recipe, k)}" for k in changed)
        raise ValueError(f"--resume with another recipe than the run's ({flags}): give the run's values")


def _shown(value) -> str:
    """An argument's value as it is typed (``64 48``), or ``(not given)``."""
    if value is None:
        return "(not given)"
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)


def _classification_setup(args, augment: dict):
    """``(timm model, teacher, train set, val set, metrics, student maker)`` for image classification;
    ``augment``: training-only ``timm.data.create_transform`` arguments."""
    from cait.train.finetune import evaluate, make_student, teacher_of

    model = build_model(args)
    train_set = image_folder(args.data, "train", model, training=True, augment=augment)
    val_set = image_folder(args.data, "val", model, training=False)
    if val_set.classes != train_set.classes:
        missing, extra = sorted(set(train_set.classes) - set(val_set.classes)), sorted(set(val_set.classes) - set(train_set.classes))
        raise ValueError(
            f"--data {args.data}: val/ and train/ must hold the same class folders (ImageFolder numbers them in order); val/ "
            f"lacks {missing or 'none'}, has {extra or 'none'} besides"
        )
    if len(train_set.classes) != model.num_classes:
        raise ValueError(
            f"{args.data}/train holds {len(train_set.classes)} classes but the model has {model.num_classes} outputs: the teacher "
            f"must be trained for these classes (pass --checkpoint of such a model and --num-classes {len(train_set.classes)})"
        )
    return model, teacher_of(model), train_set, val_set, evaluate, make_student


def _segmentation_setup(args, augment: dict):
    """``(segmentation model, teacher or None, train set, val set, metrics, student maker)``: the model
    is the ``--teacher`` segmenter (trained dense) or a new head on the ``--model`` backbone (``augment`` is
    for image folders: :func:`recipe_of` refuses image-level augmentations for segmentation)."""
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
