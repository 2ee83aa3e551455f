"""A compressed model at the extremes, on every backend: massive activations in fp16/bf16 (against timm
in the same dtype), an empty batch, one image, a 1x1 grid, NaN images, channels-last and strided
images, a large batch of small images. It answers what timm answers, or refuses with a clear error."""

import pytest
import timm
import torch

import cait
from cait.segmentation import patch_features
from cait_kernels import backend
from conftest import INTERPRET, rel_err
from models import build, images_for
from test_model import tile_constant

MASSIVE = [400.0, 4000.0, 30000.0, 60000.0]  # one residual channel; 60000 is just under the fp16 maximum
TOLERANCE = {torch.float16: 2e-3, torch.bfloat16: 1e-2}
BACKENDS = ["auto", "reference", "triton"]  # auto on a CPU: the C++ ATME step and the reference attention


def massive_avg_pool_model(massive: float, img_size: int = 224) -> torch.nn.Module:
    """The failing case of issue 14: average pooling without a class token, and one residual channel
    carrying ``massive`` in every token (as real ViTs do), so fp16 sums of ``size * x`` overflow."""
    model = timm.create_model("deit_tiny_patch16_224", class_token=False, global_pool="avg", depth=2, img_size=img_size).eval()
    with torch.no_grad():
        model.head.weight.normal_(0, 0.05)
        model.pos_embed[..., 7] += massive
    return model


@pytest.mark.parametrize("massive", MASSIVE)
@pytest.mark.parametrize("dtype", list(TOLERANCE))
def test_avg_pooling_of_merged_tokens_with_a_massive_channel(massive, dtype):
    """Tokens identical inside each 2x2 tile merge losslessly (one token per tile), so the compressed
    model must answer what timm answers in the same dtype: finite, and as close to float64 as timm."""
    model = massive_avg_pool_model(massive)
    images = tile_constant(model, images_for(model, 2), 2)
    limit = cait.ATME(r=0).limit(model.patch_embed.grid_size)
    fast = cait.compress(model, merge=cait.ATME(r=[limit, 0]))
    with torch.no_grad():
        exact = model.double()(images.double())
        expected = model.to(dtype)(images.to(dtype))
        out = fast.to(dtype)(images.to(dtype))
        plain = cait.compress(model)(images.to(dtype))  # nothing merged: timm's own head
    assert expected.isfinite().all() and rel_err(expected, exact) < TOLERANCE[dtype]
    assert out.dtype == dtype and out.isfinite().all()
    assert rel_err(out, expected) < TOLERANCE[dtype] and rel_err(out, exact) < TOLERANCE[dtype]
    assert torch.equal(plain, expected)


@pytest.mark.parametrize("massive", [4000.0, 60000.0])
@pytest.mark.parametrize("dtype", [torch.float16] if INTERPRET else list(TOLERANCE))  # the interpreter mishandles bf16
def test_avg_pooling_with_a_massive_channel_on_the_triton_kernels(massive, dtype, kernel_device):
    """The same on the Triton kernels (128 px: 64 cells, enough to overflow an fp16 sum at 4000)."""
    model = massive_avg_pool_model(massive, img_size=128)
    images = tile_constant(model, images_for(model, 2), 2)
    limit = cait.ATME(r=0).limit(model.patch_embed.grid_size)
    fast = cait.compress(model, merge=cait.ATME(r=[limit, 0])).to(kernel_device, dtype)
    with torch.no_grad():
        expected = model.to(kernel_device, dtype)(images.to(kernel_device, dtype))
        with backend("triton"):
            out = fast(images.to(kernel_device, dtype))
    assert expected.isfinite().all() and out.isfinite().all()
    assert rel_err(out, expected) < TOLERANCE[dtype]


@pytest.mark.parametrize("massive", [400.0, 60000.0])
def test_avgmax_pooling_in_fp16_with_a_massive_channel(massive):
    """avg + max pooling sums two values near the channel's size: computed in fp32, rounded once."""
    model = timm.create_model("deit_tiny_patch16_224", global_pool="avgmax", depth=2).eval()
    with torch.no_grad():
        model.pos_embed[..., 7] += massive
    images = images_for(model, 2)
    fast = cait.compress(model, merge=cait.ATME(r=[40, 20]))
    with torch.no_grad():
        reference = fast(images)
        out = fast.half()(images.half())
    assert out.isfinite().all()
    assert rel_err(out, reference) < 1e-2  # fp16 merges decide on fp16 metrics: a few owners may differ


@pytest.mark.parametrize("dtype", list(TOLERANCE))
def test_dense_features_with_a_massive_channel(dtype):
    """Segmentation features (unmerge onto the grid) carry the massive channel through exactly as timm."""
    model = massive_avg_pool_model(60000.0)
    fast = cait.compress(model, merge=cait.ATME(r=[30, 20]))
    images = images_for(model, 2).to(dtype)
    with torch.no_grad():
        dense = patch_features(model.to(dtype), images)
        merged = patch_features(fast.to(dtype), images)
        plain = patch_features(cait.compress(model), images)
    assert merged.shape == dense.shape and merged.isfinite().all()
    assert torch.equal(plain, dense)


