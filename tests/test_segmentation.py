"""Segmentation: dense features of compressed models, heads and training, mIoU, digit canvases,
saving, the pictures of merged regions, and the `cait` commands around them."""

import json
import math

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image

import cait
from cait import segmentation
from cait.regions import BORDER, merge_owners, regions_picture
from cait.segmentation.data import SegmentationFolder, digit_canvases, digit_glyphs
from cait.train.finetune import Distillation, distillation_loss
from conftest import rel_err
from models import build, images_for
from test_cli import run


@pytest.mark.parametrize("model_id", ["deit_tiny", "deit_distilled", "registers_avg", "non_square", "odd_grid"])
def test_forward_dense_without_merging_equals_the_timm_patch_features(model_id):
    model = build(model_id)
    images = images_for(model, 2)
    with torch.no_grad():
        expected = model.forward_features(images)[:, model.num_prefix_tokens :]
        expected = expected.transpose(1, 2).reshape(2, model.embed_dim, *model.patch_embed.grid_size)
        assert rel_err(cait.compress(model).forward_dense(images), expected) < 1e-5
        assert rel_err(segmentation.patch_features(model, images), expected) < 1e-6


@pytest.mark.parametrize("model_id", ["deit_tiny", "registers_avg", "odd_grid"])
def test_forward_dense_gives_every_cell_the_feature_of_its_token(model_id):
    model = build(model_id)
    fast = cait.compress(model, merge=cait.ATME(flops=0.6), prune=cait.CDCP(qk=0.5, v=0.75, mlp=0.5))
    images = images_for(model, 3)
    with torch.no_grad():
        state = fast.forward_tokens(images)
        dense = fast.forward_dense(images)
    assert state.x.shape[1] < fast.num_prefix_tokens + len(fast.cell_index)  # tokens were merged
    grid = fast.grid
    for b in range(3):
        for cell in range(grid[0] * grid[1]):
            token = fast.num_prefix_tokens + int(state.owner[b, cell])
            assert torch.equal(dense[b, :, cell // grid[1], cell % grid[1]], state.x[b, token])


def test_mean_iou_and_pixel_accuracy_on_a_hand_computed_case():
    labels = torch.tensor([[[0, 0, 1], [1, 2, 2], [segmentation.IGNORE, 0, 1]]])
    predicted = torch.tensor([[[0, 1, 1], [1, 2, 0], [3, 0, 1]]])
    logits = F.one_hot(predicted, 5).permute(0, 3, 1, 2).float()  # class 4 appears nowhere
    result = segmentation.scores(segmentation.confusion(logits, labels, 5))
    # Counted by hand over the 8 labelled pixels (the ignored one predicted 3 counts nowhere):
    # class 0: 2 hits, 1 false positive, 1 miss -> 2/4; class 1: 3 hits, 1 false positive -> 3/4;
    # class 2: 1 hit, 1 miss -> 1/2; class 3: never labelled, never predicted where labelled -> NaN
    assert result["iou"][:3] == pytest.approx([2 / 4, 3 / 4, 1 / 2])
    assert math.isnan(result["iou"][3]) and math.isnan(result["iou"][4])
    assert result["miou"] == pytest.approx((2 / 4 + 3 / 4 + 1 / 2) / 3)
    assert result["pixel_accuracy"] == pytest.approx(6 / 8)
    with pytest.raises(ValueError, match="class indices"):
        segmentation.confusion(logits, labels.clamp_min(0) + 5, 5)
    with pytest.raises(ValueError, match="do not match"):
        segmentation.confusion(logits, labels[:, :2], 5)


def test_per_pixel_distillation_loss_matches_its_formula():
    student, teacher = torch.randn(2, 4, 3, 5), torch.randn(2, 4, 3, 5)
    labels = torch.randint(0, 4, (2, 3, 5))
    labels[0, 0, 0] = segmentation.IGNORE
    p = (teacher / 2).softmax(1)
    kl = (p * (p.log() - (student / 2).log_softmax(1))).sum(1).mean()
    expected = 0.6 * F.cross_entropy(student, labels) + 0.4 * 4 * kl
    assert torch.allclose(distillation_loss(student, teacher, labels, Distillation(0.4, 2.0)), expected, rtol=1e-5)


def tiny_backbone(**overrides):
    kwargs = dict(img_size=32, patch_size=4, in_chans=1, num_classes=0, embed_dim=32, depth=2, num_heads=2) | overrides
    return timm.create_model("vit_tiny_patch16_224", **kwargs)


@pytest.mark.parametrize("head", segmentation.HEADS)
def test_segmenter_shapes_flops_and_training_lowers_the_loss(head):
    torch.manual_seed(0)
    model = segmentation.segmenter(tiny_backbone(), classes=4, head=head)
    images = torch.randn(8, 1, 32, 32)
    labels = torch.randint(0, 4, (8, 8, 8)).repeat_interleave(4, 1).repeat_interleave(4, 2)  # one class per patch: learnable
    assert model(images).shape == (8, 4, 32, 32)
    model.eval()
    assert cait.flops(model) > cait.flops(model.backbone)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.8 * losses[0]


def test_segmentation_student_trains_with_gates_and_materializes():
    torch.manual_seed(0)
    dense = segmentation.segmenter(tiny_backbone(), classes=3).eval()
    student = segmentation.make_student(dense, cait.ATME(flops=0.7), cait.CDCP(qk=0.5, v=0.5, mlp=0.5), warmup=2)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3)
    images, labels = torch.randn(4, 1, 32, 32), torch.randint(0, 3, (4, 32, 32))
    for _ in range(3):
        loss = F.cross_entropy(student(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        student.step()
    model = student.materialize().eval()
    assert isinstance(model, segmentation.Segmenter) and model.backbone.blocks[0].attn.d_qk == 8
    assert model(images).shape == (4, 3, 32, 32)
    with pytest.raises(TypeError, match="Segmenter"):
        segmentation.make_student(dense.backbone, None, None, 0)


@pytest.mark.parametrize("model_id", ["deit_distilled", "avg_pool_class_token", "siglip_map", "eva02", "pe_core_map"])
def test_every_parameter_of_a_segmentation_model_gets_a_gradient(model_id, tmp_path):
    """DistributedDataParallel (no find_unused_parameters) needs a gradient for every parameter: a model
    built for segmentation (the Python API's, its distillation student, a loaded one) keeps nothing of
    its backbone's pooling and classifier (head, distillation head, fc_norm, attention pooling)."""
    torch.manual_seed(0)
    model = build(model_id)  # with timm's classifier head, as a user's backbone
    seg = segmentation.segmenter(model, classes=3)
    student = segmentation.make_student(seg, cait.ATME(flops=0.8), cait.CDCP(qk=0.5, v=0.75, mlp=0.5), warmup=2)
    cait.save(segmentation.Segmenter(cait.compress(seg.backbone), seg.head), tmp_path / "seg.safetensors")
    loaded = cait.load(tmp_path / "seg.safetensors").train()
    images = images_for(model, 2)
    labels = torch.randint(0, 3, (2, *images.shape[2:]))
    for task_model in (seg.train(), student.train(), loaded):
        F.cross_entropy(task_model(images), labels).backward()
        trained = [name for name, p in task_model.named_parameters() if p.requires_grad]
        unused = [name for name, p in task_model.named_parameters() if p.requires_grad and p.grad is None]
        assert trained and unused == []
    assert student.gates is not None and all(p.grad is not None for p in student.gates.parameters())


def test_a_segmentation_file_that_still_holds_the_backbone_classifier_loads(tmp_path, monkeypatch):
    """Files written before segmenters dropped their backbone's classifier hold its tensors (unused)."""
    torch.manual_seed(0)
    with monkeypatch.context() as before:
        before.setattr(segmentation.model, "drop_classifier", lambda backbone: backbone)
        old = segmentation.segmenter(cait.compress(tiny_backbone(num_classes=10, global_pool="avg")), classes=3).eval()
        cait.save(old, tmp_path / "old.safetensors")
    assert {"backbone.vit.head.weight", "backbone.vit.fc_norm.weight"} <= safe_open_keys(tmp_path / "old.safetensors")
    loaded = cait.load(tmp_path / "old.safetensors")
    assert isinstance(loaded.backbone.head, torch.nn.Identity) and isinstance(loaded.backbone.fc_norm, torch.nn.Identity)
    images = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(images), old(images))


def safe_open_keys(path) -> set:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return set(f.keys())


def test_save_and_load_a_segmentation_model(tmp_path):
    dense = segmentation.segmenter(tiny_backbone(), classes=5, head="upsample")
    model = segmentation.Segmenter(cait.compress(dense.backbone, merge=cait.ATME(flops=0.7)), dense.head).eval()
    cait.save(model, tmp_path / "seg.safetensors")
    loaded = cait.load(tmp_path / "seg.safetensors")
    images = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(images), model(images))
    assert segmentation.head_kind(loaded.head) == "upsample" and loaded.backbone.schedule == model.backbone.schedule
    with pytest.raises(TypeError, match="Segmenter on one"):
        cait.save(dense, tmp_path / "dense.safetensors")  # a timm backbone: compress it (even with nothing) first


def test_bad_segmentation_arguments_are_refused():
    with pytest.raises(ValueError, match="head must be one of"):
        segmentation.segmenter(tiny_backbone(), classes=3, head="fpn")
    with pytest.raises(ValueError, match="at least 2 classes"):
        segmentation.segmenter(tiny_backbone(), classes=1)
    with pytest.raises(NotImplementedError):
        segmentation.segmenter(timm.create_model("resnet18", num_classes=0), classes=3)
    with pytest.raises(ValueError, match="hidden >= 1"):
        segmentation.UpsamplingHead(8, 3, hidden=0)


def test_digit_canvases_are_labelled_where_the_digits_are():
    (glyphs, digits), (test_glyphs, _) = digit_glyphs(0)
    assert len(glyphs) + len(test_glyphs) == 1797
    images, labels = digit_canvases(glyphs, digits, 20, 48, seed=3)
    assert images.shape == (20, 1, 48, 48) and labels.shape == (20, 48, 48)
    assert 0 <= float(images.min()) and float(images.max()) <= 1
    foreground = labels > 0
    assert 0.03 < float(foreground.float().mean()) < 0.4 and int(labels.max()) <= 10
    assert float(images[:, 0][foreground].mean()) > float(images[:, 0][~foreground].mean()) + 0.2  # strokes are bright
    again, _ = digit_canvases(glyphs, digits, 20, 48, seed=3)
    assert torch.equal(again, images)


def write_segmentation_folder(root, count=4, size=32, classes=3):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        (root / split / "images").mkdir(parents=True)
        (root / split / "masks").mkdir(parents=True)
        for i in range(count):
            mask = rng.integers(0, classes, (size, size)).astype(np.uint8)
            mask[0, 0] = 255
            pixels = (mask[..., None] * 80 + rng.integers(0, 40, (size, size, 3))).astype(np.uint8)
            Image.fromarray(pixels).save(root / split / "images" / f"{i}.png")
            Image.fromarray(mask).save(root / split / "masks" / f"{i}.png")


def test_segmentation_folder_reads_pairs_and_refuses_incomplete_ones(tmp_path):
    write_segmentation_folder(tmp_path)
    data = SegmentationFolder(str(tmp_path), "train", (3, 16, 24), mean=(0.5,) * 3, std=(0.25,) * 3)
    image, labels = data[0]
    assert image.shape == (3, 16, 24) and labels.shape == (16, 24) and labels.dtype == torch.int64
    assert int(labels[0, 0]) == segmentation.IGNORE and set(labels.unique().tolist()) <= {segmentation.IGNORE, 0, 1, 2}
    (tmp_path / "train" / "masks" / "1.png").unlink()
    with pytest.raises(ValueError, match="have no mask"):
        SegmentationFolder(str(tmp_path), "train", (3, 16, 16), (0.5,) * 3, (0.25,) * 3)
    with pytest.raises(ValueError, match="no test/images"):
        SegmentationFolder(str(tmp_path), "test", (3, 16, 16), (0.5,) * 3, (0.25,) * 3)


def test_finetune_segmentation_dense_then_compressed_then_eval_info_and_visualize(tmp_path, capsys):
    write_segmentation_folder(tmp_path / "data")
    model = ["--model", "deit_tiny_patch16_224", "--img-size", "32", "--num-classes", "3"]
    common = ["finetune", "--task", "segmentation", "--data", str(tmp_path / "data"), "--batch-size", "2", "--workers", "0"]
    assert run(common + model + ["--epochs", "1", "--out", str(tmp_path / "dense")]) == 0
    assert "training on the labels only" in capsys.readouterr().out
    teacher = str(tmp_path / "dense" / "model.safetensors")
    compress = ["--merge-flops", "0.8", "--keep-qk", "0.5", "--keep-mlp", "0.5", "--anneal-epochs", "1", "--epochs", "2"]
    assert run(common + ["--teacher", teacher, *compress, "--out", str(tmp_path / "cait")]) == 0
    log = json.loads((tmp_path / "cait" / "log.json").read_text())
    assert [e["epoch"] for e in log] == [1, 2] and all(0 <= e["val_miou"] <= 1 for e in log)
    assert "val miou" in capsys.readouterr().out
    saved = tmp_path / "cait" / "model.safetensors"
    loaded = cait.load(saved)
    assert isinstance(loaded, segmentation.Segmenter) and sum(loaded.backbone.schedule) > 0
    assert run(["eval", "--data", str(tmp_path / "data"), "--workers", "0", str(saved)]) == 0
    assert "mIoU" in capsys.readouterr().out
    assert run(["info", str(saved)]) == 0
    assert "linear segmentation head, 3 classes" in capsys.readouterr().out
    picture = tmp_path / "regions.png"
    assert run(["visualize", "--model", str(saved), str(tmp_path / "data" / "val" / "images" / "0.png"), "--out", str(picture)]) == 0
    assert Image.open(picture).height > 32
    # a compressed teacher is refused, and so is a classification-only flag
    assert run(common + ["--teacher", str(saved), "--epochs", "1", "--out", str(tmp_path / "bad")]) == 2
    assert "the teacher must be the dense segmentation model" in capsys.readouterr().err
    assert run(common + model[:4] + ["--epochs", "1", "--out", str(tmp_path / "bad")]) == 2
    assert "--num-classes" in capsys.readouterr().err


def test_visualize_draws_borders_exactly_where_the_owner_changes():
    model = build("deit_tiny")
    fast = cait.compress(model, merge=cait.ATME(flops=0.5))
    image = torch.randn(3, 224, 224)
    owner = merge_owners(fast, image[None])[-1][0]
    picture = cait.visualize(fast, image)
    assert picture.size == (224, 224)
    base = ((image - image.min()) / (image.max() - image.min()) * 255).round().to(torch.uint8).permute(1, 2, 0)  # min-max scaled
    drawn = torch.from_numpy(np.array(picture))
    cells = owner.repeat_interleave(16, 0).repeat_interleave(16, 1)
    border = torch.zeros(224, 224, dtype=torch.bool)
    border[:, :-1] |= cells[:, :-1] != cells[:, 1:]
    border[:-1] |= cells[:-1] != cells[1:]
    assert border.any() and not border.all()
    assert (drawn[border] == torch.tensor(BORDER, dtype=torch.uint8)).all()
    assert torch.equal(drawn[~border], base[~border])
    strip = cait.visualize(fast, image, blocks="all", style="mean", scale=2)
    assert strip.width > 448 * 2 and strip.height > 448


def test_regions_picture_mean_style_and_bad_arguments():
    picture = torch.arange(4 * 4 * 3, dtype=torch.uint8).reshape(4, 4, 3)
    owner = torch.tensor([[0, 0], [1, 2]])
    out = regions_picture(picture, owner, "mean")
    assert torch.equal(out[3, 0], picture[2:, :2].reshape(-1, 3).float().mean(0).round().to(torch.uint8))  # inside token 1
    with pytest.raises(ValueError, match="style"):
        regions_picture(picture, owner, "fill")
    with pytest.raises(ValueError, match="does not split"):
        regions_picture(picture[:3], owner)
    fast = cait.compress(build("deit_tiny"), merge=cait.ATME(flops=0.8))
    with pytest.raises(ValueError, match="scale"):
        cait.visualize(fast, torch.randn(3, 224, 224), scale=0)
    with pytest.raises(ValueError, match="input shape"):
        cait.visualize(fast, torch.randn(3, 32, 32))
    with pytest.raises(ValueError, match="block index"):
        cait.visualize(fast, torch.randn(3, 224, 224), blocks=12)
    with pytest.raises(TypeError, match="cait.compress"):
        cait.visualize(build("deit_tiny"), torch.randn(3, 224, 224))
    assert cait.visualize(fast, Image.new("RGB", (300, 200), (10, 200, 30))).size == (224, 224)


def test_segmentation_benchmark_quick_run_writes_rows_a_picture_and_a_plot(tmp_path, monkeypatch, capsys):
    from cait.benchmarks import segmentation as segmentation_bench

    monkeypatch.setattr(segmentation_bench, "TRAIN", 64)
    monkeypatch.setattr(segmentation_bench, "TEST", 64)
    monkeypatch.setattr(segmentation_bench, "TARGETS", (0.5,))
    out, picture, plot, work = tmp_path / "seg.json", tmp_path / "seg.png", tmp_path / "plot.png", tmp_path / "work"
    argv = ["bench", "--segmentation", "--seeds", "1", "--epochs", "1", "--finetune-epochs", "1", "--repeats", "1", "--work", str(work),
            "--out", str(out), "--picture", str(picture), "--plot", str(plot)]  # fmt: skip
    assert run(argv) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["method"] for r in rows] == [
        "dense", "CAIT (fine-tuned)", "CAIT one-shot", "ALGM-style", "ToMe + unmerge", "token pruning (EViT-style)",
        "CAIT (fine-tuned), block-1 schedule",
    ]  # fmt: skip
    assert all(set(r) == {"method", "gflops", "flops_ratio", "miou_mean", "miou_std", "img_per_s", "target"} for r in rows)
    assert rows[0]["flops_ratio"] == 1 and all(abs(r["flops_ratio"] - 0.5) < 0.03 for r in rows[1:-1])
    assert 0.55 < rows[-1]["flops_ratio"] < 0.65 and rows[-1]["target"] == round(rows[-1]["flops_ratio"], 2)
    assert Image.open(picture).width > 48 * 4 and Image.open(plot).width > 600
    assert "| CAIT (fine-tuned) | 0.5 |" in capsys.readouterr().out
    assert run(argv[:-6] + ["--time-only", "--out", str(out)]) == 0
    assert [r["miou_mean"] for r in json.loads(out.read_text())["rows"]] == [r["miou_mean"] for r in rows]


