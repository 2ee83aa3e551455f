"""The fine-tuning recipe: presets and refusals, and that each timm component is really active, read
off the optimizer's parameter groups and the batches the models see (not off flags): layer decay and
no weight decay on norms/biases/tokens, the warm-up + cosine schedule per update, Mixup/CutMix on the
student's and the teacher's images with soft targets, EMA weights; a run interrupted mid-epoch and
resumed ends with the uninterrupted run's weights, bit for bit."""

import math

import pytest
import timm
import timm.optim
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import cait
from cait.train import components
from cait.train.finetune import Distillation, Loop, distillation_loss, fit, make_student, teacher_of, train_epoch
from cait.train.recipe import Recipe
from test_cli import run

DEPTH, CLASSES = 2, 4


def tiny_vit(seed: int = 0):
    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=DEPTH, num_heads=2, num_classes=CLASSES)


def tiny_student(model, warmup: int = 3):
    return make_student(model, cait.ATME(flops=0.8), cait.CDCP(qk=0.5, v=0.5, mlp=0.5, align=1), warmup=warmup)


def data(n: int = 16, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, CLASSES, (n,), generator=g))


def group_of(optimizer, parameter):
    (group,) = [g for g in optimizer.param_groups if any(p is parameter for p in g["params"])]
    return group


def test_presets_scale_the_learning_rate_and_bad_values_name_their_flag():
    deit = Recipe.preset("deit")
    assert deit.learning_rate(world_size=8) == pytest.approx(5e-4)  # 64 x 8 = 512 images
    assert Recipe.preset("deit", batch_size=128, accumulate=2).learning_rate(world_size=4) == pytest.approx(5e-4 * 1024 / 512)
    assert Recipe.preset("deit", lr=3e-5).learning_rate(world_size=8) == 3e-5
    assert Recipe().learning_rate(world_size=8) == 1e-4  # the old loop: an absolute rate
    for overrides, flag in (({"mixup": -1.0}, "--mixup"), ({"layer_decay": 1.5}, "--layer-decay"), ({"sched": "step"}, "--sched"),
                            ({"batch_size": 3}, "--batch-size"), ({"ema_decay": 1.0}, "--ema-decay"), ({"accumulate": 0}, "--accumulate"),
                            ({"warmup_epochs": 40.0}, "--warmup-epochs")):  # fmt: skip
        with pytest.raises(ValueError, match=flag):
            Recipe.preset("deit", **overrides)
    with pytest.raises(ValueError, match="--auto-augment 'rand-x9' is not a timm augmentation policy"):
        Recipe.preset("deit", auto_augment="rand-x9")
    with pytest.raises(ValueError, match="--recipe 'beit'"):
        Recipe.preset("beit")


def test_the_command_refuses_bad_recipe_values_in_one_line_before_any_work(tmp_path, capsys):
    missing = str(tmp_path / "no-such-data")  # the recipe is checked before the data or the model is touched
    base = ["finetune", "--model", "deit_tiny_patch16_224", "--data", missing, "--out", str(tmp_path / "run")]
    for extra, words in ((["--recipe", "deit", "--cutmix", "-2"], "--cutmix must be a number >= 0"),
                         (["--precision", "fp16", "--device", "cpu"], "--precision fp16 needs CUDA"),
                         (["--task", "segmentation", "--mixup", "0.8"], "--task segmentation takes no --mixup"),
                         (["--fsdp"], "--fsdp shards the student over processes: run under torchrun")):  # fmt: skip
        assert run(base + extra) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and words in err[0], err
    assert not (tmp_path / "run").exists()


