"""timm's model API on compressed models: timm's results on the same weights with nothing merged,
timm's meanings with merging (NCHW cells carry their token, NLC gives the merged tokens)."""
import copy
import inspect

import pytest
import timm
import torch
from timm.models import group_parameters
from timm.optim import create_optimizer_v2

import cait
from cait.layers import CompressedBlock
from cait.regions import merge_owners
from conftest import rel_err

MODELS = {  # id: timm name and overrides (small: 4x4 to 6x6 grids)
    "class_token": ("vit_tiny_patch16_224", dict(depth=3, img_size=64)),
    "registers_avg": ("vit_base_patch16_reg4_gap_256", dict(embed_dim=96, num_heads=2, depth=3, img_size=96)),
    "distilled": ("deit_tiny_distilled_patch16_224", dict(depth=3, img_size=64)),
    "no_prefix": ("vit_tiny_patch16_224", dict(depth=2, img_size=80, class_token=False, global_pool="avg")),
}


def build(model_id):
    name, overrides = MODELS[model_id]
    torch.manual_seed(0)
    return timm.create_model(name, **overrides).eval()


def images_for(model, batch=2):
    return torch.randn(batch, 3, *model.patch_embed.img_size)


def close(ours, theirs):
    """Same structure, same shapes, every tensor within fp32 rounding of timm's (its attention kernel
    differs from cait's; nothing else does)."""
    if isinstance(theirs, torch.Tensor):
        return ours.shape == theirs.shape and rel_err(ours, theirs) < 1e-5
    if isinstance(theirs, dict):
        return ours.keys() == theirs.keys() and all(close(ours[k], theirs[k]) for k in theirs)
    return type(ours) is type(theirs) and len(ours) == len(theirs) and all(close(a, b) for a, b in zip(ours, theirs))


CALLS = [
    dict(),
    dict(indices=2),
    dict(indices=[0, -1], norm=True),
    dict(output_fmt="NLC"),
    dict(return_prefix_tokens=True),
    dict(indices=[0], stop_early=True, intermediates_only=True),
    dict(output_dict=True, return_prefix_tokens=True),
    dict(output_dict=True, intermediates_only=True, output_fmt="NLC"),
]


@pytest.mark.parametrize("model_id", MODELS)
def test_forward_intermediates_equals_timms_with_nothing_merged(model_id):
    model = build(model_id)
    fast = cait.compress(model)
    images = images_for(model)
    known = inspect.signature(model.forward_intermediates).parameters  # older timm lacks output_dict
    with torch.no_grad():
        for kwargs in (call for call in CALLS if set(call) <= set(known)):
            if kwargs.get("return_prefix_tokens") and not model.num_prefix_tokens and "output_dict" not in known:
                continue  # timm < 1.0.16 fails there itself (UnboundLocalError)
            assert close(fast.forward_intermediates(images, **kwargs), model.forward_intermediates(images, **kwargs)), kwargs
        assert close(fast.get_intermediate_layers(images, n=2, reshape=True), model.get_intermediate_layers(images, n=2, reshape=True))
    assert fast.feature_info == model.feature_info


@pytest.mark.parametrize("model_id", ["class_token", "no_prefix"])
def test_with_merging_every_cell_carries_its_token_at_every_depth(model_id):
    model = build(model_id)
    fast = cait.compress(model, merge=cait.ATME(r=[4, 3, 2][: len(model.blocks)]))
    images = images_for(model, 3)
    with torch.no_grad():
        final, grids = fast.forward_intermediates(images, norm=True)
        tokens = fast.forward_intermediates(images, norm=True, output_fmt="NLC", intermediates_only=True)
        owners = merge_owners(fast, images)
        assert torch.equal(final, fast.forward_features(images))
    cells = fast.grid[0] * fast.grid[1]
    for depth, (grid, spatial, owner) in enumerate(zip(grids, tokens, owners)):
        assert grid.shape == (3, fast.embed_dim, *fast.grid)
        assert spatial.shape[1] == cells - sum(fast.schedule[: depth + 1])
        index = owner.flatten(1).long()[..., None].expand(-1, -1, fast.embed_dim)
        assert torch.equal(grid.flatten(2).transpose(1, 2), spatial.gather(1, index))


def timm_names(name: str) -> str:
    return name.removeprefix("vit.")


