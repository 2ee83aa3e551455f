"""cait.save / cait.load: every constructor setting round-trips bit for bit, what a file cannot hold is
refused at save time by name, and old, foreign or damaged files are refused at load time."""
import functools
import inspect
import json
import os

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file
from timm.layers import SwiGLU, SwiGLUPacked
from torch import nn

import cait
from cait.serialize import read_config
from models import build, images_for

PRUNE = cait.CDCP(qk=0.5, v=0.5, mlp=0.5)


def tiny(**overrides):
    """A 2-block ViT-Ti on a 4x4 grid with ``overrides``; head and LayerScale randomized so they matter.
    An older timm without the model or setting skips the test (the compat environment)."""
    torch.manual_seed(0)
    name = overrides.pop("name", "vit_tiny_patch16_224")
    try:
        model = timm.create_model(name, **{"depth": 2, "img_size": 64, **overrides}).eval()
    except (TypeError, RuntimeError) as error:
        if isinstance(error, RuntimeError) and "Unknown model" not in str(error):
            raise
        pytest.skip(f"timm {timm.__version__} cannot build {name} with {sorted(overrides)}: {error}")
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "gamma"):
                module.gamma.normal_(0, 0.5)
        for head in (model.head, getattr(model, "head_dist", None)):
            if isinstance(head, nn.Linear):
                head.weight.normal_(0, 0.05)
    return model


def with_head(model, head):
    model.head = head
    return model


def with_attention(model, **settings):
    """timm's Block cannot pass these to its Attention: build it, then swap every block's attention."""
    from timm.models.vision_transformer import Attention

    if not set(settings) <= set(inspect.signature(Attention).parameters):
        pytest.skip(f"timm {timm.__version__}'s Attention has no {sorted(settings)}")
    for block in model.blocks:
        block.attn = Attention(192, num_heads=3, qkv_bias=True, **settings)
    return model


def reset(model, *args):
    model.reset_classifier(*args)
    return model


CONSTRUCTIONS = {  # id: (timm model, what is done to the compressed model before saving)
    "act_relu": (lambda: tiny(act_layer="relu"), None),
    "act_quick_gelu": (lambda: tiny(act_layer="quick_gelu"), None),
    "act_gelu_tanh": (lambda: tiny(act_layer="gelu_tanh"), None),
    "act_leaky_relu": (lambda: tiny(act_layer=functools.partial(nn.LeakyReLU, negative_slope=0.3)), None),
    "norm_eps": (lambda: tiny(norm_layer=functools.partial(nn.LayerNorm, eps=1e-3)), None),
    "rms_norm": (lambda: tiny(norm_layer="rmsnorm"), None),
    "no_pos_embed": (lambda: tiny(pos_embed="none"), None),
    "no_final_norm": (lambda: tiny(final_norm=False), None),
    "replaced_head": (lambda: with_head(tiny(), nn.Linear(192, 10)), None),
    "reset_before": (lambda: reset(tiny(), 7, "avg"), None),
    "reset_after": (tiny, lambda fast: fast.reset_classifier(5, "avgmax")),
    "no_head_after": (tiny, lambda fast: fast.reset_classifier(0)),
    "registers_no_embed_class": (lambda: tiny(reg_tokens=4, no_embed_class=True), None),
    "no_class_token_avg": (lambda: tiny(class_token=False, global_pool="avg"), None),
    "no_class_token_avgmax": (lambda: tiny(class_token=False, global_pool="avgmax", fc_norm=False), None),
    "fc_norm_token": (lambda: tiny(fc_norm=True), None),
    "pool_include_prefix": (lambda: tiny(global_pool="avg", pool_include_prefix=True), None),
    "swiglu": (lambda: tiny(mlp_layer=SwiGLU, act_layer="silu", mlp_ratio=8 / 3), None),
    "swiglu_packed": (lambda: tiny(mlp_layer=SwiGLUPacked, act_layer="silu", mlp_ratio=2.66667 * 2), None),
    "distilled": (lambda: tiny(name="deit_tiny_distilled_patch16_224"), None),
    "layer_scale": (lambda: tiny(name="deit3_small_patch16_224", embed_dim=192, num_heads=3), None),
    "clip_pre_norm": (lambda: tiny(name="vit_base_patch16_clip_quickgelu_224", embed_dim=192, num_heads=3), None),
    "no_biases": (lambda: tiny(qkv_bias=False, proj_bias=False), None),
    "gated_attention": (lambda: with_attention(tiny(), gated=True), None),
    "head_dim": (lambda: with_attention(tiny(), attn_head_dim=48), None),
    "embed_norm": (lambda: tiny(embed_norm_layer="layernorm"), None),
    "truncated": (lambda: tiny(depth=3), lambda fast: fast.prune_intermediate_layers([1])),
    "aimv2": (lambda: tiny(name="aimv2_large_patch14_224", embed_dim=192, num_heads=3, img_size=56), None),
    "unnamed": (lambda: timm.models.VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2), None),
}


