"""Accuracy at equal speed on the digits: every method's top-1 along a curve of FLOPs ratios.

Same data, model and recipes as :mod:`.accuracy`: a small DeiT-style ViT trained from scratch per seed
on scikit-learn's digits, fine-tuning for 15 epochs with distillation from it. At each FLOPs ratio of
:data:`RATIOS`, as far as each method reaches:

- one-shot (no training): ``ATME one-shot``, ``ToMe one-shot``, ``EViT-style one-shot``;
- fine-tuned, same recipe and epochs: ``CAIT (fine-tuned)`` (ATME + CDCP with dynamic gates),
  ``ToMe (fine-tuned)``, ``EViT-style (fine-tuned)``.

ToMe and EViT-style remove the same tokens per block as ATME alone does at that ratio
(:func:`cait.baselines.compress_baseline`), except where those counts exceed ToMe's limit of half the
tokens of a block (0.33 here: 34 of 64 in block 0): ToMe then runs its own schedule, the same ``r``
in every block clipped to half the tokens left (:func:`tome_on_its_own`). CAIT keeps :data:`KEEP`\\ ``[ratio]`` of the q/k, v and MLP
channels (the same share for all three: the CPU attention pads q/k to v's width otherwise) and merges
to the rest (2x2 tiles; 4x4 where 2x2 cannot reach); :func:`tune` chose :data:`KEEP` on a validation
split. Trained models are kept in a :class:`.runs.RunFolder` (an interrupted run resumes; a
timing-only run re-times them). Speed: all models of a seed timed in one process, interleaved,
batch 64, CPU; the median over seeds.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass

from ..baselines import compress_baseline
from ..baselines.tome import check_schedule
from ..cdcp import CDCP
from ..cost import flops
from ..model import compress
from ..schedule import ATME
from ..train.finetune import Student, evaluate, teacher_of
from .accuracy import digits, fine_tune, fine_tune_student, small_vit, train_dense
from .latency import time_interleaved
from .runs import RunFolder

RATIOS = (0.9, 0.75, 0.6, 0.5, 0.4, 0.33)
DENSE = "dense"
ONE_SHOT = ("ATME one-shot", "ToMe one-shot", "EViT-style one-shot")
FINE_TUNED = ("CAIT (fine-tuned)", "ToMe (fine-tuned)", "EViT-style (fine-tuned)")
BASELINES = {"ToMe": "tome", "EViT-style": "evit"}
KEEP_OPTIONS = (1.0, 0.9375, 0.875, 0.75, 0.625, 0.5)
# CAIT's channel keep ratio at each FLOPs ratio, chosen by tune() (bench/results/accuracy-curve-tuning-digits.json):
# the best validation top-1 after 3 epochs; at 0.9 no pruning won (merging alone, fine-tuned alike).
KEEP = {0.9: 1.0, 0.75: 0.875, 0.6: 0.9375, 0.5: 0.75, 0.4: 0.625, 0.33: 0.5}
BATCH = 64


@dataclass
class CurveRow:
    """One point: top-1 as a fraction (mean, std over seeds), FLOPs relative to dense, CPU images/s
    (batch 64, median over seeds); ``target``: the FLOPs ratio asked for."""

    method: str
    target: float
    flops_ratio: float
    img_per_s: float
    top1_mean: float
    top1_std: float


def name_of(method: str, ratio: float) -> str:
    return f"{method} @{ratio:g}"


def cait_plan(dense, ratio: float, keep: float) -> tuple[ATME, CDCP | None]:
    """CAIT at ``ratio``: CDCP keeping ``keep`` of the q/k, v and MLP channels (None at 1.0) and ATME
    merging to the rest. Raises ``ValueError`` when pruning alone already costs less than ``ratio`` or
    merging cannot reach it."""
    prune = None if keep == 1 else CDCP(qk=keep, v=keep, mlp=keep, align=1)
    pruned = 1.0 if prune is None else flops(compress(dense, prune=prune)) / flops(dense)
    if pruned < ratio:
        raise ValueError(f"keeping {keep} of the channels alone gives {pruned:.3f}x FLOPs, below {ratio}")
    error = None
    for block in (2, 4):
        merge = ATME(flops=min(1.0, ratio / pruned), block=block)
        try:
            compress(dense, merge=merge, prune=prune)
            return merge, prune
        except ValueError as caught:
            error = caught
    raise error


def construct(method: str, dense, ratio: float, keep: float):
    """The model (one-shot) or the :class:`Student` plus plan (fine-tuned) of ``method`` at ``ratio``,
    before any training; ``ValueError`` when the method cannot reach ``ratio``."""
    if method == "ATME one-shot":
        return compress(dense, merge=ATME(flops=ratio))
    if method == "CAIT (fine-tuned)":
        return cait_plan(dense, ratio, keep)
    family, kind = method.split(" ", 1)
    options = {"own_schedule": True} if tome_on_its_own(dense, ratio, family) else {}
    fast = compress_baseline(dense, BASELINES[family], ratio, **options)
    return fast if kind == "one-shot" else Student(fast, None)


def tome_on_its_own(dense, ratio: float, family: str) -> bool:
    """Whether ToMe runs its own schedule at ``ratio``: where ATME's per-block counts ask it to merge
    more than half the tokens of a block (its limit), ToMe merges the same ``r`` in every block instead."""
    if family != "ToMe":
        return False
    try:
        check_schedule(compress(dense, merge=ATME(flops=ratio)).schedule, math.prod(dense.patch_embed.grid_size))
    except ValueError:
        return True
    return False


def score(model, dense, test, method: str, ratio: float) -> dict:
    return {"method": method, "target": ratio, "top1": evaluate(model, test)["top1"], "flops_ratio": flops(model) / flops(dense)}


def train_seed(seed: int, store: RunFolder, ratios=RATIOS, epochs: int = 40, finetune_epochs: int = 15, keep=None,
               progress=None) -> None:  # fmt: skip
    """Train (or find in ``store``) the dense model and every method at every ratio for ``seed``;
    ``progress``: a tqdm-like bar advanced once per training epoch (skipped work included)."""
    keep = keep or KEEP
    train_x, train_y, test_x, test_y = digits(seed)
    test = list(zip(test_x.split(100), test_y.split(100)))
    if store.has(seed, DENSE):
        dense = store.load(seed, DENSE)
        _advance(progress, epochs)
    else:
        dense = train_dense(small_vit(seed), train_x, train_y, epochs, seed, progress)
        store.save(seed, DENSE, dense, score(dense, dense, test, DENSE, 1.0))
    for ratio in ratios:
        for method in ONE_SHOT + FINE_TUNED:
            name, tuned = name_of(method, ratio), method in FINE_TUNED
            if store.has(seed, name):
                _advance(progress, finetune_epochs if tuned else 0)
                continue
            try:
                built = construct(method, dense, ratio, keep.get(ratio, 1.0))
            except ValueError as error:
                store.save(seed, name, None, {"method": method, "target": ratio, "unreachable": str(error)})
                _advance(progress, finetune_epochs if tuned else 0)
                continue
            if isinstance(built, tuple):
                model = fine_tune(dense, train_x, train_y, finetune_epochs, seed, progress, *built)
            elif isinstance(built, Student):
                model = fine_tune_student(built, teacher_of(dense), train_x, train_y, finetune_epochs, seed, progress)
            else:
                model = built
            store.save(seed, name, model, score(model, dense, test, method, ratio))


def _advance(progress, steps: int) -> None:
    if progress is not None and steps:
        progress.update(steps)


def time_seed(seed: int, store: RunFolder, names: list[str], repeats: int) -> None:
    """Images/s of the stored models ``names`` of ``seed``: one process, interleaved repeats, batch 64."""
    _, _, test_x, _ = digits(seed)
    models = {name: store.load(seed, name) for name in names}
    seconds = time_interleaved(models, test_x[:BATCH], repeats, progress=False)
    store.save_speeds(seed, {name: BATCH / statistics.median(times) for name, times in seconds.items()})


def planned(ratios) -> list[str]:
    """Every model name of a run over ``ratios``, dense first."""
    return [DENSE] + [name_of(method, ratio) for ratio in ratios for method in ONE_SHOT + FINE_TUNED]


def collect(store: RunFolder, seeds, names: list[str]) -> tuple[list[CurveRow], list[dict]]:
    """The rows of the models ``names`` (reached points, in that order) and the points out of reach
    (``method``, ``target``, ``reason``)."""
    rows, unreachable = [], []
    for name in names:
        missing = [seed for seed in seeds if not store.has(seed, name)]
        if missing:
            raise ValueError(f"{name!r} is not trained for seeds {missing} in {store.folder}: run without --time-only first")
        entries = [store.scores(seed)[name] for seed in seeds]
        if "unreachable" in entries[0]:
            unreachable.append({"method": entries[0]["method"], "target": entries[0]["target"], "reason": entries[0]["unreachable"]})
            continue
        top1 = [e["top1"] for e in entries]
        speeds = [store.speeds(seed).get(name) for seed in seeds]
        if None in speeds:
            raise ValueError(f"{name!r} has not been timed in {store.folder}")
        rows.append(
            CurveRow(entries[0]["method"], entries[0]["target"], statistics.mean(e["flops_ratio"] for e in entries),
                     statistics.median(speeds), statistics.mean(top1), statistics.stdev(top1) if len(top1) > 1 else 0.0)
        )  # fmt: skip
    return rows, unreachable


def run(seeds=(0, 1, 2), ratios=RATIOS, epochs: int = 40, finetune_epochs: int = 15, folder: str = "bench/runs/accuracy-curve",
        repeats: int = 10, time_only: bool = False, progress=None) -> tuple[list[CurveRow], list[dict]]:  # fmt: skip
    """Train what ``folder`` lacks (nothing with ``time_only``), time every model of every seed, and
    return :func:`collect`'s rows and points out of reach."""
    store = RunFolder(folder)
    if not time_only:
        for seed in seeds:
            train_seed(seed, store, ratios, epochs, finetune_epochs, progress=progress)
    for seed in seeds:
        scores = store.scores(seed)
        time_seed(seed, store, [n for n in planned(ratios) if n in scores and "unreachable" not in scores[n]], repeats)
    return collect(store, seeds, planned(ratios))


