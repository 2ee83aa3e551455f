"""What only a CUDA GPU can check: bf16 and large shapes, CUDA-graph capture and torch.compile of a
compressed model on the Triton ops. Marked ``gpu``: skipped without CUDA (their CPU twins run the
same kernels through the interpreter in test_*_triton.py and test_model_triton.py)."""

import pytest
import timm
import torch

import cait
from atme_bruteforce import atme_bruteforce
from cait_kernels import atme_step, atme_step_reference, pruned_attention
from conftest import rel_err
from test_atme import merged_state
from test_attention import attention_float64, split_materialized

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("B, N, heads, d_qk, d_v", [(8, 577, 12, 64, 64), (64, 197, 6, 32, 48), (3, 99, 3, 48, 48)])
@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 1e-2), (torch.float16, 2e-3), (torch.float32, 1e-5)])
def test_attention_at_model_scale(B, N, heads, d_qk, d_v, dtype, tol):
    qkv = torch.randn(B, N, heads * (2 * d_qk + d_v), device="cuda").to(dtype)
    size = torch.randint(1, 5, (B, N), device="cuda").float()
    out = pruned_attention(qkv, heads=heads, d_qk=d_qk, d_v=d_v, scale=0.125, size=size)
    ref = attention_float64(*split_materialized(qkv.cpu(), heads, d_qk, d_v), 0.125, size.cpu())
    assert rel_err(out.cpu(), ref) < tol


@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 1e-2), (torch.float16, 2e-3)])
def test_atme_at_model_scale(dtype, tol):
    x, size, owner = merged_state(32, (14, 14), 384, 1, 2, (20,))
    metric = torch.randn(32, x.shape[1], 64)
    args = dict(r=40, grid=(14, 14), prefix=1, block=2)
    on_gpu = [t.cuda() for t in (x.to(dtype), metric, size.float(), owner)]
    first, second = atme_step(*on_gpu, **args), atme_step(*on_gpu, **args)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    ref = atme_step_reference(x.to(dtype).cpu(), metric, size.float(), owner, **args)
    exact = atme_bruteforce(x.to(dtype).double(), metric.double(), size, owner, **args, block=2)
    assert torch.equal(first[2].cpu(), ref[2]) and torch.equal(first[1].cpu(), ref[1])
    assert rel_err(first[0].cpu(), exact[0]) < tol


@pytest.fixture(scope="module")
def deit_small():
    model = timm.create_model("deit_small_patch16_224").eval()
    fast = cait.compress(model, merge=cait.ATME(flops=0.7), prune=cait.CDCP(qk=0.5, v=0.75, mlp=0.75))
    return fast.cuda().half(), torch.randn(4, 3, 224, 224, device="cuda", dtype=torch.half)


def test_cuda_graph_replays_the_eager_forward(deit_small):
    fast, images = deit_small
    with torch.inference_mode():
        eager = fast(images)
    graph = cait.cuda_graph(fast, images)
    assert torch.equal(graph(images), eager)
    other = torch.randn_like(images)
    with torch.inference_mode():
        assert torch.equal(graph(other), fast(other))
    with pytest.raises(ValueError, match="captured for"):
        graph(images[:2])


def test_torch_compile_matches_eager(deit_small):
    fast, images = deit_small
    with torch.inference_mode():
        eager = fast(images)
        compiled = torch.compile(fast, fullgraph=True)(images)
    assert rel_err(compiled, eager) < 2e-3


def test_optimize_compiles_with_cuda_graphs_and_matches_eager(deit_small):
    """cait.optimize on CUDA: inductor with freezing and CUDA graphs (CPU twin: tests/test_compiled.py)."""
    fast, images = deit_small
    compiled = cait.optimize(fast, images)
    other = torch.randn_like(images)
    with torch.inference_mode():
        first, second = compiled(images), compiled(other)  # the second replay must not overwrite the first result
        assert rel_err(first, fast(images)) < 2e-3 and rel_err(second, fast(other)) < 2e-3
