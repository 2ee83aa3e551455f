"""cait.compress on timm ViTs: exact without merging, lossless merging on tile-constant inputs, timm's interface."""
import copy

import pytest
import timm
import torch

import cait
from conftest import rel_err
from models import SUPPORTED, build, images_for


@pytest.mark.parametrize("model_id", SUPPORTED)
def test_without_merging_equals_timm(model_id):
    model = build(model_id)
    images = images_for(model, 2)
    fast = cait.compress(model)
    with torch.no_grad():
        assert rel_err(fast(images), model(images)) < 1e-5
        assert rel_err(fast.forward_features(images), model.forward_features(images)) < 1e-5


def tile_constant(model, images, tile):
    """Make every token of a ``tile x tile`` tile identical at the input: copy the tile's first
    patch over its cells, and its position embedding too (odd grids: border tiles are smaller)."""
    H, W = model.patch_embed.grid_size
    p = model.patch_embed.patch_size[0]
    rows, cols = (torch.arange(H) // tile) * tile, (torch.arange(W) // tile) * tile
    with torch.no_grad():
        spatial = model.pos_embed[:, -H * W :].view(H, W, -1)
        model.pos_embed[:, -H * W :] = spatial[rows][:, cols].reshape(1, H * W, -1)
    patches = images.unflatten(2, (H, p)).unflatten(4, (W, p))  # (B, 3, H, p, W, p)
    return patches[:, :, rows][:, :, :, :, cols].flatten(4, 5).flatten(2, 3)


@pytest.mark.parametrize("model_id", SUPPORTED)
@pytest.mark.parametrize("tile", [2, 4])
def test_merging_identical_neighbours_is_lossless(model_id, tile):
    """Tokens identical inside each tile stay identical through every block, so merging them with
    proportional attention and size-weighted pooling must change nothing: this checks the token
    state, proportional attention, pooling and unmerge together."""
    model = build(model_id)
    images = tile_constant(model, images_for(model, 2), tile)
    grid = model.patch_embed.grid_size
    limit = cait.ATME(r=0, block=tile).limit(grid)
    depth = len(model.blocks)
    schedule = [limit // depth] * depth
    schedule[0] += limit - sum(schedule)  # merge everything the tiling allows, most of it in block 0
    fast = cait.compress(model, merge=cait.ATME(r=schedule, block=tile))
    with torch.no_grad():
        state = fast.forward_tokens(images)
        assert state.x.shape[1] == model.num_prefix_tokens + grid[0] * grid[1] - limit
        assert rel_err(fast(images), model(images)) < 1e-4
        dense = model.forward_features(images)[:, model.num_prefix_tokens :]
        dense = dense.transpose(1, 2).reshape(2, -1, *grid)
        assert rel_err(fast.forward_dense(images), dense) < 1e-4


def test_forward_dense_and_head_shapes():
    model = build("registers_avg")
    fast = cait.compress(model, merge=cait.ATME(flops=0.7))
    images = images_for(model, 3)
    with torch.no_grad():
        state = fast.forward_tokens(images)
        assert fast.forward_dense(images).shape == (3, 192, 16, 16)
        assert fast.forward_head(state.x, size=state.size).shape == (3, 1000)
        assert fast.forward_head(state.x, pre_logits=True, size=state.size).shape == (3, 192)
        with pytest.raises(ValueError, match=r"forward_tokens\(x\) then model.forward_head\(state.x, size=state.size\)"):
            fast.forward_head(fast.forward_features(images))  # timm's idiom: the merged tokens lost their sizes


def test_original_model_is_untouched_and_training_flows():
    model = build("deit_distilled").train()
    before = copy.deepcopy(model.state_dict())
    fast = cait.compress(model, merge=cait.ATME(r=10))
    assert fast.training and all(type(b).__name__ == "Block" for b in model.blocks)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    images = images_for(model, 2)
    fast(images).sum().backward()
    assert fast.vit.patch_embed.proj.weight.grad.abs().sum() > 0
    assert model.patch_embed.proj.weight.grad is None


def test_bad_calls_are_refused():
    model = build("deit_tiny")
    with pytest.raises(TypeError, match="cait.CDCP"):
        cait.compress(model, prune=0.5)
    with pytest.raises(TypeError, match="cait.ATME"):
        cait.compress(model, merge=0.5)
    fast = cait.compress(model, merge=cait.ATME(r=4))
    with pytest.raises(ValueError, match=r"images must have shape \(B, 3, 224, 224\), .* dynamic_img_size=True"):
        fast(torch.randn(1, 3, 200, 224))
    with pytest.raises(ValueError, match=r"images must have shape \(B, 3, H, W\)"):
        fast(torch.randn(1, 1, 224, 224))
    with pytest.raises(NotImplementedError, match="attention masks"):
        fast(torch.randn(1, 3, 224, 224), attn_mask=torch.ones(1, 1, 197, 197))


UNSUPPORTED = {  # timm name, overrides, reason in the message
    "swin": ("swin_tiny_patch4_window7_224", {}, "timm's SwinTransformer .* is not supported yet"),
    "hybrid": ("vit_base_r50_s16_224", dict(depth=1), "hybrid CNN stems"),
    "naflex": ("vit_base_patch16_siglip_224", dict(depth=1, use_naflex=True), "timm's NaFlexVit .* is not supported yet"),
    "res_post": ("vit_base_patch16_rpn_224", dict(depth=1), "only timm's pre-norm Block"),
    "patch_drop": ("deit_tiny_patch16_224", dict(patch_drop_rate=0.2), "patch dropout"),
    "attn_drop": ("deit_tiny_patch16_224", dict(attn_drop_rate=0.1), "attention dropout"),
}


@pytest.mark.parametrize("model_id", UNSUPPORTED)
def test_unsupported_models_are_refused_by_name(model_id):
    name, overrides, reason = UNSUPPORTED[model_id]
    if not timm.is_model(name) or (model_id == "naflex" and not hasattr(timm.models, "naflexvit")):
        pytest.skip(f"timm {timm.__version__} has no {model_id}")
    with pytest.raises(NotImplementedError, match=reason):
        cait.compress(timm.create_model(name, **overrides), merge=cait.ATME(r=1))


def test_not_a_vit_is_refused():
    with pytest.raises(NotImplementedError, match=r"Linear \(torch.nn.modules.linear\) is not supported"):
        cait.compress(torch.nn.Linear(3, 3))
    with pytest.raises(TypeError, match="torch modules"):
        cait.compress("deit_tiny_patch16_224")


def test_models_of_other_libraries_are_refused_naming_the_library():
    import torchvision

    with pytest.raises(NotImplementedError, match="comes from torchvision, not timm"):
        cait.compress(torchvision.models.vit_b_16())
    # Hugging Face classes go to cait.hf (tests/test_hf.py), which refuses the ones it does not map by name
    hugging_face = type("SwinModel", (torch.nn.Module,), {"__module__": "transformers.models.swin.modeling_swin"})
    with pytest.raises(NotImplementedError, match="Hugging Face SwinModel is not supported: cait takes ViTModel"):
        cait.compress(hugging_face())


def test_cuda_graph_refuses_a_cpu_input():
    fast = cait.compress(build("deit_distilled"))
    with pytest.raises(ValueError, match="needs an example input on a CUDA device"):
        cait.cuda_graph(fast, torch.randn(1, *fast.input_size))


def test_an_older_timm_refuses_the_newer_families_by_name():
    """Where timm predates AttentionRope / masked attention pooling (before 1.0.16), Eva models and
    attention pooling are refused with the reason; on newer timm they compress (tests/test_rope.py)."""
    from models import too_old

    if not too_old("siglip_map"):
        pytest.skip(f"timm {timm.__version__} has both")
    siglip = timm.create_model("vit_base_patch16_siglip_224", img_size=96, embed_dim=96, num_heads=3, depth=2)
    with pytest.raises(NotImplementedError, match="takes attn_mask"):
        cait.compress(siglip)
    with pytest.raises(NotImplementedError, match="needs timm.layers.AttentionRope"):
        cait.compress(timm.create_model("eva02_tiny_patch14_224", img_size=70, depth=2))
