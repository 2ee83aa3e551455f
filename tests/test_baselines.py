"""The token-reduction baselines: ToMe and ALGM's local step against per-token loops written from the
papers, EViT-style pruning's choice and fill-in, equal FLOPs, and the accuracy benchmark's quick run
through the CLI."""

import itertools
import json

import pytest
import torch

import cait
from cait.baselines import algm_local_step, algm_schedule, compress_baseline, evit_step, tome_step
from cait.cost import cost_model
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


def algm_local_loop(x, metric, size, owner, k, grid, prefix):
    """ALGM's local step one image at a time: every full 2x2 window scores the mean cosine similarity
    of its 6 token pairs; the k best windows (ties: lower window first) each become one token, the
    size-weighted mean of its 4, at its smallest token index; survivors in index order."""
    height, width = grid
    n = x.shape[1] - prefix
    xs, sizes, owners = [], [], []
    for img in range(x.shape[0]):
        unit = torch.nn.functional.normalize(metric[img, prefix:].double(), dim=-1)
        windows = []
        for top, left in itertools.product(range(0, height - 1, 2), range(0, width - 1, 2)):
            cells = [top * width + left, top * width + left + 1, (top + 1) * width + left, (top + 1) * width + left + 1]
            tokens = [int(owner[img, c]) for c in cells]
            windows.append((sum(float(unit[a] @ unit[b]) for a, b in itertools.combinations(tokens, 2)) / 6, tokens))
        group_of = {t: t for t in range(n)}
        for w in sorted(range(len(windows)), key=lambda w: -windows[w][0])[:k]:
            group_of.update({t: min(windows[w][1]) for t in windows[w][1]})
        survivors = sorted(set(group_of.values()))
        rows, totals = [], []
        for s in survivors:
            members = [t for t in range(n) if group_of[t] == s]
            totals.append(sum(float(size[img, prefix + t]) for t in members))
            rows.append(sum(x[img, prefix + t].double() * float(size[img, prefix + t]) for t in members) / totals[-1])
        where = {s: i for i, s in enumerate(survivors)}
        owners.append([where[group_of[int(o)]] for o in owner[img]])
        xs.append(torch.cat([x[img, :prefix].double(), torch.stack(rows)]))
        sizes.append(totals)
    return torch.stack(xs), torch.tensor(sizes, dtype=torch.float64), torch.tensor(owners, dtype=torch.int32)


@pytest.mark.parametrize("grid, k, prefix, batch", [((4, 4), 3, 1, 2), ((5, 6), 6, 2, 3), ((6, 4), 1, 0, 1), ((3, 3), 1, 1, 2)])
def test_algm_local_step_matches_the_loop(grid, k, prefix, batch, poisoned):
    n = grid[0] * grid[1]
    x, metric = torch.randn(batch, prefix + n, 7, dtype=torch.float64), torch.randn(batch, prefix + n, 5)
    size = torch.cat([torch.ones(batch, prefix), torch.randint(1, 4, (batch, n)).float()], 1)
    owner = torch.arange(n, dtype=torch.int32).expand(batch, -1).contiguous()
    out = algm_local_step(x, metric, size, owner, k=k, grid=grid, prefix=prefix)
    ref = algm_local_loop(x, metric, size, owner, k, grid, prefix)
    assert out[0].shape == (batch, prefix + n - 3 * k, 7) and rel_err(out[0], ref[0]) < 1e-12
    assert torch.equal(out[1][:, prefix:].double(), ref[1]) and torch.equal(out[2], ref[2])
    assert torch.equal(out[0][:, :prefix], x[:, :prefix]) and torch.equal(out[1][:, :prefix], size[:, :prefix])


