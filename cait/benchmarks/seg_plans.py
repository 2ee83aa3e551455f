"""CAIT's merge schedule for the segmentation benchmark, chosen again now that a merge step is cheap,
and ALGM's split between its two steps, both on a validation split.

A :class:`Plan` fixes where ATME merges (``shape`` and its ``first`` block), its tile and CDCP's
channel keep ratio; the token count follows from the FLOPs target. Shapes: ``ramp`` (a constant rate
from block 0: :class:`cait.ATME` with ``flops=``), ``front`` (everything in block ``first``) and
``two`` (half in block ``first``, half ``depth // 3`` blocks later: ALGM's spacing), with ``first``
0 or 1 (1: block 0 runs on every patch first, as the plan before re-tuning did). :func:`tune`
fine-tunes every plan (and ALGM at every local share of :data:`ALGM_SHARES`) for a few epochs from
seed 0's trained dense model on the training canvases, scores it on validation canvases (new
canvases of the training digits; the test digits stay unseen), times every candidate in one process,
and :func:`choose` takes per FLOPs target the best validation mIoU among the candidates at least
:data:`SPEED_FLOOR` as fast as the fastest.
"""

from __future__ import annotations

import copy
import itertools
import statistics
from dataclasses import dataclass

from .. import segmentation
from ..baselines import compress_baseline
from ..cdcp import CDCP
from ..cost import cost_model, flops
from ..model import compress
from ..schedule import ATME
from ..train.finetune import Student, teacher_of

SHAPES = ("ramp", "front", "two")
FIRSTS = (0, 1)  # the block where front and two start merging
TILES = (2, 4)
KEEPS = (1.0, 0.75)
ALGM_SHARES = (0.25, 0.5, 0.75)
SPEED_FLOOR = 0.9


@dataclass(frozen=True)
class Plan:
    """Where CAIT merges (``shape``: ``ramp``, ``front`` or ``two``, from block ``first``), its ATME
    ``tile`` (2 or 4) and the share of q/k, v and MLP channels CDCP keeps (``keep``; 1.0: no pruning)."""

    shape: str
    tile: int
    keep: float
    first: int = 0

    def __str__(self) -> str:
        start = f" from block {self.first}" if self.first else ""
        return f"{self.shape}{start}, tile {self.tile}, keep {self.keep:g}"

    def build(self, backbone, target: float) -> tuple[ATME, CDCP | None]:
        """``(merge, prune)`` giving the timm ``backbone`` about ``target`` times its FLOPs; ``ValueError``
        when this plan cannot reach it."""
        prune = None if self.keep == 1 else CDCP(qk=self.keep, v=self.keep, mlp=self.keep, align=1)
        pruned = compress(backbone, prune=prune)
        share = flops(pruned) / flops(backbone)
        if share < target:
            raise ValueError(f"keeping {self.keep:g} of the channels alone gives {share:.3f}x FLOPs, below {target}")
        schedule = schedule_for(cost_model(pruned), self.shape, min(1.0, target / share), self.tile, self.first)
        return ATME(r=list(schedule), block=self.tile), prune


