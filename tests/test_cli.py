"""The `cait` command line: compress -> info -> load, bench, --help, and errors (in-process)."""

import json

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import cait
from cait.cli import build_parser, main


def run(argv):
    try:
        main(argv)
    except SystemExit as stop:
        return stop.code
    return 0


def test_compress_info_and_load(tmp_path, capsys):
    images = tmp_path / "calibration" / "class_a"
    images.mkdir(parents=True)
    for i in range(3):
        Image.fromarray((np.random.rand(40, 50, 3) * 255).astype("uint8")).save(images / f"{i}.png")
    out = tmp_path / "deit_t.safetensors"
    code = run(
        [
            "compress",
            "--model",
            "deit_tiny_patch16_224",
            "--img-size",
            "160",
            "128",
            "--merge-flops",
            "0.7",
            "--keep-qk",
            "0.5",
            "--keep-v",
            "0.75",
            "--keep-mlp",
            "0.75",
            "--calibration",
            str(tmp_path / "calibration"),
            "--out",
            str(out),
        ]
    )
    assert code == 0 and out.exists()
    printed = capsys.readouterr().out
    assert "10x8 patches" in printed and "GFLOPs" in printed
    assert run(["info", str(out)]) == 0
    info = capsys.readouterr().out
    assert "deit_tiny_patch16_224" in info and "of dense" in info
    assert "FLOPs target 0.7, solved per input size; its own input size only" in info and "origin    merge and keep ratios given" in info
    model = cait.load(out)
    assert model.blocks[0].attn.d_qk == 32 and model.blocks[0].attn.d_v == 48
    assert model(torch.randn(1, 3, 160, 128)).shape == (1, 1000)


@pytest.mark.parametrize("align, hidden", [([], 536), (["--align", "1"], 538), (["--align", "8", "64"], 512)])
def test_compress_aligns_kept_counts(tmp_path, capsys, align, hidden):
    """DeiT-T keeps 0.7 of 768 MLP units: 537.6 -> 536 (multiple of 8, the default), 538 exact, 512 (of 64)."""
    out = tmp_path / "m.safetensors"
    argv = ["compress", "--model", "deit_tiny_patch16_224", "--img-size", "64", "--keep-mlp", "0.7", "--out", str(out), *align]
    assert run(argv) == 0
    assert cait.load(out).blocks[0].mlp.fc1.out_features == hidden
    assert f"  {hidden}" in capsys.readouterr().out  # cait compress prints the widths of every block