def test_algm_local_step_breaks_ties_by_window_order_and_refuses_what_it_cannot_do():
    grid, n = (4, 6), 24
    x, metric, size = torch.randn(1, 1 + n, 4), torch.ones(1, 1 + n, 3), torch.ones(1, 1 + n)
    owner = torch.arange(n, dtype=torch.int32)[None]
    _, _, out = algm_local_step(x, metric, size, owner, k=2, grid=grid, prefix=1)  # every window scores 1: windows 0 and 1 win
    assert out[0, :14].tolist() == [0, 0, 1, 1, 2, 3, 0, 0, 1, 1, 4, 5, 6, 7]
    assert torch.equal(out, algm_local_loop(x, metric, size, owner, 2, grid, 1)[2])
    with pytest.raises(ValueError, match="before any other merge"):
        algm_local_step(x[:, :-1], metric[:, :-1], size[:, :-1], owner.clamp(max=n - 2), k=1, grid=grid, prefix=1)
    with pytest.raises(ValueError, match="1 to 6 windows"):
        algm_local_step(x, metric, size, owner, k=7, grid=grid, prefix=1)


def test_algm_merges_locally_first_then_globally_at_the_flops_of_atme():
    model = build("deit_tiny")
    fast = compress_baseline(model, "algm", 0.6, local_share=0.5)
    local, global_ = fast.schedule[0], fast.schedule[len(fast.blocks) // 3]
    assert sum(fast.schedule) == local + global_ and local % 3 == 0 and local > 0 and global_ > 0
    assert [b.step for b in fast.blocks if b.r] == ["local", "global"]
    assert cait.flops(fast) == pytest.approx(cait.flops(cait.compress(model, merge=cait.ATME(flops=0.6))), rel=2e-2)
    images = images_for(model, 2)
    with torch.no_grad():
        dense = fast.forward_dense(images)
        state = fast.forward_tokens(images)
    assert dense.shape == (2, 192, 14, 14) and state.x.shape[1] == 1 + 196 - sum(fast.schedule)
    assert torch.equal(state.size[:, 1:].sum(1), torch.full((2,), 196.0))
    assert compress_baseline(model, "algm", 0.6, local_share=1.0).schedule[len(fast.blocks) // 3] == 0
    cost = cost_model(cait.compress(model))
    for kwargs, message in (
        (dict(flops=0.01), "cannot reach"),
        (dict(flops=0.6, local_block=4, global_block=4), "local_block < global_block"),
        (dict(flops=0.6, local_share=1.5), "local_share"),
    ):
        with pytest.raises(ValueError, match=message):
            algm_schedule(cost, **kwargs)
    with pytest.raises(ValueError, match="tome takes no option local_share"):
        compress_baseline(model, "tome", 0.6, local_share=0.5)


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
    assert run(["bench", "--accuracy", "--seeds", "1", "--epochs", "1", "--finetune-epochs", "1", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["method"] for r in rows] == [
        "dense", "ATME only", "CDCP only", "ATME+CDCP one-shot", "CAIT (fine-tuned)", "ToMe", "EViT-style pruning"
    ]  # fmt: skip
    assert rows[0]["flops_ratio"] == 1 and all(0.45 < r["flops_ratio"] < 0.56 for r in rows[1:])
    assert all(0 <= r["top1_mean"] <= 1 and r["top1_std"] >= 0 and r["img_per_s"] > 0 for r in rows)
    assert "| CAIT (fine-tuned) |" in capsys.readouterr().out


@pytest.mark.parametrize("method, index", [("tome", 1), ("evit", 1), ("algm", 0), ("algm", 4)])
def test_merge_replays_what_the_forward_does(method, index):
    """``attend`` then ``merge`` (what the benchmark replays to time merging) is the block's own token step."""
    model = build("deit_tiny")
    fast = compress_baseline(model, method, 0.6)
    with torch.no_grad():
        state = fast.embed(images_for(model, 2))
        block = fast.blocks[index]
        assert block.r > 0
        x, metric = block.attend(state)
        merged = block.merge(state.merged(x, state.size, state.owner), metric)
        again = block.merge(state.merged(x, state.size, state.owner), metric)
        after = block(state)
    assert merged.x.shape[1] == state.x.shape[1] - block.r and all(torch.equal(a, b) for a, b in zip(merged[:3], again[:3]))
    assert torch.equal(after.owner, merged.owner) and torch.equal(after.size, merged.size)