def schedule_for(cost, shape: str, target: float, tile: int, first: int = 0) -> tuple[int, ...]:
    """Tokens merged per block in ``shape`` (from block ``first``; ``ramp`` starts at 0) at the FLOPs
    ratio nearest ``target`` (``ValueError`` when the nearest is more than 0.02 away or ``shape`` is
    unknown)."""
    if shape == "ramp":
        if first:
            raise ValueError("a ramp schedule merges from block 0")
        return ATME(flops=target, block=tile).schedule(cost)
    if shape not in SHAPES:
        raise ValueError(f"schedule shape must be one of {SHAPES}, got {shape!r}")
    depth = len(cost.blocks)
    dense = cost.flops((0,) * depth)
    best = None
    for total in range(ATME(r=0, block=tile).limit(cost.grid) + 1):
        schedule = [0] * depth
        schedule[first] = total if shape == "front" else total - total // 2
        schedule[first + depth // 3] += 0 if shape == "front" else total // 2
        gap = abs(cost.flops(schedule) / dense - target)
        if best is None or gap < best[0]:
            best = (gap, tuple(schedule))
    if best[0] > 0.02:
        raise ValueError(f"a {shape} schedule with {tile}x{tile} tiles cannot reach a FLOPs ratio of {target:.3f}")
    return best[1]


def plans() -> list[Plan]:
    grid = itertools.product(FIRSTS, SHAPES, TILES, KEEPS)
    return [Plan(shape, tile, keep, first) for first, shape, tile, keep in grid if not (shape == "ramp" and first)]


def tune(store, targets, seed: int = 0, epochs: int = 30, finetune_epochs: int = 2, repeats: int = 5, progress=None) -> list[dict]:
    """Score every :func:`plans` candidate and every ALGM share at every FLOPs target (see the module
    docstring) after ``epochs`` of dense training; ``store``: a :class:`.runs.RunFolder` that caches
    the dense model and every score.
    Returns one dict per candidate: ``method`` (``CAIT`` or ``ALGM-style``), ``target``, its settings,
    ``flops_ratio`` (whole model), ``val_miou``, ``img_per_s``, or ``unreachable``."""
    from . import segmentation as bench
    from .latency import time_interleaved

    train_x, train_y, _, _ = bench.canvases(seed)
    val_x, val_y = bench.validation(seed)
    val = list(zip(val_x.split(bench.BATCH), val_y.split(bench.BATCH)))
    dense = bench.trained_dense(seed, store, train_x, train_y, epochs, progress)
    teacher, warmup = teacher_of(dense), bench.warmup_steps(finetune_epochs, len(train_y))
    base = flops(dense)
    candidates = [("CAIT", target, plan) for target in targets for plan in plans()]
    candidates += [("ALGM-style", target, share) for target in targets for share in ALGM_SHARES]
    results, fast = [], {}
    for method, target, option in candidates:
        name = f"{method} {option} @{target:g}"
        settings = {"name": name, "method": method, "target": target}
        settings.update(vars(option) if method == "CAIT" else {"local_share": option})
        try:
            one_shot, student = _candidate(dense, method, target, option, warmup)
        except ValueError as error:
            results.append({**settings, "unreachable": str(error)})
            bench.advance(progress, finetune_epochs)
            continue
        fast[name] = one_shot
        if not store.has(seed, name):
            model = bench.fine_tune(student, teacher, train_x, train_y, finetune_epochs, seed, progress)
            store.save(seed, name, None, {"val_miou": segmentation.evaluate(model, val)["miou"]})
        else:
            bench.advance(progress, finetune_epochs)
        schedule = list(one_shot.backbone.schedule)
        results.append({**settings, "schedule": schedule, "flops_ratio": flops(one_shot) / base, **store.scores(seed)[name]})
    seconds = time_interleaved({"dense": dense, **fast}, val_x[: bench.BATCH], repeats, progress=False)
    for r in results:
        if "unreachable" not in r:
            r["img_per_s"] = bench.BATCH / statistics.median(seconds[r["name"]])
    results.append({"name": "dense", "method": "dense", "target": 1.0, "img_per_s": bench.BATCH / statistics.median(seconds["dense"]),
                    "val_miou": segmentation.evaluate(dense, val)["miou"], "flops_ratio": 1.0})  # fmt: skip
    return results


def _candidate(dense, method: str, target: float, option, warmup: int):
    """``(one-shot segmenter, student)`` of one candidate; ``ValueError`` when it cannot reach ``target``."""
    if method == "CAIT":
        merge, prune = option.build(dense.backbone, target)
        one_shot = segmentation.Segmenter(compress(dense.backbone, merge=merge, prune=prune), dense.head).eval()
        return one_shot, segmentation.make_student(dense, merge, prune, warmup)
    fast = compress_baseline(dense.backbone, "algm", target, local_share=option)
    one_shot = segmentation.Segmenter(fast, dense.head).eval()
    return one_shot, Student(segmentation.Segmenter(copy.deepcopy(fast), copy.deepcopy(dense.head).train()), None)


def choose(results: list[dict]) -> dict:
    """``{method: {target: best candidate}}`` for ``CAIT`` and ``ALGM-style``: per target, the best
    validation mIoU among the candidates at least :data:`SPEED_FLOOR` times as fast as the fastest one
    of that method and target (ties: the faster)."""
    chosen: dict = {}
    for r in results:
        if "unreachable" in r or r["method"] == "dense":
            continue
        peers = [p for p in results if p["method"] == r["method"] and p["target"] == r["target"] and "unreachable" not in p]
        if r["img_per_s"] < SPEED_FLOOR * max(p["img_per_s"] for p in peers):
            continue
        best = chosen.setdefault(r["method"], {}).get(r["target"])
        if best is None or (r["val_miou"], r["img_per_s"]) > (best["val_miou"], best["img_per_s"]):
            chosen[r["method"]][r["target"]] = r
    return chosen