def test_optimizer_layer_decay_no_weight_decay_and_the_gates_group():
    student = tiny_student(tiny_vit())
    recipe = Recipe(lr=1e-3, score_lr=1e-2, weight_decay=0.05, layer_decay=0.5)
    optimizer = components.optimizer(student, recipe)
    components.scheduler(optimizer, recipe, updates_per_epoch=4)  # constant: applies each group's lr_scale
    named = dict(student.model.named_parameters())
    # timm's ViT layers: 0 the stem (tokens, patch embedding), 1..DEPTH the blocks (the final norm with the
    # last one), DEPTH + 1 the head, at the full rate
    layers = DEPTH + 2
    for name, layer, decay in (("vit.patch_embed.proj.weight", 0, 0.05), ("vit.cls_token", 0, 0.0), ("vit.pos_embed", 0, 0.0),
                               ("blocks.0.attn.qkv.weight", 1, 0.05), ("blocks.0.attn.qkv.bias", 1, 0.0),
                               ("blocks.1.norm1.weight", 2, 0.0), ("blocks.1.mlp.fc1.weight", 2, 0.05),
                               ("vit.norm.bias", 2, 0.0), ("vit.head.weight", 3, 0.05)):  # fmt: skip
        parameter = named[name]
        group = group_of(optimizer, parameter)
        assert group["lr"] == pytest.approx(1e-3 * 0.5 ** (layers - 1 - layer)), layer
        assert group["weight_decay"] == decay
    gates = group_of(optimizer, student.gates.blocks[0].qk)
    assert gates["lr"] == 1e-2 and gates["weight_decay"] == 0.0
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(student.parameters()))
    assert isinstance(optimizer, torch.optim.AdamW)
    dense = tiny_vit()  # the compressed model's groups are timm's groups of the dense model
    reference = timm.optim.create_optimizer_v2(dense, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.5)
    for name, parameter in dense.named_parameters():
        group, ours = group_of(reference, parameter), group_of(optimizer, named[name if name.startswith("blocks") else f"vit.{name}"])
        assert (group["lr_scale"], group["weight_decay"]) == (ours["lr_scale"], ours["weight_decay"]), name


def test_a_segmentation_student_keeps_its_backbone_tokens_free_of_weight_decay():
    from cait import segmentation

    dense = segmentation.segmenter(tiny_vit(), classes=3)
    student = segmentation.make_student(dense, cait.ATME(flops=0.8), cait.CDCP(qk=0.5, v=0.5, mlp=0.5, align=1), warmup=0)
    optimizer = components.optimizer(student, Recipe(weight_decay=0.05))
    named = dict(student.model.named_parameters())
    assert group_of(optimizer, named["backbone.vit.pos_embed"])["weight_decay"] == 0.0
    assert group_of(optimizer, named["backbone.blocks.0.attn.qkv.weight"])["weight_decay"] == 0.05
    with pytest.raises(ValueError, match="--layer-decay: Segmenter has no timm group_matcher"):
        components.optimizer(student, Recipe(layer_decay=0.75))


def test_warmup_then_cosine_per_update_on_every_group():
    student = tiny_student(tiny_vit())
    recipe = Recipe(lr=1e-3, score_lr=1e-2, sched="cosine", warmup_epochs=1.0, warmup_lr=1e-6, min_lr=1e-5, epochs=3)
    optimizer = components.optimizer(student, recipe)
    loop = Loop(scheduler=components.scheduler(optimizer, recipe, updates_per_epoch=4))
    head = dict(student.model.named_parameters())["vit.head.weight"]
    weights, scores = group_of(optimizer, head), group_of(optimizer, student.gates.blocks[0].qk)

    def expected(peak, t):  # 4 warm-up updates from 1e-6, then cosine over the 12 updates of 3 epochs to 1e-5
        if t < 4:
            return 1e-6 + t * (peak - 1e-6) / 4
        return 1e-5 + 0.5 * (peak - 1e-5) * (1 + math.cos(math.pi * t / 12))

    seen = []
    optimizer.register_step_pre_hook(lambda opt, args, kwargs: seen.append((weights["lr"], scores["lr"])))
    loader = DataLoader(data(16), batch_size=4)
    teacher = teacher_of(tiny_vit())
    updates = 0
    for _ in range(3):
        updates = train_epoch(student, teacher, loader, optimizer, Distillation(0.5), loop=loop, updates=updates)["updates"]
    assert updates == 12
    for t, (lr, score_lr) in enumerate(seen):
        assert lr == pytest.approx(expected(1e-3, t), rel=1e-9) and score_lr == pytest.approx(expected(1e-2, t), rel=1e-9), t
    assert seen[1][0] < seen[3][0] < seen[4][0] > seen[8][0] > seen[11][0]


