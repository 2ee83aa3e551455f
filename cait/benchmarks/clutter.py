"""A harder classification proxy without a download: one digit among clutter on a textured canvas.

The digits benchmark (:func:`cait.benchmarks.accuracy.digits`, 8x8 images, 65 tokens) is saturated:
every method scores 94-97%. Here each 64x64 grey canvas holds one of scikit-learn's digits (its side
half to three quarters of the canvas's, at a random place, bright) over a striped, noisy background
(:func:`cait.segmentation.data.backgrounds` at half its contrast) with ``clutter`` distractors: halves
of other digits (10-20 px, dimmer). The label is the whole digit's class. A ViT with 8-pixel patches
sees 64 tokens of which most are background or clutter: merging and pruning have something to throw
away, and something that must not be thrown away.

Training and test canvases use disjoint glyphs (:func:`cait.segmentation.data.digit_glyphs`); every
canvas is a function of the seed (and, for the fresh training canvases of later epochs, the epoch).
Smaller digits (20-32 px), six distractors and the full background contrast left DeiT-T at chance
for hundreds of steps: from scratch, a ViT first reads the image as a bag of patches, and strong
stripes drown a small digit's patches (see the README, "A harder proxy"). The proxy's ViT
(:func:`dense_run`) has DeiT-Tiny's width, heads and 8-pixel patches but 6 blocks: 1,280 steps reach
81-89% top-1 (3 seeds) in 8-14 minutes on 2 CPU cores, where 12 blocks were at 38% after 800 steps.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..segmentation.data import backgrounds, digit_glyphs

SIZE = 64
CLUTTER = 4  # half-digit distractors per canvas
DIGIT = (0.5, 0.75)  # the labelled digit's side, a fraction of the canvas's
TRAIN, EPOCHS = 2560, 32  # fresh canvases per epoch, epochs: 1,280 steps of 64
DEPTH = 6  # the proxy ViT's blocks: DeiT-Tiny's 12 stayed near 38% in 800 steps (README, "A harder proxy")
TEXTURE = 0.5  # background contrast, relative to cait.segmentation.data.backgrounds


def _paste(canvas: torch.Tensor, glyph: torch.Tensor, side: int, brightness: float, generator: torch.Generator) -> None:
    """Scale ``glyph`` (8, 8) in [0, 1] to ``side`` px and blend it at a random place of ``canvas`` (H, W), in place."""
    image = F.interpolate(glyph[None, None], size=(side, side), mode="bilinear", align_corners=False)[0, 0].clamp(0, 1)
    top = int(torch.randint(canvas.shape[0] - side + 1, (), generator=generator))
    left = int(torch.randint(canvas.shape[1] - side + 1, (), generator=generator))
    window = canvas[top : top + side, left : left + side]
    canvas[top : top + side, left : left + side] = window * (1 - image) + brightness * image


def cluttered_canvases(
    glyphs: torch.Tensor,
    digits: torch.Tensor,
    count: int,
    seed: int,
    size: int = SIZE,
    clutter: int = CLUTTER,
    digit: tuple[float, float] = DIGIT,
    texture: float = TEXTURE,
):
    """``count`` canvases: a background (:func:`cait.segmentation.data.backgrounds` with its contrast
    around 0.3 scaled by ``texture``), ``clutter`` half-digit distractors (a random half of a random
    glyph, 10-20 px, brightness 0.45-0.7), then the labelled digit on top (side a random fraction of
    ``size`` in ``digit``, brightness 0.8-1).

    Args:
        glyphs: ``(m, 8, 8)`` digit images in [0, 1]; digits: ``(m,)`` their classes 0..9.
    Returns:
        images ``(count, 1, size, size)`` in [0, 1], labels ``(count,)`` int64.
    Raises:
        ValueError: a canvas under 32 px, a negative ``clutter`` or ``texture``, or ``digit`` not
            ``0 < low <= high <= 1``.
    """
    if size < 32 or clutter < 0 or texture < 0 or not 0 < digit[0] <= digit[1] <= 1:
        raise ValueError(
            f"cluttered_canvases needs size >= 32, clutter >= 0, texture >= 0 and 0 < digit[0] <= digit[1] <= 1, "
            f"got size {size}, clutter {clutter}, texture {texture}, digit {digit}"
        )
    generator = torch.Generator().manual_seed(seed)
    canvas = 0.3 + texture * (backgrounds(count, size, generator) - 0.3)
    labels = torch.empty(count, dtype=torch.int64)
    halves = torch.ones(4, 8, 8)
    halves[0, :4], halves[1, 4:], halves[2, :, :4], halves[3, :, 4:] = 0, 0, 0, 0  # keep bottom, top, right, left
    smallest, largest = max(1, round(digit[0] * size)), round(digit[1] * size)
    for i in range(count):
        for _ in range(clutter):
            j, half = int(torch.randint(len(glyphs), (), generator=generator)), int(torch.randint(4, (), generator=generator))
            side = int(torch.randint(10, 21, (), generator=generator))
            _paste(canvas[i], glyphs[j] * halves[half], side, 0.45 + 0.25 * float(torch.rand((), generator=generator)), generator)
        j = int(torch.randint(len(glyphs), (), generator=generator))
        side = int(torch.randint(smallest, largest + 1, (), generator=generator))
        _paste(canvas[i], glyphs[j], side, 0.8 + 0.2 * float(torch.rand((), generator=generator)), generator)
        labels[i] = digits[j]
    return canvas[:, None], labels


def cluttered_digits(seed: int, train: int = 4000, test: int = 1000, size: int = SIZE, clutter: int = CLUTTER):
    """``(train_x, train_y, test_x, test_y, fresh)``: ``x`` ``(n, 1, size, size)`` normalized by the
    training canvases' mean and std, ``y`` ``(n,)``; training and test canvases from disjoint glyphs.
    ``fresh``: ``epoch -> (x, y)``, ``train`` new training canvases for that epoch, normalized alike
    (epoch 0: ``train_x, train_y``; generator seeds ``2 * seed + 10000 * epoch``, the test canvases'
    ``2 * seed + 1``), for :func:`~cait.benchmarks.accuracy.train_dense`'s ``resample``."""
    (train_glyphs, train_digits), (test_glyphs, test_digits) = digit_glyphs(seed)
    train_x, train_y = cluttered_canvases(train_glyphs, train_digits, train, 2 * seed, size, clutter)
    test_x, test_y = cluttered_canvases(test_glyphs, test_digits, test, 2 * seed + 1, size, clutter)
    mean, std = train_x.mean(), train_x.std()

    def fresh(epoch: int):
        x, y = cluttered_canvases(train_glyphs, train_digits, train, 2 * seed + 10_000 * epoch, size, clutter)
        return (x - mean) / std, y

    return (train_x - mean) / std, train_y, (test_x - mean) / std, test_y, fresh


