"""CDCP: the materialized pruned model equals the dense model with those channels zeroed; consistency
(q/k, heads, the gate and value halves of gated MLPs); errors."""
import pytest
import timm
import torch

import cait
from cait.cdcp import kept_count
from cait.cost import cost_model
from cait_kernels.attention import EXPLICIT_LOGITS
from conftest import rel_err, zero_dropped_qkv
from models import build, images_for

PRUNE = cait.CDCP(qk=0.5, v=0.625, mlp=0.7, align=1)  # exact counts: 32, 40 and round(0.7 * 768) = 538


def zero_pruned_channels(dense, fast):
    """In ``dense``: zero the q and k rows (one channel set per head), the v rows and the fc2 columns of
    the MLP hidden units that ``fast`` dropped. Their outputs then contribute exactly nothing."""
    with torch.no_grad():
        for block, pruned in zip(dense.blocks, fast.blocks):
            zero_dropped_qkv(block.attn.qkv, block.attn.num_heads, block.attn.head_dim, pruned.kept)
            hidden = torch.ones(block.mlp.fc2.in_features, dtype=torch.bool)
            hidden[pruned.kept["mlp"]] = False
            block.mlp.fc2.weight[:, hidden] = 0


@pytest.mark.parametrize(
    "model_id", ["deit_tiny", "deit_distilled", "deit3_layerscale", "registers_avg", "odd_grid", "swiglu", "swiglu_packed"]
)
@pytest.mark.parametrize("method", ["weight", "activation"])
def test_pruned_model_equals_dense_with_zeroed_channels(model_id, method):
    model = build(model_id)
    images = images_for(model, 2)
    calibration = images_for(model, 3) if method == "activation" else None
    fast = cait.compress(model, prune=cait.CDCP(qk=0.5, v=0.625, mlp=0.7, method=method, calibration=calibration))
    zero_pruned_channels(model, fast)
    with torch.no_grad():
        assert rel_err(fast(images), model(images)) < 1e-5


def test_kept_channels_are_consistent_and_materialized():
    model = build("deit_tiny")
    fast = cait.compress(model, prune=PRUNE)
    for block, pruned in zip(model.blocks, fast.blocks):
        qk, v, mlp = (torch.tensor(pruned.kept[k]) for k in ("qk", "v", "mlp"))
        assert qk.shape == (3, 32) and v.shape == (3, 40) and mlp.shape == (538,)  # every head keeps the same count
        assert pruned.attn.d_qk == 32 and pruned.attn.d_v == 40 and pruned.attn.scale == 64**-0.5
        dense_rows = block.attn.qkv.weight.view(3, 3, 64, -1)
        q, k, v_rows = pruned.attn.qkv.weight.split([96, 96, 120])
        for h in range(3):  # q and k read the same channels of each head; proj follows v
            assert torch.equal(q.view(3, 32, -1)[h], dense_rows[0, h, qk[h]])
            assert torch.equal(k.view(3, 32, -1)[h], dense_rows[1, h, qk[h]])
            assert torch.equal(v_rows.view(3, 40, -1)[h], dense_rows[2, h, v[h]])
            assert torch.equal(pruned.attn.proj.weight.view(192, 3, 40)[:, h], block.attn.proj.weight.view(192, 3, 64)[:, h, v[h]])
        assert torch.equal(pruned.mlp.fc2.weight, block.mlp.fc2.weight[:, mlp])


@pytest.mark.parametrize("model_id", ["swiglu", "swiglu_packed"])
def test_gated_mlps_keep_the_same_units_in_gate_and_value(model_id):
    model = build(model_id)
    fast = cait.compress(model, prune=cait.CDCP(mlp=0.5))
    dense_mlp, mlp = model.blocks[1].mlp, fast.blocks[1].mlp
    kept = torch.tensor(fast.blocks[1].kept["mlp"])
    hidden = dense_mlp.fc2.in_features
    assert mlp.fc2.in_features == len(kept) == round(0.5 * hidden)
    if model_id == "swiglu":
        assert torch.equal(mlp.fc1_g.weight, dense_mlp.fc1_g.weight[kept]) and torch.equal(mlp.fc1_x.weight, dense_mlp.fc1_x.weight[kept])
    else:  # one packed linear: gate half then value half, both cut to the same units
        assert torch.equal(mlp.fc1.weight, dense_mlp.fc1.weight[torch.cat([kept, kept + hidden])])
    assert cait.flops(fast) == cost_model(fast).flops(fast.schedule)


