"""Accuracy at equal speed on the cluttered-digits proxy (:mod:`.clutter`): one-shot and fine-tuned.

Per seed, the dense proxy ViT of :func:`.clutter.dense_run` (trained here, or read from
``bench/clutter_dense.py --weights``) is compressed at each FLOPs ratio of :data:`RATIOS`:

- one-shot (no training): ATME with 2x2 and with 4x4 tiles, ToMe, EViT-style pruning;
- fine-tuned with :func:`proxy_recipe` (``deit``, the recipe of ``cait finetune --recipe deit``, sized
  to this run) and distillation from the dense model: ``CAIT (fine-tuned)`` (ATME + CDCP with dynamic
  gates), ``ToMe (fine-tuned)``, ``EViT-style (fine-tuned)``;
- at :data:`OLD_LOOP_RATIO` also ``CAIT (old loop)``: the same student and epochs with the ``default``
  recipe (constant-rate AdamW, soft distillation), to measure what the recipe gains on equal epochs.

Every fine-tune sees :data:`FINETUNE_EPOCHS` epochs of fresh canvases never seen in dense training.
CAIT keeps :data:`curve.KEEP` of the channels (chosen on the digits, :func:`.curve.tune`) and merges
to the rest with the tile (2x2 or 4x4) whose one-shot merging scores best on validation canvases
(training glyphs, canvases no training epoch draws). ToMe and EViT remove ATME's per-block token
counts (:func:`.curve.construct`). Speed: every model of a seed timed in one process, interleaved,
batch 64; the median over seeds.
"""

from __future__ import annotations

import math
import statistics

from ..cdcp import CDCP
from ..model import compress
from ..schedule import ATME
from ..train import components
from ..train.finetune import Distillation, Loop, Student, ema_student, evaluate, make_student, teacher_of, train_epoch
from ..train.recipe import Recipe
from . import curve
from .accuracy import batches
from .clutter import DEPTH, TRAIN, cluttered_digits, deit_tiny_patch8, dense_run
from .latency import time_interleaved
from .runs import RunFolder

RATIOS = (0.75, 0.6, 0.5, 0.4)
FINETUNE_EPOCHS = 5
OLD_LOOP_RATIO = 0.5
ONE_SHOT = ("ATME one-shot", "ATME 4x4 one-shot", "ToMe one-shot", "EViT-style one-shot")
FINE_TUNED = curve.FINE_TUNED
OLD_LOOP = "CAIT (old loop)"
VALIDATION_EPOCH = 5000  # the training glyphs' canvases of this "epoch" validate; training draws epochs below 1,000
FINETUNE_EPOCH0 = 100  # fine-tuning epoch e trains on the canvases of epoch FINETUNE_EPOCH0 + e (dense training: 0..EPOCHS-1)
BATCH = 64


def proxy_recipe(name: str, epochs: int, updates_per_epoch: int) -> Recipe:
    """The ``name`` preset (``deit`` or ``default``) for ``epochs`` of ``updates_per_epoch`` updates on
    the proxy. ``deit`` is DeiT's recipe with three changes, each because the proxy is not ImageNet:
    warm-up a sixth of the run (DeiT: 5 of 30 epochs); the EMA's half-life the same share of the run as
    0.99996 has in DeiT's 30 ImageNet epochs at batch 512 (75,000 updates), so it is not a copy of the
    initial model after a few hundred updates; no RandAugment and no repeated augmentation (every epoch
    draws fresh canvases, and RandAugment's flips and shears change what a digit is)."""
    if name == "default":
        return Recipe.preset("default", epochs=epochs)
    share = math.log(2) / -math.log(0.99996) / 75_000  # DeiT's EMA half-life, a share of its run
    decay = 0.5 ** (1 / (share * epochs * updates_per_epoch))
    return Recipe.preset(name, epochs=epochs, warmup_epochs=epochs / 6, ema_decay=decay, auto_augment=None, repeated_aug=0)


