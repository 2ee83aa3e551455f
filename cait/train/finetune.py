"""Fine-tuning a compressed model back to accuracy: dynamic CDCP gates, ATME in the training forward,
and distillation from the dense model.

The student is the unpruned compressed model (merging on, with the schedule of the final pruned
model) carrying :class:`cait.Gates`; the teacher is the dense timm model. The loss is DeiT's:
``(1 - alpha) * CE(student, labels) + alpha * T^2 * KL(teacher / T || student / T)``; a distilled
DeiT student (class and distillation tokens, ``distilled_training``) puts the cross entropy on the
class head and the KL on the distillation head. After training, :meth:`Student.materialize` gives
the compact model that :func:`cait.save` writes.

The same loop trains segmentation models (:mod:`cait.segmentation`): logits ``(B, K, H, W)`` against
labels ``(B, H, W)``, the KL taken per pixel; ``fit(..., metrics=cait.segmentation.evaluate)``.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..cdcp import CDCP
from ..gates import Gates, attach_gates
from ..model import compress
from ..schedule import ATME


@dataclass(frozen=True)
class Distillation:
    """``alpha``: weight of the teacher's term in ``[0, 1]`` (0: labels only); ``temperature`` > 0;
    ``kind``: ``soft`` (KL between the distributions at ``temperature``) or ``hard`` (cross entropy
    against the teacher's top-1 class, DeiT's hard distillation; ``temperature`` unused)."""

    alpha: float = 0.5
    temperature: float = 1.0
    kind: str = "soft"

    def __post_init__(self):
        if not 0 <= self.alpha <= 1:
            raise ValueError(f"distillation alpha must lie in [0, 1], got {self.alpha}")
        if not self.temperature > 0:
            raise ValueError(f"distillation temperature must be positive, got {self.temperature}")
        if self.kind not in ("soft", "hard"):
            raise ValueError(f"distillation kind must be 'soft' or 'hard', got {self.kind!r}")


def distillation_loss(
    output, teacher_logits: torch.Tensor | None, labels: torch.Tensor, distill: Distillation, smoothing: float = 0.0
) -> torch.Tensor:
    """The training loss of one batch: ``(1 - alpha) * label term + alpha * teacher term``.

    Args:
        output: student logits ``(B, K)`` or ``(B, K, H, W)``, or a pair ``(class logits, distillation logits)``:
            the label term reads the first, the teacher term the second (DeiT's two heads).
        teacher_logits: shaped like the student's, or None when ``distill.alpha == 0``; from the same
            (possibly mixed) images as the student's.
        labels: ``(B,)`` or ``(B, H, W)`` class indices (-100: ignored), cross entropy with
            ``smoothing``; or ``(B, K)`` soft targets (timm's ``Mixup``, smoothing already in them),
            timm's ``SoftTargetCrossEntropy``.
    """
    cls, dist = output if isinstance(output, tuple) else (output, output)
    if labels.is_floating_point():
        from timm.loss import SoftTargetCrossEntropy

        hard = SoftTargetCrossEntropy()(cls, labels)
    else:
        hard = F.cross_entropy(cls, labels, label_smoothing=smoothing)
    if distill.alpha == 0:
        return hard
    if distill.kind == "hard":
        return (1 - distill.alpha) * hard + distill.alpha * F.cross_entropy(dist, teacher_logits.argmax(1))
    t = distill.temperature
    kl = F.kl_div(F.log_softmax(dist / t, dim=1), F.log_softmax(teacher_logits / t, dim=1), reduction="none", log_target=True)
    soft = kl.sum(1).mean()  # per image (or per pixel), averaged
    return (1 - distill.alpha) * hard + distill.alpha * t * t * soft


class Student(nn.Module):
    """The model under training and its gates in one module (so DDP and optimizers see both).
    ``model``: a :class:`cait.CompressedViT` or a :class:`cait.segmentation.Segmenter` on one."""

    def __init__(self, model: nn.Module, gates: Gates | None):
        super().__init__()
        self.model, self.gates = model, gates

    def forward(self, images: torch.Tensor):
        return self.model(images)

    def step(self) -> None:
        """After each optimizer step: advance the keep-ratio annealing."""
        if self.gates is not None:
            self.gates.step()

    def materialize(self) -> nn.Module:
        """The compact model (gates frozen into smaller layers), ready for :func:`cait.save`."""
        if self.gates is not None:
            self.gates.materialize()
        return self.model


def make_student(model: nn.Module, merge: ATME | None, prune: CDCP | None, warmup: int) -> Student:
    """The unpruned compressed copy of the timm ``model`` with dynamic gates for ``prune``, merging with
    the schedule :func:`cait.compress` solves for the final pruned model (so training merges exactly
    as inference will)."""
    schedule = None
    if merge is not None:
        schedule = ATME(r=list(compress(model, merge=merge, prune=prune).schedule), block=merge.block, position=merge.position)
    student = compress(model, merge=schedule)
    gates = attach_gates(student, prune, warmup) if prune is not None else None
    return Student(student, gates)


def fully_shard_student(student: Student, mesh=None) -> Student:
    """FSDP2: ``torch.distributed.fsdp.fully_shard`` on every transformer block of the student's
    backbone, then on the student (the rest: embeddings, head, gate scores); in place, returns it.
    Build the optimizer afterwards (the parameters become sharded DTensors); :func:`train_epoch`
    trains it as it trains an unsharded student. ``mesh``: a 1-D device mesh (default: all processes)."""
    from torch.distributed.fsdp import fully_shard

    backbone = getattr(student.model, "backbone", student.model)
    for block in backbone.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(student, mesh=mesh)
    return student


def _distilled_training(model: nn.Module, enable: bool) -> None:
    vit = getattr(model, "vit", None)  # a classifier; segmenters use the features only
    if hasattr(vit, "set_distilled_training"):
        vit.set_distilled_training(enable)


AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Loop:
    """What one optimizer update does besides ``optimizer.step()`` (every part optional; the defaults
    are a plain fp32 step per batch). :mod:`cait.train.components` builds the timm parts from a recipe.

    - ``scheduler``: a timm scheduler, ``step_update(updates)`` after every update.
    - ``mixup``: ``timm.data.Mixup``: each batch mixed, labels become soft targets ``(B, K)``; the teacher
      sees the same mixed images (DeiT).
    - ``ema``: ``timm.utils.ModelEmaV3`` of the :class:`Student`, updated after every update.
    - ``smoothing``: label smoothing of the cross entropy (without ``mixup``; with it, Mixup smooths).
    - ``accumulate``: batches per update (the loss of each divided by the batches in its update; under
      DDP only the last one all-reduces); ``clip_grad``: largest total gradient norm (timm's
      ``dispatch_clip_grad``), or None.
    - ``precision``: ``fp32``, ``bf16`` (autocast) or ``fp16`` (autocast and ``scaler``, a
      ``torch.amp.GradScaler``, made by :func:`fit` when None); ``channels_last``: images in that layout.
    """

    scheduler: object = None
    mixup: object = None
    ema: object = None
    smoothing: float = 0.0
    accumulate: int = 1
    clip_grad: float | None = None
    precision: str = "fp32"
    channels_last: bool = False
    scaler: object = None

    def __post_init__(self):
        if self.precision not in ("fp32", *AUTOCAST):
            raise ValueError(f"Loop precision must be fp32, bf16 or fp16, got {self.precision!r}")
        if isinstance(self.accumulate, bool) or not isinstance(self.accumulate, int) or self.accumulate < 1:
            raise ValueError(f"Loop accumulate must be a whole number >= 1, got {self.accumulate!r}")

    def updates_per_epoch(self, batches: int) -> int:
        """Optimizer updates in an epoch of ``batches`` batches (a last, shorter group also updates)."""
        return -(-batches // self.accumulate)


def unwrap(runner: nn.Module) -> nn.Module:
    """The :class:`Student` inside DDP and ``torch.compile`` wrappers."""
    while True:
        if isinstance(runner, nn.parallel.DistributedDataParallel):
            runner = runner.module
        elif hasattr(runner, "_orig_mod"):
            runner = runner._orig_mod
        else:
            return runner


def train_epoch(
    student, teacher, loader, optimizer, distill: Distillation, *, progress=None, loop: Loop | None = None, updates: int = 0
) -> dict:
    """One pass over ``loader``. Returns the mean ``loss``, the training ``accuracy`` (class head against
    the unmixed labels; for segmentation: of the labelled pixels), ``img_per_s`` (images per second of
    this process, data loading included), ``memory_mib`` (peak: CUDA allocated, or the process's
    resident memory on CPU) and ``updates``, the optimizer updates done so far (``updates`` + this epoch's).

    ``student``: a :class:`Student` (possibly inside DDP or ``torch.compile``); ``teacher``: the dense
    model in eval mode; ``loop``: see :class:`Loop` (None: one fp32 step per batch); ``progress``: a
    tqdm bar (its postfix shows loss, accuracy, img/s, memory and the kept channels).
    """
    import contextlib

    loop = loop or Loop()
    if loop.precision == "fp16" and loop.scaler is None:
        raise ValueError("fp16 training needs a loss scaler: set Loop.scaler to a torch.amp.GradScaler (fit makes one)")
    inner = unwrap(student)
    ddp = student if isinstance(student, nn.parallel.DistributedDataParallel) else None
    device = next(inner.parameters()).device
    batches = len(loader)
    student.train()
    _distilled_training(inner.model, True)
    optimizer.zero_grad(set_to_none=True)
    total, correct, seen, pixels = 0.0, 0, 0, 0
    start = time.perf_counter()
    try:
        for i, (images, labels) in enumerate(loader):
            group = loop.accumulate if i < batches - batches % loop.accumulate else batches % loop.accumulate
            last = (i + 1) % loop.accumulate == 0 or i == batches - 1
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            if loop.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            targets = labels
            if loop.mixup is not None:
                images, targets = loop.mixup(images.clone(), labels)  # Mixup works in place
            sync = ddp.no_sync() if ddp is not None and not last else contextlib.nullcontext()
            with sync:
                with torch.autocast(device.type, dtype=AUTOCAST.get(loop.precision), enabled=loop.precision in AUTOCAST):
                    output = student(images)
                    with torch.no_grad():
                        target = teacher(images) if distill.alpha > 0 else None
                    loss = distillation_loss(output, target, targets, distill, loop.smoothing)
                scaled = loss / group
                (loop.scaler.scale(scaled) if loop.scaler is not None else scaled).backward()
            if last:
                _update(inner, optimizer, loop)
                updates += 1
                inner.step()
                if loop.scheduler is not None:
                    loop.scheduler.step_update(updates)
                if loop.ema is not None:
                    loop.ema.update(inner, step=updates)
            logits = output[0] if isinstance(output, tuple) else output
            labelled = labels >= 0
            total += float(loss.detach()) * len(labels)
            correct += int((logits.argmax(1) == labels)[labelled].sum())
            seen += len(labels)
            pixels += int(labelled.sum())
            if progress is not None:
                kept = inner.gates.kept_summary() if inner.gates is not None else "all channels"
                speed = seen / (time.perf_counter() - start)
                progress.set_postfix_str(
                    f"loss {total / seen:.3f} acc {correct / max(pixels, 1):.3f} {speed:.1f} img/s {memory_mib(device):.0f} MiB kept {kept}"
                )
                progress.update(1)
    finally:
        _distilled_training(inner.model, False)
    speed = seen / max(time.perf_counter() - start, 1e-9)
    return {"loss": total / max(seen, 1), "accuracy": correct / max(pixels, 1), "img_per_s": speed,
            "memory_mib": memory_mib(device), "updates": updates}  # fmt: skip


def _update(student: nn.Module, optimizer, loop: Loop) -> None:
    """Clip (after unscaling), step, and clear the gradients."""
    from timm.utils import dispatch_clip_grad

    if loop.scaler is not None:
        if loop.clip_grad is not None:
            loop.scaler.unscale_(optimizer)
            dispatch_clip_grad(student.parameters(), loop.clip_grad)
        loop.scaler.step(optimizer)
        loop.scaler.update()
    else:
        if loop.clip_grad is not None:
            dispatch_clip_grad(student.parameters(), loop.clip_grad)
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def memory_mib(device: torch.device) -> float:
    """Peak memory in MiB: CUDA memory allocated on ``device``, else the process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


@torch.no_grad()
def evaluate(model: nn.Module, loader, progress=None) -> dict:
    """Top-1 and top-5 accuracy (top-5 is top-k with k = min(5, classes)) and images seen."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    top1 = top5 = seen = 0
    try:
        for images, labels in loader:
            logits = model(images.to(device))
            labels = labels.to(device)
            best = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
            top1 += int((best[:, 0] == labels).sum())
            top5 += int((best == labels[:, None]).any(-1).sum())
            seen += len(labels)
            if progress is not None:
                progress.update(1)
    finally:
        model.train(was_training)
    return {"top1": top1 / max(seen, 1), "top5": top5 / max(seen, 1), "images": seen}


def teacher_of(model: nn.Module) -> nn.Module:
    """A frozen eval-mode copy of the dense timm model."""
    teacher = copy.deepcopy(model).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def seed_epoch(seed: int, epoch: int, rank: int) -> None:
    """Seed torch (CPU and CUDA), NumPy and ``random`` from ``(seed, epoch, rank)``. :func:`fit` calls
    it at the start of every epoch, so every draw of an epoch (shuffling, augmentation, Mixup, drop
    path) depends only on these three numbers: a resumed run draws what the uninterrupted run drew,
    in every process, without storing generator states."""
    import random

    import numpy as np

    state = np.random.SeedSequence([seed, epoch, rank]).generate_state(2)
    torch.manual_seed(int(state[0]))
    np.random.seed(int(state[1]))
    random.seed(int(state[0]))


def fit(
    student: Student,
    teacher: nn.Module,
    train_loader,
    val_loader,
    *,
    epochs: int,
    optimizer: torch.optim.Optimizer,
    distill: Distillation,
    out_dir: str,
    loop: Loop | None = None,
    resume: bool = False,
    seed: int = 0,
    ddp: bool = False,
    fsdp: bool = False,
    compile: bool = False,
    main_process: bool = True,
    metrics=evaluate,
    stop_after: int | None = None,
) -> list[dict]:
    """Train to ``epochs``, evaluating after each epoch (and the EMA model, ``val_ema_*``), and write
    ``checkpoint.pt`` (the whole training state), ``log.json`` and ``log.csv`` to ``out_dir`` from the
    main process.

    ``resume``: continue from ``out_dir/checkpoint.pt`` (:func:`load_checkpoint`), else start at epoch
    0; ``seed``: every epoch starts with :func:`seed_epoch`; ``ddp``: wrap the student in
    ``DistributedDataParallel`` (the process group is already set up); ``fsdp``: the student was
    sharded with :func:`fully_shard_student` (FSDP2) before ``optimizer`` was built: checkpoints hold
    the gathered weights and optimizer state (every process takes part, the main one writes), and
    validation runs on the unsharded weights in every process; ``compile``: ``torch.compile`` it;
    ``metrics(model, loader) -> dict``: the validation (:func:`evaluate`, or segmentation's);
    ``stop_after``: return after that many epochs of this call (a deliberate interruption, for tests
    and time-limited jobs). The log rows: epoch, updates, ``train_*`` of :func:`train_epoch`,
    ``val_*``, ``lr`` (the weights' base rate at the end of the epoch: the largest of the groups other than
    the gate scores', unscaled by layer decay), ``seconds``.

    Raises:
        ValueError: ``ddp`` and ``fsdp`` together, or ``fsdp`` with an EMA or fp16 (not supported with
            FSDP2 yet: bf16 or fp32, no EMA), before any work.
    """
    import json
    import os

    from tqdm.auto import tqdm

    loop = loop or Loop()
    if fsdp and (ddp or loop.ema is not None or loop.precision == "fp16"):
        raise ValueError("FSDP2 (fsdp=True) takes no DDP, no EMA and no fp16 yet: bf16 or fp32, no EMA")
    device = next(student.parameters()).device
    if loop.precision == "fp16" and loop.scaler is None:
        loop.scaler = torch.amp.GradScaler(device.type)
    rank = torch.distributed.get_rank() if ddp or fsdp else 0
    runner = nn.parallel.DistributedDataParallel(student, device_ids=[device.index] if device.type == "cuda" else None) if ddp else student
    if compile:
        runner = torch.compile(runner)
    checkpoint = os.path.join(out_dir, "checkpoint.pt")
    if main_process:
        os.makedirs(out_dir, exist_ok=True)
    start_epoch, updates, log = 0, 0, []
    if resume:
        start_epoch, updates, log = load_checkpoint(checkpoint, student, optimizer, loop, sharded=fsdp)
        per_epoch = loop.updates_per_epoch(len(train_loader))
        if updates != start_epoch * per_epoch:
            raise ValueError(
                f"--resume: {checkpoint} did {updates} updates in {start_epoch} epochs, but these arguments make {per_epoch} "
                "per epoch (batch size, data or accumulation changed)"
            )
    for epoch in range(start_epoch, epochs):
        if stop_after is not None and epoch - start_epoch == stop_after:
            break
        seed_epoch(seed, epoch, rank)
        if hasattr(train_loader.sampler, "set_epoch"):
            train_loader.sampler.set_epoch(epoch)
        started = time.perf_counter()
        with tqdm(total=len(train_loader), desc=f"epoch {epoch + 1}/{epochs}", disable=not main_process, leave=False) as bar:
            train = train_epoch(runner, teacher, train_loader, optimizer, distill, progress=bar, loop=loop, updates=updates)
        updates = train.pop("updates")
        val = _validate(student, val_loader, metrics, fsdp)
        row = {
            "epoch": epoch + 1,
            "updates": updates,
            **{f"train_{k}": v for k, v in train.items()},
            **{f"val_{k}": v for k, v in val.items()},
        }
        if loop.ema is not None:
            ema = ema_student(loop.ema, student)
            row.update({f"val_ema_{k}": v for k, v in metrics(ema.model, val_loader).items()})
        row.update(lr=max(g["lr"] for g in optimizer.param_groups if not g.get("gates")), seconds=time.perf_counter() - started)
        log.append(row)
        if main_process:
            kept = student.gates.kept_summary() if student.gates is not None else "all channels"
            ema_text = f"  ema top1 {row['val_ema_top1']:.4f}" if "val_ema_top1" in row else ""
            print(
                f"epoch {epoch + 1}/{epochs}: loss {train['loss']:.4f}  train acc {train['accuracy']:.4f}  "
                f"{_summary(val)}{ema_text}  {train['img_per_s']:.1f} img/s  {train['memory_mib']:.0f} MiB  kept {kept}"
            )
        save_checkpoint(checkpoint, student, optimizer, loop, epoch=epoch + 1, updates=updates, log=log, sharded=fsdp, write=main_process)
        if main_process:
            with open(os.path.join(out_dir, "log.json"), "w") as f:
                json.dump(log, f, indent=2)
            _write_csv(os.path.join(out_dir, "log.csv"), log)
    return log


def _validate(student: Student, loader, metrics, sharded: bool) -> dict:
    """``metrics(student.model, loader)``; under FSDP2 on the unsharded weights (the root's own parameters
    are gathered only by a forward through the root, so they are gathered here around the validation)."""
    if not sharded:
        return metrics(student.model, loader)
    student.unshard()
    try:
        return metrics(student.model, loader)
    finally:
        student.reshard()


def full_state(student: Student, optimizer=None) -> tuple[dict, dict]:
    """``(student state, optimizer state)`` of an FSDP2-sharded student as full CPU tensors keyed by
    parameter name, on the main process (empty dicts on the others); a collective: every process calls it.
    ``optimizer=None``: the student's state only (the second dict empty)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    if optimizer is None:
        return get_model_state_dict(student, options=options), {}
    return get_state_dict(student, optimizer, options=options)


def ema_student(ema, student: Student) -> Student:
    """The EMA's :class:`Student`, its gates at the live student's annealing step (the EMA copy's own
    step counter does not advance)."""
    module = ema.module
    if module.gates is not None:
        module.gates.set_steps(student.gates.steps)
    return module


def _write_csv(path: str, log: list[dict]) -> None:
    import csv

    columns = list(dict.fromkeys(k for row in log for k, v in row.items() if not isinstance(v, (list, dict))))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(log)


def _summary(val: dict) -> str:
    """``val top1 0.9120  val top5 0.9900``: the scalar validation metrics."""
    return "  ".join(f"val {k} {v:.4f}" for k, v in val.items() if isinstance(v, float))


def save_checkpoint(
    path: str, student: Student, optimizer, loop: Loop, *, epoch: int, updates: int, log: list[dict], sharded: bool = False,
    write: bool = True,
) -> None:  # fmt: skip
    """The whole training state after ``epoch`` epochs (``updates`` optimizer updates): student
    (weights and gate scores), gate annealing step, optimizer, scheduler, EMA, loss scaler and the
    log. Written to a temporary file and renamed, so an interrupted write leaves the previous one.
    ``sharded``: an FSDP2 student, gathered by :func:`full_state` (every process calls this; those with
    ``write=False`` only take part in the gathering)."""
    import os

    if sharded:
        weights, optimizer_state = full_state(student, optimizer)
    else:
        weights, optimizer_state = student.state_dict(), optimizer.state_dict()
    if not write:
        return
    state = {"epoch": epoch, "updates": updates, "student": weights, "optimizer": optimizer_state, "log": log, "sharded": sharded}
    state["gate_steps"] = student.gates.steps if student.gates is not None else 0
    for name in ("scheduler", "scaler"):
        if getattr(loop, name) is not None:
            state[name] = getattr(loop, name).state_dict()
    if loop.ema is not None:
        state["ema"] = loop.ema.module.state_dict()
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)


def load_checkpoint(
    path: str, student: Student, optimizer, loop: Loop | None = None, sharded: bool = False
) -> tuple[int, int, list[dict]]:  # fmt: skip
    """Load what :func:`save_checkpoint` wrote into ``student``, ``optimizer`` and ``loop``'s scheduler,
    EMA and scaler; returns ``(epochs done, updates done, log)``. ``sharded``: an FSDP2 student (every
    process reads the file and keeps its shards).

    Raises:
        FileNotFoundError: no checkpoint at ``path``.
        ValueError: the checkpoint and ``loop`` disagree on having a scheduler, an EMA or a scaler, or the
            checkpoint was written with FSDP2 and this run has none (or the other way round).
    """
    import os

    if not os.path.exists(path):
        raise FileNotFoundError(f"--resume: no {path}")
    loop = loop or Loop()
    state = torch.load(path, map_location=next(student.parameters()).device, weights_only=True)
    for name, held in (("scheduler", loop.scheduler), ("ema", loop.ema), ("scaler", loop.scaler)):
        if (name in state) != (held is not None):
            have = "has" if name in state else "has no"
            raise ValueError(
                f"--resume: {path} {have} {name} state but this run {'has none' if held is None else 'has one'}: "
                "resume with the same recipe"
            )
    if state.get("sharded", False) != sharded:
        written, now = ("with", "without") if state.get("sharded", False) else ("without", "with")
        raise ValueError(f"--resume: {path} was written {written} FSDP2 and this run is {now} it: resume it the way it was started")
    if sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        set_state_dict(student, optimizer, model_state_dict=state["student"], optim_state_dict=state["optimizer"],
                       options=StateDictOptions(full_state_dict=True))  # fmt: skip
    else:
        student.load_state_dict(state["student"])
        optimizer.load_state_dict(state["optimizer"])
    if student.gates is not None:
        student.gates.set_steps(state["gate_steps"])
    if loop.scheduler is not None:
        loop.scheduler.load_state_dict(state["scheduler"])
        loop.scheduler.step_update(state["updates"])
    if loop.scaler is not None:
        loop.scaler.load_state_dict(state["scaler"])
    if loop.ema is not None:
        loop.ema.module.load_state_dict(state["ema"])
    return state["epoch"], state["updates"], state["log"]
