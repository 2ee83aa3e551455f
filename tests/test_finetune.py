"""Fine-tuning: the distillation loss against its formula, and `cait finetune` -> `--resume` ->
`cait eval` end to end on a tiny generated ImageFolder."""

import json

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image

import cait
from cait.train.finetune import Distillation, distillation_loss
from test_cli import run


def test_distillation_loss_matches_its_formula():
    student, teacher, labels = torch.randn(5, 7), torch.randn(5, 7), torch.randint(0, 7, (5,))
    d = Distillation(alpha=0.3, temperature=2.0)
    p_teacher = (teacher / 2).softmax(-1)
    kl = (p_teacher * (p_teacher.log() - (student / 2).log_softmax(-1))).sum(-1).mean()
    expected = 0.7 * F.cross_entropy(student, labels) + 0.3 * 4 * kl
    assert torch.allclose(distillation_loss(student, teacher, labels, d), expected, rtol=1e-5)
    dist_head = torch.randn(5, 7)  # a distilled DeiT: CE on the class head, KL on the distillation head
    p = (teacher / 2).softmax(-1)
    kl = (p * (p.log() - (dist_head / 2).log_softmax(-1))).sum(-1).mean()
    both = distillation_loss((student, dist_head), teacher, labels, d)
    assert torch.allclose(both, 0.7 * F.cross_entropy(student, labels) + 0.3 * 4 * kl, rtol=1e-5)
    assert torch.equal(distillation_loss(student, None, labels, Distillation(alpha=0)), F.cross_entropy(student, labels))
    with pytest.raises(ValueError, match="alpha"):
        Distillation(alpha=1.5)


def image_folder(root, per_class=6):
    """Two classes told apart by colour, with noise: train/ and val/."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for label, colour in enumerate(((200, 40, 40), (40, 40, 200))):
            folder = root / split / f"class{label}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = np.clip(np.array(colour) + rng.normal(0, 40, (64, 64, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")


def test_finetune_resume_save_and_eval_end_to_end(tmp_path, capsys):
    image_folder(tmp_path / "data")
    teacher = timm.create_model("deit_tiny_patch16_224", img_size=64, num_classes=2)
    torch.save(teacher.state_dict(), tmp_path / "teacher.pth")
    common = ["finetune", "--model", "deit_tiny_patch16_224", "--img-size", "64", "--num-classes", "2", "--checkpoint",
              str(tmp_path / "teacher.pth"), "--data", str(tmp_path / "data"), "--merge-flops", "0.8", "--keep-qk", "0.5",
              "--keep-v", "0.75", "--keep-mlp", "0.5", "--batch-size", "4", "--workers", "0", "--out", str(tmp_path / "run")]  # fmt: skip
    assert run(common + ["--epochs", "2", "--anneal-epochs", "1"]) == 0
    log = json.loads((tmp_path / "run" / "log.json").read_text())
    assert [e["epoch"] for e in log] == [1, 2] and all(0 <= e["val_top1"] <= 1 for e in log)
    assert run(common + ["--epochs", "3", "--anneal-epochs", "1", "--resume"]) == 0
    log = json.loads((tmp_path / "run" / "log.json").read_text())
    assert [e["epoch"] for e in log] == [1, 2, 3]
    printed = capsys.readouterr().out
    assert "epoch 3/3" in printed and "epoch 1/3" not in printed and "kept qk 32/64 v 48/64 mlp 384/768" in printed
    model = cait.load(tmp_path / "run" / "model.safetensors")
    assert model.blocks[0].attn.d_qk == 32 and model.blocks[0].mlp.fc1.out_features == 384 and sum(model.schedule) > 0
    assert run(["eval", "--data", str(tmp_path / "data"), "--workers", "0", str(tmp_path / "run" / "model.safetensors")]) == 0
    assert "top-1" in capsys.readouterr().out


def test_finetune_refuses_a_teacher_for_other_classes(tmp_path, capsys):
    image_folder(tmp_path / "data", per_class=1)
    argv = ["finetune", "--model", "deit_tiny_patch16_224", "--img-size", "64", "--data", str(tmp_path / "data"), "--keep-v", "0.5",
            "--epochs", "1", "--out", str(tmp_path / "run")]  # fmt: skip
    assert run(argv) == 2
    assert "the teacher must be trained for these classes" in capsys.readouterr().err
