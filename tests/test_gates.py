"""Dynamic CDCP gates: consistent masks, dynamic kept sets, straight-through gradients, annealing,
and a materialized model equal to the gated one."""

import pytest
import torch

import cait
from cait.gates import attach_gates
from conftest import rel_err
from models import build, images_for


@pytest.fixture
def gated():
    model = build("deit3_layerscale")
    fast = cait.compress(model, merge=cait.ATME(flops=0.8))
    return fast, attach_gates(fast, cait.CDCP(qk=0.5, v=0.75, mlp=0.6)), images_for(model, 2)


def masked_qkv(fast, images):
    """The qkv outputs of every block after the gates' hooks (hooks run in registration order)."""
    seen = []
    handles = [b.attn.qkv.register_forward_hook(lambda m, a, out: seen.append(out.detach())) for b in fast.blocks]
    try:
        with torch.no_grad():
            fast(images)
    finally:
        for h in handles:
            h.remove()
    return seen


def test_q_and_k_share_channels_and_every_head_keeps_the_same_count(gated):
    fast, gates, images = gated
    for block, out in zip(fast.blocks, masked_qkv(fast, images)):
        heads, hd = block.attn.heads, block.attn.d_qk
        alive = (out != 0).any(dim=(0, 1)).view(3, heads, hd)
        assert torch.equal(alive[0], alive[1]), "q and k keep the same channels"
        assert alive[0].sum(1).tolist() == [round(0.5 * hd)] * heads
        assert alive[2].sum(1).tolist() == [round(0.75 * hd)] * heads


def test_kept_sets_follow_the_scores(gated):
    fast, gates, images = gated
    block = gates.blocks[0]
    before = block.kept()
    with torch.no_grad():
        block.qk[0] = -block.qk[0]  # head 0's worst channels become its best
        block.mlp.neg_()
    after = block.kept()
    assert not torch.equal(before["qk"][0], after["qk"][0]) and torch.equal(before["qk"][1:], after["qk"][1:])
    assert not torch.equal(before["mlp"], after["mlp"])


def test_straight_through_gradients_reach_the_scores(gated):
    fast, gates, images = gated
    fast.train()
    fast(images).logsumexp(-1).sum().backward()
    for block in gates.blocks:
        for scores in (block.qk, block.v, block.mlp):
            assert scores.grad is not None and scores.grad.abs().sum() > 0
    assert fast.vit.patch_embed.proj.weight.grad.abs().sum() > 0, "merging in the training forward is differentiable"


def test_keep_ratios_anneal_to_the_target():
    fast = cait.compress(build("deit_distilled"))
    gates = attach_gates(fast, cait.CDCP(qk=0.5, v=0.5, mlp=0.5), warmup=4)
    seen = []
    for _ in range(6):
        seen.append(gates.blocks[0].counts["mlp"])
        gates.step()
    hidden = fast.blocks[0].mlp.fc1.out_features
    assert seen[0] == hidden and seen[4:] == [hidden // 2] * 2
    assert seen == sorted(seen, reverse=True)
    assert gates.kept_summary() == f"qk 32/64 v 32/64 mlp {hidden // 2}/{hidden}"


def test_gates_keep_the_aligned_counts_that_compress_keeps():
    """Trained and one-shot pruning end at the same widths: multiples of CDCP's align (default 8)."""
    model = build("deit3_layerscale")
    prune = cait.CDCP(qk=0.45, v=0.7, mlp=0.6)  # exact 28.8 / 44.8 / 921.6 of 64 / 64 / 1536; aligned: 32 / 48 / 920

    def widths(m):
        return [(b.attn.d_qk, b.attn.d_v, b.mlp.fc1.out_features) for b in m.blocks]

    compact = attach_gates(cait.compress(model), prune).materialize()
    assert widths(compact) == widths(cait.compress(model, prune=prune)) == [(32, 48, 920)] * 3


def test_materialized_model_equals_the_gated_model(gated, tmp_path):
    fast, gates, images = gated
    fast.eval()
    with torch.no_grad():
        masked = fast(images)
    compact = gates.materialize()
    assert compact is fast and compact.blocks[0].attn.d_qk == 32 and compact.blocks[0].attn.d_v == 48
    with torch.no_grad():
        assert rel_err(compact(images), masked) < 1e-5
    cait.save(compact, tmp_path / "m.safetensors")
    with torch.no_grad():
        assert rel_err(cait.load(tmp_path / "m.safetensors")(images), masked) < 1e-5


def test_bad_uses_are_refused():
    fast = cait.compress(build("deit_distilled"))
    with pytest.raises(ValueError, match="warmup"):
        attach_gates(fast, cait.CDCP(qk=0.5), warmup=-1)
    gates = attach_gates(fast, cait.CDCP(qk=0.5), warmup=3)
    with pytest.raises(ValueError, match="already has gates"):
        attach_gates(fast, cait.CDCP(qk=0.5))
    with pytest.raises(RuntimeError, match="still annealing"):
        gates.materialize()
    pruned = cait.compress(build("deit_distilled"), prune=cait.CDCP(v=0.5))
    with pytest.raises(ValueError, match="already pruned"):
        attach_gates(pruned, cait.CDCP(qk=0.5))
    with pytest.raises(NotImplementedError, match="qk_norm"):
        attach_gates(cait.compress(build("qk_norm")), cait.CDCP(qk=0.5))
