"""The fused C++ ATME step for CPU tensors against the reference and the brute force, its dispatch,
its errors, and the fallback when it cannot be built."""

import logging
import os

import pytest
import torch

import cait
import test_atme
from atme_bruteforce import atme_bruteforce
from cait_kernels import atme_step, atme_step_cpu, atme_step_reference, backend, cpu_atme
from conftest import rel_err
from models import build, images_for
from test_atme import CASES, TIE_GRIDS, TIE_KINDS, identity_state, merged_state, tie_case

TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def poisoned_outputs(x, size, owner, r):
    """Result tensors filled with NaN / -7777, so an element the kernel does not write fails."""
    batch, tokens, channels = x.shape
    return (
        torch.full((batch, tokens - r, channels), float("nan"), dtype=x.dtype),
        torch.full((batch, tokens - r), float("nan"), dtype=size.dtype),
        torch.full_like(owner, -7777),
    )


@pytest.mark.parametrize("grid, block, batch, prefix, steps, r", CASES)
def test_matches_bruteforce_in_float64(grid, block, batch, prefix, steps, r):
    x, size, owner = merged_state(batch, grid, 12, prefix, block, steps)
    metric = torch.randn(x.shape[0], x.shape[1], 7, dtype=torch.float64)
    out = atme_step_cpu(x, metric, size, owner, r=r, grid=grid, prefix=prefix, block=block, out=poisoned_outputs(x, size, owner, r))
    exact = atme_bruteforce(x, metric, size, owner, r=r, grid=grid, prefix=prefix, block=block)
    assert torch.equal(out[2], exact[2]) and torch.equal(out[1], exact[1])
    assert rel_err(out[0], exact[0]) < 1e-12


