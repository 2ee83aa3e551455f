"""Accuracy at equal speed: the run folder, the comparison at equal speed, the classification curve and
its tuning on tiny settings through the CLI (rows, schema, points out of reach, the plot, a timing-only
re-run), and the segmentation plans."""

import json

import pytest
import torch
from PIL import Image

import cait
from cait.baselines import compress_baseline, tome_schedule
from cait.benchmarks import accuracy, curve, pareto, seg_plans
from cait.benchmarks.runs import RunFolder, slug
from cait.cost import cost_model
from test_cli import run

ROW_FIELDS = {"method", "target", "flops_ratio", "img_per_s", "top1_mean", "top1_std"}


def small_digits(seed, train=128):
    """The digits benchmark's split, cut to ``train`` training and 100 test images."""
    train_x, train_y, test_x, test_y = accuracy.digits(seed)
    return train_x[:train], train_y[:train], test_x[:100], test_y[:100]


def test_run_folder_keeps_models_scores_and_speeds(tmp_path):
    store = RunFolder(tmp_path / "runs")
    model = compress_baseline(accuracy.small_vit(0), "evit", 0.6)  # holds a forward hook: must pickle
    images = torch.randn(3, 1, 32, 32)
    assert not store.has(0, "EViT @0.6") and store.scores(0) == {} and store.speeds(0) == {}
    store.save(0, "EViT @0.6", model, {"top1": 0.5})
    store.save(0, "out of reach", None, {"unreachable": "why"})
    store.save_speeds(0, {"EViT @0.6": 12.5})
    again = RunFolder(tmp_path / "runs")
    with torch.no_grad():
        assert torch.equal(again.load(0, "EViT @0.6")(images), model.eval()(images))
    assert again.scores(0) == {"EViT @0.6": {"top1": 0.5}, "out of reach": {"unreachable": "why"}}
    assert again.has(0, "out of reach") and again.speeds(0) == {"EViT @0.6": 12.5} and not again.has(1, "EViT @0.6")
    assert slug("CAIT (fine-tuned) @0.5") == "cait-fine-tuned-0.5"
    with pytest.raises(FileNotFoundError, match="no trained model"):
        again.load(0, "out of reach")


def test_a_model_pickled_by_an_older_cait_is_refused_by_name(tmp_path):
    store = RunFolder(tmp_path / "runs")
    store.save(0, "ATME @0.8", cait.compress(accuracy.small_vit(0), merge=cait.ATME(r=2)), {"top1": 0.5})
    assert type(store.load(0, "ATME @0.8")) is cait.CompressedViT
    older = cait.compress(accuracy.small_vit(0), merge=cait.ATME(r=2))
    del older.native_grid, older.schedules  # what a CompressedViT of an older cait pickled
    store.save(0, "ATME @0.8", older, {"top1": 0.5})
    with pytest.raises(ValueError, match=r"CompressedViT was pickled by an older cait \(it has no native_grid, schedules\).*delete it"):
        store.load(0, "ATME @0.8")
    older = cait.compress(accuracy.small_vit(0), merge=cait.ATME(r=2))
    del older.blocks[1].index, older.blocks[1].attn.metric_channels, older.blocks[1].attn.gate  # the blocks are checked too
    store.save(0, "ATME @0.8", older, {"top1": 0.5})
    with pytest.raises(ValueError, match=r"CompressedAttention was pickled by an older cait \(it has no metric_channels, gate\)"):
        store.load(0, "ATME @0.8")


def _row(method, ratio, speed, score):
    return {"method": method, "flops_ratio": ratio, "img_per_s": speed, "top1_mean": score, "top1_std": 0.0}


def test_equal_speed_interpolates_within_the_measured_speeds_only():
    rows = [_row("dense", 1.0, 100, 0.90), _row("A", 0.8, 120, 0.88), _row("A", 0.5, 200, 0.80),
            _row("B", 0.7, 160, 0.80), _row("B", 0.3, 400, 0.50), _row("B", 0.9, 118, 0.95)]  # fmt: skip
    assert pareto.interpolate(pareto.by_method(rows)["A"], 160, "top1") == pytest.approx(0.84)
    compared = {(r["method"], r["flops_ratio"]): r for r in pareto.equal_speed(rows, "A", "top1")}
    # dense at 100 img/s is more than 5% slower than A's slowest point, B at 400 far faster: left out;
    # B at 118 is within 5% of A's 120 and compares with that point.
    assert set(compared) == {("B", 0.7), ("B", 0.9)}
    assert compared["B", 0.7]["ours"] == pytest.approx(0.84) and compared["B", 0.7]["gap"] == pytest.approx(0.04)
    assert compared["B", 0.9]["ours"] == pytest.approx(0.88) and compared["B", 0.9]["gap"] == pytest.approx(-0.07)
    assert "| B | 0.700 | 160 | 80.00 | 84.00 | +4.00 |" in pareto.equal_speed_table(rows, "A", "top1")
    assert list(pareto.by_method(rows)["B"]) == [rows[5], rows[3], rows[4]]  # highest FLOPs ratio first


