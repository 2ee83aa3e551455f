"""Segmentation benchmark without a download: digit canvases (:func:`cait.segmentation.data.digit_canvases`).

Per seed: 48x48 canvases (1,536 for training, 256 for testing, made from disjoint digits), a ViT
backbone (patch 4, a 12x12 grid, 6 blocks, width 64, 2 heads) with a linear head trained from scratch
for ``epochs``, then every method gets ``finetune_epochs`` more with the same loss (labels and the
trained dense model's per-pixel soft targets, alpha 0.5):

- ``dense``: the trained model itself, trained on;
- ``CAIT one-shot`` and ``CAIT (fine-tuned)``: ATME + CDCP (dynamic gates while fine-tuning);
- ``ToMe + unmerge``: ToMe's global merging, the merged token's feature copied back to every cell;
- ``token pruning (EViT-style)``: the least-attended tokens dropped, their cells filled from the
  nearest kept token.

The token methods remove the same tokens per block as ATME at CAIT's FLOPs ratio (:mod:`cait.baselines`).
Reported: mIoU over the 11 classes (mean, std over seeds), GFLOPs per image and the FLOPs ratio of the whole model, and
CPU images/s (batch 64, median of interleaved repeats).
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

SIZE, TRAIN, TEST, BATCH = 48, 1536, 256, 64
EPOCHS, FINETUNE_EPOCHS = 30, 6
FINE_TUNED = ("dense", "CAIT (fine-tuned)", "ToMe + unmerge", "token pruning (EViT-style)")
# About 0.6x FLOPs together. All merging in one block: on a CPU every merge step costs fixed time that
# this small model does not hide (the ATME(flops=...) schedule merges in every block and runs ~1.0x).
MERGE, PRUNE = ATME(r=[0, 24, 0, 0, 0, 0]), CDCP(qk=0.5, v=0.75, mlp=0.75)
DISTILL = Distillation(alpha=0.5, temperature=1.0)


@dataclass
class SegmentationRow:
    """One method: mIoU as a fraction (mean, std over seeds), GFLOPs per image (multiply-add = 2) and
    relative to dense, CPU images/s."""

    method: str
    gflops: float
    flops_ratio: float
    miou_mean: float
    miou_std: float
    img_per_s: float


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


def backbone(seed: int):
    import timm

    torch.manual_seed(seed)
    return timm.create_model(
        "vit_tiny_patch16_224", img_size=SIZE, patch_size=4, in_chans=1, num_classes=0, embed_dim=64, depth=6, num_heads=2
    )


def fine_tune(student: Student, teacher, x, y, epochs: int, seed: int, progress=None):
    """``epochs`` of labels + distillation from ``teacher`` (weights at 2e-4, CDCP scores at 1e-2);
    returns the materialized model in eval mode."""
    groups = [{"params": student.model.parameters(), "lr": 2e-4, "weight_decay": 0.05}]
    if student.gates is not None:
        groups.append({"params": student.gates.parameters(), "lr": 1e-2, "weight_decay": 0.0})
    optimizer = torch.optim.AdamW(groups)
    for epoch in range(epochs):
        train_epoch(student, teacher, batches(x, y, BATCH, seed * 1000 + 500 + epoch), optimizer, DISTILL)
        if progress is not None:
            progress.update(1)
    return student.materialize().eval()


def compressed_models(dense, x, y, finetune_epochs: int, seed: int, progress=None) -> dict:
    """Every method's model, made from the trained ``dense`` segmenter."""
    teacher = teacher_of(dense)
    warmup = max(1, finetune_epochs * (len(y) // BATCH) // 3)
    one_shot = segmentation.Segmenter(compress(dense.backbone, merge=MERGE, prune=PRUNE), dense.head).eval()
    ratio = flops(one_shot) / flops(dense)

    def token_method(name: str):
        fast = compress_baseline(dense.backbone, name, ratio)
        return Student(segmentation.Segmenter(fast, copy.deepcopy(dense.head).train()), None)

    students = dict(
        zip(
            FINE_TUNED,
            (
                Student(copy.deepcopy(dense).train(), None),
                segmentation.make_student(dense, MERGE, PRUNE, warmup),
                token_method("tome"),
                token_method("evit"),
            ),
        )
    )
    models = {name: fine_tune(student, teacher, x, y, finetune_epochs, seed, progress) for name, student in students.items()}
    return {"dense": models.pop("dense"), "CAIT one-shot": one_shot, **models}


def run(seeds=(0, 1, 2), epochs: int = EPOCHS, finetune_epochs: int = FINETUNE_EPOCHS, repeats: int = 5, progress=None) -> SegmentationRun:
    """The benchmark; ``progress``: a tqdm-like bar advanced once per training epoch."""
    scores: dict[str, list[float]] = {}
    counts: dict[str, float] = {}
    speeds: dict[str, list[float]] = {}
    for seed in seeds:
        train_x, train_y, test_x, test_y = canvases(seed)
        dense = segmentation.segmenter(backbone(seed), DIGIT_CLASSES)
        dense = train_dense(dense, train_x, train_y, epochs, seed, progress, lr=2e-3)
        models = compressed_models(dense, train_x, train_y, finetune_epochs, seed, progress)
        test = list(zip(test_x.split(BATCH), test_y.split(BATCH)))
        for name, model in models.items():
            scores.setdefault(name, []).append(segmentation.evaluate(model, test)["miou"])
            counts[name] = flops(model)
        seconds = time_interleaved(models, test_x[:BATCH], repeats, progress=False)
        for name, times in seconds.items():
            speeds.setdefault(name, []).append(BATCH / statistics.median(times))
    rows = [
        SegmentationRow(
            name,
            counts[name] / 1e9,
            counts[name] / counts["dense"],
            statistics.mean(s),
            statistics.stdev(s) if len(s) > 1 else 0.0,
            statistics.median(speeds[name]),
        )
        for name, s in scores.items()
    ]
    return SegmentationRun(rows, models, test_x)


def picture(result: SegmentationRun, count: int = 3, scale: int = 4):
    """CAIT's merged regions after every merging block on the first ``count`` test canvases, one
    strip per canvas (a ``PIL.Image``)."""
    from PIL import Image

    from ..regions import visualize

    strips = [visualize(result.models["CAIT (fine-tuned)"], image, blocks="all", scale=scale) for image in result.test_images[:count]]
    out = Image.new("RGB", (strips[0].width, sum(s.height for s in strips)), "white")
    for k, strip in enumerate(strips):
        out.paste(strip, (0, k * strips[0].height))
    return out


def table(rows: list[SegmentationRow], seeds: int) -> str:
    dense = next((r for r in rows if r.method == "dense"), rows[0])
    lines = [
        f"| method | GFLOPs | FLOPs ratio | mIoU % (mean ± std, {seeds} seeds) | CPU img/s (batch 64) | speedup |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.method} | {r.gflops:.3f} | {r.flops_ratio:.3f} | {100 * r.miou_mean:.2f} ± {100 * r.miou_std:.2f} | "
            f"{r.img_per_s:.0f} | {r.img_per_s / dense.img_per_s:.2f}x |"
        )
    return "\n".join(lines)


def as_json(rows: list[SegmentationRow]) -> list[dict]:
    return [asdict(r) for r in rows]
