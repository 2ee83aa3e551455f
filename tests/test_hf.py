"""Hugging Face transformers vision models (cait.hf): every output field equals HF's own on the same
weights without merging or pruning, merging identical neighbours is lossless, CDCP equals HF with the
pruned channels zeroed, files round-trip bit for bit, and everything else is refused by name."""

import os
import subprocess
import sys

import pytest
import timm
import torch

import cait
from cait.support import Unsupported
from conftest import rel_err

transformers = pytest.importorskip("transformers")
from transformers.utils import logging as hf_logging  # noqa: E402

hf_logging.set_verbosity_error()

SMALL = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=32, patch_size=8)
CASES = {  # id -> (class, config)
    "vit": ("ViTModel", "ViTConfig", dict(intermediate_size=128, layer_norm_eps=1e-12)),
    "vit_nopool_relu": ("ViTModel", "ViTConfig", dict(intermediate_size=96, hidden_act="relu", qkv_bias=False)),
    "vit_cls": ("ViTForImageClassification", "ViTConfig", dict(intermediate_size=128, num_labels=5)),
    "vit_odd_nonsquare": ("ViTForImageClassification", "ViTConfig", dict(intermediate_size=128, num_labels=2, image_size=[40, 56])),
    "dinov2": ("Dinov2Model", "Dinov2Config", dict(layerscale_value=0.5, layer_norm_eps=1e-6)),
    "dinov2_cls_swiglu": ("Dinov2ForImageClassification", "Dinov2Config", dict(num_labels=3, use_swiglu_ffn=True)),
    "deit": ("DeiTModel", "DeiTConfig", dict(intermediate_size=128)),
    "deit_cls": ("DeiTForImageClassification", "DeiTConfig", dict(intermediate_size=128, num_labels=4)),
    "deit_teacher": ("DeiTForImageClassificationWithTeacher", "DeiTConfig", dict(intermediate_size=128, num_labels=4)),
    "dinov2_reg": ("Dinov2WithRegistersModel", "Dinov2WithRegistersConfig", dict(num_register_tokens=2)),
    "dinov2_reg_cls": ("Dinov2WithRegistersForImageClassification", "Dinov2WithRegistersConfig", dict(num_labels=3)),
    "dinov2_reg0_cls": ("Dinov2WithRegistersForImageClassification", "Dinov2WithRegistersConfig", dict(num_register_tokens=0)),
    "siglip": ("SiglipVisionModel", "SiglipVisionConfig", dict(intermediate_size=128)),
    "siglip_nohead": ("SiglipVisionModel", "SiglipVisionConfig", dict(intermediate_size=96, vision_use_head=False)),
    "dinov3": ("DINOv3ViTModel", "DINOv3ViTConfig", dict(intermediate_size=128, num_register_tokens=2, layerscale_value=0.5)),
    "dinov3_gated": ("DINOv3ViTModel", "DINOv3ViTConfig", dict(intermediate_size=96, use_gated_mlp=True, hidden_act="silu")),
    "clip": ("CLIPVisionModel", "CLIPVisionConfig", dict(intermediate_size=128)),
    "clip_proj": ("CLIPVisionModelWithProjection", "CLIPVisionConfig", dict(intermediate_size=128, projection_dim=16)),
}
CORE = ["vit", "vit_cls", "dinov2", "dinov2_cls_swiglu"]  # the classes every check runs on; the others get equality + merging


