"""The Eva family (EVA-02, DINOv3, RoPE-ViT, SBB RoPE ViTs, Perception Encoder): exact without merging,
merged tokens at the position their rule gives them, CDCP keeping whole rotary pairs, refusals."""
import math

import pytest
import timm
import torch
from timm.layers.pos_embed_sincos import _build_grid, _rope_layout

import cait
from cait.gates import attach_gates
from cait.rope import RotaryPositions, rotary_pairs
from conftest import rel_err, zero_dropped_qkv
from models import ROPE, build, images_for


@pytest.mark.parametrize("model_id", ROPE)
def test_without_merging_equals_timm(model_id):
    model = build(model_id)
    images = images_for(model, 2)
    fast = cait.compress(model)
    with torch.no_grad():  # the CPU reference attention multiplies out small attentions: not SDPA's rounding
        assert rel_err(fast.forward_features(images), model.forward_features(images)) < 1e-6
        assert rel_err(fast(images), model(images)) < 1e-6


@pytest.mark.parametrize("model_id", ["eva02", "rope_axial_odd", "rope_mixed", "dinov3", "pe_core_map"])
def test_cell_embedding_is_timms_table_bit_for_bit(model_id):
    model = build(model_id)
    grid = tuple(model.patch_embed.grid_size)
    tokens = torch.randn(1, *grid, model.embed_dim) if model.dynamic_img_size else torch.randn(1, grid[0] * grid[1], model.embed_dim)
    _, table = model._pos_embed(tokens)
    positions = RotaryPositions(model.rope, "anchor", model.num_prefix_tokens)
    cells = positions.cells(grid, torch.device("cpu"))[None]
    for block in range(len(model.blocks)):
        mine = positions.embed(cells, block)[0]  # (HW, heads or 1, 2 * head_dim)
        theirs = table[block].transpose(0, 1) if table.dim() == 4 else table[:, None]
        assert torch.equal(mine, theirs)


def _timm_coords(rope, grid) -> torch.Tensor:
    """Cell coordinates (H*W, 2) as timm's rope module builds its grid."""
    if type(rope).__name__ == "RotaryEmbeddingDinoV3":
        coords = _build_grid(list(grid), grid_type="centered", grid_offset=rope.grid_offset, grid_indexing=rope.grid_indexing)
    elif type(rope).__name__ == "RotaryEmbeddingMixed":
        coords = _build_grid(list(grid), grid_indexing=rope.grid_indexing)
    else:
        coords = _build_grid(list(grid), grid_type=rope.grid_type, ref_feat_shape=rope.ref_feat_shape, grid_offset=rope.grid_offset,
                             grid_indexing=rope.grid_indexing)
    return coords.reshape(-1, 2).double()


def _rope_at(rope, coords: torch.Tensor, block: int) -> torch.Tensor:
    """sin/cos at ``coords (N, 2)`` from the RoPE formula in float64: ``(N, 2d)``, or ``(heads, N, 2d)`` for mixed RoPE."""
    kind = type(rope).__name__
    if kind == "RotaryEmbeddingMixed":
        fx, fy = rope.freqs[:, block].double()  # (heads, d / 2) each
        angles = coords[None, :, 0, None] * fx[:, None] + coords[None, :, 1, None] * fy[:, None]
        half = False
    else:
        bands = rope.bands.double() if kind == "RotaryEmbeddingCat" else 2 * math.pi / rope.periods.double()
        angles = (coords[..., None] * bands).flatten(-2)
        half = rope.rotate_half
    return torch.cat([_rope_layout(angles.sin(), half), _rope_layout(angles.cos(), half)], dim=-1).float()