def test_accuracy_curve_quick_run_resumes_and_retimes(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(curve, "digits", lambda seed: small_digits(seed, 64))  # one batch per epoch
    monkeypatch.setattr(curve, "RATIOS", (0.33,))
    out, plot, work = tmp_path / "curve.json", tmp_path / "curve.png", tmp_path / "work"
    argv = ["bench", "--accuracy", "--curve", "--seeds", "2", "--epochs", "1", "--finetune-epochs", "1", "--repeats", "1",
            "--work", str(work), "--out", str(out), "--plot", str(plot)]  # fmt: skip
    assert run(argv) == 0
    data = json.loads(out.read_text())
    rows = data["rows"]
    methods = [(r["method"], r["target"]) for r in rows]
    assert methods == [("dense", 1.0)] + [(m, 0.33) for m in curve.ONE_SHOT + curve.FINE_TUNED] and data["unreachable"] == []
    assert all(set(r) == ROW_FIELDS and 0 <= r["top1_mean"] <= 1 and r["img_per_s"] > 0 for r in rows)
    assert all(abs(r["flops_ratio"] - r["target"]) < 0.02 for r in rows)
    assert data["settings"]["keep"] == {str(k): v for k, v in curve.KEEP.items()} and data["machine"]["threads"] >= 1
    with Image.open(plot) as image:
        assert image.format == "PNG" and image.width > 600
    assert "| CAIT (fine-tuned) | 0.33 |" in capsys.readouterr().out
    store = RunFolder(work)
    # ATME's counts at 0.33 merge 34 of 64 tokens in block 0, over ToMe's limit: ToMe runs its own schedule
    assert store.load(0, "ToMe one-shot @0.33").schedule == (18, 18, 14, 7, 3, 2)
    seeds = [store.scores(seed)["CAIT (fine-tuned) @0.33"]["top1"] for seed in (0, 1)]
    cait_row = next(r for r in rows if r["method"] == "CAIT (fine-tuned)")
    assert cait_row["top1_mean"] == pytest.approx(sum(seeds) / 2)
    scores_file = work / "seed0" / "scores.json"
    written = scores_file.stat().st_mtime_ns
    assert run(argv[:-4] + ["--time-only", "--out", str(out)]) == 0  # trains nothing: same scores, new speeds
    again = json.loads(out.read_text())["rows"]
    assert [(r["method"], r["target"], r["top1_mean"]) for r in again] == [(r["method"], r["target"], r["top1_mean"]) for r in rows]
    assert scores_file.stat().st_mtime_ns == written and (work / "seed0" / "timing.json").stat().st_mtime_ns > written


def test_time_only_refuses_an_untrained_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(curve, "digits", small_digits)
    argv = ["bench", "--accuracy", "--curve", "--seeds", "1", "--time-only", "--work", str(tmp_path / "empty")]
    assert run(argv) == 2
    assert "is not trained for seeds [0]" in capsys.readouterr().err


def test_accuracy_curve_tuning_picks_the_best_validation_score(tmp_path, monkeypatch):
    monkeypatch.setattr(curve, "digits", small_digits)
    monkeypatch.setattr(curve, "RATIOS", (0.9, 0.5))
    monkeypatch.setattr(curve, "KEEP_OPTIONS", (1.0, 0.875, 0.5))
    out = tmp_path / "tune.json"
    argv = ["bench", "--accuracy", "--curve", "--tune", "--epochs", "1", "--finetune-epochs", "1"]
    argv += ["--work", str(tmp_path), "--out", str(out)]
    assert run(argv) == 0
    data = json.loads(out.read_text())
    reached = {(c["target"], c["keep"]) for c in data["candidates"] if "unreachable" not in c}
    assert reached == {(0.9, 1.0), (0.5, 1.0), (0.5, 0.875), (0.5, 0.5)}  # at 0.9, pruning to 0.875 or 0.5 alone goes below
    assert all(0 <= c["val_top1"] <= 1 and abs(c["flops_ratio"] - c["target"]) < 0.02 for c in data["candidates"] if "val_top1" in c)
    results = [{"target": 0.5, "keep": 1.0, "val_top1": 0.8}, {"target": 0.5, "keep": 0.75, "val_top1": 0.9},
               {"target": 0.5, "keep": 0.875, "val_top1": 0.9}, {"target": 0.9, "keep": 0.5, "unreachable": "x"},
               {"target": 0.9, "keep": 1.0, "val_top1": 0.1}]  # fmt: skip
    assert curve.choose(results) == {0.5: 0.875, 0.9: 1.0}  # a tie goes to the larger keep ratio


def test_tome_runs_its_own_schedule_only_where_atme_counts_break_its_limit():
    dense = accuracy.small_vit(0)
    assert not curve.tome_on_its_own(dense, 0.4, "ToMe") and curve.tome_on_its_own(dense, 0.33, "ToMe")
    assert not curve.tome_on_its_own(dense, 0.33, "EViT-style")
    own = compress_baseline(dense, "tome", 0.33, own_schedule=True)
    assert own.schedule == tome_schedule(cost_model(own), 0.33) == (18, 18, 14, 7, 3, 2)  # r = 18, clipped to half from block 2 on
    assert cait.flops(own) / cait.flops(dense) == pytest.approx(0.33, abs=0.01)
    with pytest.raises(ValueError, match="at most half"):
        compress_baseline(dense, "tome", 0.33)
    with pytest.raises(ValueError, match="evit takes no option own_schedule"):
        compress_baseline(dense, "evit", 0.33, own_schedule=True)


def test_cait_plan_prunes_then_merges_to_the_target():
    dense = accuracy.small_vit(0)
    merge, prune = curve.cait_plan(dense, 0.4, 0.75)
    fast = cait.compress(dense, merge=merge, prune=prune)
    assert prune.qk == prune.v == prune.mlp == 0.75 and fast.blocks[0].attn.d_qk == 24
    assert cait.flops(fast) / cait.flops(dense) == pytest.approx(0.4, abs=0.01)
    assert curve.cait_plan(dense, 0.9, 1.0)[1] is None
    with pytest.raises(ValueError, match="below 0.9"):
        curve.cait_plan(dense, 0.9, 0.75)


def test_segmentation_schedule_shapes_hit_their_targets():
    from cait.benchmarks.segmentation import backbone

    model = backbone(0)
    cost = cost_model(cait.compress(model))
    front = seg_plans.schedule_for(cost, "front", 0.6, 2)
    two = seg_plans.schedule_for(cost, "two", 0.6, 2)
    assert front[0] > 0 and sum(front[1:]) == 0 and two[0] >= two[2] > 0 and sum(two) == two[0] + two[2]
    later = seg_plans.schedule_for(cost, "two", 0.6, 2, first=1)
    assert later[0] == 0 and later[1] >= later[3] > 0 and sum(later) == later[1] + later[3] and sum(later) > sum(two)
    for schedule in (front, two, later, seg_plans.schedule_for(cost, "ramp", 0.6, 4)):
        assert cost.flops(schedule) / cost.flops((0,) * 6) == pytest.approx(0.6, abs=0.02)
    merge, prune = seg_plans.Plan("two", 4, 0.75).build(model, 0.5)
    fast = cait.compress(model, merge=merge, prune=prune)
    assert merge.block == 4 and cait.flops(fast) / cait.flops(model) == pytest.approx(0.5, abs=0.02)
    with pytest.raises(ValueError, match="cannot reach"):
        seg_plans.schedule_for(cost, "front", 0.05, 2)
    with pytest.raises(ValueError, match="shape must be one of"):
        seg_plans.schedule_for(cost, "middle", 0.6, 2)
    with pytest.raises(ValueError, match="below 0.9"):
        seg_plans.Plan("ramp", 2, 0.75).build(model, 0.9)
    with pytest.raises(ValueError, match="from block 0"):
        seg_plans.schedule_for(cost, "ramp", 0.6, 2, first=1)
    assert str(seg_plans.Plan("two", 4, 0.75, 1)) == "two from block 1, tile 4, keep 0.75"
    assert str(seg_plans.Plan("two", 4, 0.75)) == "two, tile 4, keep 0.75"  # the names cached scores are kept under


def test_segmentation_choice_prefers_validation_miou_among_the_fast():
    results = [
        {"method": "CAIT", "target": 0.5, "name": "a", "val_miou": 0.50, "img_per_s": 100.0},
        {"method": "CAIT", "target": 0.5, "name": "b", "val_miou": 0.60, "img_per_s": 80.0},  # too slow: under 0.9 x 100
        {"method": "CAIT", "target": 0.5, "name": "c", "val_miou": 0.55, "img_per_s": 91.0},
        {"method": "CAIT", "target": 0.5, "name": "d", "unreachable": "x"},
        {"method": "ALGM-style", "target": 0.5, "name": "e", "val_miou": 0.40, "img_per_s": 50.0},
        {"method": "dense", "target": 1.0, "name": "dense", "val_miou": 0.7, "img_per_s": 40.0},
    ]
    chosen = seg_plans.choose(results)
    assert {m: {t: r["name"] for t, r in c.items()} for m, c in chosen.items()} == {"CAIT": {0.5: "c"}, "ALGM-style": {0.5: "e"}}