def tune(folder: str, ratios=RATIOS, options=KEEP_OPTIONS, epochs: int = 40, finetune_epochs: int = 3, seed: int = 0,
         progress=None) -> list[dict]:  # fmt: skip
    """CAIT's keep ratio per FLOPs ratio, on a validation split: seed ``seed``'s training images cut
    into 1,000 for training (a dense model trained on them, then each option fine-tuned for
    ``finetune_epochs``) and 297 for validation. Returns one dict per option (``target``, ``keep``,
    ``block``, ``flops_ratio``, ``val_top1``, or ``unreachable``); :func:`choose` picks."""
    store = RunFolder(folder)
    x, y, _, _ = digits(seed)
    cut = len(y) * 1000 // 1297  # 1,000 of the 1,297 training images
    train_x, train_y, val = x[:cut], y[:cut], list(zip(x[cut:].split(100), y[cut:].split(100)))
    if store.has(seed, DENSE):
        dense = store.load(seed, DENSE)
    else:
        dense = train_dense(small_vit(seed), train_x, train_y, epochs, seed, progress)
        store.save(seed, DENSE, dense, {"val_top1": evaluate(dense, val)["top1"]})
    results = []
    for ratio in ratios:
        for keep in options:
            name = f"CAIT keep {keep:g} @{ratio:g}"
            if store.has(seed, name):
                _advance(progress, finetune_epochs)
            else:
                try:
                    merge, prune = cait_plan(dense, ratio, keep)
                except ValueError as error:
                    store.save(seed, name, None, {"target": ratio, "keep": keep, "unreachable": str(error)})
                    _advance(progress, finetune_epochs)
                    continue
                model = fine_tune(dense, train_x, train_y, finetune_epochs, seed, progress, merge, prune)
                entry = {"target": ratio, "keep": keep, "block": merge.block, "schedule": list(model.schedule),
                         "flops_ratio": flops(model) / flops(dense), "val_top1": evaluate(model, val)["top1"]}  # fmt: skip
                store.save(seed, name, None, entry)
            results.append(store.scores(seed)[name])
    return results