def test_mlp_norm_refuses_only_mlp_pruning():
    model = timm.create_model("vit_small_patch16_224", depth=1, img_size=64)
    model.blocks[0].mlp.norm = torch.nn.LayerNorm(model.blocks[0].mlp.fc2.in_features)  # as scale_mlp_norm=True builds it
    with pytest.raises(NotImplementedError, match="scale_mlp_norm"):
        cait.compress(model, prune=cait.CDCP(mlp=0.5))
    assert cait.compress(model, prune=cait.CDCP(qk=0.5, v=0.5)).blocks[0].kept["mlp"] is None


def test_activation_and_weight_importance_differ_where_they_should():
    """One MLP unit with huge weights but a bias that keeps GELU at zero: weight norms rank it first,
    activations rank it last."""
    model = build("deit_tiny")
    with torch.no_grad():
        fc1 = model.blocks[0].mlp.fc1
        fc1.weight[7] *= 100
        fc1.bias[7] = -1e4
    by_weight = cait.compress(model, prune=cait.CDCP(mlp=0.5))
    by_activation = cait.compress(model, prune=cait.CDCP(mlp=0.5, method="activation", calibration=images_for(model, 4)))
    assert 7 in by_weight.blocks[0].kept["mlp"]
    assert 7 not in by_activation.blocks[0].kept["mlp"]


def test_merging_and_pruning_multiply():
    model = timm.create_model("deit_small_patch16_224")
    equal_widths = cait.CDCP(qk=0.75, v=0.75, mlp=0.7)
    pruned = cait.compress(model, prune=equal_widths)
    both = cait.compress(model, merge=cait.ATME(flops=0.7), prune=equal_widths)
    assert cait.flops(both) == cost_model(both).flops(both.schedule)
    assert abs(cait.flops(both) / cait.flops(pruned) - 0.7) < 0.01


def test_counted_flops_include_the_cpu_padding_of_narrow_qk():
    """On CPU, attention with more than EXPLICIT_LOGITS logits runs torch's fused kernel, which needs
    equal widths: q and k narrower than v are zero-padded to v's width, and the counter sees those
    executed FLOPs, 2 * heads * N^2 * (d_v - d_qk) per block. Smaller attention (DeiT-S at 224, one
    image: 6 * 197^2 logits) is multiplied out unpadded, so the count equals the cost model's."""
    model = timm.create_model("deit_small_patch16_224", depth=3)
    fast = cait.compress(model, merge=cait.ATME(r=[20, 10, 0]), prune=cait.CDCP(qk=0.5, v=0.75))
    assert 6 * 197**2 <= EXPLICIT_LOGITS and cait.flops(fast) == cost_model(fast).flops(fast.schedule)
    large = timm.create_model("deit_small_patch16_224", img_size=384, depth=1)
    large = cait.compress(large, merge=cait.ATME(r=20), prune=cait.CDCP(qk=0.5, v=0.75))
    assert 6 * 577**2 > EXPLICIT_LOGITS
    assert cait.flops(large) == cost_model(large).flops(large.schedule) + 2 * 6 * 577**2 * (48 - 32)


def test_qk_norm_models_refuse_only_qk_pruning():
    model = build("qk_norm")
    with pytest.raises(NotImplementedError, match="qk_norm"):
        cait.compress(model, prune=cait.CDCP(qk=0.5))
    fast = cait.compress(model, prune=cait.CDCP(v=0.5, mlp=0.5))
    images = images_for(model, 2)
    for pruned in fast.blocks:
        pruned.kept["qk"] = [list(range(64))] * 6
    zero_pruned_channels(model, fast)
    with torch.no_grad():
        assert rel_err(fast(images), model(images)) < 1e-5


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(qk=0), ValueError, r"keep ratio in \(0, 1\]"),
    (dict(v=1.5), ValueError, r"keep ratio in \(0, 1\]"),
    (dict(mlp="half"), ValueError, r"keep ratio in \(0, 1\]"),
    (dict(method="magnitude"), ValueError, "method must be one of"),
    (dict(method="activation"), ValueError, "needs calibration"),
    (dict(calibration=torch.zeros(1, 3, 8, 8)), ValueError, "only used with method='activation'"),
])
def test_bad_specs_are_refused(kwargs, error, message):
    with pytest.raises(error, match=message):
        cait.CDCP(**kwargs)


