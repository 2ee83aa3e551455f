"""timm's training components built from a :class:`~cait.train.recipe.Recipe`.

Everything here is timm's (or torch's) own: ``timm.optim.create_optimizer_v2`` with timm's parameter
groups, ``timm.scheduler.create_scheduler_v2`` stepped per optimizer update, ``timm.data.Mixup``,
``timm.utils.ModelEmaV3``, ``timm.data.create_transform`` arguments and ``RepeatAugSampler``. This
module only wires them to a :class:`cait.train.finetune.Student` (the CDCP gate scores get their own
parameter group) and resolves the precision for a device.
"""

from __future__ import annotations

import torch
from torch import nn

from .recipe import Recipe


def optimizer(student: nn.Module, recipe: Recipe, world_size: int = 1) -> torch.optim.Optimizer:
    """AdamW (``create_optimizer_v2``) on ``student`` (a :class:`~cait.train.finetune.Student`).

    Weights: learning rate :meth:`Recipe.learning_rate`, weight decay on matrices only (none on 1-D
    parameters, biases, and the model's or its segmentation backbone's ``no_weight_decay()`` tokens:
    class, distillation, position),
    with ``recipe.layer_decay`` each block's rate scaled by ``layer_decay ** (layers - layer)`` (the
    group's ``lr_scale``, applied by the scheduler). Gate scores: one group at ``score_lr``, no decay.

    Raises:
        ValueError: layer decay on a model without timm's ``group_matcher`` (e.g. a segmentation model).
    """
    import timm.optim

    model = student.model
    no_decay = _no_weight_decay(model)
    if recipe.layer_decay is not None and not hasattr(model, "group_matcher"):
        raise ValueError(f"--layer-decay: {type(model).__name__} has no timm group_matcher to number its layers")

    def groups(_):
        if recipe.layer_decay is not None:
            weights = timm.optim.param_groups_layer_decay(
                model, weight_decay=recipe.weight_decay, no_weight_decay_list=list(no_decay), layer_decay=recipe.layer_decay
            )
        else:
            weights = timm.optim.param_groups_weight_decay(model, weight_decay=recipe.weight_decay, no_weight_decay_list=list(no_decay))
        if student.gates is not None:
            weights.append({"params": list(student.gates.parameters()), "lr": recipe.score_lr, "weight_decay": 0.0, "gates": True})
        return weights

    return timm.optim.create_optimizer_v2(
        student, "adamw", lr=recipe.learning_rate(world_size), weight_decay=recipe.weight_decay, param_group_fn=groups
    )


def _no_weight_decay(model: nn.Module) -> set[str]:
    """Parameter names timm exempts from weight decay (tokens, position embeddings), also through a
    segmentation model's ``backbone``."""
    if hasattr(model, "no_weight_decay"):
        return set(model.no_weight_decay())
    backbone = getattr(model, "backbone", None)
    if hasattr(backbone, "no_weight_decay"):
        return {f"backbone.{name}" for name in backbone.no_weight_decay()}
    return set()


def scheduler(optimizer: torch.optim.Optimizer, recipe: Recipe, updates_per_epoch: int):
    """timm's ``constant`` or ``cosine`` schedule over ``recipe.epochs``, stepped per optimizer update
    (``scheduler.step_update(updates)``): linear warm-up from ``warmup_lr`` for
    ``warmup_epochs * updates_per_epoch`` updates, then constant or cosine to ``min_lr``. It also
    applies layer decay's ``lr_scale`` (so there is always one, the constant schedule included)."""
    import timm.scheduler

    schedule, _ = timm.scheduler.create_scheduler_v2(
        optimizer,
        sched=recipe.sched,
        num_epochs=recipe.epochs,
        min_lr=recipe.min_lr,
        warmup_lr=recipe.warmup_lr,
        warmup_epochs=recipe.warmup_epochs,
        step_on_epochs=False,
        updates_per_epoch=updates_per_epoch,
    )
    schedule.step_update(0)
    return schedule


def mixup(recipe: Recipe, num_classes: int):
    """``timm.data.Mixup`` (per batch; label smoothing in its soft targets), or None when mixing is off."""
    if not recipe.mixing:
        return None
    from timm.data import Mixup

    return Mixup(
        mixup_alpha=recipe.mixup,
        cutmix_alpha=recipe.cutmix,
        prob=recipe.mixup_prob,
        switch_prob=recipe.mixup_switch_prob,
        label_smoothing=recipe.smoothing,
        num_classes=num_classes,
    )


def ema(student: nn.Module, recipe: Recipe):
    """``timm.utils.ModelEmaV3`` of the whole student (weights and gate scores), or None. Call
    ``ema.update(student, step=updates)`` after each update; ``ema.module`` is a :class:`Student`."""
    if recipe.ema_decay is None:
        return None
    from timm.utils import ModelEmaV3

    return ModelEmaV3(student, decay=recipe.ema_decay)


def transform_arguments(recipe: Recipe) -> dict:
    """Training-only arguments of ``timm.data.create_transform``: RandAugment and random erasing."""
    return {"auto_augment": recipe.auto_augment, "re_prob": recipe.reprob, "re_mode": recipe.remode, "re_count": recipe.recount}


def sampler(dataset, recipe: Recipe, world_size: int, rank: int, seed: int):
    """The training sampler: timm's ``RepeatAugSampler`` with ``repeated_aug`` repeats, torch's
    ``DistributedSampler`` under DDP, or None (shuffle in the loader)."""
    if recipe.repeated_aug:
        from timm.data.distributed_sampler import RepeatAugSampler

        return RepeatAugSampler(dataset, num_replicas=world_size, rank=rank, num_repeats=recipe.repeated_aug)
    if world_size > 1:
        from torch.utils.data import DistributedSampler

        return DistributedSampler(dataset, num_replicas=world_size, rank=rank, seed=seed)
    return None


def precision(recipe: Recipe, device: torch.device) -> str:
    """``fp32``, ``bf16`` or ``fp16`` for ``device``. Raises ValueError for fp16 off CUDA."""
    if recipe.precision == "auto":
        if device.type != "cuda":
            return "fp32"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if recipe.precision == "fp16" and device.type != "cuda":
        raise ValueError(f"--precision fp16 needs CUDA (its loss scaler); on {device.type} use bf16 or fp32")
    return recipe.precision
