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
    """``alpha``: weight of the teacher's soft targets in ``[0, 1]`` (0: labels only); ``temperature`` > 0."""

    alpha: float = 0.5
    temperature: float = 1.0

    def __post_init__(self):
        if not 0 <= self.alpha <= 1:
            raise ValueError(f"distillation alpha must lie in [0, 1], got {self.alpha}")
        if not self.temperature > 0:
            raise ValueError(f"distillation temperature must be positive, got {self.temperature}")


def distillation_loss(output, teacher_logits: torch.Tensor | None, labels: torch.Tensor, distill: Distillation) -> torch.Tensor:
    """The training loss of one batch.

    Args:
        output: student logits ``(B, K)`` or ``(B, K, H, W)``, or a pair ``(class logits, distillation logits)``.
        teacher_logits: shaped like the student's, or None when ``distill.alpha == 0``.
        labels: ``(B,)`` or ``(B, H, W)`` class indices (-100: ignored by the cross entropy).
    """
    cls, dist = output if isinstance(output, tuple) else (output, output)
    hard = F.cross_entropy(cls, labels)
    if distill.alpha == 0:
        return hard
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


def _distilled_training(model: nn.Module, enable: bool) -> None:
    vit = getattr(model, "vit", None)  # a classifier; segmenters use the features only
    if hasattr(vit, "set_distilled_training"):
        vit.set_distilled_training(enable)


def train_epoch(student, teacher, loader, optimizer, distill: Distillation, *, scaler=None, progress=None) -> dict:
    """One pass over ``loader``; returns the mean ``loss`` and the training ``accuracy`` (class head;
    for segmentation: of the labelled pixels).

    ``student``: a :class:`Student` (possibly inside DDP); ``teacher``: the dense model in eval mode;
    ``scaler``: a ``torch.amp.GradScaler`` for fp16 autocast on CUDA, or None; ``progress``: a tqdm bar
    (its postfix shows loss, accuracy and the kept channels).
    """
    inner = student.module if hasattr(student, "module") else student
    device = next(inner.parameters()).device
    student.train()
    _distilled_training(inner.model, True)
    total, correct, seen, pixels = 0.0, 0, 0, 0
    try:
        for images, labels in loader:
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.float16, enabled=scaler is not None):
                output = student(images)
                with torch.no_grad():
                    target = teacher(images) if distill.alpha > 0 else None
                loss = distillation_loss(output, target, labels, distill)
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
            inner.step()
            logits = output[0] if isinstance(output, tuple) else output
            labelled = labels >= 0
            total += float(loss.detach()) * len(labels)
            correct += int((logits.argmax(1) == labels)[labelled].sum())
            seen += len(labels)
            pixels += int(labelled.sum())
            if progress is not None:
                kept = inner.gates.kept_summary() if inner.gates is not None else "all channels"
                progress.set_postfix_str(f"loss {total / seen:.3f} acc {correct / max(pixels, 1):.3f} kept {kept}")
                progress.update(1)
    finally:
        _distilled_training(inner.model, False)
    return {"loss": total / max(seen, 1), "accuracy": correct / max(pixels, 1)}


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
    start_epoch: int = 0,
    amp: bool = False,
    ddp: bool = False,
    main_process: bool = True,
    metrics=evaluate,
) -> list[dict]:
    """Train ``epochs - start_epoch`` epochs, evaluating after each and writing ``checkpoint.pt`` (the
    whole training state, for ``--resume``) and ``log.json`` to ``out_dir`` from the main process.
    ``ddp``: wrap the student in ``DistributedDataParallel`` (the process group is already set up);
    ``metrics(model, loader) -> dict``: the validation (:func:`evaluate`, or segmentation's)."""
    import json
    import os

    from tqdm.auto import tqdm

    device = next(student.parameters()).device
    scaler = torch.amp.GradScaler("cuda") if amp else None
    runner = nn.parallel.DistributedDataParallel(student, device_ids=[device.index] if device.type == "cuda" else None) if ddp else student
    log_path = os.path.join(out_dir, "log.json")
    log = json.load(open(log_path)) if start_epoch and os.path.exists(log_path) else []
    for epoch in range(start_epoch, epochs):
        if hasattr(train_loader.sampler, "set_epoch"):
            train_loader.sampler.set_epoch(epoch)
        with tqdm(total=len(train_loader), desc=f"epoch {epoch + 1}/{epochs}", disable=not main_process, leave=False) as bar:
            train = train_epoch(runner, teacher, train_loader, optimizer, distill, scaler=scaler, progress=bar)
        val = metrics(student.model, val_loader)
        log.append({"epoch": epoch + 1, **{f"train_{k}": v for k, v in train.items()}, **{f"val_{k}": v for k, v in val.items()}})
        if main_process:
            kept = student.gates.kept_summary() if student.gates is not None else "all channels"
            print(
                f"epoch {epoch + 1}/{epochs}: loss {train['loss']:.4f}  train acc {train['accuracy']:.4f}  "
                f"{_summary(val)}  kept {kept}"
            )
            state = {"epoch": epoch + 1, "student": student.state_dict(), "optimizer": optimizer.state_dict()}
            state["gate_steps"] = student.gates.steps if student.gates is not None else 0
            torch.save(state, os.path.join(out_dir, "checkpoint.pt"))
            with open(log_path, "w") as f:
                json.dump(log, f, indent=2)
    return log


def _summary(val: dict) -> str:
    """``val top1 0.9120  val top5 0.9900``: the scalar validation metrics."""
    return "  ".join(f"val {k} {v:.4f}" for k, v in val.items() if isinstance(v, float))


def resume(student: Student, optimizer: torch.optim.Optimizer, path: str) -> int:
    """Load the training state written by :func:`fit`; returns the number of epochs already done."""
    state = torch.load(path, map_location=next(student.parameters()).device, weights_only=True)
    student.load_state_dict(state["student"])
    optimizer.load_state_dict(state["optimizer"])
    if student.gates is not None:
        student.gates.set_steps(state["gate_steps"])
    return state["epoch"]