class Recording(torch.nn.Module):
    """Wraps a model and keeps the images it was called with."""

    def __init__(self, model):
        super().__init__()
        self.model, self.seen = model, []

    def forward(self, images):
        self.seen.append(images.detach().clone())
        return self.model(images)


@pytest.mark.parametrize("kind", ["mixup", "cutmix"])
def test_mixup_and_cutmix_mix_the_batch_the_student_and_the_teacher_see(kind):
    student = tiny_student(tiny_vit())
    student.model = Recording(student.model)
    teacher = Recording(teacher_of(tiny_vit()))
    recipe = Recipe(mixup=1.0 if kind == "mixup" else 0.0, cutmix=1.0 if kind == "cutmix" else 0.0, smoothing=0.1)
    images, labels = data(8).tensors
    optimizer = components.optimizer(student, recipe)
    train_epoch(student, teacher, [(images, labels)], optimizer, Distillation(0.5), loop=Loop(mixup=components.mixup(recipe, CLASSES)))
    (mixed,), (taught,) = student.model.seen, teacher.seen
    assert torch.equal(mixed, taught), "the teacher sees the student's mixed images"
    assert torch.equal(images, data(8).tensors[0]), "the caller's batch is untouched"
    flipped = images.flip(0)  # timm's batch mode pairs image i with image B-1-i
    if kind == "mixup":
        lam = float(((mixed - flipped) / (images - flipped))[0, 0, 0, 0])
        assert 0 < lam < 1 and torch.allclose(mixed, lam * images + (1 - lam) * flipped, atol=1e-5)
    else:
        from_self, from_other = (mixed == images).all(1), (mixed == flipped).all(1)  # per pixel
        assert (from_self | from_other).all() and from_other.any() and from_self.any()


def test_loss_on_soft_targets_and_hard_distillation():
    cls, dist, teacher = torch.randn(6, 5), torch.randn(6, 5), torch.randn(6, 5)
    soft = torch.rand(6, 5)
    soft = soft / soft.sum(1, keepdim=True)
    label_term = -(soft * cls.log_softmax(1)).sum(1).mean()
    assert torch.allclose(distillation_loss(cls, None, soft, Distillation(alpha=0)), label_term)
    hard = Distillation(alpha=0.5, kind="hard")
    expected = 0.5 * label_term + 0.5 * F.cross_entropy(dist, teacher.argmax(1))
    assert torch.allclose(distillation_loss((cls, dist), teacher, soft, hard), expected)
    labels = torch.randint(0, 5, (6,))
    smoothed = 0.9 * F.cross_entropy(cls, labels) + 0.1 * (-cls.log_softmax(1).mean(1)).mean()
    assert torch.allclose(distillation_loss(cls, None, labels, Distillation(alpha=0), smoothing=0.1), smoothed, rtol=1e-5)


def test_ema_is_the_moving_average_of_the_updated_weights():
    student = tiny_student(tiny_vit())
    recipe = Recipe(ema_decay=0.5, clip_grad=0.1)
    optimizer = components.optimizer(student, recipe)
    ema = components.ema(student, recipe)
    after = []
    optimizer.register_step_post_hook(lambda opt, args, kwargs: after.append({k: v.clone() for k, v in student.state_dict().items()}))
    loader = DataLoader(data(8), batch_size=4)
    train_epoch(student, teacher_of(tiny_vit()), loader, optimizer, Distillation(0.5), loop=Loop(ema=ema, clip_grad=0.1))
    assert len(after) == 2
    averaged = ema.module.state_dict()
    for name, value in after[1].items():  # ModelEmaV3: the first update copies, the second averages with decay 0.5
        assert torch.allclose(averaged[name], 0.5 * after[0][name] + 0.5 * value, atol=1e-7), name
    assert not torch.equal(averaged["model.vit.head.weight"], after[1]["model.vit.head.weight"])


