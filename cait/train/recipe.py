"""Fine-tuning hyperparameters as one value: :class:`Recipe`, and the named presets (``--recipe``).

A recipe says *what* to train with; :mod:`cait.train.components` builds timm's optimizer, scheduler,
Mixup, EMA, transforms and sampler from it. ``Recipe()`` (the ``default`` preset) is the loop cait had
before recipes: constant learning rate, AdamW, timm's default transforms, soft distillation (but no
weight decay on norms, biases and tokens, as timm's parameter groups have it). ``deit``
is DeiT's recipe (Touvron et al. 2021, ``facebookresearch/deit`` ``main.py`` defaults) for 30 epochs,
the budget of the fine-tunes of compressed DeiTs (DynamicViT, EViT, ToMe, DiffRate): AdamW at
``5e-4 * global batch / 512``, weight decay 0.05 (none on norms, biases and tokens), cosine decay to
1e-5 after 5 warm-up epochs from 1e-6, RandAugment ``rand-m9-mstd0.5-inc1``, random erasing 0.25
(per-pixel), Mixup 0.8 / CutMix 1.0, label smoothing 0.1, three repeated augmentations, EMA 0.99996
and hard distillation (alpha 0.5). DeiT's drop-path rate (0.1) is a model setting, not a recipe one:
build the timm model with ``drop_path_rate``.

Every field can be overridden (:meth:`Recipe.preset`); every field is checked when the recipe is
made, and a bad value raises one ``ValueError`` that names the command-line flag (``--mixup``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
SCHEDULES = ("constant", "cosine")
DISTILLATIONS = ("soft", "hard")


@dataclass(frozen=True)
class Recipe:
    """Fine-tuning hyperparameters. Units: epochs are passes over the training set, a step is one
    optimizer update (``accumulate`` batches), ``batch_size`` is per process.

    - ``lr``: the weights' learning rate; None: ``lr_base * global batch / lr_base_size`` (:meth:`learning_rate`).
    - ``score_lr``: the CDCP gate scores' learning rate (their own parameter group, no weight decay,
      the same schedule shape as the weights).
    - ``layer_decay``: layer-wise learning-rate decay (BEiT's, through timm's ``group_matcher``); None: off.
    - ``sched``: ``constant`` or ``cosine`` (to ``min_lr``), both per step after ``warmup_epochs`` of
      linear warm-up from ``warmup_lr``.
    - ``clip_grad``: largest gradient norm (None: no clipping); ``accumulate``: batches per step.
    - ``auto_augment``: timm's policy string (``rand-m9-mstd0.5-inc1``) or None; ``reprob``/``remode``/
      ``recount``: random erasing; ``mixup``/``cutmix``: Beta alphas (0: off), ``mixup_prob``,
      ``mixup_switch_prob``; ``smoothing``: label smoothing.
    - ``repeated_aug``: repeats per image and epoch with timm's ``RepeatAugSampler`` (0: off).
    - ``ema_decay``: ``timm.utils.ModelEmaV3`` decay per step (None: no EMA).
    - ``distillation``: ``soft`` (KL at ``temperature``) or ``hard`` (teacher's top-1); ``alpha``: its weight.
    - ``anneal_epochs``: epochs over which CDCP keep ratios go from 1 to the targets (None: a third).
    - ``precision``: ``auto`` (CUDA: bf16 where the GPU has it, else fp16 with a loss scaler; CPU:
      fp32), or ``fp32``/``bf16``/``fp16`` (fp16 only on CUDA).
    - ``channels_last``: images and the patch embedding in channels-last layout; ``compile``: ``torch.compile`` the student.
    """

    name: str = "default"
    epochs: int = 30
    batch_size: int = 64
    lr: float | None = 1e-4
    lr_base: float = 5e-4
    lr_base_size: int = 512
    score_lr: float = 1e-2
    weight_decay: float = 0.05
    layer_decay: float | None = None
    sched: str = "constant"
    warmup_epochs: float = 0.0
    warmup_lr: float = 1e-6
    min_lr: float = 1e-5
    clip_grad: float | None = None
    accumulate: int = 1
    auto_augment: str | None = None
    reprob: float = 0.0
    remode: str = "pixel"
    recount: int = 1
    mixup: float = 0.0
    cutmix: float = 0.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    smoothing: float = 0.0
    repeated_aug: int = 0
    ema_decay: float | None = None
    distillation: str = "soft"
    alpha: float = 0.5
    temperature: float = 1.0
    anneal_epochs: float | None = None
    precision: str = "auto"
    channels_last: bool = False
    compile: bool = False

    def __post_init__(self):
        def need(ok: bool, field: str, what: str):
            if not ok:
                raise ValueError(f"--{field.replace('_', '-')} {what}, got {getattr(self, field)!r} (recipe {self.name!r})")

        for field in ("epochs", "batch_size", "lr_base_size", "accumulate", "recount"):
            need(isinstance(getattr(self, field), int) and getattr(self, field) >= 1, field, "must be a whole number >= 1")
        for field in ("lr", "lr_base", "score_lr"):
            need(getattr(self, field) is None and field == "lr" or _positive(getattr(self, field)), field, "must be a number > 0")
        for field in ("weight_decay", "warmup_epochs", "warmup_lr", "min_lr", "reprob", "mixup", "cutmix", "smoothing"):
            need(_number(getattr(self, field)) and getattr(self, field) >= 0, field, "must be a number >= 0")
        for field in ("reprob", "mixup_prob", "mixup_switch_prob", "alpha"):
            need(_number(getattr(self, field)) and 0 <= getattr(self, field) <= 1, field, "must lie in [0, 1]")
        need(self.smoothing < 1, "smoothing", "must be below 1")
        need(self.layer_decay is None or (_number(self.layer_decay) and 0 < self.layer_decay <= 1), "layer_decay", "must lie in (0, 1]")
        need(self.ema_decay is None or (_number(self.ema_decay) and 0 < self.ema_decay < 1), "ema_decay", "must lie in (0, 1)")
        need(self.clip_grad is None or _positive(self.clip_grad), "clip_grad", "must be a number > 0")
        need(_positive(self.temperature), "temperature", "must be a number > 0")
        need(self.anneal_epochs is None or (_number(self.anneal_epochs) and self.anneal_epochs >= 0), "anneal_epochs", "must be >= 0")
        need(isinstance(self.repeated_aug, int) and self.repeated_aug >= 0, "repeated_aug", "must be a whole number >= 0")
        need(self.sched in SCHEDULES, "sched", f"must be one of {', '.join(SCHEDULES)}")
        need(self.distillation in DISTILLATIONS, "distillation", f"must be one of {', '.join(DISTILLATIONS)}")
        need(self.precision in PRECISIONS, "precision", f"must be one of {', '.join(PRECISIONS)}")
        need(self.remode in ("const", "rand", "pixel"), "remode", "must be one of const, rand, pixel")
        need(self.warmup_epochs <= self.epochs, "warmup_epochs", f"must not exceed --epochs {self.epochs}")
        need(
            self.auto_augment is None or isinstance(self.auto_augment, str) and self.auto_augment != "",
            "auto_augment",
            "must be a timm policy",
        )
        if self.auto_augment is not None:
            _check_policy(self.auto_augment)
        if self.mixing:
            need(self.batch_size % 2 == 0, "batch_size", "must be even with --mixup or --cutmix (timm's Mixup pairs images)")

    @classmethod
    def preset(cls, name: str, **overrides) -> Recipe:
        """The named preset (``default``, ``deit``) with ``overrides`` (field: value) applied."""
        if name not in PRESETS:
            raise ValueError(f"--recipe {name!r}: the recipes are {', '.join(PRESETS)}")
        unknown = set(overrides) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"not recipe fields: {', '.join(sorted(unknown))}")
        return cls(**{**PRESETS[name], "name": name, **overrides})

    @property
    def mixing(self) -> bool:
        """Whether Mixup or CutMix is on (labels become soft targets)."""
        return self.mixup > 0 or self.cutmix > 0

    def learning_rate(self, world_size: int) -> float:
        """The weights' learning rate for ``world_size`` processes: ``lr``, or ``lr_base`` scaled by the
        global batch (``batch_size * accumulate * world_size``) over ``lr_base_size``."""
        if self.lr is not None:
            return self.lr
        return self.lr_base * self.batch_size * self.accumulate * world_size / self.lr_base_size

    def as_dict(self) -> dict:
        """The fields, for JSON."""
        return dataclasses.asdict(self)


def _check_policy(policy: str) -> None:
    """Build timm's training transform with ``policy`` once; ValueError (naming the flag) if timm rejects it."""
    import timm.data

    try:
        timm.data.create_transform(32, is_training=True, auto_augment=policy)
    except (AssertionError, ValueError, KeyError) as error:
        raise ValueError(f"--auto-augment {policy!r} is not a timm augmentation policy: {error}") from None


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value and abs(value) != float("inf")


def _positive(value) -> bool:
    return _number(value) and value > 0


PRESETS: dict[str, dict] = {
    "default": {},
    "deit": dict(
        epochs=30,
        batch_size=64,
        lr=None,
        lr_base=5e-4,
        lr_base_size=512,
        weight_decay=0.05,
        sched="cosine",
        warmup_epochs=5.0,
        warmup_lr=1e-6,
        min_lr=1e-5,
        auto_augment="rand-m9-mstd0.5-inc1",
        reprob=0.25,
        remode="pixel",
        mixup=0.8,
        cutmix=1.0,
        smoothing=0.1,
        repeated_aug=3,
        ema_decay=0.99996,
        distillation="hard",
        alpha=0.5,
    ),
}
