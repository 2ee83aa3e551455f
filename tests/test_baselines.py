"""The token-reduction baselines: ToMe against a per-token loop written from the paper, EViT-style
pruning's choice and fill-in, equal FLOPs, and the accuracy benchmark's quick run through the CLI."""

import json

import pytest
import torch

import cait
from cait.baselines import compress_baseline, evit_step, tome_step
from cait.tokens import TokenState
from conftest import rel_err
from models import build, images_for
from test_cli import run


def tome_loop(x, metric, size, owner, r, prefix):
    """ToMe for one image at a time: A = even spatial tokens, B = odd; every A token's best B partner;
    the r best A tokens merge into their partners (size-weighted); then unmerged A (best first), B."""
    xs, sizes, owners = [], [], []
    for img in range(x.shape[0]):
        n = x.shape[1] - prefix
        unit = torch.nn.functional.normalize(metric[img, prefix:].double(), dim=-1)
        a_ids, b_ids = list(range(0, n, 2)), list(range(1, n, 2))
        best = {a: max(b_ids, key=lambda b: float(unit[a] @ unit[b])) for a in a_ids}
        ranked = sorted(a_ids, key=lambda a: -float(unit[a] @ unit[best[a]]))
        merged, kept = ranked[:r], ranked[r:]
        total = {b: float(size[img, prefix + b]) for b in b_ids}
        feat = {b: x[img, prefix + b].double() * size[img, prefix + b] for b in b_ids}
        for a in merged:
            total[best[a]] += float(size[img, prefix + a])
            feat[best[a]] = feat[best[a]] + x[img, prefix + a].double() * size[img, prefix + a]
        rows = [x[img, prefix + a].double() for a in kept] + [feat[b] / total[b] for b in b_ids]
        sizes.append([float(size[img, prefix + a]) for a in kept] + [total[b] for b in b_ids])
        where = {t: i for i, t in enumerate(kept + b_ids)}
        where.update({a: where[best[a]] for a in merged})
        owners.append([where[int(o)] for o in owner[img]])
        xs.append(torch.cat([x[img, :prefix].double(), torch.stack(rows)]))
    return torch.stack(xs), torch.tensor(sizes, dtype=torch.float64), torch.tensor(owners, dtype=torch.int32)


@pytest.mark.parametrize("n, r, prefix", [(16, 5, 1), (15, 7, 2), (9, 1, 0)])
def test_tome_matches_the_loop(n, r, prefix):
    x, metric = torch.randn(2, prefix + n, 6, dtype=torch.float64), torch.randn(2, prefix + n, 4)
    size = torch.cat([torch.ones(2, prefix), torch.randint(1, 4, (2, n)).float()], 1)
    owner = torch.randint(0, n, (2, 20), dtype=torch.int32)
    out = tome_step(x, metric, size, owner, r=r, prefix=prefix)
    ref = tome_loop(x, metric, size, owner, r, prefix)
    assert rel_err(out[0], ref[0]) < 1e-12 and torch.equal(out[1][:, prefix:].double(), ref[1]) and torch.equal(out[2], ref[2])
    with pytest.raises(ValueError, match="at most half"):
        tome_step(x, metric, size, owner, r=n // 2 + 1, prefix=prefix)


def test_evit_keeps_the_most_attended_and_fills_dropped_cells_from_the_nearest():
    grid, prefix = (3, 4), 1
    x = torch.randn(1, prefix + 12, 5)
    attention = torch.rand(1, 12)
    out, size, owner = evit_step(x, attention, torch.ones(1, 13), torch.arange(12, dtype=torch.int32)[None], r=5, prefix=prefix, grid=grid)
    keep = sorted(attention[0].topk(7).indices.tolist())
    assert torch.equal(out[0, prefix:], x[0, prefix:][keep]) and size.shape == (1, 8)
    for cell in range(12):
        token = int(owner[0, cell])
        distance = lambda c: (c // 4 - cell // 4) ** 2 + (c % 4 - cell % 4) ** 2  # noqa: E731
        assert distance(keep[token]) == min(distance(k) for k in keep)
        if cell in keep:
            assert keep[token] == cell


def test_baselines_cost_what_atme_costs_and_run_the_whole_model():
    model = build("deit_tiny")
    atme = cait.flops(cait.compress(model, merge=cait.ATME(flops=0.6)))
    images = images_for(model, 2)
    for method in ("tome", "evit"):
        fast = compress_baseline(model, method, 0.6)
        assert cait.flops(fast) == pytest.approx(atme, rel=1e-2)  # ToMe's matching product and EViT's scores add a little
        with torch.no_grad():
            assert fast(images).shape == (2, 1000) and fast.forward_dense(images).shape == (2, 192, 14, 14)
    with pytest.raises(ValueError, match="method must be one of"):
        compress_baseline(model, "random", 0.6)
    with pytest.raises(ValueError, match="no class token"):
        compress_baseline(_no_class_token(), "evit", 0.7)


def _no_class_token():
    import timm

    return timm.create_model("vit_tiny_patch16_224", class_token=False, global_pool="avg", depth=2, img_size=64)


def test_accuracy_benchmark_quick_run(tmp_path, capsys):
    out = tmp_path / "accuracy.json"
    assert run(["bench", "--accuracy", "--seeds", "2", "--epochs", "1", "--finetune-epochs", "1", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["method"] for r in rows] == [
        "dense", "ATME only", "CDCP only", "ATME+CDCP one-shot", "CAIT (fine-tuned)", "ToMe", "EViT-style pruning"
    ]  # fmt: skip
    assert rows[0]["flops_ratio"] == 1 and all(0.45 < r["flops_ratio"] < 0.56 for r in rows[1:])
    assert all(0 <= r["top1_mean"] <= 1 and r["top1_std"] >= 0 and r["img_per_s"] > 0 for r in rows)
    assert "| CAIT (fine-tuned) |" in capsys.readouterr().out


@pytest.mark.parametrize("method", ["tome", "evit"])
def test_merge_replays_what_the_forward_does(method):
    """``attend`` then ``merge`` (what the benchmark replays to time merging) is the block's own token step."""
    model = build("deit_tiny")
    fast = compress_baseline(model, method, 0.6)
    with torch.no_grad():
        state = fast.embed(images_for(model, 2))
        block = fast.blocks[1]
        x, metric = block.attend(state)
        merged = block.merge(TokenState(x, state.size, state.owner), metric)
        again = block.merge(TokenState(x, state.size, state.owner), metric)
        after = block(state)
    assert merged.x.shape[1] == state.x.shape[1] - block.r and all(torch.equal(a, b) for a, b in zip(merged, again))
    assert torch.equal(after.owner, merged.owner) and torch.equal(after.size, merged.size)
