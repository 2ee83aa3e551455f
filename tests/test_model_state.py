"""Where a compressed model keeps its state: everything forward reads is in state_dict() or fixed by the
configuration; one forward pass keeps its plan in its token state, so threads can share a model; and
set_input_size changes the model's own size with timm's meaning."""

import threading

import pytest
import timm
import torch
from timm.models import load_checkpoint

import cait
from cait.layers import CompressedModule
from conftest import rel_err
from models import build, images_for

MERGE_AND_PRUNE = dict(merge=cait.ATME(flops=0.7), prune=cait.CDCP(qk=0.5, v=0.75, mlp=0.75, align=2))
# cait's own buffers left out of state_dict(): computed from the configuration alone
DERIVED_BUFFERS = {"cell_index"}


def _model(model_id: str) -> torch.nn.Module:
    """``build(model_id)``; ``deit`` is DeiT-Tiny cut to 3 blocks (a 14x14 grid at a test's cost)."""
    if model_id != "deit":
        return build(model_id)
    model = timm.create_model("deit_tiny_patch16_224", depth=3).eval()
    with torch.no_grad():
        model.head.weight.normal_(0, 0.05)
    return model


def _seeded(model_id: str, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return _model(model_id)


@pytest.mark.parametrize("model_id", ["deit", "rope_axial_odd", "dinov3", "rope_mixed", "eva02"])
def test_a_state_dict_carries_what_forward_reads(model_id, tmp_path):
    """Weights of one compressed model loaded (strict) into another of the same shape and configuration whose
    pruning kept other channels give the first model's outputs: directly and through timm's load_checkpoint."""
    source = cait.compress(_seeded(model_id, 0), **MERGE_AND_PRUNE).eval()
    images = images_for(source, 3)
    receivers = [cait.compress(_seeded(model_id, seed), **MERGE_AND_PRUNE).eval() for seed in (1, 2)]
    kept = [[b.kept["qk"] for b in m.blocks] for m in (source, *receivers)]
    assert kept[0] != kept[1] and kept[0] != kept[2]  # the test means something: other channels were kept
    receivers[0].load_state_dict(source.state_dict(), strict=True)
    torch.save(source.state_dict(), tmp_path / "weights.pth")
    load_checkpoint(receivers[1], str(tmp_path / "weights.pth"), strict=True)
    with torch.no_grad():
        expected = source(images)
        for receiver in receivers:
            assert torch.equal(receiver(images), expected)


@pytest.mark.parametrize("model_id", ["deit", "dinov3", "siglip_map"])
def test_no_state_hides_outside_state_dict(model_id):
    """Every tensor a compressed model holds is a parameter or a buffer in state_dict(), or one of the
    buffers computed from the configuration (cait's DERIVED_BUFFERS, timm's own modules' caches); no
    module keeps a tensor as a plain attribute."""
    fast = cait.compress(_model(model_id), **MERGE_AND_PRUNE)
    with torch.no_grad():
        fast(images_for(fast, 1))  # caches filled by a call count too
    for path, module in fast.named_modules():
        plain = [key for key, value in vars(module).items() if isinstance(value, torch.Tensor)]
        assert not plain, f"{path or 'the model'} keeps tensors {plain} outside its parameters and buffers"
        for name in module._non_persistent_buffers_set:
            if getattr(module, name) is None:
                continue
            if isinstance(module, CompressedModule):
                assert name in DERIVED_BUFFERS, f"{path}.{name} changes what the model computes but is not in state_dict()"
            else:
                assert type(module).__module__.startswith(("timm.", "torch.")), f"{path}.{name}: a buffer of a foreign module"


def test_a_pruned_rope_map_must_agree_with_the_file(tmp_path):
    """cait.load takes a pruned RoPE head's channel map from the config when a file predates it in
    state_dict(), and refuses a file whose map disagrees with the config."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    fast = cait.compress(build("rope_axial_odd"), **MERGE_AND_PRUNE).eval()
    path = tmp_path / "rope.safetensors"
    cait.save(fast, path)
    images = images_for(fast, 2)
    tensors = load_file(path)
    with safe_open(path, framework="pt") as f:
        metadata = f.metadata()
    names = [k for k in tensors if k.endswith("attn.rope_channels")]
    assert names  # the map is in the file
    older = tmp_path / "older.safetensors"
    save_file({k: v for k, v in tensors.items() if k not in names}, older, metadata=metadata)
    with torch.no_grad():
        assert torch.equal(cait.load(older)(images), fast(images))
    wrong = dict(tensors)
    wrong[names[0]] = wrong[names[0]].flip(-1)
    save_file(wrong, tmp_path / "wrong.safetensors", metadata=metadata)
    with pytest.raises(ValueError, match="disagree with the config: blocks.0.attn.rope_channels"):
        cait.load(tmp_path / "wrong.safetensors")


@pytest.mark.parametrize("model_id", ["deit", "dinov3"])
def test_one_model_serves_threads_with_several_sizes(model_id):
    """One dynamic-size model called from four threads at once with images of three sizes computes what
    it computes called alone (each call's grid and schedule live in its own token state)."""
    model = _model(model_id)
    fast = cait.compress(model, merge=cait.ATME(flops=0.7), prune=cait.CDCP(qk=0.5, align=2), dynamic_img_size=True).eval()
    patch = model.patch_embed.patch_size
    sizes = [tuple(model.patch_embed.img_size), (patch[0] * 6, patch[1] * 8), (patch[0] * 9, patch[1] * 5)]
    inputs = [torch.randn(1, 3, *sizes[i % 3]) for i in range(12)]
    with torch.no_grad():
        expected = [fast(images) for images in inputs]
        fresh = cait.compress(model, merge=cait.ATME(flops=0.7), prune=cait.CDCP(qk=0.5, align=2), dynamic_img_size=True).eval()
    results, errors, start = [None] * len(inputs), [], threading.Barrier(4)

    def work(worker: int) -> None:
        start.wait()
        try:
            with torch.no_grad():
                for i in range(worker, len(inputs), 4):
                    results[i] = fresh(inputs[i])  # schedules of new grids solved while other threads run
        except Exception as error:  # reported below, with its message
            errors.append(error)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors[0]
    for out, ref in zip(results, expected):
        assert rel_err(out, ref) < 1e-6


def _timm_at(model: torch.nn.Module, **size) -> torch.nn.Module:
    import copy

    other = copy.deepcopy(model)
    other.set_input_size(**size)
    return other


@pytest.mark.parametrize("model_id, size", [("deit", dict(img_size=160)), ("deit", dict(patch_size=8, img_size=112)),
                                             ("dinov3", dict(img_size=(96, 48))), ("eva02", dict(img_size=84))])  # fmt: skip
def test_set_input_size_is_timms(model_id, size, tmp_path):
    """set_input_size equals compressing the timm model after timm's own set_input_size (the FLOPs target
    solved for the new grid), and cait.save / cait.load keep the new size exactly."""
    model = _model(model_id)
    fast = cait.compress(model, **MERGE_AND_PRUNE).eval()
    fast.set_input_size(**size)
    resized = _timm_at(model, **size)
    direct = cait.compress(resized, **MERGE_AND_PRUNE).eval()
    images = images_for(resized, 2)
    assert fast.input_size == direct.input_size and fast.grid == direct.grid and fast.schedule == direct.schedule
    with torch.no_grad():
        assert torch.equal(fast(images), direct(images))
        assert torch.equal(fast.forward_dense(images), direct.forward_dense(images))
    cait.save(fast, tmp_path / "resized.safetensors")
    loaded = cait.load(tmp_path / "resized.safetensors")
    with torch.no_grad():
        assert loaded.input_size == fast.input_size and torch.equal(loaded(images), fast(images))
    if not fast.dynamic_img_size:
        with pytest.raises(ValueError, match=r"images must have shape \(B, 3, "):
            fast(images_for(model, 1))  # the old size is no longer the model's


def test_set_input_size_scales_counts_or_refuses_before_changing_anything():
    model = _model("deit")
    fast = cait.compress(model, merge=cait.ATME(r=[20, 10, 10])).eval()
    fast.set_input_size(img_size=112)  # 7x7: a quarter of the cells
    assert fast.grid == (7, 7) and fast.schedule == (5, 3, 2)
    with torch.no_grad():
        assert fast.forward_tokens(torch.randn(1, 3, 112, 112)).x.shape[1] == 1 + 49 - 10
    full = cait.compress(model, merge=cait.ATME(r=[147, 0, 0])).eval()
    images = images_for(model, 1)
    with torch.no_grad():
        before = full(images)
    with pytest.raises(ValueError, match=r"scale to 127 tokens on a 13x13 grid, which allows at most 120"):
        full.set_input_size(img_size=208)
    with pytest.raises(ValueError, match=r"img_size must be a whole number >= 1"):
        full.set_input_size(img_size=(0, 224))
    with pytest.raises(ValueError, match=r"holds no 16x16 px patch"):
        full.set_input_size(img_size=8)
    with torch.no_grad():  # nothing changed
        assert full.input_size == (3, 224, 224) and torch.equal(full(images), before)


def test_resizing_the_timm_model_inside_is_refused_by_name():
    fast = cait.compress(_model("deit"), merge=cait.ATME(flops=0.7)).eval()
    fast.vit.set_input_size(img_size=160)
    with pytest.raises(RuntimeError, match=r"resized .* call set_input_size on the compressed model itself"):
        fast(torch.randn(1, 3, 160, 160))
    with pytest.raises(RuntimeError, match=r"resized .* call set_input_size on the compressed model itself"):
        cait.save(fast, "never-written.safetensors")


def test_compressing_a_compressed_model_says_so():
    fast = cait.compress(_model("deit"))
    with pytest.raises(NotImplementedError, match="already compressed by cait: compress the timm model it came from"):
        cait.compress(fast, merge=cait.ATME(flops=0.7))


@pytest.mark.parametrize("model_id", ["deit", "dinov3", "siglip_map"])
def test_head_hidden_size_is_timms(model_id):
    model = _model(model_id)
    assert cait.compress(model).head_hidden_size == model.head_hidden_size
    timm_reset = timm.create_model("deit_tiny_patch16_224", depth=1, num_classes=0)
    assert cait.compress(timm_reset).head_hidden_size == timm_reset.head_hidden_size == 192


@pytest.mark.parametrize("dynamic", [False, True])
def test_counts_scale_from_what_was_set_not_from_an_earlier_resize(dynamic, tmp_path):
    """set_input_size to a small grid and back restores the counts as set (scaling from scaled counts
    drifted: (6, 4) -> 2x2 -> (0, 1) -> back at 8x8 (0, 16)); other grids and a saved file agree."""
    model = timm.create_model("deit_tiny_patch16_224", img_size=128, depth=2).eval()
    fast = cait.compress(model, merge=cait.ATME(r=[6, 4]), dynamic_img_size=dynamic).eval()
    fast.set_input_size(img_size=32)
    assert fast.schedule == (0, 1)
    if dynamic:
        assert fast.schedule_for((8, 8)) == (6, 4)
    fast.set_input_size(img_size=160)
    assert fast.schedule == (9, 7)  # cumulative 6, 10 scaled by 100 / 64, rounded: 9, 16
    cait.save(fast, tmp_path / "m.safetensors")
    loaded = cait.load(tmp_path / "m.safetensors")
    for resized in (fast, loaded):
        resized.set_input_size(img_size=128)
        assert resized.schedule == (6, 4)


def test_float_sizes_are_refused_in_one_sentence():
    fast = cait.compress(_model("deit"))
    with pytest.raises(ValueError, match="img_size must be a whole number"):
        fast.set_input_size(img_size=128.0)
