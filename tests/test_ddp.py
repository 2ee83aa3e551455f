"""DistributedDataParallel fine-tuning: two CPU processes (gloo) on halves of each batch end with the
same weights and CDCP scores as one process on the whole batches."""

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import cait
from cait.train.finetune import Distillation, make_student, teacher_of, train_epoch
from models import build

STEPS, BATCH = 3, 4


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


def _worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        student, teacher, images, labels = setup()
        half = BATCH // world
        batches = [(x[rank * half : (rank + 1) * half], y[rank * half : (rank + 1) * half]) for x, y in zip(images, labels)]
        runner = torch.nn.parallel.DistributedDataParallel(student)
        train_epoch(runner, teacher, batches, optimizer_for(runner), Distillation(alpha=0.5, temperature=2.0))
        if rank == 0:
            torch.save(student.state_dict(), out)
    finally:
        dist.destroy_process_group()


def test_two_processes_equal_one_with_the_combined_batch(tmp_path):
    port = 29500 + os.getpid() % 1000
    mp.spawn(_worker, args=(2, port, str(tmp_path / "ddp.pt")), nprocs=2, join=True)
    student, teacher, images, labels = setup()
    initial = {name: value.clone() for name, value in student.state_dict().items()}
    train(student, teacher, list(zip(images, labels)))
    ddp = torch.load(tmp_path / "ddp.pt", weights_only=True)
    single = student.state_dict()
    assert ddp.keys() == single.keys()
    for name, value in single.items():
        assert torch.allclose(ddp[name], value, rtol=1e-4, atol=1e-5), name
    assert any(not torch.equal(value, initial[name]) for name, value in single.items() if "gates" in name), "the scores learned"
