"""DistributedDataParallel fine-tuning in two CPU processes (gloo): two processes on halves of each batch
end with the same weights and CDCP scores as one process on the whole batches (plain SGD, and the
recipe's AdamW with layer decay, schedule, EMA, accumulation and clipping; FSDP2 shards too); a segmentation model
trains under DDP built from the Python API (``fit(ddp=True)``) and from ``cait finetune`` (torchrun's
environment), past the second step, where a parameter without a gradient stops DDP."""

import json
import os
import socket

import pytest
import timm
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import cait
from cait import segmentation
from cait.train import components
from cait.train.finetune import Distillation, Loop, fit, make_student, teacher_of, train_epoch
from cait.train.recipe import Recipe
from models import build

STEPS, BATCH, WORLD = 3, 4, 2


def _process(rank, port, job, args, group):
    """One of the processes: torchrun's environment, a gloo process group unless the job sets one up
    itself (``group=False``, as ``cait finetune`` does), then ``job(rank, *args)``."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)  # two processes on a small machine: more threads each only contend (gloo's steps slow down 100x)
    if not group:
        job(rank, *args)
        return
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        job(rank, *args)
    finally:
        dist.destroy_process_group()


def in_two_processes(job, *args, group: bool = True) -> None:
    """Run ``job(rank, *args)`` (a module-level function) in two spawned CPU processes (ranks 0 and 1)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_process, args=(port, job, args, group), nprocs=WORLD, join=True)


def setup():
    """The same student, teacher and batches in every process."""
    torch.manual_seed(0)
    model = build("deit_distilled")
    student = make_student(model, cait.ATME(flops=0.8), cait.CDCP(qk=0.5, v=0.75, mlp=0.5), warmup=2)
    images = torch.randn(STEPS, BATCH, 3, 224, 224)
    labels = torch.randint(0, 1000, (STEPS, BATCH))
    return student, teacher_of(model), images, labels


def optimizer_for(student):
    return torch.optim.SGD(student.parameters(), lr=0.05)


def train(student, teacher, batches):
    train_epoch(student, teacher, batches, optimizer_for(student), Distillation(alpha=0.5, temperature=2.0))


def _classifier_job(rank, out):
    student, teacher, images, labels = setup()
    half = BATCH // WORLD
    batches = [(x[rank * half : (rank + 1) * half], y[rank * half : (rank + 1) * half]) for x, y in zip(images, labels)]
    runner = torch.nn.parallel.DistributedDataParallel(student)
    train_epoch(runner, teacher, batches, optimizer_for(runner), Distillation(alpha=0.5, temperature=2.0))
    if rank == 0:
        torch.save(student.state_dict(), out)


def test_two_processes_equal_one_with_the_combined_batch(tmp_path):
    in_two_processes(_classifier_job, str(tmp_path / "ddp.pt"))
    student, teacher, images, labels = setup()
    initial = {name: value.clone() for name, value in student.state_dict().items()}
    train(student, teacher, list(zip(images, labels)))
    ddp = torch.load(tmp_path / "ddp.pt", weights_only=True)
    single = student.state_dict()
    assert ddp.keys() == single.keys()
    for name, value in single.items():
        assert torch.allclose(ddp[name], value, rtol=1e-4, atol=1e-5), name
    assert any(not torch.equal(value, initial[name]) for name, value in single.items() if "gates" in name), "the scores learned"


def segmentation_backbone():
    """A tiny timm ViT as a user builds one: with timm's classifier head (1000 classes)."""
    return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)


def _segmentation_job(rank, out):
    torch.manual_seed(0)
    dense = segmentation.segmenter(segmentation_backbone(), classes=3)  # the README's way
    student = segmentation.make_student(dense, cait.ATME(flops=0.8), cait.CDCP(qk=0.5, v=0.5, mlp=0.5), warmup=2)
    data = TensorDataset(torch.randn(8, 3, 32, 32), torch.randint(0, 3, (8, 32, 32)))
    train_loader = DataLoader(data, batch_size=2, sampler=DistributedSampler(data, shuffle=False))  # 2 steps per process
    optimizer = torch.optim.SGD(student.parameters(), lr=0.05)
    fit(student, teacher_of(dense), train_loader, DataLoader(data, batch_size=4), epochs=1, optimizer=optimizer,
        distill=Distillation(alpha=0.5, temperature=2.0), out_dir=out, ddp=True, main_process=rank == 0,
        metrics=segmentation.evaluate)  # fmt: skip
    torch.save({name: p.detach() for name, p in student.named_parameters()}, os.path.join(out, f"rank{rank}.pt"))