def fine_tune(student: Student, teacher, fresh, recipe: Recipe, seed: int, val, progress=None):
    """Train ``student`` with ``recipe`` (timm's components, as ``cait finetune`` builds them) on
    ``fresh(FINETUNE_EPOCH0 + e)`` for epoch ``e``; random erasing per image (timm's ``RandomErasing``).
    Returns ``(model, info)``: the materialized model, or its EMA where that scores higher on ``val``
    (a list of batches); ``info`` holds ``val_top1``, and with an EMA ``val_ema_top1`` and ``ema``
    (whether the EMA was chosen)."""
    import torch
    from timm.data.random_erasing import RandomErasing

    x, y = fresh(FINETUNE_EPOCH0)
    updates_per_epoch = len(y) // recipe.batch_size
    optimizer = components.optimizer(student, recipe)
    loop = Loop(smoothing=recipe.smoothing, clip_grad=recipe.clip_grad)
    loop.scheduler = components.scheduler(optimizer, recipe, updates_per_epoch)
    loop.ema = components.ema(student, recipe)
    loop.mixup = components.mixup(recipe, 10)
    erase = RandomErasing(recipe.reprob, mode=recipe.remode, max_count=recipe.recount, device="cpu") if recipe.reprob else None
    distill = Distillation(recipe.alpha, recipe.temperature, recipe.distillation)
    updates = 0
    for epoch in range(recipe.epochs):
        torch.manual_seed(seed * 1000 + epoch)  # Mixup's and the erasing's draws
        if epoch > 0:
            x, y = fresh(FINETUNE_EPOCH0 + epoch)
        if erase is not None:
            x = torch.stack([erase(image) for image in x])
        updates = train_epoch(student, teacher, batches(x, y, recipe.batch_size, seed * 1000 + 700 + epoch), optimizer, distill,
                              loop=loop, updates=updates)["updates"]  # fmt: skip
        if progress is not None:
            progress.update(1)
    info = {"val_top1": evaluate(student.eval(), val)["top1"]}
    if loop.ema is None:
        return student.materialize().eval(), info
    averaged = ema_student(loop.ema, student)
    info["val_ema_top1"] = evaluate(averaged.eval(), val)["top1"]
    chosen = averaged if info["val_ema_top1"] > info["val_top1"] else student
    return chosen.materialize().eval(), {**info, "ema": chosen is averaged}


def cait_plan(dense, ratio: float, val) -> tuple[ATME, CDCP | None]:
    """CAIT at ``ratio``: :data:`curve.KEEP` of the channels, merging to the rest (:func:`.curve.cait_plan`)
    with the tile, 2x2 or 4x4, whose merging alone at that ATME target scores best one-shot on ``val``
    (the pruned model's one-shot score says little before its channels are fine-tuned), among the tiles
    that reach ``ratio`` with the pruning. ValueError where neither does."""
    keep = curve.KEEP.get(ratio, 1.0)
    merge, prune = curve.cait_plan(dense, ratio, keep)
    scored = []
    for block in (2, 4):
        tiled = ATME(flops=merge.flops, block=block)
        try:
            compress(dense, merge=tiled, prune=prune)
            scored.append((evaluate(compress(dense, merge=tiled), val)["top1"], -block, tiled))
        except ValueError:
            continue
    return max(scored, key=lambda s: s[:2])[2], prune  # curve.cait_plan reached ratio with one tile: scored is not empty


def construct(method: str, dense, ratio: float, val, warmup: int):
    """The one-shot model, or the :class:`Student` to fine-tune, of ``method`` at ``ratio`` (CDCP keep
    ratios annealing over ``warmup`` updates); ValueError where the method cannot reach it."""
    if method == "ATME 4x4 one-shot":
        return compress(dense, merge=ATME(flops=ratio, block=4))
    if method in ("CAIT (fine-tuned)", OLD_LOOP):
        return make_student(dense, *cait_plan(dense, ratio, val), warmup=warmup)
    return curve.construct(method, dense, ratio, 1.0)


def planned(ratios=RATIOS) -> list[str]:
    """Every model name of a run over ``ratios``, dense first."""
    names = [curve.DENSE] + [curve.name_of(m, r) for r in ratios for m in ONE_SHOT + FINE_TUNED]
    return names + ([curve.name_of(OLD_LOOP, OLD_LOOP_RATIO)] if OLD_LOOP_RATIO in ratios else [])