def hf_model(case: str, seed: int = 0):
    """A small HF model with random weights (every tensor perturbed: HF initializes biases, LayerScale and
    norms to constants that would hide a mapping mistake)."""
    class_name, config_name, extra = CASES[case]
    if case.startswith("dinov3") and not timm.is_model(cait.hf.DINOV3_NAME):  # the setup.py floor's timm (make compat)
        pytest.skip(f"timm {timm.__version__} has no {cait.hf.DINOV3_NAME} (cait refuses DINOv3 there by name)")
    torch.manual_seed(seed)
    kwargs = dict(SMALL, **extra)
    config = getattr(transformers, config_name)(**kwargs)
    args = (config, False) if case == "vit_nopool_relu" else (config,)  # ViTModel(config, add_pooling_layer=False)
    model = getattr(transformers, class_name)(*args).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def images(batch: int, size=32, seed: int = 1) -> torch.Tensor:
    """``(batch, 3, H, W)`` random images; ``size``: ``H`` (square) or ``(H, W)``, or a model (its config's size)."""
    if isinstance(size, torch.nn.Module):
        size = size.config.image_size
    height, width = (size, size) if isinstance(size, int) else size
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


def assert_outputs_close(ours, theirs, tol: float):
    assert type(ours) is type(theirs)
    assert list(ours.keys()) == list(theirs.keys())
    for key in theirs.keys():
        a, b = ours[key], theirs[key]
        if isinstance(b, tuple):
            assert len(a) == len(b), key
            pairs = list(zip(a, b))
        else:
            pairs = [(a, b)]
        for x, y in pairs:
            assert x.shape == y.shape and x.dtype == y.dtype, key
            assert y.numel() == 0 or rel_err(x, y) <= tol, (key, rel_err(x, y))


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("batch", [0, 1, 3])
def test_unmerged_unpruned_equals_hf(case, batch):
    model = hf_model(case)
    fast = cait.compress(model).eval()
    x = images(batch, model)

    def reference(**kwargs):  # HF cannot run an empty batch (its attention reshape fails): one image's fields, sliced
        if batch:
            return model(x, **kwargs)
        out = model(images(1, model), **kwargs)
        for key in out.keys():
            out[key] = tuple(t[:0] for t in out[key]) if isinstance(out[key], tuple) else out[key][:0]
        return out if kwargs.get("return_dict", True) else out.to_tuple()

    with torch.no_grad():
        for hidden in (False, True):
            assert_outputs_close(fast(x, output_hidden_states=hidden), reference(output_hidden_states=hidden), 1e-5)
        ours, theirs = fast(x, return_dict=False), reference(return_dict=True).to_tuple()
    assert isinstance(ours, tuple) and len(ours) == len(theirs)
    assert all(rel_err(a, b) < 1e-5 for a, b in zip(ours, theirs) if b.numel())
    # interpolate_pos_encoding at the model's own size changes nothing (HF: the embedding as it is)
    if case.startswith(("vit", "deit", "clip", "siglip")):
        with torch.no_grad():
            assert_outputs_close(fast(x, interpolate_pos_encoding=True), fast(x), 0)


@pytest.mark.parametrize("act", ["gelu_new", "gelu_fast", "gelu_accurate", "gelu_python"])
def test_hfs_other_gelu_spellings_equal_hf(act):
    """HF's tanh-approximate GELUs written out by hand (and its erf GELU in Python) are timm's GELUs up to rounding."""
    torch.manual_seed(0)
    model = transformers.ViTModel(transformers.ViTConfig(**SMALL, intermediate_size=128, hidden_act=act)).eval()
    x = images(2)
    with torch.no_grad():
        assert_outputs_close(cait.compress(model).eval()(x, output_hidden_states=True), model(x, output_hidden_states=True), 1e-5)


@pytest.mark.parametrize(
    "class_name, config_name, extra",
    [
        ("ViTModel", "ViTConfig", dict(hidden_size=56, intermediate_size=488)),
        ("SiglipVisionModel", "SiglipVisionConfig", dict(hidden_size=56, intermediate_size=488)),  # and its pooling head's MLP
        ("Dinov2Model", "Dinov2Config", dict(hidden_size=44, use_swiglu_ffn=True)),  # 120 SwiGLU units on width 44
        ("DINOv3ViTModel", "DINOv3ViTConfig", dict(hidden_size=56, intermediate_size=488)),
    ],
)
def test_mlp_widths_whose_ratio_rounds_down_equal_hf(class_name, config_name, extra, tmp_path):
    """488 / 56 * 56 is 487.99...: timm's int(width * mlp_ratio) needs the ratio one float step up."""
    torch.manual_seed(0)
    config = getattr(transformers, config_name)(**dict(SMALL, num_attention_heads=2, **extra))
    model = getattr(transformers, class_name)(config).eval()
    fast = cait.compress(model).eval()
    x = images(2)
    with torch.no_grad():
        assert_outputs_close(fast(x, output_hidden_states=True), model(x, output_hidden_states=True), 1e-5)
    cait.save(fast, tmp_path / "m.safetensors")
    with torch.no_grad():
        assert torch.equal(cait.load(tmp_path / "m.safetensors")(x).last_hidden_state, fast(x).last_hidden_state)