def test_segmentation_student_from_the_python_api_trains_under_ddp(tmp_path):
    in_two_processes(_segmentation_job, str(tmp_path))
    torch.manual_seed(0)
    initial = segmentation.make_student(
        segmentation.segmenter(segmentation_backbone(), classes=3), cait.ATME(flops=0.8), cait.CDCP(qk=0.5, v=0.5, mlp=0.5), warmup=2
    )
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(WORLD)]
    assert ranks[0].keys() == ranks[1].keys() == dict(initial.named_parameters()).keys()
    assert all(torch.equal(ranks[0][name], ranks[1][name]) for name in ranks[0]), "DDP keeps the processes' weights equal"
    trained = {name for name, p in initial.named_parameters() if not torch.equal(ranks[0][name], p)}
    assert {name.split(".")[0] if name.startswith("gates") else name.split(".")[1] for name in trained} == {"backbone", "head", "gates"}
    assert (tmp_path / "checkpoint.pt").exists()


def _cli_job(rank, argv):
    from test_cli import run

    assert run(argv) == 0


def test_segmentation_finetune_command_trains_under_ddp(tmp_path):
    """``torchrun --nproc-per-node 2 -m cait finetune --task segmentation``: the teacher saved from the
    Python API (a backbone with timm's head), the compressed student with gates, 2 steps per process."""
    from test_segmentation import write_segmentation_folder

    write_segmentation_folder(tmp_path / "data", count=8)
    cait.save(segmentation.segmenter(cait.compress(segmentation_backbone()), classes=3), tmp_path / "dense.safetensors")
    argv = ["finetune", "--task", "segmentation", "--teacher", str(tmp_path / "dense.safetensors"), "--data", str(tmp_path / "data"),
            "--merge-flops", "0.8", "--keep-qk", "0.5", "--keep-mlp", "0.5", "--epochs", "1", "--batch-size", "2", "--workers", "0",
            "--device", "cpu", "--out", str(tmp_path / "cait")]  # fmt: skip
    in_two_processes(_cli_job, argv, group=False)
    loaded = cait.load(tmp_path / "cait" / "model.safetensors")
    assert isinstance(loaded, segmentation.Segmenter) and sum(loaded.backbone.schedule) > 0


RECIPE = Recipe(
    lr=1e-3, sched="cosine", warmup_epochs=1.0, epochs=2, ema_decay=0.9, accumulate=2, clip_grad=0.5, layer_decay=0.75, batch_size=4
)


def recipe_setup(parallel=None):
    """A tiny student trained with the recipe's components (layer decay, warm-up + cosine, EMA,
    accumulation over 2 batches, clipping), its teacher, and 4 global batches of 4 images.
    ``parallel(student)`` (DDP or FSDP2) runs before the optimizer is built; it returns the runner."""
    from test_recipe import tiny_student, tiny_vit

    model = tiny_vit()
    student = tiny_student(model, warmup=2)
    runner = parallel(student) if parallel is not None else student
    optimizer = components.optimizer(student, RECIPE)
    loop = Loop(scheduler=components.scheduler(optimizer, RECIPE, updates_per_epoch=2), accumulate=2, clip_grad=0.5,
                ema=components.ema(student, RECIPE) if parallel is None or isinstance(runner, DDP) else None)  # fmt: skip
    g = torch.Generator().manual_seed(3)
    images, labels = torch.randn(4, 4, 3, 32, 32, generator=g), torch.randint(0, 4, (4, 4), generator=g)
    return student, runner, teacher_of(model), optimizer, loop, images, labels


def recipe_train(runner, teacher, optimizer, loop, batches):
    train_epoch(runner, teacher, batches, optimizer, Distillation(alpha=0.5, temperature=2.0), loop=loop)


def _halves(rank, images, labels):
    half = images.shape[1] // WORLD
    return [(x[rank * half : (rank + 1) * half], y[rank * half : (rank + 1) * half]) for x, y in zip(images, labels)]