class Canvases:
    """A seed's canvases: ``fresh`` (training epochs), ``test`` and ``val`` (lists of batches of 100;
    validation: 1,000 canvases of the training glyphs), ``updates_per_epoch`` at batch :data:`BATCH`."""

    def __init__(self, seed: int):
        _, train_y, test_x, test_y, self.fresh = cluttered_digits(seed, TRAIN)
        self.test, self.updates_per_epoch = list(zip(test_x.split(100), test_y.split(100))), len(train_y) // BATCH
        val_x, val_y = self.fresh(VALIDATION_EPOCH)
        self.val = list(zip(val_x[:1000].split(100), val_y[:1000].split(100)))


def dense_from(weights: str, seed: int):
    """The proxy ViT of ``seed`` with the state dict in the file ``weights``, in eval mode; ValueError
    for a file that is not one (:func:`check_weights`)."""
    dense = deit_tiny_patch8(seed, depth=DEPTH)
    dense.load_state_dict(_state_dict(weights))
    return dense.eval()


class Unreachable(ValueError):
    """A method cannot reach a FLOPs ratio (a point of the curve that does not exist)."""


def train_point(method: str, dense, ratio: float, seed: int, epochs: int, data: Canvases, progress=None):
    """``method`` at ``ratio`` built from ``dense`` and, unless one-shot, fine-tuned for ``epochs``
    (:func:`proxy_recipe`: ``default`` for :data:`OLD_LOOP`, else ``deit``; CDCP annealing over the
    first third). Returns ``(model, scores)``: test ``top1``, ``flops_ratio`` and for fine-tuned
    methods the validation scores and the recipe. :class:`Unreachable` where ``method`` cannot reach ``ratio``."""
    try:
        built = construct(method, dense, ratio, data.val, max(1, round(epochs / 3 * data.updates_per_epoch)))
    except ValueError as error:
        raise Unreachable(str(error)) from error
    info = {}
    if isinstance(built, Student):
        recipe = proxy_recipe("default" if method == OLD_LOOP else "deit", epochs, data.updates_per_epoch)
        built, info = fine_tune(built, teacher_of(dense), data.fresh, recipe, seed, data.val, progress)
        info["recipe"] = recipe.name
    return built, {**curve.score(built, dense, data.test, method, ratio), **info}


def train_seed(seed: int, store: RunFolder, ratios=RATIOS, finetune_epochs: int = FINETUNE_EPOCHS, weights: str | None = None,
               progress=None) -> None:  # fmt: skip
    """Train (or find in ``store``) every model of :func:`planned` for ``seed``. ``weights``: the dense
    model's state dict (``bench/clutter_dense.py --weights``) instead of training it (about 10 minutes
    on 2 cores); ``progress``: a tqdm-like bar advanced once per fine-tuning epoch."""
    data = Canvases(seed)
    if store.has(seed, curve.DENSE):
        dense = store.load(seed, curve.DENSE)
    else:
        dense = dense_from(weights, seed) if weights else dense_run(seed)[1]
        store.save(seed, curve.DENSE, dense, curve.score(dense, dense, data.test, curve.DENSE, 1.0))
    for name in planned(ratios)[1:]:
        method, ratio = name.rsplit(" @", 1)
        ratio, tuned = float(ratio), not method.endswith("one-shot")
        if store.has(seed, name):
            curve._advance(progress, finetune_epochs if tuned else 0)
            continue
        try:
            model, scores = train_point(method, dense, ratio, seed, finetune_epochs, data, progress)
        except Unreachable as error:
            store.save(seed, name, None, {"method": method, "target": ratio, "unreachable": str(error)})
            curve._advance(progress, finetune_epochs if tuned else 0)
            continue
        store.save(seed, name, model, scores)


def time_seed(seed: int, store: RunFolder, names: list[str], repeats: int) -> None:
    """Images/s of the stored models ``names`` of ``seed``: one process, interleaved repeats, batch 64."""
    _, _, test_x, _, _ = cluttered_digits(seed, TRAIN)
    models = {name: store.load(seed, name) for name in names}
    seconds = time_interleaved(models, test_x[:BATCH], repeats, progress=False)
    store.save_speeds(seed, {name: BATCH / statistics.median(times) for name, times in seconds.items()})