def tile_constant(model, x: torch.Tensor, tile: int = 2) -> torch.Tensor:
    """Copy each 2x2 tile's first patch over the tile, in the images and in the position embedding."""
    config = model.config
    p = config.patch_size
    H, W = (size // p for size in ((config.image_size,) * 2 if isinstance(config.image_size, int) else config.image_size))
    rows, cols = (torch.arange(H) // tile) * tile, (torch.arange(W) // tile) * tile
    inner = cait.hf.trunk(model)
    with torch.no_grad():
        emb = inner.embeddings
        pos = emb.position_embedding.weight[None] if hasattr(emb, "position_embedding") else emb.position_embeddings
        spatial = pos[:, -H * W :].view(H, W, -1).clone()
        pos[:, -H * W :] = spatial[rows][:, cols].reshape(1, H * W, -1)
    patches = x.unflatten(2, (H, p)).unflatten(4, (W, p))
    return patches[:, :, rows][:, :, :, :, cols].flatten(4, 5).flatten(2, 3)


@pytest.mark.parametrize("case", sorted(set(CASES) - {"dinov3", "dinov3_gated"}))  # RoPE: identical tokens at other positions differ
def test_merging_identical_neighbours_is_lossless(case):
    """Every output field (HF's shapes: merged tokens back on the grid) equals HF's on tile-constant input."""
    model = hf_model(case)
    x = tile_constant(model, images(2, model))
    fast = cait.compress(model, merge=cait.ATME(r=[8, 4, 0])).eval()  # 12 = all a 4x4 grid of 2x2 tiles allows
    grid = fast.backbone.grid
    with torch.no_grad():
        assert fast.backbone.forward_tokens(x).x.shape[1] == fast.backbone.num_prefix_tokens + grid[0] * grid[1] - 12
        assert_outputs_close(fast(x, output_hidden_states=True), model(x, output_hidden_states=True), 1e-4)


def zero_pruned_channels(model, fast):
    """In the HF ``model``: zero the q and k rows, the v rows and the MLP output columns that ``fast`` dropped."""
    inner = cait.hf.trunk(model)
    layers = cait.hf._layers(cait.hf.SUPPORTED[type(model).__name__], inner)
    with torch.no_grad():
        for layer, block in zip(layers, fast.backbone.blocks):
            attn = getattr(layer, "attention", None) or layer.self_attn
            heads, dim = block.attn.heads, attn.q_proj.out_features // block.attn.heads
            for proj, name in ((attn.q_proj, "qk"), (attn.k_proj, "qk"), (attn.v_proj, "v")):
                drop = torch.ones(heads, dim, dtype=torch.bool)
                for h in range(heads):
                    drop[h, torch.as_tensor(block.kept[name][h])] = False
                proj.weight[drop.flatten()] = 0
                if proj.bias is not None:
                    proj.bias[drop.flatten()] = 0
            out = layer.mlp.down_proj if hasattr(layer.mlp, "down_proj") else layer.mlp.fc2
            drop = torch.ones(out.in_features, dtype=torch.bool)
            drop[torch.as_tensor(block.kept["mlp"])] = False
            out.weight[:, drop] = 0


PRUNED = [*CORE, "deit_teacher", "clip_proj", "dinov2_reg_cls", "siglip", "vit_odd_nonsquare", "dinov3", "dinov3_gated"]


@pytest.mark.parametrize("case", PRUNED)
@pytest.mark.parametrize("method", ["weight", "activation"])
def test_pruned_equals_hf_with_zeroed_channels(case, method):
    model = hf_model(case)
    calibration = images(4, model, seed=5) if method == "activation" else None
    fast = cait.compress(model, prune=cait.CDCP(qk=0.5, v=0.5, mlp=0.5, align=4, method=method, calibration=calibration)).eval()
    assert all(block.kept["mlp"] is not None for block in fast.backbone.blocks)
    zero_pruned_channels(model, fast)
    x = images(3, model)
    with torch.no_grad():
        assert_outputs_close(fast(x, output_hidden_states=True), model(x, output_hidden_states=True), 1e-5)


@pytest.mark.parametrize("case", sorted(CASES))
def test_save_load_round_trip_is_bit_exact(case, tmp_path):
    model = hf_model(case)
    fast = cait.compress(model, merge=cait.ATME(flops=0.7), prune=cait.CDCP(qk=0.5, v=0.75, mlp=0.75, align=4)).eval()
    path = tmp_path / "m.safetensors"
    cait.save(fast, path)
    back = cait.load(path)
    assert type(back) is type(fast) and back.class_name == type(model).__name__
    assert back.config.to_dict() == fast.config.to_dict()
    assert back.config.cait["schedule"] == list(fast.backbone.schedule) and back.config.cait["merge_flops"] == 0.7
    x = images(3, model)
    with torch.no_grad():
        a, b = fast(x, output_hidden_states=True), back(x, output_hidden_states=True)
    for key in a.keys():
        for p, q in zip(*((v if isinstance(v, tuple) else (v,)) for v in (a[key], b[key]))):
            assert torch.equal(p, q), key
    assert set(back.state_dict()) == set(fast.state_dict())
    with pytest.raises(Unsupported, match=r"cait.save\(model, 'name.safetensors'\)"):  # HF's habit, pointed to cait.save
        fast.save_pretrained(tmp_path / "folder")


@pytest.mark.parametrize("case", ["vit", "dinov2_reg", "siglip"])
def test_forward_dense_is_last_hidden_state_on_the_grid(case):
    model = hf_model(case)
    fast = cait.compress(model, merge=cait.ATME(r=[4, 2, 0])).eval()
    x = images(2)
    with torch.no_grad():
        dense, last = fast.forward_dense(x), fast(x).last_hidden_state
    prefix = fast.backbone.num_prefix_tokens
    assert dense.shape == (2, 64, 4, 4)
    assert torch.equal(dense.flatten(2).transpose(1, 2), last[:, prefix:])


def test_config_records_the_compression_and_hf_settings():
    model = hf_model("vit_cls")
    fast = cait.compress(model, merge=cait.ATME(r=[2, 2, 0]), prune=cait.CDCP(mlp=0.5, align=8))
    config = fast.config
    assert type(config) is type(model.config) and config.num_labels == 5 and config.hidden_size == 64
    assert config.cait["schedule"] == [2, 2, 0] and config.cait["tile"] == 2
    assert [k["mlp"] for k in config.cait["kept"]] == [64, 64, 64] and config.cait["kept"][0]["qk"] is None
    assert not hasattr(model.config, "cait")  # the source's config is untouched


def test_labels_give_hfs_loss():
    model = hf_model("vit_cls")
    fast = cait.compress(model).eval()
    x, labels = images(3), torch.tensor([0, 4, 2])
    with torch.no_grad():
        ours, theirs = fast(x, labels=labels), model(x, labels=labels)
    assert abs(float(ours.loss) - float(theirs.loss)) < 1e-5
    with pytest.raises(TypeError, match="takes no labels"):
        cait.compress(hf_model("vit"))(x, labels=labels)


def test_positional_arguments_mean_what_they_mean_for_the_hf_class():
    """HF's forward takes ``labels`` second for a classifier, ``interpolate_pos_encoding`` third for ViTModel."""
    model = hf_model("vit_cls")
    fast = cait.compress(model).eval()
    x, labels = images(3), torch.tensor([0, 4, 2])
    with torch.no_grad():
        assert_outputs_close(fast(x, labels), model(x, labels), 1e-5)
        backbone = hf_model("vit")
        x = images(2, 36)  # HF's own grid at a size with a remainder: taken with interpolate_pos_encoding only
        assert_outputs_close(cait.compress(backbone).eval()(x, None, True), backbone(x, None, True), 1e-5)
    with pytest.raises(TypeError, match="multiple values for argument 'labels'"):
        fast(x, labels, labels=labels)
    with pytest.raises(TypeError, match=r"takes 4 positional arguments \(pixel_values, labels, interpolate_pos_encoding"):
        fast(x, labels, None, None, None)


def test_training_flows_through_the_wrapper():
    fast = cait.compress(hf_model("dinov2_cls_swiglu"), merge=cait.ATME(r=[4, 2, 0])).train()
    loss = fast(images(2), labels=torch.tensor([0, 2])).loss
    loss.backward()
    assert all(p.grad is not None for p in fast.parameters() if p.requires_grad)
    assert not fast.backbone.grad_checkpointing


@pytest.mark.parametrize("case", ["dinov2_cls_swiglu", "dinov3"])
def test_hfs_activation_checkpointing_carries_over(case):
    """HF's gradient (activation) checkpointing becomes cait's: the same loss and gradients, blocks recomputed."""
    model = hf_model(case).train()
    model.activation_checkpointing_enable()
    fast = cait.compress(model, merge=cait.ATME(r=[4, 2, 0])).train()
    assert fast.backbone.grad_checkpointing
    plain = cait.compress(hf_model(case), merge=cait.ATME(r=[4, 2, 0])).train()
    for net in (fast, plain):
        net(images(2)).to_tuple()[0].square().mean().backward()  # logits, or last_hidden_state
    for (name, a), b in zip(fast.named_parameters(), plain.parameters()):
        assert a.grad is not None and torch.allclose(a.grad, b.grad, rtol=1e-4, atol=1e-6), name


HF_HEADS = {  # case -> the HF modules that are cait's heads
    "vit_cls": ["classifier"],
    "deit_teacher": ["cls_classifier", "distillation_classifier"],
    "dinov2_reg_cls": ["classifier"],
    "siglip": ["head"],
    "clip_proj": ["vision_model.post_layernorm", "visual_projection"],
    "dinov3_gated": [],
}


@pytest.mark.parametrize("case", sorted(HF_HEADS))
def test_frozen_hf_tensors_stay_frozen(case):
    """requires_grad carries over: HF's layer 0 and heads frozen -> cait's block 0 and heads frozen, the rest trainable
    (a linear probe on a frozen HF backbone must not train the compressed backbone)."""
    model = hf_model(case)
    cait.hf._layers(cait.hf.SUPPORTED[type(model).__name__], cait.hf.trunk(model))[0].requires_grad_(False)
    for name in HF_HEADS[case]:
        model.get_submodule(name).requires_grad_(False)
    fast = cait.compress(model, merge=cait.ATME(r=[2, 2, 0]), prune=cait.CDCP(qk=0.5, v=0.5, mlp=0.5, align=4))
    for name, parameter in fast.named_parameters():
        frozen = name.startswith(("backbone.blocks.0.", "heads."))
        assert parameter.requires_grad is not frozen, name
    assert sum(p.requires_grad for p in model.parameters()) and all(p.requires_grad for p in cait.compress(hf_model(case)).parameters())


@pytest.mark.parametrize(
    "call, feature",
    [
        (lambda f, x: f(x, output_attentions=True), "attention maps"),
        (lambda f, x: f(x, bool_masked_pos=torch.zeros(1, 16, dtype=torch.bool)), "bool_masked_pos"),
        (lambda f, x: f(images(1, 48), interpolate_pos_encoding=True), "position-embedding interpolation"),
    ],
)
def test_refusals_name_the_feature(call, feature):
    fast = cait.compress(hf_model("vit"))
    with pytest.raises(Unsupported) as error:
        call(fast, images(1))
    assert error.value.feature == feature


def test_dinov3_takes_any_size_as_hf():
    """DINOv3 has no position embedding to interpolate: its RoPE is computed per grid, in HF as in timm's Eva."""
    model = hf_model("dinov3")
    fast = cait.compress(model).eval()
    for size in ((40, 56), (24, 24)):
        x = images(2, size)
        with torch.no_grad():
            assert_outputs_close(fast(x, output_hidden_states=True), model(x, output_hidden_states=True), 1e-5)
    merged = cait.compress(model, merge=cait.ATME(flops=0.7)).eval()
    with torch.no_grad():
        assert merged(images(2, (40, 56))).last_hidden_state.shape == (2, 1 + 2 + 35, 64)


@pytest.mark.parametrize(
    "case, size, interpolate",
    [("vit", (39, 33), True), ("clip", (36, 36), True), ("dinov2_reg", (36, 38), None), ("siglip", (39, 39), None)]
    + [("dinov3", (44, 52), None)],
)
def test_sizes_with_a_remainder_are_cropped_as_hfs_patch_convolution(case, size, interpolate):
    """HF's stride-patch convolution drops the pixels after the last whole patch: on the model's own grid (or any
    grid for DINOv3) nothing is interpolated, and every field equals HF's."""
    model = hf_model(case)
    fast = cait.compress(model).eval()
    x = images(2, size)
    kwargs = dict(output_hidden_states=True, **({"interpolate_pos_encoding": True} if interpolate else {}))
    with torch.no_grad():
        assert_outputs_close(fast(x, **kwargs), model(x, **kwargs), 1e-5)
    with pytest.raises(ValueError, match="smaller than one 8x8 px patch"):
        fast(images(1, 7), interpolate_pos_encoding=True)


def test_other_sizes():
    with pytest.raises(ValueError, match=r"calibration images must have shape \(B, 3, 32, 32\) .*got \(4, 3, 48, 48\): resize"):
        cait.compress(hf_model("vit"), prune=cait.CDCP(mlp=0.5, method="activation", calibration=images(4, 48)))
    vit, dino = cait.compress(hf_model("vit")), cait.compress(hf_model("dinov2"))
    with pytest.raises(ValueError, match=r"doesn't match model \(32\*32\)"):  # HF's own refusal without interpolation
        vit(images(1, 48))
    with pytest.raises(Unsupported, match="bicubic, no antialiasing"):  # DINOv2 always interpolates: refused, not different
        dino(images(1, 48))
    with pytest.raises(Unsupported, match="position-embedding|bicubic"):
        cait.compress(hf_model("vit"), dynamic_img_size=True)


def test_unsupported_classes_are_refused_by_name():
    config = transformers.ViTMAEConfig(**SMALL, intermediate_size=128)
    with pytest.raises(Unsupported, match="ViTMAEModel is not supported yet: MAE drops") as error:
        cait.compress(transformers.ViTMAEModel(config))
    assert error.value.feature == "random masking"
    config = transformers.ConvNextConfig(num_stages=1, depths=[1], hidden_sizes=[8])
    with pytest.raises(Unsupported, match="ConvNextModel is not supported: cait takes ViTModel") as error:
        cait.compress(transformers.ConvNextModel(config))
    assert error.value.feature == "Hugging Face model class"
    towers = dict(vision_config=dict(SMALL, intermediate_size=128), text_config=dict(SMALL, intermediate_size=128))
    clip = transformers.CLIPModel(transformers.CLIPConfig(**towers)).eval()  # the usual CLIP checkpoint's class
    with pytest.raises(Unsupported, match=r"CLIPModel is not supported yet: .* compress model.vision_model or CLIPVisionModelW") as error:
        cait.compress(clip)
    assert error.value.feature == "text tower"
    x = images(2)
    with torch.no_grad():  # the tower the message points to: CLIP's own image features through its projection
        pooled = cait.compress(clip.vision_model).eval()(x).pooler_output
        assert rel_err(clip.visual_projection(pooled), clip.get_image_features(x).pooler_output) < 1e-5


def test_sweep_over_installed_vision_classes():
    """Every vision class of the installed transformers works or is refused with a named feature (hf_sweep.py)."""
    import hf_sweep

    results = {name: hf_sweep.outcome(name) for name in hf_sweep.vision_classes()}
    works = {name for name, (kind, _) in results.items() if kind == "works"}
    assert works == {name for name in cait.hf.SUPPORTED if hasattr(transformers, name)}
    assert all(kind in ("works", "refused", "unbuildable", "missing") for kind, _ in results.values())
    assert all(detail for kind, detail in results.values() if kind == "refused")


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_loading_without_transformers_is_one_clear_line(tmp_path):
    path = tmp_path / "m.safetensors"
    cait.save(cait.compress(hf_model("vit"), merge=cait.ATME(r=[2, 0, 0])), path)
    code = (
        "import sys; sys.modules['transformers'] = None\n"
        "from cait.cli import main\n"
        f"main(['info', {str(path)!r}])\n"
    )
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode != 0
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "needs Hugging Face transformers" in lines[0] and "cait[hf]" in lines[0], run.stderr


def test_cli_compresses_a_save_pretrained_folder(tmp_path, capsys):
    from cait.cli import main

    model = hf_model("dinov2_cls_swiglu")
    model.save_pretrained(tmp_path / "dino")
    out = tmp_path / "dino.safetensors"
    main(["compress", "--model", str(tmp_path / "dino"), "--merge-r", "4,2,0", "--keep-mlp", "0.5", "--align", "4", "--out", str(out)])
    assert "Hugging Face Dinov2ForImageClassification" in capsys.readouterr().out
    fast = cait.load(out)
    assert fast.class_name == "Dinov2ForImageClassification" and fast.config.cait["schedule"] == [4, 2, 0]
    python = cait.compress(model, merge=cait.ATME(r=[4, 2, 0]), prune=cait.CDCP(mlp=0.5, align=4)).eval()
    x = images(2)
    with torch.no_grad():
        assert torch.equal(fast(x).logits, python(x).logits)
    main(["info", str(out)])
    assert "Dinov2ForImageClassification" in capsys.readouterr().out


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--checkpoint", "x.pth"], "holds its weights and settings: drop --checkpoint"),
        (["--calibration", "imgs"], "--calibration is not supported with a Hugging Face folder"),
        (["--model", "{tmp}/no_such_folder"], "no_such_folder: no such folder"),
    ],
)
def test_cli_folder_refusals_are_one_line(tmp_path, capsys, extra, message):
    from cait.cli import main

    hf_model("vit").save_pretrained(tmp_path / "vit")
    extra = [arg.format(tmp=tmp_path) for arg in extra]
    with pytest.raises(SystemExit):  # a second --model replaces the first
        main(["compress", "--model", str(tmp_path / "vit"), "--merge-r", "2", *extra, "--out", str(tmp_path / "o.safetensors")])
    assert message in capsys.readouterr().err


