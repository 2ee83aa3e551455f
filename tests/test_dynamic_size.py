"""Any input size: one compressed model, a schedule per grid, timm's position-embedding interpolation."""
import copy

import pytest
import timm
import torch

import cait
from conftest import rel_err
from models import build

SIZES = {  # model id: (native size from the model, another size)
    "deit": ("deit_tiny_patch16_224", dict(depth=4), (160, 208)),
    "dinov3": ("vit_small_patch16_dinov3", dict(img_size=128, embed_dim=96, num_heads=2, depth=3, num_classes=10), (96, 160)),
    "siglip_map": ("vit_base_patch16_siglip_224", dict(img_size=128, embed_dim=96, num_heads=3, depth=3, num_classes=10), (160, 112)),
    "eva02_rope": ("eva02_tiny_patch14_224", dict(img_size=112, embed_dim=96, num_heads=2, depth=3, num_classes=10), (140, 84)),
}


def _model(model_id):
    name, overrides, other = SIZES[model_id]
    model = timm.create_model(name, **overrides).eval()
    with torch.no_grad():
        model.head.weight.normal_(0, 0.05)
    return model, other


def _at_size(model, size):
    """The timm model rebuilt for ``size`` (timm's ``set_input_size``: position embedding resampled)."""
    resized = copy.deepcopy(model)
    resized.set_input_size(img_size=size)
    return resized


@pytest.mark.parametrize("model_id", SIZES)
def test_one_model_two_sizes_flops_and_outputs(model_id):
    """At each size the FLOPs ratio meets the target and the outputs equal a model compressed at that size."""
    model, other = _model(model_id)
    fast = cait.compress(model, merge=cait.ATME(flops=0.6), dynamic_img_size=True)
    for size in (tuple(model.patch_embed.img_size), other):
        dense = _at_size(model, size)
        images = torch.randn(2, 3, *size)
        ratio = cait.flops(fast, (3, *size)) / cait.flops(dense, (3, *size))
        assert abs(ratio - 0.6) < 0.01
        direct = cait.compress(dense, merge=cait.ATME(flops=0.6))
        with torch.no_grad():
            assert rel_err(fast(images), direct(images)) < 1e-5
            dense_map = fast.forward_dense(images)
        patch = model.patch_embed.patch_size
        assert dense_map.shape == (2, model.embed_dim, size[0] // patch[0], size[1] // patch[1])
        grid = fast.grid_of(images)
        assert fast.schedule_for(grid) == direct.schedule and grid == direct.grid
    assert len(fast.schedules) == 2


@pytest.mark.parametrize("model_id", SIZES)
def test_without_merging_equals_timm_at_another_size(model_id):
    model, other = _model(model_id)
    fast = cait.compress(model, dynamic_img_size=True)
    dense = _at_size(model, other)
    images = torch.randn(2, 3, *other)
    with torch.no_grad():
        assert rel_err(fast.forward_features(images), dense.forward_features(images)) < 1e-6
        assert rel_err(fast(images), dense(images)) < 1e-6


def test_dynamic_timm_model_takes_every_size_without_asking():
    model = build("dinov3")  # built with dynamic_img_size=True by timm
    fast = cait.compress(model, merge=cait.ATME(flops=0.7))
    assert fast.dynamic_img_size
    for size in ((64, 80), (96, 64), (80, 48)):
        images = torch.randn(1, 3, *size)
        with torch.no_grad():
            assert rel_err(cait.compress(model)(images), model(images)) < 1e-6
            assert fast(images).shape == model(images).shape
    reach = r"ATME flops=0.7 is out of reach: merging gets this model \(a 3x3 grid in 2x2 tiles\) down to .* at most; use block=4, "
    with pytest.raises(ValueError, match=reach + "give larger images, or ask merging for less and take the rest from CDCP pruning"):
        fast(torch.randn(1, 3, 48, 48))  # a 3x3 grid has too few cells to merge


def test_counts_scale_to_the_grid_or_are_refused():
    model, _ = _model("deit")
    fast = cait.compress(model, merge=cait.ATME(r=[20, 10, 10, 0]), dynamic_img_size=True)
    with torch.no_grad():
        state = fast.forward_tokens(torch.randn(1, 3, 112, 112))  # 7x7 grid: a quarter of the cells
    assert state.schedule == fast.schedule_for((7, 7)) == (5, 3, 2, 0)  # cumulative 40 -> 10: 5, 7.5 -> 8, 10
    assert state.x.shape[1] == 1 + 49 - 10 and fast.schedule == (20, 10, 10, 0)  # the model's own grid keeps its counts
    full = cait.compress(model, merge=cait.ATME(r=[147, 0, 0, 0]), dynamic_img_size=True)  # all a 14x14 grid allows
    with pytest.raises(ValueError, match=r"scale to 127 tokens on a 13x13 grid, which allows at most 120 .* ATME\(flops=...\)"):
        full(torch.randn(1, 3, 208, 208))


def test_sizes_that_do_not_split_into_patches_are_refused():
    model, _ = _model("deit")
    fast = cait.compress(model, merge=cait.ATME(flops=0.7), dynamic_img_size=True)
    with pytest.raises(ValueError, match=r"images of 200x224 px do not split into 16x16 px patches"):
        fast(torch.randn(1, 3, 200, 224))
    with pytest.raises(ValueError, match=r"shape \(B, 3, H, W\)"):
        fast(torch.randn(3, 224, 224))
    padded = cait.compress(timm.create_model("deit_tiny_patch16_224", depth=2, dynamic_img_size=True, dynamic_img_pad=True))
    with torch.no_grad():
        assert padded.forward_dense(torch.randn(1, 3, 200, 230)).shape == (1, 192, 13, 15)
    with pytest.raises(TypeError, match="dynamic_img_size must be True or False"):
        cait.compress(model, dynamic_img_size="yes")
