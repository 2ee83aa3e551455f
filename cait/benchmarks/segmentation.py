"""Segmentation benchmark without a download: digit canvases (:func:`cait.segmentation.data.digit_canvases`).

Per seed: 48x48 canvases (1,536 for training, 256 for testing, made from disjoint digits), a ViT
backbone (patch 4, a 12x12 grid, 6 blocks, width 64, 2 heads) with a linear head trained from scratch
for ``epochs``, then every method gets ``finetune_epochs`` more with the same loss (labels and the
trained dense model's per-pixel soft targets, alpha 0.5). At each backbone FLOPs target of
:data:`TARGETS`:

- ``CAIT one-shot`` and ``CAIT (fine-tuned)``: ATME + CDCP (dynamic gates while fine-tuning) on the
  plan :mod:`.seg_plans` chose for that target (:data:`PLANS`);
- ``ALGM-style``: local 2x2 merging in block 0, global bipartite merging in block 2
  (:mod:`cait.baselines.algm`, its local share chosen alike: :data:`ALGM_SHARES`);
- ``ToMe + unmerge``: ToMe's global merging, the merged token's feature copied back to every cell;
- ``token pruning (EViT-style)``: the least-attended tokens dropped, their cells filled from the
  nearest kept token (both with ATME's per-block counts at that target, :mod:`cait.baselines`);

plus ``dense`` (trained on alike) and ``CAIT (fine-tuned), block-1 schedule``: the plan of the
previous version of this benchmark (24 tokens merged in block 1 only, chosen when the CPU merge step
cost ~0.5 ms). Reported: mIoU over the 11 classes (mean, std over seeds), GFLOPs per image and the
FLOPs ratio of the whole model, CPU images/s (batch 64; all models of a seed timed in one process,
interleaved; the median over seeds). Trained models are kept in a :class:`.runs.RunFolder`.
"""

from __future__ import annotations

import copy
import statistics
from dataclasses import asdict, dataclass

import torch

from .. import segmentation
from ..baselines import compress_baseline
from ..cdcp import CDCP
from ..cost import flops
from ..model import compress
from ..schedule import ATME
from ..segmentation.data import DIGIT_CLASSES, digit_canvases, digit_glyphs
from ..train.finetune import Distillation, Student, teacher_of, train_epoch
from .accuracy import batches, train_dense
from .latency import time_interleaved
from .runs import RunFolder
from .seg_plans import Plan

SIZE, TRAIN, TEST, BATCH = 48, 1536, 256, 64
EPOCHS, FINETUNE_EPOCHS = 30, 6
TARGETS = (0.6, 0.5, 0.4)  # backbone FLOPs ratios
# Chosen by `cait bench --segmentation --tune` (bench/results/segmentation-tuning-digits.json).
PLANS = {0.6: Plan("front", 4, 0.75), 0.5: Plan("front", 4, 0.75, first=1), 0.4: Plan("two", 2, 0.75)}
ALGM_SHARES = {0.6: 0.5, 0.5: 0.5, 0.4: 0.75}
EARLIER = ATME(r=[0, 24, 0, 0, 0, 0]), CDCP(qk=0.5, v=0.75, mlp=0.75, align=1)  # the plan before re-tuning, about 0.61x
DISTILL = Distillation(alpha=0.5, temperature=1.0)
DENSE, BASE = "dense", "dense (trained)"  # BASE: the model after training from scratch, teacher of every method
TOKEN_METHODS = {"ToMe + unmerge": "tome", "token pruning (EViT-style)": "evit"}
PICTURE = 0.5  # the target whose CAIT model draws the picture


@dataclass
class SegmentationRow:
    """One method: mIoU as a fraction (mean, std over seeds), GFLOPs per image (multiply-add = 2) and
    relative to dense, CPU images/s; ``target``: the backbone FLOPs ratio asked for."""

    method: str
    gflops: float
    flops_ratio: float
    miou_mean: float
    miou_std: float
    img_per_s: float
    target: float


@dataclass
class SegmentationRun:
    """The table, and the last seed's models and test images (for pictures)."""

    rows: list[SegmentationRow]
    models: dict
    test_images: torch.Tensor


def canvases(seed: int):
    """``(train_x, train_y, test_x, test_y)``: images ``(n, 1, 48, 48)`` normalized by the training
    set's statistics, labels ``(n, 48, 48)``."""
    (train_glyphs, train_digits), (test_glyphs, test_digits) = digit_glyphs(seed)
    train_x, train_y = digit_canvases(train_glyphs, train_digits, TRAIN, SIZE, seed=2 * seed)
    test_x, test_y = digit_canvases(test_glyphs, test_digits, TEST, SIZE, seed=2 * seed + 1)
    mean, std = train_x.mean(), train_x.std()
    return (train_x - mean) / std, train_y, (test_x - mean) / std, test_y