def reference_tokens(model, images, owner, rule):
    """The final tokens of timm's own blocks when block 0 merges the cells of each token of ``owner``
    ``(B, H*W)`` between its attention and its MLP (size-weighted means) and every later block sees
    the merged tokens with ``log(size)`` as attention mask and RoPE at the rule's position: the
    anchor cell's row of timm's table, or the formula at the mean coordinates of the token's cells."""
    prefix = model.num_prefix_tokens
    with torch.no_grad():
        x, table = model._pos_embed(model.patch_embed(images))
        x = model.norm_pre(x)
        first = model.blocks[0]
        attn = first.attn(first.norm1(x), rope=table[0] if table.dim() == 4 else table)
        x = x + (attn if first.gamma_1 is None else first.gamma_1 * attn)
        coords = _timm_coords(model.rope, model.patch_embed.dynamic_feat_size(images.shape[-2:]))
        merged, sizes, ropes = [], [], [[] for _ in model.blocks]
        for b in range(len(images)):
            tokens = int(owner[b].max()) + 1
            cells = [torch.nonzero(owner[b] == t).flatten() for t in range(tokens)]
            merged.append(torch.stack([x[b, prefix + c].mean(0) for c in cells]))
            sizes.append(torch.tensor([1.0] * prefix + [float(len(c)) for c in cells]))
            for i in range(1, len(model.blocks)):
                if rule == "anchor":
                    rows = torch.stack([c.min() for c in cells])
                    ropes[i].append(table[i][:, rows] if table.dim() == 4 else table[rows])
                else:
                    ropes[i].append(_rope_at(model.rope, torch.stack([coords[c].mean(0) for c in cells]), i))
        x = torch.cat([x[:, :prefix], torch.stack(merged)], dim=1)
        mlp = first.mlp(first.norm2(x))
        x = x + (mlp if first.gamma_2 is None else first.gamma_2 * mlp)
        mask = torch.stack(sizes).log()[:, None, None, :]
        for i, block in enumerate(model.blocks[1:], start=1):
            rope = torch.stack(ropes[i])
            x = block(x, rope=rope if rope.dim() == 4 else rope[:, None], attn_mask=mask)
        return model.norm(x)


@pytest.mark.parametrize("model_id", ["eva02", "rope_axial_odd", "rope_mixed", "dinov3", "pe_core_map"])
@pytest.mark.parametrize("rule", ["anchor", "centroid"])
@pytest.mark.parametrize("full", [True, False], ids=["whole-tiles", "some-pairs"])
def test_merged_tokens_sit_at_their_rule_position(model_id, rule, full):
    """A merged token attends as one token at its rule's position (anchor cell or centroid), with the
    weight of its cells; tokens not merged keep their cells' positions. Block 0 merges (every tile
    whole, or a few pairs chosen by similarity), the reference runs timm's blocks on the same groups."""
    model = build(model_id)
    images = images_for(model, 2)
    grid = model.patch_embed.grid_size
    limit = cait.ATME(r=0).limit(grid)
    schedule = [limit if full else 3] + [0] * (len(model.blocks) - 1)
    fast = cait.compress(model, merge=cait.ATME(r=schedule, position=rule))
    with torch.no_grad():
        state = fast.forward_tokens(images)
    assert state.x.shape[1] == model.num_prefix_tokens + grid[0] * grid[1] - schedule[0]
    assert rel_err(state.x, reference_tokens(model, images, state.owner, rule)) < 1e-5


def test_the_two_rules_differ_only_where_tokens_merged():
    model = build("rope_axial_odd")
    images = images_for(model, 2)
    outputs = {}
    for rule in ("anchor", "centroid"):
        fast = cait.compress(model, merge=cait.ATME(r=[2, 0], position=rule))
        with torch.no_grad():
            outputs[rule] = fast.forward_tokens(images)
    assert torch.equal(outputs["anchor"].owner, outputs["centroid"].owner)
    assert not torch.equal(outputs["anchor"].x, outputs["centroid"].x)  # two merged pairs moved half a cell
    fast = cait.compress(model, merge=cait.ATME(r=[0, 2], position="centroid"))  # merging in the last block: no later attention
    with torch.no_grad():
        assert rel_err(fast(images), cait.compress(model, merge=cait.ATME(r=[0, 2]))(images)) < 1e-7


@pytest.mark.parametrize("half", [False, True])
def test_rotary_pairs(half):
    pairs = rotary_pairs(8, half)
    assert pairs.tolist() == ([[0, 4], [1, 5], [2, 6], [3, 7]] if half else [[0, 1], [2, 3], [4, 5], [6, 7]])
    with pytest.raises(ValueError, match="even head_dim"):
        rotary_pairs(7, half)