def test_segmentation_tuning_quick_run_scores_every_candidate(tmp_path, monkeypatch):
    from cait.benchmarks import seg_plans
    from cait.benchmarks import segmentation as segmentation_bench

    monkeypatch.setattr(segmentation_bench, "TRAIN", 64)
    monkeypatch.setattr(segmentation_bench, "TEST", 64)
    monkeypatch.setattr(segmentation_bench, "TARGETS", (0.5,))
    monkeypatch.setattr(seg_plans, "SHAPES", ("two", "front"))
    monkeypatch.setattr(seg_plans, "TILES", (4,))
    monkeypatch.setattr(seg_plans, "KEEPS", (0.75,))
    monkeypatch.setattr(seg_plans, "FIRSTS", (0, 1))
    monkeypatch.setattr(seg_plans, "ALGM_SHARES", (0.5,))
    out = tmp_path / "tune.json"
    argv = ["bench", "--segmentation", "--tune", "--epochs", "1", "--finetune-epochs", "1", "--work", str(tmp_path), "--out", str(out)]
    assert run(argv) == 0
    data = json.loads(out.read_text())
    candidates = [c for c in data["candidates"] if c["method"] != "dense"]
    assert [(c["method"], c.get("shape"), c.get("first"), c.get("local_share")) for c in candidates] == [
        ("CAIT", "two", 0, None), ("CAIT", "front", 0, None), ("CAIT", "two", 1, None), ("CAIT", "front", 1, None),
        ("ALGM-style", None, None, 0.5),
    ]  # fmt: skip
    assert all(0 <= c["val_miou"] <= 1 and c["img_per_s"] > 0 and abs(c["flops_ratio"] - 0.5) < 0.03 for c in candidates)
    assert candidates[0]["schedule"][0] > 0 and candidates[0]["schedule"][2] > 0 and sum(candidates[1]["schedule"][1:]) == 0
    assert candidates[2]["schedule"][0] == 0 and candidates[2]["schedule"][1] > 0 and candidates[2]["schedule"][3] > 0
    assert candidates[3]["schedule"][0] == 0 and sum(candidates[3]["schedule"][2:]) == 0
    assert set(data["chosen"]) == {"CAIT", "ALGM-style"} and data["chosen"]["ALGM-style"] == {"0.5": candidates[4]["name"]}