def test_the_log_holds_the_weights_base_rate_not_a_layer_decayed_one(tmp_path):
    import json

    student = tiny_student(tiny_vit())
    recipe = Recipe(lr=1e-3, score_lr=1e-2, layer_decay=0.5)
    optimizer = components.optimizer(student, recipe)
    loop = Loop(scheduler=components.scheduler(optimizer, recipe, updates_per_epoch=2))
    assert optimizer.param_groups[0]["lr"] < 1e-3  # the stem's group, scaled by 0.5 ** 3
    fit(student, None, DataLoader(data(8), batch_size=4), DataLoader(data(4), batch_size=4), epochs=1, optimizer=optimizer,
        distill=Distillation(0.0), out_dir=str(tmp_path), loop=loop)  # fmt: skip
    assert json.loads((tmp_path / "log.json").read_text())[0]["lr"] == 1e-3


def resumable_run(out_dir, *, interrupt_at=None, resume=False, epochs=2):
    """A fine-tune with every stateful part on (cosine warm-up, Mixup/CutMix, EMA, accumulation,
    clipping, gate annealing, a shuffling loader). ``interrupt_at``: (epoch, batch) where the loader
    raises, as a killed job stops."""
    student = tiny_student(tiny_vit(), warmup=5)
    recipe = Recipe(lr=1e-3, sched="cosine", warmup_epochs=1.0, epochs=epochs, mixup=0.8, cutmix=1.0, smoothing=0.1,
                    ema_decay=0.9, accumulate=2, clip_grad=1.0, layer_decay=0.75, batch_size=4)  # fmt: skip
    optimizer = components.optimizer(student, recipe)
    loader = DataLoader(data(16), batch_size=4, shuffle=True)
    loop = Loop(scheduler=components.scheduler(optimizer, recipe, 2), mixup=components.mixup(recipe, CLASSES),
                ema=components.ema(student, recipe), smoothing=0.1, accumulate=2, clip_grad=1.0)  # fmt: skip
    if interrupt_at is not None:
        loader = Interrupting(loader, *interrupt_at)
    val = DataLoader(data(8, seed=2), batch_size=8)
    fit(student, teacher_of(tiny_vit()), loader, val, epochs=epochs, optimizer=optimizer, distill=Distillation(0.5, 2.0),
        out_dir=str(out_dir), loop=loop, resume=resume, seed=7, main_process=True)  # fmt: skip
    return student, loop.ema, optimizer


class Interrupting:
    """A loader that raises ``KeyboardInterrupt`` at batch ``batch`` of epoch ``epoch`` (counting from 0)."""

    def __init__(self, loader, epoch, batch):
        self.loader, self.epoch, self.batch, self.epochs = loader, epoch, batch, 0
        self.sampler = loader.sampler

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for i, item in enumerate(self.loader):
            if (self.epochs, i) == (self.epoch, self.batch):
                raise KeyboardInterrupt
            yield item
        self.epochs += 1


def test_a_run_interrupted_mid_epoch_and_resumed_ends_with_the_uninterrupted_weights(tmp_path):
    whole, whole_ema, whole_optimizer = resumable_run(tmp_path / "whole")
    with pytest.raises(KeyboardInterrupt):
        resumable_run(tmp_path / "cut", interrupt_at=(1, 3))  # killed in epoch 2, after one of its two updates
    assert torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)["epoch"] == 1
    resumed, resumed_ema, resumed_optimizer = resumable_run(tmp_path / "cut", resume=True)
    assert resumed.gates.steps == whole.gates.steps == 4  # of 5: still annealing
    for mine, theirs in ((resumed.state_dict(), whole.state_dict()), (resumed_ema.module.state_dict(), whole_ema.module.state_dict())):
        assert mine.keys() == theirs.keys()
        for name in mine:
            assert torch.equal(mine[name], theirs[name]), name
    assert [g["lr"] for g in resumed_optimizer.param_groups] == [g["lr"] for g in whole_optimizer.param_groups]
    log = (tmp_path / "cut" / "log.csv").read_text().splitlines()
    assert log[0].startswith("epoch,updates,train_loss") and "train_img_per_s" in log[0] and "val_ema_top1" in log[0] and len(log) == 3
    with pytest.raises(ValueError, match="has scheduler state but this run has none"):
        student = tiny_student(tiny_vit())
        optimizer = components.optimizer(student, Recipe())
        fit(student, None, DataLoader(data(16), batch_size=4), None, epochs=4, optimizer=optimizer, distill=Distillation(0.0),
            out_dir=str(tmp_path / "cut"), resume=True)  # fmt: skip