@pytest.mark.parametrize("model_id", MODELS)
def test_parameter_groups_and_weight_decay_are_timms(model_id):
    model = build(model_id)
    fast = cait.compress(model, merge=cait.ATME(r=2), prune=cait.CDCP(qk=0.5, mlp=0.5))
    for coarse in (False, True):
        ours = group_parameters(fast, fast.group_matcher(coarse=coarse), reverse=True)
        theirs = group_parameters(model, model.group_matcher(coarse=coarse), reverse=True)
        assert {timm_names(k): v for k, v in ours.items()} == theirs
    exempt = {timm_names(name) for name, _ in fast.named_parameters() if name in fast.no_weight_decay()}
    assert exempt == {name for name, _ in model.named_parameters() if name in model.no_weight_decay()} != set()


def optimizer_settings(model) -> dict:
    names = {id(p): name for name, p in model.named_parameters()}
    optimizer = create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.65)
    return {timm_names(names[id(p)]): (g["lr_scale"], g["weight_decay"]) for g in optimizer.param_groups for p in g["params"]}


def test_timms_optimizer_factory_builds_timms_layer_decay_groups():
    model = build("distilled")
    settings = optimizer_settings(cait.compress(model, merge=cait.ATME(r=2)))
    assert settings == optimizer_settings(model)
    assert len({scale for scale, _ in settings.values()}) == len(model.blocks) + 2  # stem, every block, head


def count_block_calls(monkeypatch) -> list:
    calls = []
    forward = CompressedBlock.forward
    monkeypatch.setattr(CompressedBlock, "forward", lambda self, state: calls.append(1) or forward(self, state))
    return calls


def test_grad_checkpointing_recomputes_blocks_with_the_same_gradients(monkeypatch):
    model = timm.create_model("vit_tiny_patch16_224", depth=3, img_size=64, drop_path_rate=0.2).train()
    images = images_for(model)
    plain = cait.compress(model, merge=cait.ATME(r=3), prune=cait.CDCP(mlp=0.5))
    checkpointed = copy.deepcopy(plain)
    checkpointed.set_grad_checkpointing()
    calls = count_block_calls(monkeypatch)
    gradients = []
    for fast in (plain, checkpointed):
        calls.clear()
        torch.manual_seed(1)
        fast(images).square().mean().backward()
        gradients.append({name: p.grad for name, p in fast.named_parameters()})
        assert len(calls) == (6 if fast is checkpointed else 3)  # forward, then each block again in backward
    assert gradients[0].keys() == gradients[1].keys()
    assert all(torch.equal(gradients[0][k], gradients[1][k]) for k in gradients[0])
    calls.clear()
    with torch.no_grad():
        checkpointed(images)
    assert len(calls) == 3  # nothing to recompute without autograd


def test_a_source_models_checkpointing_carries_over():
    model = build("class_token")
    model.set_grad_checkpointing(True)
    fast = cait.compress(model)
    assert fast.grad_checkpointing and fast.timm_model().grad_checkpointing


def test_reset_and_get_classifier_as_timm():
    model = build("class_token")
    fast = cait.compress(model)
    model.reset_classifier(10, "avg")
    fast.reset_classifier(10, "avg")
    fast.vit.head.load_state_dict(model.head.state_dict())
    images = images_for(model)
    assert fast.get_classifier() is fast.vit.head and fast.num_classes == 10 and fast.global_pool == "avg"
    with torch.no_grad():
        assert close(fast(images), model(images))
    distilled = cait.compress(build("distilled"))
    distilled.reset_classifier(3)
    assert [head.out_features for head in distilled.get_classifier()] == [3, 3]


@pytest.mark.parametrize("model_id, args, message", [
    ("class_token", (10, "map"), "global_pool='map' needs the attention pooling the model was built with"),
    ("class_token", (10, "attention"), "global_pool='attention' is not supported"),
    ("no_prefix", (3, "token"), "needs a class token"),
])
def test_reset_classifier_refuses_what_timm_refuses_with_timms_error_too(model_id, args, message):
    """Where timm's reset_classifier asserts, cait's raises one error that is both cait's ValueError and timm's
    AssertionError, before it changes anything."""
    with pytest.raises(AssertionError):
        build(model_id).reset_classifier(*args)
    fast = cait.compress(build(model_id))
    head = fast.head
    with pytest.raises(ValueError, match=message) as refused:
        fast.reset_classifier(*args)
    assert isinstance(refused.value, AssertionError) and fast.head is head
    with pytest.raises(ValueError, match="num_classes must be a whole number"):
        fast.reset_classifier(-1)


