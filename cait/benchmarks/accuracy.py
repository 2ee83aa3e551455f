"""Accuracy benchmark without a download: a small ViT trained from scratch on scikit-learn's digits.

The digits (1,797 grey 8x8 images, 10 classes) are upsampled to 32x32 and split 1,297 / 500 per
seed. A DeiT-style timm ``VisionTransformer`` (patch 4, an 8x8 grid, 6 blocks, width 96, 3 heads)
is trained from scratch, then compressed to about half its FLOPs by each method and scored on the
held-out images:

- ``dense``; ``ATME only``, ``CDCP only``, ``ATME+CDCP one-shot`` (no training);
- ``CAIT (fine-tuned)``: ATME+CDCP with dynamic gates, fine-tuned with distillation from the dense model;
- ``ToMe``: global bipartite matching, and ``EViT-style pruning``: drop the least-attended tokens
  (:mod:`cait.baselines`, one-shot, the same per-block token counts as ATME).

Every method reports top-1 (mean and std over seeds), its FLOPs ratio and CPU images/s (batch 64).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from ..baselines import compress_baseline
from ..cdcp import CDCP
from ..cost import flops
from ..model import compress
from ..schedule import ATME
from ..train.finetune import Distillation, Student, evaluate, make_student, teacher_of, train_epoch

TARGET = 0.5  # FLOPs ratio every method aims at
# The digits benchmarks prune with align=1 (exact keep ratios): their ViTs have 32-channel heads and
# 384 MLP units, where hardware-aligned counts would change the ratios and the FLOPs targets are measured.
MERGE, PRUNE = ATME(flops=0.7), CDCP(qk=0.5, v=0.75, mlp=0.75, align=1)  # together about 0.5x


@dataclass
class AccuracyRow:
    """One method's line: top-1 as a fraction over seeds, FLOPs relative to dense, CPU images/s (median over seeds)."""

    method: str
    flops_ratio: float
    top1_mean: float
    top1_std: float
    img_per_s: float


def digits(seed: int):
    """``(train_x, train_y, test_x, test_y)``: ``x`` ``(n, 1, 32, 32)`` normalized, ``y`` ``(n,)``."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32)[:, None] / 16
    x = F.interpolate(x, size=32, mode="bilinear", align_corners=False)
    x = (x - x.mean()) / x.std()
    y = torch.tensor(data.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    train, test = order[:1297], order[1297:]
    return x[train], y[train], x[test], y[test]


def small_vit(seed: int):
    import timm

    torch.manual_seed(seed)
    return timm.create_model(
        "vit_tiny_patch16_224", img_size=32, patch_size=4, in_chans=1, num_classes=10, embed_dim=96, depth=6, num_heads=3
    )


def batches(x, y, size: int, seed: int):
    """Shuffled mini-batches of ``size`` (the remainder is dropped)."""
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    return [(x[order[i : i + size]], y[order[i : i + size]]) for i in range(0, len(y) - size + 1, size)]


def train_dense(model, x, y, epochs: int, seed: int, progress=None, lr: float = 1e-3, resample=None):
    """Training from scratch: AdamW, one-cycle schedule peaking at ``lr``, batch 64, cross entropy
    (per image or per pixel). Random shifts slowed learning on the digits, so there are none.
    ``resample``: ``epoch -> (x, y)``, a fresh training set of ``len(y)`` examples for every epoch
    after the first (generated data); None: ``x, y`` every epoch."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    steps = epochs * (len(y) // 64)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    for epoch in range(epochs):
        if resample is not None and epoch > 0:
            x, y = resample(epoch)
        for images, labels in batches(x, y, 64, seed * 1000 + epoch):
            loss = F.cross_entropy(model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
        if progress is not None:
            progress.update(1)
    return model.eval()


def fine_tune(dense, x, y, epochs: int, seed: int, progress=None, merge: ATME = MERGE, prune: CDCP | None = PRUNE):
    """The method: ATME+CDCP with dynamic gates, distilled from ``dense``; returns the compact model."""
    student = make_student(dense, merge, prune, warmup=max(1, epochs * (len(y) // 64) // 3))
    return fine_tune_student(student, teacher_of(dense), x, y, epochs, seed, progress)


def fine_tune_student(student: Student, teacher, x, y, epochs: int, seed: int, progress=None):
    """The fine-tuning recipe of this benchmark for any compressed ``student``: ``epochs`` of AdamW
    (weights at 2e-4 with weight decay 0.05, CDCP scores at 1e-2), batch 64, distillation from
    ``teacher`` (alpha 0.5, temperature 2); returns the materialized model in eval mode."""
    groups = [{"params": student.model.parameters(), "lr": 2e-4, "weight_decay": 0.05}]
    if student.gates is not None:
        groups.append({"params": student.gates.parameters(), "lr": 1e-2})
    optimizer = torch.optim.AdamW(groups)
    for epoch in range(epochs):
        train_epoch(student, teacher, batches(x, y, 64, seed * 1000 + 500 + epoch), optimizer, Distillation(0.5, 2.0))
        if progress is not None:
            progress.update(1)
    return student.materialize().eval()


def images_per_second(model, x, repeats: int = 5) -> float:
    images = x[:64]
    times = []
    with torch.inference_mode():
        model(images)
        for _ in range(repeats):
            start = time.perf_counter()
            model(images)
            times.append(time.perf_counter() - start)
    return len(images) / statistics.median(times)


def run(seeds=(0, 1, 2), epochs: int = 40, finetune_epochs: int = 15, progress=None) -> list[AccuracyRow]:
    """The benchmark table; ``progress``: a tqdm-like bar advanced once per training epoch."""
    scores: dict[str, list[float]] = {}
    ratios: dict[str, float] = {}
    speeds: dict[str, list[float]] = {}
    for seed in seeds:
        train_x, train_y, test_x, test_y = digits(seed)
        dense = train_dense(small_vit(seed), train_x, train_y, epochs, seed, progress)
        models = {
            "dense": dense,
            "ATME only": compress(dense, merge=ATME(flops=TARGET)),
            "CDCP only": compress(dense, prune=CDCP(qk=0.5, v=0.5, mlp=0.5, align=1)),
            "ATME+CDCP one-shot": compress(dense, merge=MERGE, prune=PRUNE),
            "CAIT (fine-tuned)": fine_tune(dense, train_x, train_y, finetune_epochs, seed, progress),
            "ToMe": compress_baseline(dense, "tome", TARGET),
            "EViT-style pruning": compress_baseline(dense, "evit", TARGET),
        }
        base = flops(dense)
        test = list(zip(test_x.split(100), test_y.split(100)))
        for name, model in models.items():
            scores.setdefault(name, []).append(evaluate(model, test)["top1"])
            ratios[name] = flops(model) / base
            speeds.setdefault(name, []).append(images_per_second(model, test_x))
    return [
        AccuracyRow(name, ratios[name], statistics.mean(s), statistics.stdev(s) if len(s) > 1 else 0.0, statistics.median(speeds[name]))
        for name, s in scores.items()
    ]


def table(rows: list[AccuracyRow], seeds: int) -> str:
    lines = [f"| method | FLOPs ratio | top-1 % (mean ± std, {seeds} seeds) | CPU img/s (batch 64) |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.method} | {r.flops_ratio:.3f} | {100 * r.top1_mean:.2f} ± {100 * r.top1_std:.2f} | {r.img_per_s:.0f} |")
    return "\n".join(lines)


def as_json(rows: list[AccuracyRow]) -> list[dict]:
    return [asdict(r) for r in rows]