def test_deit_transforms_hold_randaugment_and_random_erasing(tmp_path):
    from test_finetune import image_folder as write_image_folder
    from timm.data.auto_augment import RandAugment
    from timm.data.random_erasing import RandomErasing

    from cait.cli.common import image_folder

    write_image_folder(tmp_path / "data", per_class=1)
    model = timm.create_model("deit_tiny_patch16_224", img_size=64, num_classes=2)
    augment = components.transform_arguments(Recipe.preset("deit"))
    train = image_folder(str(tmp_path / "data"), "train", model, training=True, augment=augment).transform.transforms
    (rand,) = [t for t in train if isinstance(t, RandAugment)]
    (erase,) = [t for t in train if isinstance(t, RandomErasing)]
    assert len(rand.ops) == 15 and rand.ops[0].magnitude == 9 and erase.probability == 0.25 and erase.mode == "pixel"
    val = image_folder(str(tmp_path / "data"), "val", model, training=False, augment=augment).transform.transforms
    assert not any(isinstance(t, (RandAugment, RandomErasing)) for t in val)


def test_deit_recipe_from_the_command_line_prints_stores_and_refuses_another_on_resume(tmp_path, capsys):
    import json

    from test_finetune import image_folder

    image_folder(tmp_path / "data", per_class=4)
    torch.save(timm.create_model("deit_tiny_patch16_224", img_size=64, num_classes=2).state_dict(), tmp_path / "teacher.pth")
    argv = ["finetune", "--recipe", "deit", "--model", "deit_tiny_patch16_224", "--img-size", "64", "--num-classes", "2",
            "--checkpoint", str(tmp_path / "teacher.pth"), "--data", str(tmp_path / "data"), "--merge-flops", "0.8", "--keep-mlp",
            "0.5", "--epochs", "2", "--warmup-epochs", "1", "--batch-size", "4", "--min-lr", "1e-6", "--workers", "0",
            "--out", str(tmp_path / "run")]  # fmt: skip
    assert run(argv) == 0
    printed = capsys.readouterr().out
    assert "recipe deit: epochs 2, batch_size 4, lr None, lr_base 0.0005" in printed and "mixup 0.8" in printed
    stored = json.loads((tmp_path / "run" / "recipe.json").read_text())
    assert stored["recipe"]["auto_augment"] == "rand-m9-mstd0.5-inc1" and stored["recipe"]["distillation"] == "hard"
    assert stored["resolved"]["lr"] == pytest.approx(5e-4 * 4 / 512) and stored["resolved"]["updates_per_epoch"] == 2
    log = json.loads((tmp_path / "run" / "log.json").read_text())
    assert [row["epoch"] for row in log] == [1, 2] and all("val_ema_top1" in row and row["train_img_per_s"] > 0 for row in log)
    for name in ("model.safetensors", "model_ema.safetensors"):
        assert cait.load(tmp_path / "run" / name).blocks[0].mlp.fc1.out_features == 384
    assert stored["arguments"]["keep_mlp"] == 0.5 and stored["arguments"]["img_size"] == [64] and stored["arguments"]["block"] == 2
    for extra, words in ((["--mixup", "0.5"], "--mixup 0.8 -> 0.5"), (["--epochs", "3"], "--epochs 2 -> 3"),
                         (["--keep-mlp", "0.25", "--block", "4"], "arguments than the run's (--block 2 -> 4, --keep-mlp 0.5 -> 0.25)"),
                         (["--img-size", "64", "48"], "--img-size 64 -> 64 48"), (["--keep-v", "0.5"], "--keep-v 1.0 -> 0.5")):  # fmt: skip
        assert run(argv + extra + ["--resume"]) == 2
        assert words in capsys.readouterr().err
    del stored["arguments"]  # a run started before the arguments were recorded
    (tmp_path / "run" / "recipe.json").write_text(json.dumps(stored))
    assert run(argv + ["--resume"]) == 2
    assert "does not record the model and compression arguments" in capsys.readouterr().err