@pytest.mark.parametrize("model_id", list(MODELS))
def test_timms_settings_and_pretrained_cfg_read_as_on_timms_model(model_id):
    """Every plain setting timm's model holds (``in_chans``, ``has_class_token``, ...) reads the same on the
    compressed model; its pretrained_cfg has timm's data settings, and its classifier and first_conv name
    parameters of the compressed model (timm's load_pretrained finds the head and the stem by them)."""
    model = build(model_id)
    fast = cait.compress(model, merge=cait.ATME(r=2))
    cfgs = ("training", "pretrained_cfg", "default_cfg")  # the cfgs are compared below
    settings = {k: v for k, v in vars(model).items() if not k.startswith("_") and k not in cfgs}
    assert {k: getattr(fast, k) for k in settings} == settings
    assert "in_chans" in settings and fast.in_chans == 3
    names = fast.state_dict().keys()
    cfg, theirs = fast.pretrained_cfg, model.pretrained_cfg
    assert fast.default_cfg is cfg and cfg["mean"] == theirs["mean"] and cfg["input_size"] == theirs["input_size"]
    classifiers = cfg["classifier"] if isinstance(cfg["classifier"], (tuple, list)) else (cfg["classifier"],)
    assert all(f"{c}.weight" in names for c in classifiers) and f"{cfg['first_conv']}.weight" in names
    assert theirs["first_conv"] == "patch_embed.proj"  # timm's own cfg is left as it was
    if model_id == "distilled":
        fast.set_distilled_training(True)
        assert fast.distilled_training and model.distilled_training is False and fast.vit.distilled_training


def test_a_model_on_the_meta_device_compresses_there():
    """timm builds models on the meta device (``with torch.device("meta")``); cait's own buffers follow the weights."""
    with torch.device("meta"):
        model = timm.create_model("vit_tiny_patch16_224", depth=2, img_size=64)
    fast = cait.compress(model)
    assert {t.device.type for t in [*fast.parameters(), *fast.buffers()]} == {"meta"}
    assert fast(torch.empty(2, 3, 64, 64, device="meta")).shape == (2, 1000)


@pytest.mark.parametrize("model_id", ["deit", "eva02", "dinov3", "rope_mixed"])
def test_meta_to_empty_and_weights_give_the_same_function(model_id):
    """Built on the meta device, compressed there, materialized with ``to_empty``, weights loaded and
    ``init_non_persistent_buffers()`` called (timm's recipe): the model of the real weights. The rotary
    tables of RoPE models are not in state_dict() (NaN or ~1e-2 off when they were left empty)."""
    import models

    if models.too_old(model_id):
        pytest.skip(f"timm {timm.__version__} refuses the {model_id} family (needs 1.0.16)")
    name, overrides = models.ROPE.get(model_id) or ("deit_tiny_patch16_224", dict(img_size=64, depth=2))
    torch.manual_seed(0)
    real = timm.create_model(name, **overrides).eval()
    with torch.device("meta"):
        meta = timm.create_model(name, **overrides)
    fast = cait.compress(meta, merge=cait.ATME(flops=0.7)).to_empty(device="cpu").eval()
    fast.load_state_dict(cait.compress(real).state_dict())
    fast.init_non_persistent_buffers()
    expected = cait.compress(real, merge=cait.ATME(flops=0.7)).eval()
    images = torch.randn(2, 3, *real.patch_embed.img_size)
    with torch.no_grad():
        assert torch.equal(fast(images), expected(images))


def test_pruning_on_the_meta_device_is_refused_in_one_sentence():
    with torch.device("meta"):
        model = timm.create_model("deit_tiny_patch16_224", depth=2, img_size=64)
    with pytest.raises(ValueError, match="CDCP ranks channels by their weights, which a model on the meta device does not have"):
        cait.compress(model, prune=cait.CDCP(qk=0.5))