def zero_dropped_pairs(dense_fast, pruned):
    """In an unpruned compressed copy: zero the q/k rows of the rotary pairs ``pruned`` dropped and
    the v rows it dropped: they then add exactly nothing."""
    for block, small in zip(dense_fast.blocks, pruned.blocks):
        zero_dropped_qkv(block.attn.qkv, block.attn.heads, block.attn.d_qk, small.kept)


@pytest.mark.parametrize("model_id", ["rope_axial_odd", "rope_mixed", "dinov3", "sbb_rope_registers"])
@pytest.mark.parametrize("method", ["weight", "activation"])
def test_qk_pruning_keeps_whole_rotary_pairs(model_id, method):
    model = build(model_id)
    images = images_for(model, 2)
    calibration = images_for(model, 3) if method == "activation" else None
    prune = cait.CDCP(qk=0.4, v=0.75, method=method, calibration=calibration, align=1)  # pairs: the nearest even count
    pruned = cait.compress(model, prune=prune)  # no merging: the pruned metric would merge other pairs
    reference = cait.compress(model)
    half = reference.blocks[0].attn.positions.half
    head_dim = reference.blocks[0].attn.d_qk
    for block in pruned.blocks:
        kept = torch.tensor(block.kept["qk"])
        assert kept.shape[1] == 2 * round(0.4 * head_dim / 2) == block.attn.d_qk
        partner = torch.where(kept < head_dim // 2, kept + head_dim // 2, kept - head_dim // 2) if half else kept ^ 1
        assert all(set(p.tolist()) == set(k.tolist()) for p, k in zip(partner, kept)), "a pair kept without its partner"
    zero_dropped_pairs(reference, pruned)
    with torch.no_grad():
        assert rel_err(pruned(images), reference(images)) < 1e-5


def test_gated_rope_model_equals_its_materialized_model():
    model = build("dinov3")
    fast = cait.compress(model, merge=cait.ATME(r=[4, 2]))
    gates = attach_gates(fast, cait.CDCP(qk=0.5, v=0.75, mlp=0.5), warmup=3)
    images = images_for(model, 2)
    for _ in range(2):
        gates.step()
    assert gates.blocks[0].counts["qk"] % 2 == 0
    gates.step()
    with torch.no_grad():
        gated = fast(images)
        kept = gates.blocks[0].kept()["qk"]
        small = gates.materialize()
        assert rel_err(small(images), gated) < 1e-5
    assert kept.shape[1] == small.blocks[0].attn.d_qk == 24


REFUSED = {  # timm name, overrides, reason in the message
    "post_norm": ("eva02_tiny_patch14_224", dict(depth=1, use_post_norm=True), "only the pre-norm EvaBlock"),
    "grouped_query": ("vit_small_patch16_rope_224", dict(depth=1, qkv_fused=False, num_kv_heads=2), "grouped-query attention"),
    "mrope": ("eva02_tiny_patch14_224", dict(depth=1, rope_type="mrope", use_abs_pos_emb=False), "RotaryEmbeddingMRope is not supported"),
    "rope_augmentation": ("vit_small_patch16_dinov3", dict(depth=1, rope_shift_coords=1.0), "coordinate augmentation"),
    "patch_drop": ("eva02_tiny_patch14_224", dict(depth=1, patch_drop_rate=0.1), "patch dropout"),
    "attn_drop": ("vit_small_patch16_rope_224", dict(depth=1, attn_drop_rate=0.1), "attention dropout"),
}


@pytest.mark.parametrize("model_id", REFUSED)
def test_unsupported_settings_are_refused_by_name(model_id):
    name, overrides, reason = REFUSED[model_id]
    with pytest.raises(NotImplementedError, match=reason):
        cait.compress(timm.create_model(name, **overrides), merge=cait.ATME(r=1))


def test_bad_position_rule_is_refused():
    with pytest.raises(ValueError, match="position must be one of"):
        cait.ATME(r=1, position="middle")


@pytest.mark.parametrize("rule", ["anchor", "centroid"])
def test_pruned_merged_rope_model_compiles_to_one_graph(rule):
    model = build("rope_mixed")  # per-block learned frequencies
    images = images_for(model, 2)
    fast = cait.compress(model, merge=cait.ATME(r=[3, 2], position=rule), prune=cait.CDCP(qk=0.5))
    torch._dynamo.reset()
    with torch.no_grad():
        eager = fast(images)
        graph = torch.compile(fast, backend="aot_eager", fullgraph=True)(images)
    assert rel_err(graph, eager) < 1e-6


@pytest.mark.parametrize("model_id", ["eva02", "eva02_separate_qkv", "dinov3_qkvb_token", "rope_mixed"])
def test_timm_model_gets_the_packed_weights_back_under_timm_names(model_id):
    model = build(model_id)
    fast = cait.compress(model, merge=cait.ATME(r=[2, 1]))
    back = fast.timm_model()
    expected = model.state_dict()
    assert sorted(back.state_dict()) == sorted(expected)
    assert all(torch.equal(t, expected[name]) for name, t in back.state_dict().items())
    if model_id == "rope_mixed":
        return  # AttentionRope has a k bias of its own
    with torch.no_grad():
        fast.blocks[0].attn.qkv.bias[fast.blocks[0].attn.qkv.out_features // 2] = 1.0  # a k bias, which timm's Eva has not
    with pytest.raises(ValueError, match="nonzero entries where timm's EvaAttention has no bias"):
        fast.timm_model()


def test_a_first_call_under_inference_mode_leaves_training_working():
    """The cell tables RoPE caches are plain tensors even when the first call runs in inference mode."""
    model = build("dinov3")
    fast = cait.compress(model, merge=cait.ATME(r=[3, 2])).train()
    images = images_for(model, 2)
    with torch.inference_mode():
        fast(images)
    fast(images).sum().backward()
    assert fast.blocks[0].attn.qkv.weight.grad is not None


def test_rope_rule_benchmark_quick_run(tmp_path, monkeypatch, capsys):
    """The benchmark's table on a few digits and one epoch: both rules per method, FLOPs near the targets;
    the trained weights are kept and reused (no training on the second run)."""
    import json

    from cait.benchmarks import rope_rule
    from test_cli import run

    full = rope_rule.digits
    monkeypatch.setattr(rope_rule, "digits", lambda seed: tuple(t[:n] for t, n in zip(full(seed), (64, 64, 50, 50))))
    monkeypatch.setattr(rope_rule, "MODELS", {"axial": rope_rule.MODELS["axial"]})
    out, weights = tmp_path / "rule.json", tmp_path / "weights"
    argv = ["bench", "--rope-rule", "--seeds", "1", "--epochs", "1", "--weights", str(weights), "--out", str(out)]
    assert run(argv) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["model"], r["method"]) for r in rows] == [(m, k) for m in rope_rule.MODELS for k in ["dense", *rope_rule.METHODS]]
    assert all(abs(r["flops_ratio"] - t) < 0.03 for r in rows for t in [{"dense": 1, "ATME 0.6x": 0.6}.get(r["method"], 0.5)])
    assert [p.name for p in weights.iterdir()] == ["rope-axial-seed0-epochs1.pt"]
    monkeypatch.setattr(rope_rule, "train_dense", None)  # a second run must read the weights back
    assert run(argv) == 0
    assert json.loads(out.read_text())["rows"] == rows
    assert "| axial | ATME 0.5x |" in capsys.readouterr().out