def test_cli_refuses_an_unsupported_folder_by_name(tmp_path, capsys):
    from cait.cli import main

    transformers.ViTMAEModel(transformers.ViTMAEConfig(**SMALL, intermediate_size=128)).save_pretrained(tmp_path / "mae")
    with pytest.raises(SystemExit):
        capsys.readouterr()  # save_pretrained's progress bar
        main(["compress", "--model", str(tmp_path / "mae"), "--merge-r", "2", "--out", str(tmp_path / "o.safetensors")])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ViTMAEModel is not supported yet" in err[0]


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda folder: (folder / "model.safetensors").unlink(), "cannot load its ViTModel: Error no file named model.safetensors"),
        (lambda folder: (folder / "model.safetensors").write_bytes(b"garbage" * 10), "cannot load its ViTModel: damaged weights"),
    ],
)
def test_cli_folders_transformers_cannot_load_are_one_line(tmp_path, capsys, damage, message):
    from cait.cli import main

    hf_model("vit").save_pretrained(tmp_path / "vit")
    damage(tmp_path / "vit")
    capsys.readouterr()  # save_pretrained's progress bar
    with pytest.raises(SystemExit):
        main(["compress", "--model", str(tmp_path / "vit"), "--merge-r", "2", "--out", str(tmp_path / "o.safetensors")])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_cli_commands_without_hf_support_refuse_in_one_line(tmp_path, capsys):
    from cait.cli import main

    folder, saved = tmp_path / "vit", tmp_path / "vit.safetensors"
    hf_model("vit_cls").save_pretrained(folder)
    cait.save(cait.compress(hf_model("vit_cls"), merge=cait.ATME(r=[2, 0, 0])), saved)
    for argv, message in [
        (["finetune", "--model", str(folder), "--data", str(tmp_path), "--merge-r", "2", "--out", str(tmp_path / "o.safetensors")],
         "is a Hugging Face folder, which cait finetune does not take yet"),
        (["plan", "--model", str(folder), "--target-flops", "0.7", "--out", str(tmp_path / "p.json")],
         "is a Hugging Face folder, which cait plan does not take yet"),
        (["eval", str(saved), "--data", str(tmp_path)], "is a compressed Hugging Face model, which cait eval does not take yet"),
    ]:  # fmt: skip
        capsys.readouterr()
        with pytest.raises(SystemExit):
            main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], argv[0]


