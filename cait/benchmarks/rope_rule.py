"""Where a merged token sits for RoPE, measured: the anchor rule against the centroid rule (:mod:`cait.rope`).

Small RoPE ViTs are trained from scratch on scikit-learn's digits (the data, split and training of
:mod:`cait.benchmarks.accuracy`: 32x32 images, patch 4, an 8x8 grid; 6 blocks, width 64, 2 heads,
no LayerScale) with positions given by RoPE alone (no absolute position embedding), in two of timm's
RoPE layouts:

- ``axial``: RoPE-ViT's axial RoPE (``vit_small_patch16_rope_224``: integer cell coordinates,
  interleaved pairs, class token);
- ``dinov3``: DINOv3's RoPE (``vit_small_patch16_dinov3``: centred coordinates normalized to
  ``[-1, 1]``, half-layout pairs, 4 registers, average pooling).

Each trained model is compressed one-shot (no training) by ATME alone at 0.5 and 0.6x FLOPs and by
ATME+CDCP at about 0.5x, once per rule, and scored on the 500 held-out digits: top-1 mean and std
over seeds, side by side.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass

import torch

from ..cdcp import CDCP
from ..cost import flops
from ..model import compress
from ..rope import RULES
from ..schedule import ATME
from ..train.finetune import evaluate
from .accuracy import digits, train_dense

EPOCHS = 30
MODELS = {"axial": "vit_small_patch16_rope_224", "dinov3": "vit_small_patch16_dinov3"}
METHODS = {  # name: (merge target, CDCP or None)
    "ATME 0.6x": (0.6, None),
    "ATME 0.5x": (0.5, None),
    "ATME+CDCP ~0.5x": (0.7, CDCP(qk=0.5, v=0.75, mlp=0.75, align=1)),
}


@dataclass
class RuleRow:
    """One model and method: FLOPs ratio and top-1 (fraction, mean and std over seeds) under each rule."""

    model: str
    method: str
    flops_ratio: float
    anchor_mean: float
    anchor_std: float
    centroid_mean: float
    centroid_std: float


def rope_vit(kind: str, seed: int):
    """A small RoPE ViT of ``kind`` (``axial`` or ``dinov3``) for 1x32x32 digits, seeded."""
    import timm

    torch.manual_seed(seed)
    return timm.create_model(
        MODELS[kind], img_size=32, patch_size=4, in_chans=1, num_classes=10, embed_dim=64, depth=6, num_heads=2,
        use_abs_pos_emb=False, init_values=None,  # no LayerScale: it slows training from scratch at this size
    )


def trained(kind: str, seed: int, epochs: int, weights: str | None = None, progress=None):
    """The dense RoPE ViT of ``kind`` trained on the digits of ``seed``; with ``weights`` (a folder)
    its state is saved there and read back on the next run with the same settings."""
    import os

    train_x, train_y = digits(seed)[:2]
    model = rope_vit(kind, seed)
    path = None if weights is None else os.path.join(weights, f"rope-{kind}-seed{seed}-epochs{epochs}.pt")
    if path is not None and os.path.exists(path):
        model.load_state_dict(torch.load(path))
        if progress is not None:
            progress.update(epochs)
        return model.eval()
    model = train_dense(model, train_x, train_y, epochs, seed, progress)
    if path is not None:
        os.makedirs(weights, exist_ok=True)
        torch.save(model.state_dict(), path)
    return model


def run(seeds=(0, 1, 2), epochs: int = EPOCHS, kinds=None, weights: str | None = None, progress=None) -> list[RuleRow]:
    """The comparison table for ``kinds`` (default: all of :data:`MODELS`); ``weights``: a folder that
    keeps the trained dense models (see :func:`trained`); ``progress``: a tqdm-like bar advanced once
    per training epoch."""
    kinds = tuple(MODELS) if kinds is None else kinds
    scores: dict[tuple[str, str, str], list[float]] = {}
    ratios: dict[tuple[str, str], float] = {}
    for kind in kinds:
        for seed in seeds:
            test_x, test_y = digits(seed)[2:]
            dense = trained(kind, seed, epochs, weights, progress)
            test = list(zip(test_x.split(100), test_y.split(100)))
            scores.setdefault((kind, "dense", "anchor"), []).append(evaluate(dense, test)["top1"])
            ratios[(kind, "dense")] = 1.0
            for method, (target, prune) in METHODS.items():
                for rule in RULES:
                    fast = compress(dense, merge=ATME(flops=target, position=rule), prune=prune)
                    scores.setdefault((kind, method, rule), []).append(evaluate(fast, test)["top1"])
                ratios[(kind, method)] = flops(fast) / flops(dense)
    rows = []
    for (kind, method), ratio in ratios.items():
        anchor = scores[(kind, method, "anchor")]
        centroid = scores.get((kind, method, "centroid"), anchor)  # dense: nothing merged, one score
        rows.append(RuleRow(kind, method, ratio, statistics.mean(anchor), _std(anchor), statistics.mean(centroid), _std(centroid)))
    return rows


def _std(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def table(rows: list[RuleRow], seeds: int) -> str:
    lines = [
        f"| RoPE | method | FLOPs ratio | anchor top-1 % | centroid top-1 % | centroid - anchor (points, mean of {seeds} seeds) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.model} | {r.method} | {r.flops_ratio:.3f} | {100 * r.anchor_mean:.2f} ± {100 * r.anchor_std:.2f} | "
            f"{100 * r.centroid_mean:.2f} ± {100 * r.centroid_std:.2f} | {100 * (r.centroid_mean - r.anchor_mean):+.2f} |"
        )
    return "\n".join(lines)


def as_json(rows: list[RuleRow]) -> list[dict]:
    return [asdict(r) for r in rows]