@pytest.mark.parametrize("model_id", ["dinov3", "rope_mixed", "siglip_map"])
def test_rope_and_attention_pooling_models_export_and_optimize(model_id, tmp_path):
    """pt2 and ONNX (checked by cait.export against eager) and cait.optimize, with nothing run eagerly
    first: traced code builds the RoPE tables in its graph and leaves the caches alone."""
    model = build(model_id)
    fast = cait.compress(model, merge=cait.ATME(flops=0.7), prune=None if model_id == "siglip_map" else cait.CDCP(qk=0.5))
    assert cait.export(fast, tmp_path / "m.pt2", format="pt2", batch=2).error < 1e-6
    assert cait.export(fast, tmp_path / "m.onnx", format="onnx", batch=2).error < 1e-5
    images = images_for(model, 2)
    with torch.no_grad():
        assert rel_err(cait.optimize(fast, images)(images), fast(images)) < 1e-5


@pytest.mark.parametrize("model_id", [*ROPE, "siglip_map"])
def test_save_load_round_trip_at_two_sizes(model_id, tmp_path):
    """Every RoPE / attention-pooling family saved with merging, pruning and dynamic_img_size reloads as
    the same function, bit for bit, at its native size and at another size (a FLOPs target solved anew)."""
    model = build(model_id)
    prune = cait.CDCP(qk=0.5, v=0.75, mlp=1 if model_id == "eva02_separate_qkv" else 0.5, align=1)  # scale_mlp_norm: mlp=1
    fast = cait.compress(model, merge=cait.ATME(flops=0.75), prune=prune, dynamic_img_size=True)
    native = images_for(model, 2)
    other = torch.randn(2, 3, native.shape[2] + 2 * model.patch_embed.patch_size[0], native.shape[3])
    with torch.no_grad():
        fast(other)  # saved after a call at another size: the file still describes the model, not its last call
    cait.save(fast, tmp_path / "m.safetensors")
    back = cait.load(tmp_path / "m.safetensors")
    with torch.no_grad():
        for images in (native, other):
            assert torch.equal(back(images), fast(images))
            grid = back.grid_of(images)
            assert back.schedule_for(grid) == fast.schedule_for(grid) and back.position == fast.position
            maps = back.forward_intermediates(images, indices=1, intermediates_only=True)
            assert maps[0].shape[-2:] == grid  # the grid of the images at hand


