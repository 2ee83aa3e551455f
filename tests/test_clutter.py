"""The cluttered-digits proxy: a function of its seed, classes from the pasted digit, held-out glyphs."""

import pytest
import torch

from cait.benchmarks.clutter import cluttered_canvases, cluttered_digits, deit_tiny_patch8


def test_cluttered_digits_are_deterministic_per_seed():
    first, again, other = (cluttered_digits(seed, train=12, test=6) for seed in (3, 3, 4))
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], other[0])
    train_x, train_y, test_x, test_y = first
    assert train_x.shape == (12, 1, 64, 64) and test_x.shape == (6, 1, 64, 64) and train_y.dtype == torch.int64
    assert train_x.mean().abs() < 1e-5 and abs(float(train_x.std()) - 1) < 1e-5  # normalized by the training canvases
    assert 0 <= int(train_y.min()) and int(train_y.max()) <= 9


def test_the_label_is_the_pasted_digit_and_clutter_is_dimmer():
    glyph = torch.zeros(1, 8, 8)
    glyph[0, 2:6, 3:5] = 1.0  # a bar: where it lands, the canvas is at the digit's brightness (0.8-1)
    images, labels = cluttered_canvases(glyph, torch.tensor([7]), count=4, seed=0, clutter=0)
    assert labels.tolist() == [7] * 4 and (images.amax((1, 2, 3)) >= 0.8).all()
    _, no_digit_labels = cluttered_canvases(glyph, torch.tensor([7]), count=1, seed=0, clutter=3)
    assert no_digit_labels.tolist() == [7]
    with pytest.raises(ValueError, match="size >= 32"):
        cluttered_canvases(glyph, torch.tensor([7]), count=1, seed=0, size=16)


def test_the_proxy_vit_has_deit_tiny_shape_with_64_patches():
    model = deit_tiny_patch8(0)
    assert (model.embed_dim, len(model.blocks), model.blocks[0].attn.num_heads, model.patch_embed.num_patches) == (192, 12, 3, 64)
    assert model(torch.randn(2, 1, 64, 64)).shape == (2, 10)