@pytest.mark.parametrize("grid, block, batch, prefix, steps, r", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_matches_reference_and_float64(grid, block, batch, prefix, steps, r, dtype):
    x, size, owner = merged_state(batch, grid, 12, prefix, block, steps)
    x, size = x.to(dtype), size.float()
    metric = torch.randn(x.shape[0], x.shape[1], 7, dtype=dtype)
    out = atme_step_cpu(x, metric, size, owner, r=r, grid=grid, prefix=prefix, block=block, out=poisoned_outputs(x, size, owner, r))
    ref = atme_step_reference(x, metric, size, owner, r=r, grid=grid, prefix=prefix, block=block)
    exact = atme_bruteforce(x.double(), metric.double(), size.double(), owner, r=r, grid=grid, prefix=prefix, block=block)
    assert torch.equal(out[2], ref[2]) and torch.equal(out[1], ref[1])
    assert out[0].dtype == dtype and rel_err(out[0], exact[0]) < TOLERANCE[dtype]
    assert torch.equal(out[0], ref[0])  # the same operations in the same order and precision as the reference


@pytest.mark.parametrize("grid, block", TIE_GRIDS)
@pytest.mark.parametrize("kind", TIE_KINDS)
def test_ties_break_like_the_reference(grid, block, kind):
    x, size, owner, metric, r = tie_case(grid, block, kind, torch.float32)
    out = atme_step_cpu(x, metric, size, owner, r=r, grid=grid, prefix=1, block=block)
    ref = atme_step_reference(x, metric, size, owner, r=r, grid=grid, prefix=1, block=block)
    assert all(torch.equal(a, b) for a, b in zip(out, ref))


def test_several_steps_and_a_strided_batch_match_the_reference():
    """Owner and sizes after several kernel steps equal the reference's; non-contiguous inputs are read right."""
    grid, batch = (14, 14), 5
    x, size, owner = identity_state(batch, grid, 40, 1, torch.float32)
    ref = (x, size, owner)
    for r in (30, 25, 20, 15):
        metric = torch.randn(batch, x.shape[1], 9).transpose(0, 1).contiguous().transpose(0, 1)  # not contiguous
        x, size, owner = atme_step_cpu(x, metric, size, owner, r=r, grid=grid, prefix=1)
        ref = atme_step_reference(*ref[:1], metric, *ref[1:], r=r, grid=grid, prefix=1)
        assert all(torch.equal(a, b) for a, b in zip((x, size, owner), ref))


def test_repeat_is_bit_identical_and_r_zero_changes_nothing():
    x, size, owner = merged_state(4, (14, 14), 32, 1, 2, (12,))
    x = x.float()
    metric = torch.randn_like(x)
    first = atme_step_cpu(x, metric, size, owner, r=13, grid=(14, 14), prefix=1)
    second = atme_step_cpu(x, metric, size, owner, r=13, grid=(14, 14), prefix=1)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert atme_step_cpu(x, metric, size, owner, r=0, grid=(14, 14), prefix=1) == (x, size, owner)


def test_public_op_runs_the_kernel_on_cpu_and_the_reference_when_asked(monkeypatch):
    calls = []
    kernel = cpu_atme.atme_step_cpu
    monkeypatch.setattr(cpu_atme, "atme_step_cpu", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    x, size, owner = identity_state(2, (4, 4), 3, 1, torch.float32)
    metric = torch.randn_like(x)
    out = atme_step(x, metric, size, owner, r=3, grid=(4, 4), prefix=1)
    assert calls == [1]
    with backend("reference"):
        ref = atme_step(x, metric, size, owner, r=3, grid=(4, 4), prefix=1)
    assert calls == [1] and all(torch.equal(a, b) for a, b in zip(out, ref))


def test_training_runs_the_differentiable_reference():
    """With autograd recording, the public op takes the reference's path (same gradients); the kernel refuses."""
    x, size, owner = identity_state(2, (4, 4), 3, 1, torch.float32)
    x.requires_grad_(True)
    grads = []
    for step in (atme_step, atme_step_reference):
        x.grad = None
        step(x, x.detach(), size, owner, r=5, grid=(4, 4), prefix=1)[0].square().sum().backward()
        grads.append(x.grad)
    assert grads[0].abs().sum() > 0 and torch.equal(*grads)
    with pytest.raises(RuntimeError, match="no backward"):
        atme_step_cpu(x, x.detach(), size, owner, r=5, grid=(4, 4), prefix=1)


@pytest.mark.parametrize("case", list(test_atme.bad_inputs()), ids=lambda c: c[0])
def test_bad_input_is_refused(case):
    _, kwargs, error, message = case
    with pytest.raises(error, match=message):
        atme_step_cpu(**kwargs)


def test_the_op_itself_refuses_what_would_read_out_of_bounds():
    """Called through ``torch.ops`` directly (no Python checks), the kernel still refuses bad owners and outputs."""
    x, size, owner = identity_state(2, (4, 4), 3, 1, torch.float32)
    cpu_atme.load()
    with pytest.raises(ValueError, match="owner values must lie in"):
        torch.ops.cait_cpu.atme_step(x, x, size, owner.clone().fill_(16), 3, [4, 4], 1, 2)
    with pytest.raises(ValueError, match="r must lie in"):
        torch.ops.cait_cpu.atme_step(x, x, size, owner, 13, [4, 4], 1, 2)
    orphans = (torch.arange(16, dtype=torch.int32) // 2).expand(2, -1).contiguous()  # tokens 8..15 hold no cell
    with pytest.raises(ValueError, match="only 4 merges are possible, not r = 5"):
        atme_step_cpu(x, x, size, orphans, r=5, grid=(4, 4), prefix=1)
    outputs = poisoned_outputs(x, size, owner, 3)
    with pytest.raises(ValueError, match="x_out must be"):
        atme_step_cpu(x, x, size, owner, r=3, grid=(4, 4), prefix=1, out=(outputs[0][:, 1:], *outputs[1:]))
    with pytest.raises(ValueError, match="owner_out must be"):
        atme_step_cpu(x, x, size, owner, r=3, grid=(4, 4), prefix=1, out=(*outputs[:2], outputs[2].long()))


def test_a_failed_build_warns_once_and_the_reference_runs(monkeypatch, caplog):
    def no_compiler(**kwargs):
        raise OSError("no C++ compiler found")

    from torch.utils import cpp_extension

    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    cpu_atme.load.cache_clear()
    monkeypatch.setattr(cpu_atme, "_available", None)
    try:
        with pytest.raises(RuntimeError, match="no C\\+\\+ compiler found.*backend\\('reference'\\)"):
            cpu_atme.load()
        x, size, owner = identity_state(2, (4, 4), 3, 1, torch.float32)
        with caplog.at_level(logging.WARNING, logger="cait_kernels.cpu_atme"):
            out = atme_step(x, x, size, owner, r=3, grid=(4, 4), prefix=1)
            atme_step(x, x, size, owner, r=3, grid=(4, 4), prefix=1)
        assert sum("could not build" in message for message in caplog.messages) == 1
        ref = atme_step_reference(x, x, size, owner, r=3, grid=(4, 4), prefix=1)
        assert all(torch.equal(a, b) for a, b in zip(out, ref))
    finally:
        monkeypatch.undo()
        cpu_atme.load.cache_clear()
    assert cpu_atme.available()


@pytest.fixture(scope="module")
def compressed():
    torch.manual_seed(1)
    model = build("odd_grid")  # 13x13 grid: odd N, border tiles
    fast = cait.compress(model, merge=cait.ATME(flops=0.6), prune=cait.CDCP(qk=0.6, v=0.75, mlp=0.5))
    return fast, images_for(model, 2)


def test_model_on_the_kernel_matches_the_reference_and_compiles_to_one_graph(compressed):
    fast, images = compressed
    torch._dynamo.reset()
    with torch.no_grad():
        out = fast.forward_tokens(images)
        with backend("reference"):
            ref = fast.forward_tokens(images)
        eager = fast(images)
        graph = torch.compile(fast, backend="aot_eager", fullgraph=True)(images)
    assert torch.equal(out.owner, ref.owner) and torch.equal(out.size, ref.size)
    assert rel_err(out.x, ref.x) < 1e-6
    assert rel_err(graph, eager) < 1e-6


def test_the_pip_ninja_is_found_off_path(monkeypatch):
    import ninja  # a dependency of cait (setup.py)

    monkeypatch.setattr(cpu_atme.shutil, "which", lambda name: None)
    monkeypatch.setenv("PATH", "/nowhere")
    cpu_atme._put_ninja_on_path()
    assert os.environ["PATH"].split(os.pathsep)[0] == ninja.BIN_DIR