def test_bench_writes_rows(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = run(
        [
            "bench",
            "--models",
            "deit_tiny_patch16_224",
            "--batch",
            "1",
            "--repeats",
            "1",
            "--variant",
            "merge=0.8",
            "--variant",
            "merge=0.8,prune=0.5/0.5/0.5",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["variant"] for r in rows] == ["dense", "merge=0.8", "merge=0.8,prune=0.5/0.5/0.5"]
    assert rows[0]["speedup"] == 1.0 and 0.3 < rows[2]["flops_ratio"] < 0.6
    assert rows[0]["merge_share"] is None and all(0 < r["merge_share"] < 1 for r in rows[1:])
    text, err = capsys.readouterr()
    assert "speedup x FLOPs ratio | merge % |" in text and "| 1.00 | - |" in text
    assert text.count("| model | variant |") == 1 and "warning: no --checkpoint: the timm models in --models have random weights" in err


def test_help_explains_every_flag():
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    for name, sub in commands.items():
        for action in sub._actions:
            assert action.help, f"cait {name} {action.option_strings} has no help"
    assert run(["compress", "--help"]) == 0


@pytest.mark.parametrize(
    "argv, message",
    [
        (["compress", "--model", "deit_tiny_patch16_224", "--out", "x.safetensors"], "nothing to compress"),
        (["compress", "--model", "deit_tiny_patch16_224", "--merge-r", "0", "--out", "x.safetensors"], "--merge-r 0 merge nothing"),
        (["compress", "--model", "deit_tiny_patch16_224", "--merge-flops", "1", "--out", "x.safetensors"], "nothing to compress"),
        (["compress", "--model", "no_such_model", "--merge-r", "2", "--out", "x.safetensors"], "Unknown model"),
        (["compress", "--model", "deit_tiny_patch16_224", "--merge-r", "200", "--out", "x.safetensors"], "at most 147"),
        (
            ["compress", "--model", "deit_tiny_patch16_224", "--keep-v", "0.5", "--importance", "activation", "--out", "x"],
            "needs --calibration",
        ),
        (
            ["compress", "--model", "deit_tiny_patch16_224", "--keep-v", "0.5", "--calibration", "/no/such/dir", "--out", "x"],
            "is not a folder",
        ),
        (["compress", "--model", "deit_tiny_patch16_224", "--keep-v", "1.5", "--out", "x"], "keep ratio"),
        (
            ["compress", "--model", "deit_tiny_patch16_224", "--keep-v", "0.5", "--calibration", ".", "--calibration-images", "0",
             "--out", "x"],
            "--calibration-images must be 1 or more",
        ),  # fmt: skip
        (["info", "/no/such/file.safetensors"], "no such file"),
        (["bench", "--variant", "merge=0.7,speed=2"], "must look like"),
    ],
)
def test_errors_are_one_clear_line(argv, message, capsys):
    assert run(argv) == 2
    err = capsys.readouterr().err
    assert message in err.strip().splitlines()[-1] and "Traceback" not in err


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A compressed DeiT-Ti on a 4x4 grid saved by cait (1000 classes), and a 2-class image folder."""
    folder = tmp_path_factory.mktemp("saved")
    model = timm.create_model("deit_tiny_patch16_224", img_size=64, depth=2)
    cait.save(cait.compress(model, merge=cait.ATME(r=2), prune=cait.CDCP(mlp=0.5)), folder / "m.safetensors")
    seg = cait.segmentation.segmenter(cait.compress(model), classes=3)
    cait.save(seg, folder / "seg.safetensors")
    for label in ("cat", "dog"):
        (folder / "data" / "val" / label).mkdir(parents=True)
        Image.fromarray((np.random.rand(64, 64, 3) * 255).astype("uint8")).save(folder / "data" / "val" / label / "0.png")
    torch.save(timm.create_model("deit_tiny_patch16_224", num_classes=10).state_dict(), folder / "ten_classes.pth")
    return folder


@pytest.mark.parametrize(
    "argv, message",
    [
        (["compress", "--model", "deit_tiny_patch16_224", "--checkpoint", "{dir}/no.pth", "--merge-r", "2", "--out", "x"], "no such file"),
        (["compress", "--model", "deit_tiny_patch16_224", "--checkpoint", "{dir}/m.safetensors", "--merge-r", "2", "--out", "{dir}/x"],
         "is a compressed model saved by cait, not timm weights: pass it to `cait bench --models`"),
        (["compress", "--model", "deit_tiny_patch16_224", "--checkpoint", "{dir}/ten_classes.pth", "--merge-r", "2", "--out", "{dir}/x"],
         "does not fit deit_tiny_patch16_224 as built here: 2 problems, first: size mismatch for head.weight"),
        (["compress", "--model", "deit_tiny_patch16_224", "--merge-r", "2", "--out", "{dir}/no/x.safetensors"], "/no does not exist"),
        (["bench", "--models", "deit_tiny_patch16_224", "--out", "{dir}/no/rows.json"], "/no does not exist"),
        (["bench", "--models", "deit_tiny_patch16_224", "--checkpoint", "{dir}/m.safetensors"], "is a compressed model saved by cait"),
        (["bench", "--models", "{dir}/m.safetensors", "--checkpoint", "{dir}/ten_classes.pth"], "exactly one timm model name"),
        (["bench", "--models", "deit_tiny_patch16_224", "no_such_vit"], "no_such_vit: not a timm model name"),
        (["bench", "--models", "{dir}/seg.safetensors"], "holds a segmentation model"),
        (["bench", "--models", "{dir}/none.safetensors"], "no such file"),
        (["eval", "{dir}/m.safetensors", "--data", "{dir}/data", "--workers", "0"], "has 1000 classes but"),
        (["visualize", "--model", "{dir}/m.safetensors", "{dir}/none.png", "--out", "{dir}/r.png"], "no such image"),
        (["compress", "--model", "deit_tiny_patch16_224", "--merge-r", "2", "--out", "{dir}"], "is a folder: give a file name"),
        (["compress", "--model", "deit_tiny_patch16_224", "--merge-r", "2", "--out", "{dir}/m.pt2"], "ends in .safetensors"),
        (["compress", "--model", "deit_tiny_patch16_224", "--keep-qk", "0", "--out", "{dir}/x.safetensors"], "keep ratio"),
        (["compress", "--model", "deit_tiny_patch16_224", "--merge-flops", "1.5", "--out", "{dir}/x.safetensors"], "flops must be"),
        (["compress", "--model", "deit_tiny_patch16_224", "--merge-r", "2", "--num-classes", "-3", "--out", "{dir}/x.safetensors"],
         "--num-classes must be 0"),
        (["bench", "--models", "{dir}/m.safetensors", "--batch", "0"], "--batch sizes must be at least 1"),
        (["bench", "--models", "{dir}/m.safetensors", "--variant", "merge=0.5"], "a saved file is timed as it was saved"),
    ],
)
def test_command_line_mistakes_are_one_line_before_any_work(saved, argv, message, capsys):
    assert run([a.format(dir=saved) for a in argv]) == 2
    err = capsys.readouterr().err
    assert message in err.strip().splitlines()[-1] and "Traceback" not in err
    assert "random weights" not in err or "--checkpoint" in argv  # refused before a model was built


def test_bench_times_a_saved_file_and_prints_the_table_once(saved, capsys):
    assert run(["bench", "--models", str(saved / "m.safetensors"), "--batch", "1", "--repeats", "1"]) == 0
    out, err = capsys.readouterr()
    assert out.count("| model | variant |") == 1
    assert "| saved |" in out and "| dense |" in out and "warning" not in err


def test_random_weights_are_announced(capsys):
    assert run(["compress", "--model", "deit_tiny_patch16_224", "--merge-r", "200", "--out", "x.safetensors"]) == 2
    assert "warning: no --checkpoint or --pretrained: deit_tiny_patch16_224 has random weights" in capsys.readouterr().err


def test_version(capsys):
    assert run(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"cait {cait.__version__}"


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU, --kernels times every kernel (bench/, not a test)")
def test_bench_kernels_without_a_gpu_prints_the_compile_report(tmp_path, capsys, monkeypatch):
    from cait_kernels import aot

    builds = aot.all_builds()
    first_two = [b.label for b in builds[:2]]
    monkeypatch.setattr(aot, "report", lambda progress=None, _report=aot.report: _report(select=first_two[0], progress=progress))
    assert run(["bench", "--kernels", "--out", str(tmp_path / "k.json")]) == 0
    printed = capsys.readouterr().out
    assert "kernel timings need a CUDA GPU" in printed and first_two[0] in printed and "sm_90" in printed
    saved = json.loads((tmp_path / "k.json").read_text())
    assert {row["arch"] for row in saved["compile_report"]} == {80, 90}


@pytest.mark.parametrize(
    "argv, message", [(["bench", "--cuda-graph", "--device", "cpu"], "--cuda-graph needs --device cuda")]
    + ([] if torch.cuda.is_available() else [(["bench", "--device", "cuda"], "no CUDA GPU is visible")]),
)
def test_gpu_options_refused_where_they_cannot_work(argv, message, capsys):
    assert run(argv) == 2
    assert message in capsys.readouterr().err


def test_an_unreadable_calibration_image_is_named(tmp_path, capsys):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "broken.jpg").write_bytes(b"not a jpeg")
    argv = ["compress", "--model", "deit_tiny_patch16_224", "--img-size", "64", "--keep-v", "0.5", "--calibration",
            str(tmp_path / "images"), "--out", str(tmp_path / "m.safetensors")]  # fmt: skip
    assert run(argv) == 2
    assert f"cannot read {tmp_path / 'images' / 'broken.jpg'}" in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--seed", "-5"], "--seed must be >= 0, got -5"),
        (["--workers", "-1"], "--workers must be >= 0, got -1"),
        (["--out", "{dir}/file"], "--out {dir}/file: {dir}/file is a file, not a folder"),
        (["--out", "{dir}/file/run"], "--out {dir}/file/run: {dir}/file is a file, not a folder"),
        (["--out", "{dir}/started", "--resume"], "--resume: no {dir}/started/checkpoint.pt"),
        (["--resume"], "--resume: no {dir}/run/checkpoint.pt"),
        (["--out", "{dir}/done"], "--out {dir}/done holds a run: give --resume to continue it, or another --out"),
        (["--recipe", "deit", "--batch-size", "4"],
         "--min-lr 1e-05 is above the learning rate 3.91e-06 (--lr-base 0.0005 x global batch 4 / 512): give a larger --lr or"),
        (["--warmup-epochs", "1", "--warmup-lr", "1e-3"],
         "--warmup-lr 0.001 is above the learning rate 0.0001 (--lr): give a larger --lr or a smaller --warmup-lr"),
    ],
)
def test_finetune_refuses_bad_arguments_in_one_line_before_any_work(tmp_path, extra, message, capsys):
    """Before the model is built (no random-weights warning) and before anything is written."""
    (tmp_path / "file").write_text("")
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "checkpoint.pt").write_text("")
    (tmp_path / "started").mkdir()
    (tmp_path / "started" / "recipe.json").write_text("{}")
    argv = ["finetune", "--model", "deit_tiny_patch16_224", "--data", str(tmp_path / "data"), "--keep-v", "0.5",
            "--out", str(tmp_path / "run")]  # fmt: skip
    assert run(argv + [a.format(dir=tmp_path) for a in extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message.format(dir=tmp_path) in err[0], err
    assert not (tmp_path / "run").exists() and (tmp_path / "started" / "recipe.json").read_text() == "{}"


@pytest.mark.parametrize("val, message", [(("cat",), "lacks ['dog'], has none besides"), (("cat", "cow", "dog"), "has ['cow'] besides")])
def test_finetune_refuses_val_classes_other_than_train_ones(tmp_path, val, message, capsys):
    """torchvision's ImageFolder numbers the classes of each folder on its own: other classes in val/ mislabel it."""
    for split, labels in (("train", ("cat", "dog")), ("val", val)):
        for label in labels:
            (tmp_path / "data" / split / label).mkdir(parents=True)
            Image.fromarray((np.random.rand(64, 64, 3) * 255).astype("uint8")).save(tmp_path / "data" / split / label / "0.png")
    argv = ["finetune", "--model", "deit_tiny_patch16_224", "--img-size", "64", "--num-classes", "2", "--data", str(tmp_path / "data"),
            "--keep-v", "0.5", "--workers", "0", "--out", str(tmp_path / "run")]  # fmt: skip
    assert run(argv) == 2
    err = capsys.readouterr().err
    assert "val/ and train/ must hold the same class folders" in err.strip().splitlines()[-1] and message in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()