def test_ratio_that_keeps_nothing_is_refused():
    with pytest.raises(ValueError, match="rounds to 0"):
        cait.compress(build("deit_tiny"), prune=cait.CDCP(qk=0.001, align=1))


@pytest.mark.parametrize("ratio, total, align, expected", [
    (0.7, 1536, 1, 1075),  # exact: round(1075.2)
    (0.7, 1536, 8, 1072),  # 1075.2 / 8 = 134.4 -> 134
    (0.7, 1536, 64, 1088),  # 1075.2 / 64 = 16.8 -> 17
    (0.45, 64, 8, 32),  # 28.8 / 8 = 3.6 -> 4
    (0.7, 64, 8, 48),  # 44.8 / 8 = 5.6 -> 6
    (0.5, 24, 8, 16),  # 12 / 8 = 1.5: halves round up
    (0.001, 64, 8, 8),  # never 0: at least one multiple
    (0.5, 100, 8, 48),  # 50 / 8 = 6.25 -> 6
    (0.95, 20, 8, 16),  # 19 / 8 = 2.375 -> 2, below the total
    (1.0, 100, 8, 100),  # ratio 1 keeps the total, aligned or not
])
def test_kept_counts_are_the_nearest_multiple(ratio, total, align, expected):
    assert kept_count(ratio, total, "mlp", align) == expected


@pytest.mark.parametrize("ratio, total, align", [(0.99, 64, 8), (0.5, 8, 8), (0.3, 12, 16)])
def test_a_ratio_whose_aligned_count_keeps_everything_is_refused(ratio, total, align):
    with pytest.raises(ValueError, match=f"rounds to all {total} at align={align}"):
        kept_count(ratio, total, "qk", align)


@pytest.mark.parametrize("align", [0, -8, 2.5, True, (8,), (8, 8, 8), "8"])
def test_bad_align_is_refused(align):
    with pytest.raises(ValueError, match="align must be"):
        cait.CDCP(qk=0.5, align=align)


def test_compressed_widths_are_aligned_and_the_flops_solver_counts_them():
    """Default align 8 on DeiT-S (head_dim 64, 1536 MLP units): the widths of the issue's example
    CDCP(0.45, 0.7, 0.66) become 32 / 48 / 1016 (exact: 29 / 45 / 1014). With equal q/k and v
    widths nothing is padded, so the FLOPs counter equals the solver's cost model exactly."""
    model = timm.create_model("deit_small_patch16_224", depth=3)
    fast = cait.compress(model, prune=cait.CDCP(qk=0.45, v=0.7, mlp=0.66))
    assert [(b.attn.d_qk, b.attn.d_v, b.mlp.fc1.out_features) for b in fast.blocks] == [(32, 48, 1016)] * 3
    exact = cait.compress(model, prune=cait.CDCP(qk=0.45, v=0.7, mlp=0.66, align=1))
    assert (exact.blocks[0].attn.d_qk, exact.blocks[0].attn.d_v, exact.blocks[0].mlp.fc1.out_features) == (29, 45, 1014)
    paired = cait.compress(model, prune=cait.CDCP(qk=0.45, v=0.7, mlp=0.7, align=(8, 64)))
    assert (paired.blocks[0].attn.d_qk, paired.blocks[0].attn.d_v, paired.blocks[0].mlp.fc1.out_features) == (32, 48, 1088)
    both = cait.compress(model, merge=cait.ATME(flops=0.7), prune=cait.CDCP(qk=0.7, v=0.7, mlp=0.7))
    assert both.blocks[0].attn.d_qk == both.blocks[0].attn.d_v == 48 and both.blocks[0].mlp.fc1.out_features == 1072
    assert cait.flops(both) == cost_model(both).flops(both.schedule)
    pruned = cait.compress(model, prune=cait.CDCP(qk=0.7, v=0.7, mlp=0.7))
    assert abs(cait.flops(both) / cait.flops(pruned) - 0.7) < 0.02