def choose(results: list[dict]) -> dict[float, float]:
    """Per target, the keep ratio with the best validation top-1 (ties: the larger keep ratio)."""
    best: dict[float, dict] = {}
    for r in results:
        if "unreachable" in r:
            continue
        current = best.get(r["target"])
        if current is None or (r["val_top1"], r["keep"]) > (current["val_top1"], current["keep"]):
            best[r["target"]] = r
    return {target: r["keep"] for target, r in best.items()}


def table(rows: list[CurveRow], unreachable: list[dict], seeds: int) -> str:
    dense = next(r for r in rows if r.method == DENSE)
    lines = [f"| method | target | FLOPs ratio | top-1 % (mean ± std, {seeds} seeds) | CPU img/s (batch 64) | speedup |"]
    lines.append("|---|---|---|---|---|---|")
    for r in rows:
        lines.append(f"| {r.method} | {r.target:g} | {r.flops_ratio:.3f} | {100 * r.top1_mean:.2f} ± {100 * r.top1_std:.2f} | "
                     f"{r.img_per_s:.0f} | {r.img_per_s / dense.img_per_s:.2f}x |")  # fmt: skip
    if unreachable:
        lines.append("\nOut of reach: " + "; ".join(f"{u['method']} at {u['target']:g} ({u['reason']})" for u in unreachable))
    return "\n".join(lines)


def as_json(rows: list[CurveRow]) -> list[dict]:
    return [asdict(r) for r in rows]