@pytest.mark.parametrize("format", ["pt2", "onnx"])
def test_export_writes_hfs_first_field(format, tmp_path):
    """cait.export of a compressed HF classifier: the file maps pixel_values to the logits (export checks the
    file itself; here against HF's output field of the eager wrapper, at a batch the trace did not see)."""
    # one merging block: the ONNX export of a merge step is ~170 nodes and most of this test's time
    fast = cait.compress(hf_model("dinov2_cls_swiglu"), merge=cait.ATME(r=[4, 0, 0]), prune=cait.CDCP(mlp=0.5, align=4)).eval()
    path = tmp_path / f"m.{format}"
    cait.export(fast, path, format=format, batch=2, dynamic_batch=True)
    run = cait.load_exported(path)
    x = images(3)
    with torch.no_grad():
        assert rel_err(run(x), fast(x).logits) < 1e-5


def test_cli_bench_times_a_folder_and_a_saved_file(tmp_path, capsys):
    from cait.cli import main

    model = hf_model("vit_cls")
    model.save_pretrained(tmp_path / "vit")
    main(["bench", "--models", str(tmp_path / "vit"), "--batch", "2", "--repeats", "1", "--variant", "merge=0.7,prune=0.5/0.5/0.5"])
    out = capsys.readouterr().out
    assert "dense" in out and "merge=0.7,prune=0.5/0.5/0.5" in out
    cait.save(cait.compress(model, merge=cait.ATME(r=[2, 2, 0])), tmp_path / "vit.safetensors")
    main(["bench", "--models", str(tmp_path / "vit.safetensors"), "--batch", "2", "--repeats", "1"])
    assert "saved" in capsys.readouterr().out


def test_cli_exports_a_saved_hf_file(tmp_path, capsys):
    from cait.cli import main

    model = hf_model("clip_proj")
    fast = cait.compress(model, merge=cait.ATME(r=[2, 2, 0])).eval()
    cait.save(fast, tmp_path / "clip.safetensors")
    main(["export", str(tmp_path / "clip.safetensors"), "--format", "pt2", "--batch", "2"])
    assert "wrote" in capsys.readouterr().out
    run = cait.load_exported(tmp_path / "clip.pt2")
    x = images(2)
    with torch.no_grad():
        assert torch.allclose(run(x), fast(x).image_embeds, atol=1e-6)