def _recipe_ddp_job(rank, out):
    student, runner, teacher, optimizer, loop, images, labels = recipe_setup(lambda s: DDP(s))
    recipe_train(runner, teacher, optimizer, loop, _halves(rank, images, labels))
    if rank == 0:
        torch.save({"student": student.state_dict(), "ema": loop.ema.module.state_dict()}, out)


def _recipe_fsdp_job(rank, out):
    from torch.distributed.device_mesh import init_device_mesh

    from cait.train.finetune import fully_shard_student

    mesh = init_device_mesh("cpu", (WORLD,))
    student, runner, teacher, optimizer, loop, images, labels = recipe_setup(lambda s: fully_shard_student(s, mesh))
    recipe_train(runner, teacher, optimizer, loop, _halves(rank, images, labels))
    full = {name: value.full_tensor() for name, value in student.state_dict().items()}  # an all-gather: every rank calls it
    if rank == 0:
        torch.save({"student": full}, out)


def single_process_recipe_run():
    student, runner, teacher, optimizer, loop, images, labels = recipe_setup()
    initial = {name: value.clone() for name, value in student.state_dict().items()}
    recipe_train(runner, teacher, optimizer, loop, list(zip(images, labels)))
    return student, loop, initial


def assert_same_weights(parallel: dict, single: dict, initial: dict) -> None:
    assert parallel.keys() == single.keys()
    for name, value in single.items():
        assert torch.allclose(parallel[name], value, rtol=1e-4, atol=1e-5), name
    assert sum(not torch.equal(value, initial[name]) for name, value in single.items()) > len(single) // 2, "most tensors trained"


def test_two_processes_with_the_recipe_equal_one_with_the_global_batch(tmp_path):
    """DDP with layer decay, warm-up + cosine, EMA, accumulation and clipping: 2 processes x 2 images
    per batch end where 1 process x 4 images ends, weights, gate scores and EMA alike."""
    in_two_processes(_recipe_ddp_job, str(tmp_path / "ddp.pt"))
    student, loop, initial = single_process_recipe_run()
    ddp = torch.load(tmp_path / "ddp.pt", weights_only=True)
    assert_same_weights(ddp["student"], student.state_dict(), initial)
    assert_same_weights(ddp["ema"], loop.ema.module.state_dict(), initial)


def test_fsdp2_shards_train_like_one_process(tmp_path):
    """FSDP2 (``fully_shard`` per block, then the student; gloo on CPU) with the recipe's optimizer and
    schedule: the gathered weights equal one process's on the global batches."""
    in_two_processes(_recipe_fsdp_job, str(tmp_path / "fsdp.pt"))
    student, _, initial = single_process_recipe_run()
    fsdp = torch.load(tmp_path / "fsdp.pt", weights_only=True)
    assert_same_weights(fsdp["student"], student.state_dict(), initial)


def _loaders(images, labels, distributed: bool):
    """The recipe setup's 4 batches of 4 as a loader (2 images per process under ``distributed``: the
    processes' halves of a step are one process's batch) and a validation loader."""
    data = TensorDataset(images.flatten(0, 1), labels.flatten(0, 1))
    train = DataLoader(data, batch_size=2, sampler=DistributedSampler(data, shuffle=False)) if distributed else DataLoader(data, 4)
    return train, DataLoader(data, batch_size=8)


def _fsdp_fit_job(rank, out):
    """``fit(fsdp=True)`` for one of the recipe's 2 epochs, then a fresh sharded student resumed to the end."""
    from torch.distributed.device_mesh import init_device_mesh

    from cait.train.finetune import full_state, fully_shard_student

    mesh = init_device_mesh("cpu", (WORLD,))
    for resume in (False, True):
        student, runner, teacher, optimizer, loop, images, labels = recipe_setup(lambda s: fully_shard_student(s, mesh))
        train, val = _loaders(images, labels, distributed=True)
        fit(runner, teacher, train, val, epochs=RECIPE.epochs, optimizer=optimizer, distill=Distillation(alpha=0.5, temperature=2.0),
            out_dir=out, loop=loop, resume=resume, fsdp=True, main_process=rank == 0, stop_after=None if resume else 1)  # fmt: skip
    weights, _ = full_state(student)
    if rank == 0:
        torch.save(weights, os.path.join(out, "final.pt"))


