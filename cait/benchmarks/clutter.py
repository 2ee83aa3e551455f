"""A harder classification proxy without a download: one digit among clutter on a textured canvas.

The digits benchmark (:func:`cait.benchmarks.accuracy.digits`, 8x8 images, 65 tokens) is saturated:
every method scores 94-97%. Here each 64x64 grey canvas holds one of scikit-learn's digits (scaled to
20-32 px, at a random place, bright) over a striped, noisy background
(:func:`cait.segmentation.data.backgrounds`) with ``clutter`` distractors: halves of other digits
(10-20 px, dimmer). The label is the whole digit's class. A ViT with 8-pixel patches sees 64 tokens
of which most are background or clutter: merging and pruning have something to throw away, and
something that must not be thrown away.

Training and test canvases use disjoint glyphs (:func:`cait.segmentation.data.digit_glyphs`); every
canvas is a function of the seed only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..segmentation.data import backgrounds, digit_glyphs

SIZE = 64


def _paste(canvas: torch.Tensor, glyph: torch.Tensor, side: int, brightness: float, generator: torch.Generator) -> None:
    """Scale ``glyph`` (8, 8) in [0, 1] to ``side`` px and blend it at a random place of ``canvas`` (H, W), in place."""
    image = F.interpolate(glyph[None, None], size=(side, side), mode="bilinear", align_corners=False)[0, 0].clamp(0, 1)
    top = int(torch.randint(canvas.shape[0] - side + 1, (), generator=generator))
    left = int(torch.randint(canvas.shape[1] - side + 1, (), generator=generator))
    window = canvas[top : top + side, left : left + side]
    canvas[top : top + side, left : left + side] = window * (1 - image) + brightness * image


def cluttered_canvases(glyphs: torch.Tensor, digits: torch.Tensor, count: int, seed: int, size: int = SIZE, clutter: int = 6):
    """``count`` canvases: ``clutter`` half-digit distractors (a random half of a random glyph, 10-20 px,
    brightness 0.45-0.7), then the labelled digit on top (20-32 px for 64 px canvases, brightness 0.8-1).

    Args:
        glyphs: ``(m, 8, 8)`` digit images in [0, 1]; digits: ``(m,)`` their classes 0..9.
    Returns:
        images ``(count, 1, size, size)`` in [0, 1], labels ``(count,)`` int64.
    Raises:
        ValueError: a canvas under 32 px (the digit would not fit) or a negative ``clutter``.
    """
    if size < 32 or clutter < 0:
        raise ValueError(f"cluttered_canvases needs size >= 32 and clutter >= 0, got size {size}, clutter {clutter}")
    generator = torch.Generator().manual_seed(seed)
    canvas = backgrounds(count, size, generator)
    labels = torch.empty(count, dtype=torch.int64)
    halves = torch.ones(4, 8, 8)
    halves[0, :4], halves[1, 4:], halves[2, :, :4], halves[3, :, 4:] = 0, 0, 0, 0  # keep bottom, top, right, left
    for i in range(count):
        for _ in range(clutter):
            j, half = int(torch.randint(len(glyphs), (), generator=generator)), int(torch.randint(4, (), generator=generator))
            side = int(torch.randint(10, 21, (), generator=generator))
            _paste(canvas[i], glyphs[j] * halves[half], side, 0.45 + 0.25 * float(torch.rand((), generator=generator)), generator)
        j = int(torch.randint(len(glyphs), (), generator=generator))
        side = int(torch.randint(size * 5 // 16, size // 2 + 1, (), generator=generator))
        _paste(canvas[i], glyphs[j], side, 0.8 + 0.2 * float(torch.rand((), generator=generator)), generator)
        labels[i] = digits[j]
    return canvas[:, None], labels


def cluttered_digits(seed: int, train: int = 4000, test: int = 1000, size: int = SIZE, clutter: int = 6):
    """``(train_x, train_y, test_x, test_y)``: ``x`` ``(n, 1, size, size)`` normalized by the training
    canvases' mean and std, ``y`` ``(n,)``; training and test canvases from disjoint glyphs."""
    (train_glyphs, train_digits), (test_glyphs, test_digits) = digit_glyphs(seed)
    train_x, train_y = cluttered_canvases(train_glyphs, train_digits, train, 2 * seed, size, clutter)
    test_x, test_y = cluttered_canvases(test_glyphs, test_digits, test, 2 * seed + 1, size, clutter)
    mean, std = train_x.mean(), train_x.std()
    return (train_x - mean) / std, train_y, (test_x - mean) / std, test_y


def deit_tiny_patch8(seed: int, size: int = SIZE):
    """A ViT of DeiT-Tiny's shape (width 192, 12 blocks, 3 heads) with 8-pixel patches on ``size`` px
    grey images, 10 classes, random weights from ``seed``."""
    import timm

    torch.manual_seed(seed)
    return timm.create_model("deit_tiny_patch16_224", img_size=size, patch_size=8, in_chans=1, num_classes=10)


def dense_run(seed: int, train: int = 4000, test: int = 1000, epochs: int = 30, progress=None) -> dict:
    """Train :func:`deit_tiny_patch8` from scratch on :func:`cluttered_digits` (the digits benchmark's
    :func:`~cait.benchmarks.accuracy.train_dense`: AdamW, one-cycle to 1e-3, batch 64) and score it on
    the held-out canvases. Returns ``top1`` (fraction), ``train_top1``, ``seconds`` of training and the
    settings; ``progress``: a tqdm-like bar advanced once per epoch."""
    import time

    from ..train.finetune import evaluate
    from .accuracy import train_dense

    train_x, train_y, test_x, test_y = cluttered_digits(seed, train, test)
    start = time.perf_counter()
    model = train_dense(deit_tiny_patch8(seed), train_x, train_y, epochs, seed, progress)
    seconds = time.perf_counter() - start
    top1 = evaluate(model, list(zip(test_x.split(100), test_y.split(100))))["top1"]
    train_top1 = evaluate(model, list(zip(train_x.split(100), train_y.split(100))))["top1"]
    return {"seed": seed, "train": train, "test": test, "epochs": epochs, "top1": top1, "train_top1": train_top1, "seconds": seconds}