def run(seeds=(0, 1, 2), ratios=RATIOS, finetune_epochs: int = FINETUNE_EPOCHS, folder: str = "bench/runs/clutter-curve",
        repeats: int = 20, time_only: bool = False, weights: str | None = None, progress=None):  # fmt: skip
    """Train what ``folder`` lacks (nothing with ``time_only``), time every model, and return
    :func:`.curve.collect`'s rows and points out of reach. ``weights``: a folder of the dense models'
    state dicts, ``seed<k>.pt`` (those missing are trained)."""
    import os

    store = RunFolder(folder)
    if not time_only:
        for seed in seeds:
            path = os.path.join(weights, f"seed{seed}.pt") if weights else None
            train_seed(seed, store, ratios, finetune_epochs, path if path and os.path.isfile(path) else None, progress)
    names = planned(ratios)
    for seed in seeds:
        scores = store.scores(seed)
        time_seed(seed, store, [n for n in names if n in scores and "unreachable" not in scores[n]], repeats)
    return curve.collect(store, seeds, names)


def recipe_gain(store: RunFolder, seeds) -> dict | None:
    """CAIT fine-tuned with the ``deit`` recipe minus the ``default`` recipe (the old loop), same student
    and epochs, at :data:`OLD_LOOP_RATIO`: ``per_seed`` top-1 differences (fractions), ``mean``, ``std``;
    None where a seed lacks either score (the ratio not in the run, or out of reach)."""
    new, old = curve.name_of("CAIT (fine-tuned)", OLD_LOOP_RATIO), curve.name_of(OLD_LOOP, OLD_LOOP_RATIO)
    pairs = [(store.scores(seed).get(new, {}), store.scores(seed).get(old, {})) for seed in seeds]
    if not all("top1" in a and "top1" in b for a, b in pairs):
        return None
    gains = [a["top1"] - b["top1"] for a, b in pairs]
    return {"ratio": OLD_LOOP_RATIO, "per_seed": gains, "mean": statistics.mean(gains),
            "std": statistics.stdev(gains) if len(gains) > 1 else 0.0}  # fmt: skip


def check_weights(folder: str, seeds) -> None:
    """Refuse, before any work, a ``--weights`` folder that is missing, or a ``seed<k>.pt`` in it that
    is not a state dict of the proxy ViT (:func:`.clutter.deit_tiny_patch8` with :data:`.clutter.DEPTH`
    blocks, as ``bench/clutter_dense.py --weights`` writes with its default settings). A missing file
    is no error: that seed's dense model is trained."""
    import os

    if not os.path.isdir(folder):
        raise ValueError(f"--weights {folder}: no such folder (it holds seed<k>.pt from bench/clutter_dense.py --weights)")
    for seed in seeds:
        path = os.path.join(folder, f"seed{seed}.pt")
        if os.path.isfile(path):
            _state_dict(path)


def _state_dict(path: str) -> dict:
    """The proxy ViT's state dict in ``path``; ValueError naming ``--weights`` for anything else."""
    import torch

    try:
        state = torch.load(path, map_location="cpu")
        shapes = {k: v.shape for k, v in state.items()}
    except Exception as error:  # any unreadable file: torch raises several kinds
        reason = f"{type(error).__name__}: {str(error).splitlines()[0]}"
        raise ValueError(f"--weights: {path} is not a state dict saved by torch ({reason})") from None
    if shapes != {k: v.shape for k, v in deit_tiny_patch8(0, depth=DEPTH).state_dict().items()}:
        raise ValueError(f"--weights: {path} is not the proxy ViT's state dict ({DEPTH} blocks, width 192, patch 8, 64 px, "
                         "10 classes: bench/clutter_dense.py with its default --depth)")  # fmt: skip
    return state


def check_trained(folder: str, seeds, ratios=RATIOS) -> None:
    """Refuse a timing-only run over ``folder`` where some model of :func:`planned` was not trained."""
    store = RunFolder(folder)
    for seed in seeds:
        missing = [name for name in planned(ratios) if not store.has(seed, name)]
        if missing:
            raise ValueError(f"{missing[0]!r} (and {len(missing) - 1} more) is not trained for seed {seed} in {folder}: "
                             "run without --time-only first")  # fmt: skip