@pytest.mark.parametrize("construction", CONSTRUCTIONS)
def test_every_construction_round_trips_bit_for_bit(tmp_path, construction):
    make, change = CONSTRUCTIONS[construction]
    model = make()
    images = images_for(model, 3)
    with torch.no_grad():
        if model.forward_features(images).shape[1] != model.num_prefix_tokens + model.patch_embed.num_patches:
            pytest.skip(f"timm {timm.__version__} itself drops prefix tokens in this construction")
    qk = 1.0 if not isinstance(model.blocks[0].attn.q_norm, nn.Identity) else 0.5
    fast = cait.compress(model, merge=cait.ATME(r=2), prune=cait.CDCP(qk=qk, v=0.5, mlp=0.5)).eval()
    if change:
        change(fast)
    cait.save(fast, tmp_path / "m.safetensors")
    loaded = cait.load(tmp_path / "m.safetensors")
    with torch.no_grad():
        assert torch.equal(loaded(images), fast(images))
        assert torch.equal(loaded.forward_dense(images), fast.forward_dense(images))
    assert loaded.schedule == fast.schedule and [b.kept for b in loaded.blocks] == [b.kept for b in fast.blocks]
    assert str(loaded) == str(fast)


def test_training_behaviour_round_trips(tmp_path):
    """Stochastic depth and head dropout act in training: the loaded model drops the same paths."""
    fast = cait.compress(tiny(depth=3, drop_path_rate=0.3, drop_rate=0.2), merge=cait.ATME(r=2))
    cait.save(fast, tmp_path / "m.safetensors")
    loaded = cait.load(tmp_path / "m.safetensors").train()
    images = images_for(fast.vit, 2)
    outputs = []
    for model in (fast.train(), loaded):
        torch.manual_seed(3)
        outputs.append(model(images))
    assert torch.equal(*outputs)
    assert [b.drop_path1.drop_prob for b in loaded.blocks[1:]] == pytest.approx([0.15, 0.3])


def test_round_trip_of_the_library_models(tmp_path):
    for model_id, merge, prune in [
        ("deit_distilled", cait.ATME(flops=0.7), cait.CDCP(qk=0.5, v=0.75, mlp=0.75)),
        ("registers_avg", cait.ATME(r=20, block=4), cait.CDCP(mlp=0.5)),
        ("odd_grid", cait.ATME(flops=0.8), None),
        ("non_square", None, None),
    ]:
        model = build(model_id)
        fast = cait.compress(model, merge=merge, prune=prune).eval()
        cait.save(fast, tmp_path / f"{model_id}.safetensors")
        loaded = cait.load(tmp_path / f"{model_id}.safetensors")
        images = images_for(model, 2)
        assert not loaded.training
        with torch.no_grad():
            assert torch.equal(loaded(images), fast(images)), model_id


def test_config_records_the_architecture_schedule_and_versions(tmp_path):
    fast = cait.compress(tiny(act_layer="quick_gelu"), merge=cait.ATME(r=3), prune=cait.CDCP(qk=0.5))
    fast.reset_classifier(10)
    cait.save(fast, tmp_path / "m.safetensors")
    config = read_config(tmp_path / "m.safetensors")
    assert config["format"] == 2 and config["timm_version"] == timm.__version__ and config["cait_version"] == cait.__version__
    arch = config["timm"]
    assert arch["name"] == "vit_tiny_patch16_224" and arch["class"] == "timm.models.vision_transformer:VisionTransformer"
    assert arch["kwargs"]["act_layer"] == {"class": "timm.layers.activations:QuickGELU"}
    norm = arch["kwargs"]["norm_layer"]
    assert norm["class"].endswith(":LayerNorm") and (norm["eps"], norm["affine"], norm["bias"]) == (1e-6, True, True)
    assert arch["kwargs"]["num_classes"] == 10 and arch["kwargs"]["depth"] == 2 and arch["pretrained_cfg"]["mean"] == [0.5] * 3
    assert config["schedule"] == [3, 3] and config["tile"] == 2
    assert len(config["kept"][0]["qk"]) == 3 and config["kept"][0]["v"] is None
    json.dumps(config)