def test_fsdp2_fit_checkpoints_and_resumes_like_one_process(tmp_path):
    """``fit(fsdp=True)`` in two processes, interrupted after an epoch and resumed from its checkpoint
    (gathered weights and optimizer state), ends where one uninterrupted process ends; its validation
    (on the unsharded weights) logs the same top-1; the checkpoint holds the full tensors."""
    in_two_processes(_fsdp_fit_job, str(tmp_path / "fsdp"))
    student, runner, teacher, optimizer, loop, images, labels = recipe_setup()
    initial = {name: value.clone() for name, value in student.state_dict().items()}
    train, val = _loaders(images, labels, distributed=False)
    loop.ema = None
    log = fit(student, teacher, train, val, epochs=RECIPE.epochs, optimizer=optimizer, distill=Distillation(alpha=0.5, temperature=2.0),
              out_dir=str(tmp_path / "single"), loop=loop)  # fmt: skip
    assert_same_weights(torch.load(tmp_path / "fsdp" / "final.pt", weights_only=True), student.state_dict(), initial)
    checkpoint = torch.load(tmp_path / "fsdp" / "checkpoint.pt", weights_only=True)
    assert checkpoint["sharded"] and checkpoint["epoch"] == RECIPE.epochs
    assert {k: v.shape for k, v in checkpoint["student"].items()} == {k: v.shape for k, v in initial.items()}
    with open(tmp_path / "fsdp" / "log.json") as f:
        sharded_log = json.load(f)
    assert [row["val_top1"] for row in sharded_log] == [row["val_top1"] for row in log]


def test_fsdp2_fit_refuses_what_it_does_not_support_before_work(tmp_path):
    student, runner, teacher, optimizer, loop, images, labels = recipe_setup()
    train, val = _loaders(images, labels, distributed=False)
    with pytest.raises(ValueError, match="FSDP2 .* no EMA"):  # the recipe setup's loop keeps an EMA
        fit(student, teacher, train, val, epochs=1, optimizer=optimizer, distill=Distillation(0.0), out_dir=str(tmp_path), loop=loop,
            fsdp=True)  # fmt: skip
    assert not (tmp_path / "checkpoint.pt").exists()


def test_finetune_command_with_fsdp_saves_the_gathered_model(tmp_path):
    """``torchrun --nproc-per-node 2 -m cait finetune --fsdp``: the student sharded with FSDP2, and the
    saved model built from the gathered weights (those of the checkpoint); an EMA is refused in one line."""
    from test_finetune import image_folder

    image_folder(tmp_path / "data", per_class=4)
    teacher = timm.create_model("deit_tiny_patch16_224", img_size=64, num_classes=2)
    torch.save(teacher.state_dict(), tmp_path / "teacher.pth")
    argv = ["finetune", "--model", "deit_tiny_patch16_224", "--img-size", "64", "--num-classes", "2", "--checkpoint",
            str(tmp_path / "teacher.pth"), "--data", str(tmp_path / "data"), "--merge-flops", "0.8", "--keep-mlp", "0.5", "--epochs",
            "1", "--batch-size", "2", "--workers", "0", "--device", "cpu", "--fsdp", "--out", str(tmp_path / "run")]  # fmt: skip
    in_two_processes(_cli_job, argv, group=False)
    saved = cait.load(tmp_path / "run" / "model.safetensors")
    gathered = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["student"]
    embedding = gathered["model.vit.patch_embed.proj.weight"]
    assert torch.equal(saved.vit.patch_embed.proj.weight, embedding) and not torch.equal(embedding, teacher.patch_embed.proj.weight)
    assert saved.blocks[0].mlp.fc1.out_features == 384 and saved(torch.randn(1, 3, 64, 64)).shape == (1, 2)


def test_fsdp_with_an_ema_is_refused_in_one_line(capsys):
    from test_cli import run

    os.environ["WORLD_SIZE"] = "2"
    try:
        assert run(["finetune", "--recipe", "deit", "--fsdp", "--model", "deit_tiny_patch16_224", "--data", "none", "--out", "none"]) == 2
    finally:
        del os.environ["WORLD_SIZE"]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--fsdp keeps no EMA yet: give --ema-decay none" in err[0], err
