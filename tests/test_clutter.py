"""The cluttered-digits proxy: a function of its seed, classes from the pasted digit, held-out glyphs;
its accuracy curve (the recipe sized to the proxy, a quick run through the CLI)."""

import json

import pytest
import torch

from cait.benchmarks import clutter_curve
from cait.benchmarks.clutter import DEPTH, cluttered_canvases, cluttered_digits, deit_tiny_patch8, one_shot
from cait.benchmarks.runs import RunFolder
from cait.train.recipe import Recipe
from test_cli import run


def test_cluttered_digits_are_deterministic_per_seed():
    first, again, other = (cluttered_digits(seed, train=12, test=6) for seed in (3, 3, 4))
    assert all(torch.equal(a, b) for a, b in zip(first[:4], again[:4]))
    assert not torch.equal(first[0], other[0])
    train_x, train_y, test_x, test_y, fresh = first
    assert train_x.shape == (12, 1, 64, 64) and test_x.shape == (6, 1, 64, 64) and train_y.dtype == torch.int64
    assert train_x.mean().abs() < 1e-5 and abs(float(train_x.std()) - 1) < 1e-5  # normalized by the training canvases
    assert 0 <= int(train_y.min()) and int(train_y.max()) <= 9


def test_fresh_training_canvases_are_new_every_epoch_and_deterministic():
    train_x, train_y, _, _, fresh = cluttered_digits(3, train=12, test=6)
    assert all(torch.equal(a, b) for a, b in zip(fresh(0), (train_x, train_y)))  # epoch 0: the training set
    epoch_1, epoch_2 = fresh(1), fresh(2)
    assert all(torch.equal(a, b) for a, b in zip(epoch_1, cluttered_digits(3, train=12, test=6)[4](1)))
    assert epoch_1[0].shape == train_x.shape and not torch.equal(epoch_1[0], train_x) and not torch.equal(epoch_1[0], epoch_2[0])


def test_the_label_is_the_pasted_digit_and_clutter_is_dimmer():
    glyph = torch.zeros(1, 8, 8)
    glyph[0, 2:6, 3:5] = 1.0  # a bar: where it lands, the canvas is at the digit's brightness (0.8-1)
    images, labels = cluttered_canvases(glyph, torch.tensor([7]), count=4, seed=0, clutter=0)
    assert labels.tolist() == [7] * 4 and (images.amax((1, 2, 3)) >= 0.8).all()
    _, no_digit_labels = cluttered_canvases(glyph, torch.tensor([7]), count=1, seed=0, clutter=3)
    assert no_digit_labels.tolist() == [7]
    with pytest.raises(ValueError, match="size >= 32"):
        cluttered_canvases(glyph, torch.tensor([7]), count=1, seed=0, size=16)


def test_the_digit_side_and_the_background_contrast_follow_the_settings():
    square = torch.ones(1, 8, 8)  # the pasted digit: a bright square of the drawn side, on a flat canvas
    images, _ = cluttered_canvases(square, torch.tensor([1]), count=20, seed=0, clutter=0, digit=(0.5, 0.75), texture=0)
    sides = (images[:, 0] >= 0.8).any(1).sum(1)
    assert 32 <= int(sides.min()) and int(sides.max()) <= 48
    assert bool(((images >= 0.8) | (images == 0.3)).all())  # texture 0: a flat background
    striped, _ = cluttered_canvases(square, torch.tensor([1]), count=20, seed=0, clutter=0, texture=1)
    dimmer, _ = cluttered_canvases(square, torch.tensor([1]), count=20, seed=0, clutter=0, texture=0.5)
    assert torch.allclose(dimmer[striped < 0.8] - 0.3, 0.5 * (striped[striped < 0.8] - 0.3), atol=1e-6)
    for bad in (dict(digit=(0.6, 0.5)), dict(digit=(0.0, 0.5)), dict(texture=-1)):
        with pytest.raises(ValueError, match="0 < digit"):
            cluttered_canvases(square, torch.tensor([1]), count=1, seed=0, **bad)


def test_the_proxy_vit_has_deit_tiny_shape_with_64_patches():
    model = deit_tiny_patch8(0)
    assert (model.embed_dim, len(model.blocks), model.blocks[0].attn.num_heads, model.patch_embed.num_patches) == (192, 12, 3, 64)
    assert model(torch.randn(2, 1, 64, 64)).shape == (2, 10)
    assert len(deit_tiny_patch8(0, depth=6).blocks) == 6  # the CPU setting: DeiT-Tiny's width, half its depth


def test_one_shot_scores_every_method_at_each_flops_target():
    rows = one_shot(deit_tiny_patch8(0), 0, targets=(0.5,), train=64, test=20)
    assert [(r["method"], r["target"]) for r in rows] == [("dense", 1.0), ("ATME", 0.5), ("ATME 4x4", 0.5), ("tome", 0.5), ("evit", 0.5)]
    assert rows[0]["flops_ratio"] == 1.0 and all(abs(r["flops_ratio"] - 0.5) < 0.05 for r in rows[1:])
    assert all(0 <= r["top1"] <= 1 for r in rows)