def small(name: str = "deit_tiny_patch16_224", **overrides) -> torch.nn.Module:
    """A 4x4-grid, 2-block timm model (64 px images): the Triton interpreter runs it in seconds."""
    return timm.create_model(name, **dict(dict(img_size=64, depth=2), **overrides)).eval()


def one_per_backend(fast, name, images):
    with torch.no_grad(), backend(name):
        return fast(images), fast.forward_features(images), fast.forward_dense(images)


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("model_id", ["deit_tiny", "registers_avg", "odd_grid"])
def test_empty_batch(name, model_id, kernel_device):
    """Issue 14's second failure: a batch of 0 images crashed the process on the C++ step."""
    model = build(model_id)
    fast = cait.compress(model, merge=cait.ATME(flops=0.7), prune=cait.CDCP(qk=0.5, v=0.75, mlp=0.75))
    device = kernel_device if name == "triton" else torch.device("cpu")
    images = images_for(model, 0)
    with torch.no_grad():
        expected = model(images)
    logits, tokens, dense = (t.cpu() for t in one_per_backend(fast.to(device), name, images.to(device)))
    assert logits.shape == expected.shape == (0, model.num_classes)
    assert tokens.shape[0] == 0 and tokens.shape[2] == model.embed_dim
    assert dense.shape == (0, model.embed_dim, *model.patch_embed.grid_size)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, inside the Triton interpreter, on the NaN image
@pytest.mark.parametrize("name", BACKENDS)
def test_an_image_alone_or_in_a_batch_and_a_nan_image(name, kernel_device):
    """Images do not affect each other: one alone equals itself inside a batch, and a NaN image spoils
    only its own row (timm's answer too)."""
    model = small("deit_tiny_distilled_patch16_224")
    fast = cait.compress(model, merge=cait.ATME(flops=0.6))
    device = kernel_device if name == "triton" else torch.device("cpu")
    fast = fast.to(device)
    images = images_for(model, 3).to(device)
    spoiled = images.clone()
    spoiled[1, :, 5:9, 40:50] = float("nan")
    with torch.no_grad(), backend(name):
        batch, alone, with_nan = fast(images), fast(images[2:]), fast(spoiled)
        timm_nan = model.to(device)(spoiled)
    assert rel_err(alone, batch[2:]) < 1e-5
    assert torch.equal(with_nan.isfinite().all(1), timm_nan.isfinite().all(1))
    assert torch.equal(with_nan.isfinite().all(1), torch.tensor([True, False, True], device=device))
    assert rel_err(with_nan[[0, 2]], batch[[0, 2]]) < 1e-5


def test_one_cell_grid():
    """A 1x1 patch grid holds one token: nothing to merge (r = 0 is timm), any merge is refused up front."""
    model = small(img_size=16)
    images = images_for(model, 3)
    fast = cait.compress(model, merge=cait.ATME(r=0))
    with torch.no_grad():
        assert rel_err(fast(images), model(images)) < 1e-6  # the CPU reference attention is not SDPA: rounding only
    with pytest.raises(ValueError, match="allows at most 0"):
        cait.compress(model, merge=cait.ATME(r=1))
    with pytest.raises(ValueError, match="out of reach"):
        cait.compress(model, merge=cait.ATME(flops=0.7))


@pytest.mark.parametrize("name", BACKENDS)
def test_channels_last_and_strided_images(name, kernel_device):
    model = small(img_size=80)  # 5x5 grid: border tiles
    fast = cait.compress(model, merge=cait.ATME(flops=0.6), prune=cait.CDCP(qk=0.5, v=0.75, mlp=0.75))
    device = kernel_device if name == "triton" else torch.device("cpu")
    fast = fast.to(device)
    images = images_for(model, 4).to(device)
    with torch.no_grad(), backend(name):
        plain = fast(images)
        last = fast(images.contiguous(memory_format=torch.channels_last))
        strided = fast(torch.stack([images, images], 2).flatten(1, 2)[:, ::2])  # every other channel of a wider tensor
    assert rel_err(last, plain) < 1e-5 and rel_err(strided, plain) < 1e-5


@pytest.mark.parametrize("name, batch", [("auto", 512), ("triton", 64 if INTERPRET else 512)])  # the interpreter is slow
def test_large_batch_of_small_images(name, batch, kernel_device):
    """Many images of 2x2 patches, merged down to one token each: the kernels equal the reference."""
    model = small(img_size=32)
    fast = cait.compress(model, merge=cait.ATME(r=[3, 0]))
    device = kernel_device if name == "triton" else torch.device("cpu")
    fast = fast.to(device)
    images = torch.randn(batch, 3, 32, 32, device=device)
    with torch.no_grad():
        with backend("reference"):
            expected = fast.forward_tokens(images)
        with backend(name):
            out = fast.forward_tokens(images)
    assert out.x.shape == (batch, 2, 192) and torch.equal(out.owner, expected.owner)
    assert rel_err(out.x, expected.x) < 1e-5
