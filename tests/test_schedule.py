"""FLOPs counting and ATME schedules: the solver, explicit schedules, and their errors."""
import pytest
import timm
import torch

import cait
from cait.cost import cost_model
from models import build


def deit_tiny_flops_by_hand(tokens_attn, tokens_mlp):
    """DeiT-Tiny (C=192, 12 blocks, MLP 768, 1000 classes) written out; multiply-add = 2."""
    C = 192
    embed = 2 * 196 * C * 3 * 16 * 16
    blocks = sum(
        2 * n * C * 3 * C + 2 * 2 * n * n * C + 2 * n * C * C + 2 * m * C * 4 * C * 2
        for n, m in zip(tokens_attn, tokens_mlp)
    )
    return embed + blocks + 2 * C * 1000


def test_flops_of_dense_deit_tiny_by_hand():
    """Also guards the CPU attention kernel, which torch's flop counter does not know by itself."""
    assert cait.flops(timm.create_model("deit_tiny_patch16_224")) == deit_tiny_flops_by_hand([197] * 12, [197] * 12)


def test_flops_of_merged_model_by_hand_and_by_cost_model():
    model = timm.create_model("deit_tiny_patch16_224")
    schedule = (20, 10, 0, 30, 5, 5, 5, 5, 5, 5, 5, 5)
    fast = cait.compress(model, merge=cait.ATME(r=schedule))
    attn, mlp, n = [], [], 197
    for r in schedule:
        attn.append(n)
        n -= r
        mlp.append(n)
    assert cait.flops(fast) == deit_tiny_flops_by_hand(attn, mlp) == cost_model(fast).flops(schedule)


@pytest.mark.parametrize("model_id", ["deit_distilled", "registers_avg", "non_square", "siglip_map", "eva02", "dinov3", "pe_core_map"])
def test_cost_model_matches_the_counter(model_id):
    model = build(model_id)
    fast = cait.compress(model, merge=cait.ATME(flops=0.7))
    assert cait.flops(fast) == cost_model(fast).flops(fast.schedule)
    assert cait.flops(model) == cost_model(fast).flops((0,) * len(fast.blocks))


@pytest.mark.parametrize("target", [0.35, 0.5, 0.6, 0.8, 0.95])
def test_solver_lands_near_the_target(target):
    model = timm.create_model("deit_small_patch16_224")
    merge = cait.ATME(flops=target)
    fast = cait.compress(model, merge=merge)
    assert abs(cait.flops(fast) / cait.flops(model) - target) < 0.01
    assert sum(fast.schedule) <= merge.limit((14, 14)) and min(fast.schedule) >= 0


def test_block_4_reaches_further():
    model = timm.create_model("deit_tiny_patch16_224")
    with pytest.raises(ValueError, match="out of reach"):
        cait.compress(model, merge=cait.ATME(flops=0.25))
    fast = cait.compress(model, merge=cait.ATME(flops=0.25, block=4))
    assert abs(cait.flops(fast) / cait.flops(model) - 0.25) < 0.01


def test_explicit_schedules():
    model = timm.create_model("deit_tiny_patch16_224", depth=4)
    assert cait.compress(model, merge=cait.ATME(r=8)).schedule == (8, 8, 8, 8)
    assert cait.compress(model, merge=cait.ATME(r=[1, 2, 3, 4])).schedule == (1, 2, 3, 4)
    assert cait.compress(model, merge=cait.ATME(flops=1.0)).schedule == (0, 0, 0, 0)
    assert cait.compress(model, merge=cait.ATME(r=[147, 0, 0, 0])).schedule == (147, 0, 0, 0)
    with pytest.raises(ValueError, match="allows at most 147"):
        cait.compress(model, merge=cait.ATME(r=[147, 1, 0, 0]))
    with pytest.raises(ValueError, match="lists 3 counts but the model has 4 blocks"):
        cait.compress(model, merge=cait.ATME(r=[1, 2, 3]))


@pytest.mark.parametrize("kwargs, message", [
    (dict(), "exactly one of"),
    (dict(r=1, flops=0.5), "exactly one of"),
    (dict(r=-1), "non-negative int"),
    (dict(r=[1, 2.5]), "non-negative int"),
    (dict(r=True), "non-negative int"),
    (dict(flops=0.0), r"ratio in \(0, 1\]"),
    (dict(flops=1.5), r"ratio in \(0, 1\]"),
    (dict(r=1, block=3), "block must be 2 or 4"),
])
def test_bad_schedules_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        cait.ATME(**kwargs)


def test_flops_input_size_errors():
    with pytest.raises(ValueError, match=r"input_size must be \(C, H, W\)"):
        cait.flops(timm.create_model("deit_tiny_patch16_224", depth=1), (224, 224))
    with pytest.raises(ValueError, match="cannot tell the input size"):
        cait.flops(torch.nn.Linear(3, 3))


@pytest.mark.parametrize("r", [2.5, -1, "3", [1.5, 2], True])
def test_bad_counts_are_refused_by_name(r):
    with pytest.raises(ValueError, match="ATME r must be a non-negative int or a list of them"):
        cait.ATME(r=r)