def test_the_proxy_recipe_keeps_deit_ema_half_life_as_a_share_of_the_run():
    # DeiT: 30 epochs of 2,500 updates (ImageNet at batch 512) with EMA decay 0.99996
    assert clutter_curve.proxy_recipe("deit", 30, 2500).ema_decay == pytest.approx(0.99996, abs=1e-9)
    short = clutter_curve.proxy_recipe("deit", 6, 40)
    assert short.ema_decay ** (0.23 * 240) == pytest.approx(0.5, rel=0.02)  # half-life about 23% of the run, as in DeiT
    assert (short.sched, short.warmup_epochs, short.mixup, short.cutmix, short.distillation) == ("cosine", 1.0, 0.8, 1.0, "hard")
    assert short.auto_augment is None and short.repeated_aug == 0
    assert clutter_curve.proxy_recipe("default", 6, 40) == Recipe.preset("default", epochs=6)


def small_clutter(seed, train):
    """The proxy's canvases, cut to 128 fresh training and 100 test canvases."""
    return cluttered_digits(seed, 128, 100)


def test_clutter_curve_quick_run_through_the_cli(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(clutter_curve, "cluttered_digits", small_clutter)
    monkeypatch.setattr(clutter_curve, "RATIOS", (0.5,))
    weights, work, out = tmp_path / "dense", tmp_path / "work", tmp_path / "curve.json"
    weights.mkdir()
    torch.save(deit_tiny_patch8(0, depth=DEPTH).state_dict(), weights / "seed0.pt")
    argv = ["bench", "--accuracy", "--curve", "--clutter", "--seeds", "1", "--finetune-epochs", "1", "--repeats", "1",
            "--weights", str(weights), "--work", str(work), "--out", str(out)]  # fmt: skip
    assert run(argv) == 0
    data = json.loads(out.read_text())
    methods = [(r["method"], r["target"]) for r in data["rows"]]
    assert methods == [("dense", 1.0)] + [(m, 0.5) for m in clutter_curve.ONE_SHOT + clutter_curve.FINE_TUNED + ("CAIT (old loop)",)]
    assert all(abs(r["flops_ratio"] - r["target"]) < 0.03 and r["img_per_s"] > 0 for r in data["rows"])
    scores = RunFolder(work).scores(0)
    assert scores["CAIT (fine-tuned) @0.5"]["recipe"] == "deit" and "val_ema_top1" in scores["CAIT (fine-tuned) @0.5"]
    assert scores["CAIT (old loop) @0.5"]["recipe"] == "default" and "val_ema_top1" not in scores["CAIT (old loop) @0.5"]
    gain = scores["CAIT (fine-tuned) @0.5"]["top1"] - scores["CAIT (old loop) @0.5"]["top1"]
    assert data["recipe_gain"]["per_seed"] == [pytest.approx(gain)]
    dense = RunFolder(work).load(0, "dense")
    assert torch.equal(dense.state_dict()["head.weight"], torch.load(weights / "seed0.pt")["head.weight"])  # the given weights
    assert "the deit recipe against the default one" in capsys.readouterr().out


def test_clutter_needs_the_accuracy_curve(capsys):
    assert run(["bench", "--accuracy", "--clutter"]) == 2
    assert "--clutter is an accuracy curve" in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--weights", "/no/such/folder"], "--weights /no/such/folder: no such folder"),
        (["--device", "cpu"], "drop --device"),
        (["--models", "deit_tiny_patch16_224", "--batch", "8"], "drop --models, --batch"),
        (["--plot", "/no/such/folder/x.png"], "--plot /no/such/folder/x.png: the folder"),
        (["--time-only"], "'dense' (and 29 more) is not trained for seed 0"),  # 1 + 4 ratios x 7 + the old loop
    ],
)
def test_clutter_curve_refuses_before_any_work(tmp_path, extra, message, capsys):
    argv = ["bench", "--accuracy", "--curve", "--clutter", "--seeds", "1", "--work", str(tmp_path / "work"), *extra]
    assert run(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "work").exists()  # nothing written


def test_clutter_curve_refuses_dense_weights_of_another_model(tmp_path, capsys):
    (tmp_path / "text").mkdir(), (tmp_path / "shallow").mkdir()
    (tmp_path / "text" / "seed0.pt").write_text("not a state dict")
    torch.save(deit_tiny_patch8(1, depth=2).state_dict(), tmp_path / "shallow" / "seed1.pt")  # seed 0 missing: it would train
    for folder, message in (("text", "is not a state dict saved by torch"), ("shallow", "is not the proxy ViT's state dict")):
        assert run(["bench", "--accuracy", "--curve", "--clutter", "--seeds", "2", "--weights", str(tmp_path / folder)]) == 2
        assert message in capsys.readouterr().err


def test_longer_fine_tunes_refuse_a_missing_weights_file(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "bench" / "clutter_longer.py"
    done = subprocess.run([sys.executable, str(script), "--weights", str(tmp_path / "none.pt"), "--out", str(tmp_path / "x.json")],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 2 and "none.pt: no such file" in done.stderr and "Traceback" not in done.stderr