def validation(seed: int):
    """``(x, y)``: ``TEST`` new canvases of the training digits (for choosing plans; the test digits stay
    unseen), normalized like the training set."""
    (train_glyphs, train_digits), _ = digit_glyphs(seed)
    train_x, _ = digit_canvases(train_glyphs, train_digits, TRAIN, SIZE, seed=2 * seed)
    x, y = digit_canvases(train_glyphs, train_digits, TEST, SIZE, seed=2 * seed + 1000)
    return (x - train_x.mean()) / train_x.std(), y


def backbone(seed: int):
    import timm

    torch.manual_seed(seed)
    return timm.create_model(
        "vit_tiny_patch16_224", img_size=SIZE, patch_size=4, in_chans=1, num_classes=0, embed_dim=64, depth=6, num_heads=2
    )


def advance(progress, steps: int) -> None:
    if progress is not None and steps:
        progress.update(steps)


def trained_dense(seed: int, store: RunFolder, x, y, epochs: int = EPOCHS, progress=None):
    """The segmenter trained from scratch for ``seed`` (kept in ``store`` under ``dense (trained)``)."""
    if store.has(seed, BASE):
        advance(progress, epochs)
        return store.load(seed, BASE)
    dense = train_dense(segmentation.segmenter(backbone(seed), DIGIT_CLASSES), x, y, epochs, seed, progress, lr=2e-3)
    store.save(seed, BASE, dense, {})
    return dense


def fine_tune(student: Student, teacher, x, y, epochs: int, seed: int, progress=None):
    """``epochs`` of labels + distillation from ``teacher`` (weights at 2e-4, CDCP scores at 1e-2);
    returns the materialized model in eval mode."""
    groups = [{"params": student.model.parameters(), "lr": 2e-4, "weight_decay": 0.05}]
    if student.gates is not None:
        groups.append({"params": student.gates.parameters(), "lr": 1e-2, "weight_decay": 0.0})
    optimizer = torch.optim.AdamW(groups)
    for epoch in range(epochs):
        train_epoch(student, teacher, batches(x, y, BATCH, seed * 1000 + 500 + epoch), optimizer, DISTILL)
        advance(progress, 1)
    return student.materialize().eval()


def fine_tune_alike(dense, student: Student, x, y, epochs: int, seed: int, progress=None):
    """``student`` (built from the trained ``dense``) fine-tuned as every method of this benchmark:
    :func:`fine_tune` with ``dense`` as the teacher. Returns the materialized model in eval mode."""
    return fine_tune(student, teacher_of(dense), x, y, epochs, seed, progress)


