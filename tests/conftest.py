"""Test configuration. TRITON_INTERPRET is read when a kernel is decorated, so it is set before anything
imports cait_kernels: Triton kernels then run on the CPU through the interpreter. On a GPU machine run
``TRITON_INTERPRET=0 pytest``: the same kernel tests then run natively on CUDA tensors, and the tests
marked ``gpu`` run too (they are skipped without CUDA)."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

INTERPRET = os.environ["TRITON_INTERPRET"] == "1"

# Under pytest-xdist (``make test`` runs one worker per core) each worker computes on one thread: more
# only contend for the same cores
if "PYTEST_XDIST_WORKER" in os.environ:
    torch.set_num_threads(1)

# Property tests: a fixed, bounded set of examples by default (repeatable, fast enough for CI); a long
# exploration with fresh randomness on request: HYPOTHESIS_PROFILE=long pytest tests/test_properties.py
SLOW_OK = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("default", max_examples=30, derandomize=True, database=None, print_blob=True, **SLOW_OK)
settings.register_profile("long", max_examples=1000, **SLOW_OK)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def kernel_device() -> torch.device:
    """Where Triton kernels run in this session: the CPU under the interpreter, else the GPU."""
    if INTERPRET:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        pytest.skip("Triton kernels need TRITON_INTERPRET=1 or a CUDA GPU")
    return torch.device("cuda")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` in float64; NaN anywhere gives inf so it never passes."""
    out, ref = out.double(), ref.double()
    if torch.isnan(out).any():
        return float("inf")
    return float((out - ref).norm() / ref.norm())


@pytest.fixture
def poisoned(monkeypatch):
    """New tensors from ``torch.empty``/``empty_like`` start as NaN (floats) or -7777 (integers), so an
    element a kernel forgets to write fails the comparison."""
    empty, empty_like = torch.empty, torch.empty_like

    def poison(t):
        return t.fill_(float("nan") if t.is_floating_point() else -7777)

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(empty_like(*a, **k)))


def moved(kwargs: dict, device: torch.device) -> dict:
    """``kwargs`` with its CPU tensors moved to ``device`` (tensors elsewhere, e.g. on ``meta``, stay)."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) and v.device.type == "cpu" else v for k, v in kwargs.items()}


def zero_dropped_qkv(qkv: torch.nn.Linear, heads: int, head_dim: int, kept: dict) -> None:
    """Zero the rows of a packed ``qkv`` (``[q heads | k heads | v heads]``) for the q/k and v channels
    a pruned block did not keep (``kept["qk"]``, ``kept["v"]``: ``(heads, d)`` channel indices)."""
    keep = torch.zeros(3, heads, head_dim, dtype=torch.bool)
    for h in range(heads):
        keep[0, h, kept["qk"][h]] = keep[1, h, kept["qk"][h]] = True
        keep[2, h, kept["v"][h]] = True
    drop = ~keep.flatten()
    with torch.no_grad():
        qkv.weight[drop] = 0
        if qkv.bias is not None:
            qkv.bias[drop] = 0
