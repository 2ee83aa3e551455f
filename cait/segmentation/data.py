"""Segmentation data: a folder of images and label masks, and digit canvases made on the spot.

:class:`SegmentationFolder` reads ``ROOT/SPLIT/images/NAME.(png|jpg|...)`` with
``ROOT/SPLIT/masks/NAME.png`` beside it: a single-channel PNG holding the class index of every pixel
(255: ignored, as ADE20k's "other").

:func:`digit_canvases` needs no download: scikit-learn's 8x8 digits scaled to random sizes and
pasted at random places on striped, noisy backgrounds, labelled per pixel (0 background, ``1 + d``
for digit ``d``): a small dense-prediction task where where-things-are matters.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F

from .model import IGNORE

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm")
MASK_IGNORE = 255
DIGIT_CLASSES = 11  # background + 10 digits


class SegmentationFolder(torch.utils.data.Dataset):
    """``(image (C, H, W) normalized, labels (H, W) int64)`` pairs resized to ``input_size (C, H, W)``
    (bilinear for images, nearest for masks); mask value 255 becomes ``IGNORE``. ``training``:
    random horizontal flips. ``mean``/``std``: per-channel normalization (timm's data config)."""

    def __init__(self, root: str, split: str, input_size, mean, std, training: bool = False):
        self.images, self.masks = os.path.join(root, split, "images"), os.path.join(root, split, "masks")
        for folder in (self.images, self.masks):
            if not os.path.isdir(folder):
                raise ValueError(f"{root!r} has no {os.path.relpath(folder, root)}/ folder (expected SPLIT/images and SPLIT/masks)")
        self.names = sorted(n for n in os.listdir(self.images) if n.lower().endswith(IMAGE_SUFFIXES))
        if not self.names:
            raise ValueError(f"{self.images!r} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        missing = [n for n in self.names if not os.path.isfile(self._mask_path(n))]
        if missing:
            raise ValueError(f"{len(missing)} images have no mask in {self.masks!r}, e.g. {os.path.splitext(missing[0])[0]}.png")
        self.channels, self.size = input_size[0], tuple(input_size[1:])
        self.mean, self.std = torch.tensor(mean).view(-1, 1, 1), torch.tensor(std).view(-1, 1, 1)
        self.training = training

    def _mask_path(self, name: str) -> str:
        return os.path.join(self.masks, os.path.splitext(name)[0] + ".png")

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int):
        import numpy as np
        from PIL import Image

        name = self.names[index]
        image = Image.open(os.path.join(self.images, name)).convert("RGB" if self.channels == 3 else "L")
        mask = Image.open(self._mask_path(name))
        if mask.mode not in ("L", "P", "I", "I;16"):
            raise ValueError(f"mask {self._mask_path(name)} must be single-channel (class index per pixel), got mode {mask.mode}")
        pixels = torch.from_numpy(np.array(image, dtype=np.float32) / 255).reshape(image.height, image.width, -1).permute(2, 0, 1)
        labels = torch.from_numpy(np.array(mask, dtype=np.int64))
        pixels = F.interpolate(pixels[None], size=self.size, mode="bilinear", align_corners=False)[0]
        labels = F.interpolate(labels[None, None].float(), size=self.size, mode="nearest")[0, 0].long()
        labels[labels == MASK_IGNORE] = IGNORE
        if self.training and torch.rand(()) < 0.5:
            pixels, labels = pixels.flip(-1), labels.flip(-1)
        return (pixels - self.mean) / self.std, labels


def backgrounds(count: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """``(count, size, size)`` grey textures in about [0, 0.65]: two random stripe patterns and noise."""
    coords = torch.arange(size, dtype=torch.float32)
    y, x = coords[:, None], coords[None, :]
    canvas = torch.full((count, size, size), 0.3)
    for amplitude in (0.15, 0.08):
        angle = torch.rand(count, 1, 1, generator=generator) * math.pi
        frequency = 0.15 + 0.6 * torch.rand(count, 1, 1, generator=generator)
        phase = 2 * math.pi * torch.rand(count, 1, 1, generator=generator)
        canvas += amplitude * torch.sin(frequency * (x * angle.cos() + y * angle.sin()) + phase)
    canvas += 0.05 * torch.randn(count, size, size, generator=generator)
    return canvas.clamp(0, 1)


def digit_canvases(glyphs: torch.Tensor, digits: torch.Tensor, count: int, size: int, seed: int, cells: int = 2):
    """``count`` canvases of ``size x size`` px: a ``cells x cells`` layout whose every cell holds a
    digit with probability 3/4, scaled to 2/3 to all of the cell's side and shifted at random inside it.

    Args:
        glyphs: ``(m, 8, 8)`` digit images in [0, 1]; digits: ``(m,)`` their classes 0..9.
    Returns:
        images ``(count, 1, size, size)`` in [0, 1], labels ``(count, size, size)`` int64 (0: background).
    """
    generator = torch.Generator().manual_seed(seed)
    canvas = backgrounds(count, size, generator)
    labels = torch.zeros(count, size, size, dtype=torch.int64)
    cell = size // cells
    for i in range(count):
        for row in range(cells):
            for col in range(cells):
                if float(torch.rand((), generator=generator)) >= 0.75:
                    continue
                j = int(torch.randint(len(glyphs), (), generator=generator))
                side = int(torch.randint(2 * cell // 3, cell + 1, (), generator=generator))
                glyph = F.interpolate(glyphs[j][None, None], size=(side, side), mode="bilinear", align_corners=False)[0, 0].clamp(0, 1)
                top = row * cell + int(torch.randint(cell - side + 1, (), generator=generator))
                left = col * cell + int(torch.randint(cell - side + 1, (), generator=generator))
                brightness = 0.75 + 0.25 * float(torch.rand((), generator=generator))
                window = canvas[i, top : top + side, left : left + side]
                canvas[i, top : top + side, left : left + side] = window * (1 - glyph) + brightness * glyph
                labels[i, top : top + side, left : left + side][glyph > 0.3] = int(digits[j]) + 1
    return canvas[:, None], labels


def digit_glyphs(seed: int, test_share: float = 0.28):
    """scikit-learn's digits split by ``seed`` into disjoint train and test glyphs:
    ``((train_glyphs (m, 8, 8), train_digits (m,)), (test_glyphs, test_digits))``, glyphs in [0, 1]."""
    from sklearn.datasets import load_digits

    data = load_digits()
    glyphs, digits = torch.tensor(data.images, dtype=torch.float32) / 16, torch.tensor(data.target)
    order = torch.randperm(len(digits), generator=torch.Generator().manual_seed(seed))
    cut = round(len(digits) * (1 - test_share))
    return (glyphs[order[:cut]], digits[order[:cut]]), (glyphs[order[cut:]], digits[order[cut:]])
