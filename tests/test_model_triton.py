"""A compressed timm model on the Triton kernels (through the interpreter on CPU): same answer as the
references, and one graph under ``torch.compile`` (the ops' fake implementations)."""

import pytest
import torch

import cait
from cait_kernels import backend
from conftest import rel_err
from models import build, images_for


@pytest.fixture(scope="module")
def compressed(kernel_device):
    torch.manual_seed(1)
    model = build("odd_grid")  # 13x13 grid: odd N, border tiles
    fast = cait.compress(model, merge=cait.ATME(flops=0.6), prune=cait.CDCP(qk=0.6, v=0.75, mlp=0.5))
    return fast.to(kernel_device), images_for(model, 2).to(kernel_device)


def test_triton_backend_matches_reference(compressed):
    fast, images = compressed
    with torch.no_grad():
        with backend("reference"):
            ref = fast.forward_tokens(images)
        with backend("triton"):
            out = fast.forward_tokens(images)
    assert torch.equal(out.owner, ref.owner) and torch.equal(out.size, ref.size)
    assert rel_err(out.x, ref.x) < 1e-5


def test_compiles_to_one_graph_on_the_triton_ops(compressed):
    fast, images = compressed
    torch._dynamo.reset()
    with torch.no_grad(), backend("triton"):
        eager = fast(images)
        graph = torch.compile(fast, backend="aot_eager", fullgraph=True)(images)
    assert rel_err(graph, eager) < 1e-6


def test_flops_count_the_triton_attention(kernel_device):
    """The flop counter knows the Triton op: same count as the reference (equal q/k and v widths, no padding)."""
    fast = cait.compress(build("deit_distilled"), merge=cait.ATME(flops=0.6)).to(kernel_device)
    with backend("reference"):
        reference = cait.flops(fast)
    with backend("triton"):
        assert cait.flops(fast) == reference


def test_training_runs_the_differentiable_reference(compressed):
    """The kernels have no backward: with autograd recording, auto picks the reference, triton refuses."""
    fast, images = compressed
    fast.train()
    try:
        fast(images).sum().backward()
        assert all(p.grad is not None for p in fast.blocks[0].attn.qkv.parameters())
        with backend("triton"), pytest.raises(RuntimeError, match="no backward"):
            fast(images)
    finally:
        fast.eval().zero_grad(set_to_none=True)