def warmup_steps(epochs: int, images: int) -> int:
    """Steps over which the CDCP gates anneal: the first third of the fine-tuning."""
    return max(1, epochs * (images // BATCH) // 3)


def methods() -> list[tuple[str, str, float | None]]:
    """``(name, method, target)`` of every model of a run, in table order (``target`` None: dense, and
    the earlier plan, whose ratio is its own)."""
    out = [(DENSE, DENSE, None)]
    for t in TARGETS:
        out += [(f"{m} @{t:g}", m, t) for m in ("CAIT (fine-tuned)", "CAIT one-shot", "ALGM-style", *TOKEN_METHODS)]
    return out + [("CAIT (fine-tuned), block-1 schedule", "CAIT (fine-tuned), block-1 schedule", None)]


def fine_tuned(method: str) -> bool:
    return method != "CAIT one-shot"


def construct(method: str, target: float | None, dense, warmup: int):
    """The one-shot model or the :class:`Student` of ``method`` at ``target``; ``ValueError`` when out of reach."""
    head = copy.deepcopy(dense.head).train()
    if method == DENSE:
        return Student(copy.deepcopy(dense).train(), None)
    if method == "CAIT (fine-tuned), block-1 schedule":
        return segmentation.make_student(dense, *EARLIER, warmup)
    if method.startswith("CAIT"):
        merge, prune = PLANS[target].build(dense.backbone, target)
        if method == "CAIT one-shot":
            return segmentation.Segmenter(compress(dense.backbone, merge=merge, prune=prune), dense.head).eval()
        return segmentation.make_student(dense, merge, prune, warmup)
    if method == "ALGM-style":
        fast = compress_baseline(dense.backbone, "algm", target, local_share=ALGM_SHARES[target])
    else:
        fast = compress_baseline(dense.backbone, TOKEN_METHODS[method], target)
    return Student(segmentation.Segmenter(fast, head), None)


def train_seed(seed: int, store: RunFolder, epochs: int = EPOCHS, finetune_epochs: int = FINETUNE_EPOCHS, progress=None):
    """Train (or find in ``store``) every model of ``seed``; ``progress`` advances once per training epoch."""
    train_x, train_y, test_x, test_y = canvases(seed)
    test = list(zip(test_x.split(BATCH), test_y.split(BATCH)))
    dense = trained_dense(seed, store, train_x, train_y, epochs, progress)
    teacher, warmup = teacher_of(dense), warmup_steps(finetune_epochs, len(train_y))
    base = flops(dense)
    for name, method, target in methods():
        steps = finetune_epochs if fine_tuned(method) else 0
        if store.has(seed, name):
            advance(progress, steps)
            continue
        try:
            built = construct(method, target, dense, warmup)
        except ValueError as error:
            store.save(seed, name, None, {"method": method, "target": target, "unreachable": str(error)})
            advance(progress, steps)
            continue
        model = fine_tune(built, teacher, train_x, train_y, finetune_epochs, seed, progress) if isinstance(built, Student) else built
        count = flops(model)
        store.save(seed, name, model, {"method": method, "target": target, "miou": segmentation.evaluate(model, test)["miou"],
                                       "gflops": count / 1e9, "flops_ratio": count / base})  # fmt: skip


def run(seeds=(0, 1, 2), epochs: int = EPOCHS, finetune_epochs: int = FINETUNE_EPOCHS, repeats: int = 5,
        folder: str = "bench/runs/segmentation", time_only: bool = False, progress=None) -> SegmentationRun:  # fmt: skip
    """The benchmark: train what ``folder`` lacks (nothing with ``time_only``), time every model of each
    seed in one process, and gather the rows (points out of reach are left out)."""
    store = RunFolder(folder)
    if not time_only:
        for seed in seeds:
            train_seed(seed, store, epochs, finetune_epochs, progress=progress)
    names = [name for name, _, _ in methods()]
    for seed in seeds:
        missing = [n for n in names if not store.has(seed, n)]
        if missing:
            raise ValueError(f"{missing[0]!r} is not trained for seed {seed} in {folder}: run without --time-only first")
        scores = store.scores(seed)
        models = {n: store.load(seed, n) for n in names if "unreachable" not in scores[n]}
        test_x = canvases(seed)[2]
        seconds = time_interleaved(models, test_x[:BATCH], repeats, progress=False)
        store.save_speeds(seed, {n: BATCH / statistics.median(t) for n, t in seconds.items()})
    rows = []
    for name, method, _ in methods():
        entries = [store.scores(seed)[name] for seed in seeds]
        if "unreachable" in entries[0]:
            continue
        miou = [e["miou"] for e in entries]
        target = entries[0]["target"] if entries[0]["target"] is not None else round(entries[0]["flops_ratio"], 2)
        rows.append(SegmentationRow(method, entries[0]["gflops"], entries[0]["flops_ratio"], statistics.mean(miou),
                                    statistics.stdev(miou) if len(miou) > 1 else 0.0,
                                    statistics.median(store.speeds(seed)[name] for seed in seeds), target))  # fmt: skip
    return SegmentationRun(rows, models, test_x)


def picture(result: SegmentationRun, count: int = 3, scale: int = 4):
    """CAIT's merged regions after every merging block on the first ``count`` test canvases, one
    strip per canvas (a ``PIL.Image``)."""
    from PIL import Image

    from ..regions import visualize

    model = result.models[f"CAIT (fine-tuned) @{PICTURE:g}"]
    strips = [visualize(model, image, blocks="all", scale=scale) for image in result.test_images[:count]]
    out = Image.new("RGB", (strips[0].width, sum(s.height for s in strips)), "white")
    for k, strip in enumerate(strips):
        out.paste(strip, (0, k * strips[0].height))
    return out


def table(rows: list[SegmentationRow], seeds: int) -> str:
    dense = next((r for r in rows if r.method == DENSE), rows[0])
    lines = [
        f"| method | target | GFLOPs | FLOPs ratio | mIoU % (mean ± std, {seeds} seeds) | CPU img/s (batch 64) | speedup |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.method} | {r.target:g} | {r.gflops:.3f} | {r.flops_ratio:.3f} | {100 * r.miou_mean:.2f} ± {100 * r.miou_std:.2f} | "
            f"{r.img_per_s:.0f} | {r.img_per_s / dense.img_per_s:.2f}x |"
        )
    return "\n".join(lines)


def as_json(rows: list[SegmentationRow]) -> list[dict]:
    return [asdict(r) for r in rows]