@pytest.mark.parametrize("model_id", ["dinov3", "rope_mixed"])
def test_merges_the_same_with_and_without_autograd(model_id):
    """The merge metric is read before the rotation, whether or not autograd records the forward."""
    model = build(model_id)
    fast = cait.compress(model, merge=cait.ATME(flops=0.75))
    images = images_for(model, 2)
    with torch.no_grad():
        plain = fast.forward_tokens(images)
    recorded = fast.forward_tokens(images)
    assert torch.equal(plain.owner, recorded.owner) and torch.equal(plain.size, recorded.size)
    assert torch.equal(plain.x, recorded.x.detach())


@pytest.mark.parametrize("model_id, pool", [("eva02", "token"), ("eva02", "avgmax"), ("rope_axial_odd", "avg"), ("dinov3", "")])
def test_saves_after_reset_classifier_changes_the_pooling(model_id, pool, tmp_path):
    """timm's Eva places its final norm (norm or fc_norm) by global_pool when built; a new pooling later
    keeps the norms, and the saved record says where they are."""
    model = build(model_id)
    fast = cait.compress(model, merge=cait.ATME(flops=0.8))
    fast.reset_classifier(4, pool)
    cait.save(fast, tmp_path / "m.safetensors")
    images = images_for(model, 2)
    with torch.no_grad():
        assert torch.equal(cait.load(tmp_path / "m.safetensors")(images), fast(images))


@pytest.mark.parametrize("model_id", ["dinov3", "pe_core_map"])
def test_info_bench_and_segmentation_take_a_saved_rope_model(model_id, tmp_path, capsys):
    from cait.segmentation import segmenter
    from test_cli import run

    model = build(model_id)
    fast = cait.compress(model, merge=cait.ATME(flops=0.75), prune=cait.CDCP(qk=0.5, align=1))
    cait.save(fast, tmp_path / "m.safetensors")
    assert run(["info", str(tmp_path / "m.safetensors")]) == 0
    assert run(["bench", "--models", str(tmp_path / "m.safetensors"), "--batch", "1", "--repeats", "1"]) == 0
    assert "| saved |" in capsys.readouterr().out
    seg = segmenter(cait.load(tmp_path / "m.safetensors"), 3).eval()
    images = images_for(model, 2)
    cait.save(seg, tmp_path / "seg.safetensors")
    with torch.no_grad():
        assert seg(images).shape == (2, 3, *images.shape[2:])
        assert torch.equal(cait.load(tmp_path / "seg.safetensors")(images), seg(images))