def test_prune_intermediate_layers_as_timm():
    model = build("registers_avg")
    fast = cait.compress(model)
    ours, theirs = fast.prune_intermediate_layers([0, 1], prune_norm=True), model.prune_intermediate_layers([0, 1], prune_norm=True)
    assert ours == sorted(theirs) == [0, 1]  # timm < 1.0.16 returns a set
    images = images_for(model)
    assert len(fast.blocks) == 2 and fast.num_classes == 0
    with torch.no_grad():
        assert close(fast(images), model(images))
        assert close(fast.forward_intermediates(images), model.forward_intermediates(images))


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(indices=5), ValueError, "the model has 3"),
    (dict(indices=[3]), ValueError, "out of range"),
    (dict(output_fmt="NHWC"), ValueError, "output_fmt must be"),
    (dict(attn_mask=torch.ones(1, 1, 17, 17)), NotImplementedError, "attention masks"),
])
def test_forward_intermediates_refusals(kwargs, error, message):
    fast = cait.compress(build("class_token"))
    with pytest.raises(error, match=message):
        fast.forward_intermediates(images_for(fast.vit), **kwargs)


def test_timm_model_rebuilds_the_same_function():
    model = build("distilled")
    fast = cait.compress(model, merge=cait.ATME(r=2))
    fast.reset_classifier(4)
    plain = fast.timm_model()
    assert type(plain) is type(model) and plain.num_classes == 4
    assert not {p.data_ptr() for p in plain.parameters()} & {p.data_ptr() for p in fast.parameters()}
    images = images_for(model)
    unmerged = copy.deepcopy(fast)
    unmerged.set_schedule([0] * len(unmerged.blocks))
    with torch.no_grad():
        assert close(plain(images), unmerged(images))


@pytest.mark.parametrize("model_id", list(MODELS))
def test_timms_parts_are_read_and_assigned_on_the_compressed_model(model_id, tmp_path):
    """``fast.head``, ``fast.patch_embed``, ``fast.cls_token``, ... are timm's modules and parameters: a head
    assigned to the compressed model is the one it runs, saves and reloads; names timm's model lacks stay missing."""
    model = build(model_id)
    fast = cait.compress(model, merge=cait.ATME(r=2))
    for name in ("patch_embed", "cls_token", "reg_token", "pos_embed", "norm", "fc_norm", "head", "attn_pool"):
        assert getattr(fast, name) is getattr(fast.vit, name)
    fast.head = torch.nn.Linear(fast.head_hidden_size, 5)
    if model_id == "distilled":  # timm averages the two heads: both must change, as on timm's model
        fast.head_dist = torch.nn.Linear(fast.head_hidden_size, 5)
        assert fast.vit.head_dist is fast.head_dist
    assert fast.vit.head is fast.head and "head" not in dict(fast.named_children()) and fast.num_classes == 5
    images = torch.randn(2, 3, *model.patch_embed.img_size)
    with torch.no_grad():
        state = fast.forward_tokens(images)
        assert fast(images).shape == (2, 5) and torch.equal(fast(images), fast.forward_head(state.x, size=state.size))
    cait.save(fast, tmp_path / "head.safetensors")
    with torch.no_grad():
        assert torch.equal(cait.load(tmp_path / "head.safetensors")(images), fast(images))
    with pytest.raises(AttributeError, match="has no attribute 'blocks_of_timm'"):
        fast.blocks_of_timm


def test_fx_symbolic_tracing_is_refused_in_one_sentence():
    """torch.fx symbolic tracing (timm's FX feature extraction) is refused by name, not with a message about
    attention masks nobody passed; torch.export still records the model."""
    from timm.models._features_fx import create_feature_extractor

    fast = cait.compress(build("class_token"), merge=cait.ATME(r=2)).eval()
    refusal = r"torch.fx symbolic tracing cannot record a compressed model .* use torch.export / cait.export"
    for trace in (
        lambda: torch.fx.symbolic_trace(fast),
        lambda: torch.fx.symbolic_trace(fast, concrete_args={"attn_mask": None, "is_causal": False}),
        lambda: create_feature_extractor(fast, return_nodes=["vit.norm"]),
    ):
        with pytest.raises(NotImplementedError, match=refusal):
            trace()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert rel_err(torch.export.export(fast, (images,)).module()(images), fast(images)) < 1e-6