def test_loaded_model_answers_with_timms_data_config(tmp_path):
    model = tiny(name="vit_base_patch16_clip_224", embed_dim=192, num_heads=3)
    cait.save(cait.compress(model), tmp_path / "m.safetensors")
    loaded = cait.load(tmp_path / "m.safetensors")
    for key in ("mean", "std", "interpolation", "crop_pct"):
        assert timm.data.resolve_model_data_config(loaded)[key] == timm.data.resolve_model_data_config(model)[key]


def swap_activation(fast):
    fast.blocks[1].mlp.act = nn.ReLU()


def change_eps(fast):
    fast.vit.norm.eps = 1e-3


def hook(fast):
    fast.blocks[0].attn.register_forward_hook(lambda module, args, out: out)


def patch_forward(fast):
    fast.blocks[0].mlp.forward = lambda x: x


def own_activation(fast):
    fast.blocks[0].mlp.act = type("MyAct", (nn.Module,), {"forward": lambda self, x: x})()


REFUSED = {  # id: (change, error type, message)
    "swapped_activation": (swap_activation, ValueError, r"blocks\.1\.mlp\.act is a ReLU in the model but a GELU when rebuilt \(setting: a"),
    "changed_eps": (change_eps, ValueError, r"vit\.norm\.eps is 0\.001 in the model but 1e-06 when rebuilt \(setting: norm_layer"),
    "head_without_bias": (lambda f: setattr(f.vit, "head", nn.Linear(192, 4, bias=False)), ValueError, r"vit\.head\.bias is absent"),
    "sequential_head": (lambda f: setattr(f.vit, "head", nn.Sequential(nn.Linear(192, 4))), NotImplementedError, "head is a Sequential"),
    "hook": (hook, ValueError, "blocks.0.attn has forward hooks"),
    "patched_forward": (patch_forward, ValueError, "blocks.0.mlp has its own forward function"),
    "own_activation_class": (own_activation, ValueError, "blocks.0.mlp.act is a MyAct in the model"),
    "gates": (lambda f: cait.attach_gates(f, cait.CDCP(qk=0.5)), ValueError, "gates are attached: materialize them first"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_what_a_file_cannot_hold_is_refused_by_name(tmp_path, case):
    change, error, message = REFUSED[case]
    fast = cait.compress(tiny(), merge=cait.ATME(r=2))
    change(fast)
    with pytest.raises(error, match=message):
        cait.save(fast, tmp_path / "m.safetensors")
    assert not (tmp_path / "m.safetensors").exists()


def test_save_refuses_a_missing_folder_and_other_models(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        cait.save(cait.compress(tiny()), tmp_path / "no" / "m.safetensors")
    with pytest.raises(TypeError, match="made by cait.compress"):
        cait.save(build("deit_tiny"), tmp_path / "x.safetensors")
    with pytest.raises(IsADirectoryError, match="it is a folder"):
        cait.save(cait.compress(tiny()), tmp_path)


def test_saved_file_gets_the_permissions_open_would_give(tmp_path):
    def mode(path):
        return os.stat(path).st_mode & 0o777

    (tmp_path / "plain").write_text("")
    model = cait.compress(tiny())
    cait.save(model, tmp_path / "m.safetensors")
    assert mode(tmp_path / "m.safetensors") == mode(tmp_path / "plain")
    os.chmod(tmp_path / "m.safetensors", 0o600)
    cait.save(model, tmp_path / "m.safetensors")  # written again: keeps its permissions, as open() would
    assert mode(tmp_path / "m.safetensors") == 0o600
    (tmp_path / "link.safetensors").symlink_to(tmp_path / "m.safetensors")
    cait.save(model, tmp_path / "link.safetensors")  # through the link, to its target
    assert (tmp_path / "link.safetensors").is_symlink() and cait.load(tmp_path / "link.safetensors") is not None


def rewrite_config(path, target, change):
    tensors = load_file(str(path))
    config = read_config(path)
    change(config)
    save_file(tensors, str(target), metadata={"cait": json.dumps(config)})


@pytest.mark.parametrize("change, message", [
    (lambda c: c.update(format=1), "format 1 .* stored only the settings that shape the weights"),
    (lambda c: c.update(format=3), "format 3; this cait reads format 2: upgrade cait"),
    (lambda c: c.pop("kept"), "lacks or mistypes kept"),
    (lambda c: c["timm"].pop("kwargs"), "lacks or mistypes timm.kwargs"),
    (lambda c: c["timm"].update({"class": "os:system"}), "only use layers from torch.nn and timm"),
    (lambda c: c["timm"]["kwargs"]["act_layer"].update({"class": "builtins:eval"}), "only use layers from torch.nn and timm"),
    (lambda c: c["timm"]["kwargs"]["act_layer"].update({"class": "torch.nn.modules.module:torch.os.system"}), "only use layers from"),
    (lambda c: c["timm"]["kwargs"].update(embed_dim=96), "weights do not fit the rebuilt architecture|kept .* do not fit"),
    (lambda c: c["kept"][0].update(mlp=[0, 900]), "block 0's kept mlp channels do not fit the architecture"),
    (lambda c: c["timm"]["kwargs"].update(new_setting=3), "sets new_setting=3, which timm .* does not know"),
])
def test_old_foreign_and_damaged_files_are_refused_at_load(tmp_path, change, message):
    cait.save(cait.compress(tiny(), prune=PRUNE), tmp_path / "m.safetensors")
    rewrite_config(tmp_path / "m.safetensors", tmp_path / "bad.safetensors", change)
    with pytest.raises(ValueError, match=message):
        cait.load(tmp_path / "bad.safetensors")


def test_refusals(tmp_path):
    with pytest.raises(FileNotFoundError):
        cait.load(tmp_path / "missing.safetensors")
    with pytest.raises(IsADirectoryError, match="is a folder"):
        cait.load(tmp_path)
    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="no cait config"):
        cait.load(tmp_path / "plain.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a tensor file")
    with pytest.raises(ValueError, match="not a safetensors file"):
        cait.load(tmp_path / "junk.safetensors")


def test_load_keeps_the_saved_dtype(tmp_path):
    fast = cait.compress(tiny(), merge=cait.ATME(r=2)).to(torch.float64)
    cait.save(fast, tmp_path / "m.safetensors")
    loaded = cait.load(tmp_path / "m.safetensors")
    images = images_for(fast.vit, 2).double()
    with torch.no_grad():
        assert torch.equal(loaded(images), fast(images))
    assert next(loaded.parameters()).dtype == torch.float64


def test_copy_false_shares_every_weight_and_consumes_the_source():
    model = tiny()
    storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    fast = cait.compress(model, merge=cait.ATME(r=2), copy=False)
    assert {p.untyped_storage().data_ptr() for p in fast.parameters()} == storages
    assert fast.vit is model
    for use in (lambda: model(images_for(fast.vit, 1)), lambda: model.forward_intermediates(images_for(fast.vit, 1))):
        with pytest.raises(RuntimeError, match=r"consumes its source"):
            use()
    copied = cait.compress(tiny(), merge=cait.ATME(r=2))
    assert not {p.untyped_storage().data_ptr() for p in copied.parameters()} & storages


def test_segmentation_heads_round_trip_with_their_options_and_others_are_refused(tmp_path):
    from cait.segmentation import Segmenter, UpsamplingHead

    fast = cait.compress(tiny(), merge=cait.ATME(r=2), prune=PRUNE)
    seg = Segmenter(fast, UpsamplingHead(192, 5, hidden=24, stages=1)).eval()
    cait.save(seg, tmp_path / "seg.safetensors")
    assert read_config(tmp_path / "seg.safetensors")["head"] == {"kind": "upsample", "classes": 5, "hidden": 24, "stages": 1}
    loaded = cait.load(tmp_path / "seg.safetensors")
    images = images_for(fast.vit, 2)
    with torch.no_grad():
        assert torch.equal(loaded(images), seg(images))
    with pytest.raises(ValueError, match="Conv2d head is not one of cait's segmentation heads"):
        cait.save(Segmenter(fast, nn.Conv2d(192, 5, 1)), tmp_path / "other.safetensors")


def test_an_edited_pretrained_cfg_is_saved(tmp_path):
    """The data settings a user sets on the compressed model (mean, std, crop) are what a reloaded model reports."""
    fast = cait.compress(timm.create_model("deit_tiny_patch16_224", depth=1, img_size=64))
    fast.pretrained_cfg["mean"] = (0.1, 0.2, 0.3)
    cait.save(fast, tmp_path / "m.safetensors")
    loaded = cait.load(tmp_path / "m.safetensors")
    assert tuple(loaded.pretrained_cfg["mean"]) == (0.1, 0.2, 0.3)
    assert loaded.pretrained_cfg["classifier"] == fast.pretrained_cfg["classifier"] == "vit.head"


def test_loading_onto_a_missing_gpu_or_the_meta_device_says_so(tmp_path):
    cait.save(cait.compress(timm.create_model("deit_tiny_patch16_224", depth=1, img_size=64)), tmp_path / "m.safetensors")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU is visible"):
            cait.load(tmp_path / "m.safetensors", device="cuda")
    with pytest.raises(ValueError, match="onto the meta device"):
        cait.load(tmp_path / "m.safetensors", device="meta")