def deit_tiny_patch8(seed: int, size: int = SIZE, depth: int = 12):
    """A ViT of DeiT-Tiny's shape (width 192, ``depth`` blocks: 12 as DeiT-Tiny, 3 heads) with 8-pixel
    patches on ``size`` px grey images, 10 classes, random weights from ``seed``."""
    import timm

    torch.manual_seed(seed)
    return timm.create_model("deit_tiny_patch16_224", img_size=size, patch_size=8, in_chans=1, num_classes=10, depth=depth)


def dense_run(seed: int, train: int = TRAIN, test: int = 1000, epochs: int = EPOCHS, depth: int = DEPTH, progress=None):
    """Train :func:`deit_tiny_patch8` (``depth`` blocks) from scratch on :func:`cluttered_digits`, ``train`` fresh canvases
    every epoch (the digits benchmark's :func:`~cait.benchmarks.accuracy.train_dense`: AdamW, one-cycle
    to 1e-3, batch 64), and score it on the held-out canvases. Returns ``(result, model)``: ``result``
    holds ``top1`` (fraction), ``train_top1`` (on the first epoch's canvases), ``seconds`` of training
    and the settings, ``model`` the trained ViT in eval mode; ``progress``: a tqdm-like bar advanced
    once per epoch."""
    import time

    from ..train.finetune import evaluate
    from .accuracy import train_dense

    train_x, train_y, test_x, test_y, fresh = cluttered_digits(seed, train, test)
    start = time.perf_counter()
    model = train_dense(deit_tiny_patch8(seed, depth=depth), train_x, train_y, epochs, seed, progress, resample=fresh)
    seconds = time.perf_counter() - start
    top1 = evaluate(model, list(zip(test_x.split(100), test_y.split(100))))["top1"]
    train_top1 = evaluate(model, list(zip(train_x.split(100), train_y.split(100))))["top1"]
    settings = {"seed": seed, "train": train, "test": test, "epochs": epochs, "steps": epochs * (train // 64), "depth": depth}
    task = {"size": SIZE, "clutter": CLUTTER, "digit": DIGIT, "texture": TEXTURE}
    return {**settings, **task, "top1": top1, "train_top1": train_top1, "seconds": seconds}, model


def one_shot(dense, seed: int, targets=(0.7, 0.5), train: int = TRAIN, test: int = 1000) -> list[dict]:
    """The trained ``dense`` model of :func:`dense_run` (same ``seed`` and ``train``, which fix the
    normalization) compressed without training by ATME (2x2 and 4x4 tiles), ToMe and EViT-style pruning
    (:func:`cait.baselines.compress_baseline`, ATME's per-block token counts) at each FLOPs ratio in
    ``targets``, and scored on the seed's test canvases: ``{"method", "target", "flops_ratio", "top1"}``
    rows, dense first."""
    from ..baselines import compress_baseline
    from ..cost import flops
    from ..model import compress
    from ..schedule import ATME
    from ..train.finetune import evaluate

    _, _, test_x, test_y, _ = cluttered_digits(seed, train, test)
    batches, base = list(zip(test_x.split(100), test_y.split(100))), flops(dense)
    models = [("dense", 1.0, dense)]
    for target in targets:
        models += [("ATME", target, compress(dense, merge=ATME(flops=target))),
                   ("ATME 4x4", target, compress(dense, merge=ATME(flops=target, block=4)))]  # fmt: skip
        models += [(method, target, compress_baseline(dense, method, target)) for method in ("tome", "evit")]
    return [
        {"method": name, "target": target, "flops_ratio": flops(model) / base, "top1": evaluate(model, batches)["top1"]}
        for name, target, model in models
    ]
