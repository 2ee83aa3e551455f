"""The ATME step as one fused C++ kernel for CPU tensors (``csrc/atme_cpu.cpp``).

The PyTorch reference spends ~450 small torch ops per step (Kruskal over slots, label propagation,
sorts); at batch 1 that host time costs more than the merge saves. This kernel does the same math
in one pass per image (parallel over images) and returns the reference's result bit for bit: the
same owners and sizes, and features summed in the same order in at least fp32, rounded once.

The op ``torch.ops.cait_cpu.atme_step`` (and ``.out``) is defined here, with a fake implementation,
when ``cait_kernels`` is imported, so ``torch.compile`` traces through it and a saved
``torch.export`` program that calls it loads in a fresh process. Its CPU kernel is compiled on
first use with ``torch.utils.cpp_extension`` (needs a C++ compiler and ``ninja``, 10-30 s once;
cached by torch in ``TORCH_EXTENSIONS_DIR`` or ``~/.cache/torch_extensions``); until it is loaded,
the op's Python implementation loads it (or, where it cannot be built, warns once and runs the
reference), after which calls go straight to the C++ kernel. Inference only: it has no backward
(the dispatcher runs the reference while autograd records).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import sys
from pathlib import Path

import torch

from .atme import atme_step_reference, check_atme_inputs

SOURCE = Path(__file__).with_name("csrc") / "atme_cpu.cpp"
# One build per torch version and source file: venvs with different torch share torch's extension cache folder
# (a library built against one torch does not load into another), and so do checkouts of cait in other places
# (the build file records the source's path: each checkout rewrote it and forced a rebuild of the others').
NAME = "cait_cpu_kernels_torch{}_{}".format(
    torch.__version__.split("+")[0].replace(".", "_"), hashlib.sha256(str(SOURCE.resolve()).encode()).hexdigest()[:8]
)
# at::parallel_for is OpenMP in the header on Linux builds of torch: without the flag it runs serially.
# The kernel then shares torch's libgomp (same soname, already loaded), so one thread pool serves both.
OPENMP = ["-fopenmp"] if sys.platform.startswith("linux") and torch.backends.openmp.is_available() else []
# CAIT_KERNELS_SANITIZE=1 (read at import; `make sanitize`): build a separate copy under AddressSanitizer and
# UndefinedBehaviorSanitizer, every report fatal. Python must start with the ASan runtime preloaded (the Makefile says how).
SANITIZE = os.environ.get("CAIT_KERNELS_SANITIZE") == "1"
SANITIZERS = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all"]
log = logging.getLogger(__name__)
SCHEMAS = (
    "atme_step(Tensor x, Tensor metric, Tensor size, Tensor owner, int r, int[] grid, int prefix, int block) -> (Tensor, Tensor, Tensor)",
    "atme_step.out(Tensor x, Tensor metric, Tensor size, Tensor owner, int r, int[] grid, int prefix, int block, *, "
    "Tensor(a!) x_out, Tensor(b!) size_out, Tensor(c!) owner_out) -> (Tensor(a!), Tensor(b!), Tensor(c!))",
)
_library = torch.library.Library("cait_cpu", "DEF")  # the C++ library adds the CPU kernels (TORCH_LIBRARY_IMPL)
for _schema in SCHEMAS:
    _library.define(_schema)


def build_options() -> tuple[str, list[str], list[str]]:
    """``(name, cflags, ldflags)`` of the extension: optimised, or sanitized under :data:`SANITIZE`."""
    if SANITIZE:
        return f"{NAME}_sanitized", ["-O1", "-g", "-fno-omit-frame-pointer", *SANITIZERS, *OPENMP], [*SANITIZERS, *OPENMP]
    return NAME, ["-O3", *OPENMP], OPENMP


@functools.cache
def load() -> None:
    """Build (first use on a machine) and load the C++ kernels; raise ``RuntimeError`` saying why they cannot be built."""
    cpp_extension = _quiet_cpp_extension()
    name, cflags, ldflags = build_options()
    build_dir = cpp_extension._get_build_directory(name, verbose=False)
    if not os.path.exists(os.path.join(build_dir, f"{name}.so")):
        log.warning("cait_kernels: compiling the C++ CPU kernels (once per machine, 10-30 s) into %s", build_dir)
    _put_ninja_on_path()
    try:
        cpp_extension.load(
            name=name, sources=[str(SOURCE)], extra_cflags=cflags, extra_ldflags=ldflags, is_python_module=False, verbose=False
        )
    except Exception as error:  # no compiler, no ninja, a failed build: say what to do
        raise RuntimeError(
            f"cait_kernels could not build its C++ CPU kernels ({type(error).__name__}: {error}). They need a C++ compiler and "
            "`pip install ninja`; meanwhile `with cait_kernels.backend('reference'): ...` runs the PyTorch reference"
        ) from error


def _quiet_cpp_extension():
    """``torch.utils.cpp_extension``, imported without its warning about a missing CUDA toolkit (CPU kernels need none)."""
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        logger.setLevel(level)
    return cpp_extension


def _put_ninja_on_path() -> None:
    """torch runs ``ninja`` from PATH; the pip package's binary sits in a venv's bin, off PATH unless the venv is activated."""
    if shutil.which("ninja"):
        return
    try:
        import ninja
    except ImportError:
        return
    os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


@torch.library.register_fake("cait_cpu::atme_step")
def _(x, metric, size, owner, r, grid, prefix, block):
    batch, tokens, channels = x.shape
    return x.new_empty(batch, tokens - r, channels), size.new_empty(batch, tokens - r), torch.empty_like(owner)


@torch.library.impl(_library, "atme_step", "CompositeExplicitAutograd")
def _first_call(x, metric, size, owner, r, grid, prefix, block):
    """Runs only until the C++ CPU kernel is loaded (it then takes the CPU key): load it and call it,
    or run the reference where it cannot be built. E.g. the first call of a loaded export program."""
    if x.device.type != "cpu":
        raise NotImplementedError(f"cait_cpu::atme_step runs on CPU tensors, got {x.device.type} tensors")
    if available():
        if not torch._C._dispatch_has_kernel_for_dispatch_key("cait_cpu::atme_step", "CPU"):  # would call itself again
            raise RuntimeError(f"the library {NAME} loaded without its CPU kernel for cait_cpu::atme_step")
        return torch.ops.cait_cpu.atme_step(x, metric, size, owner, r, grid, prefix, block)
    return atme_step_reference(x, metric, size, owner, r=r, grid=tuple(grid), prefix=prefix, block=block)


@torch.compiler.assume_constant_result  # torch.compile asks once while tracing, and does not trace the build
def available() -> bool:
    """Whether the C++ kernels load here; if not, warn once with the reason (the callers then run the reference)."""
    global _available
    if _available is None:
        try:
            load()
            _available = True
        except RuntimeError as error:
            log.warning("%s", error)
            _available = False
    return _available


_available: bool | None = None  # not tried yet


def atme_step_cpu(x, metric, size, owner, *, r, grid, prefix, block=2, out=None):
    """One ATME merge step by the fused C++ kernel; arguments and result as :func:`cait_kernels.atme.atme_step_reference`.

    Args:
        x: ``(B, P+N, C)`` CPU token features (fp16, bf16, fp32 or fp64).
        metric: ``(B, P+N, Cm)`` similarity features (prefix rows ignored).
        size: ``(B, P+N)`` cells per token.
        owner: ``(B, H*W)`` int32 spatial token of every cell, values in ``0..N-1``.
        r: tokens to remove per image; grid: ``(H, W)``; prefix: ``P``; block: 2 or 4.
        out: optional ``(x, size, owner)`` contiguous tensors of the result's shapes and dtypes to
            write into (then written even for ``r = 0``).
    Returns:
        ``x (B, P+N-r, C)``, ``size (B, P+N-r)``, ``owner (B, H*W)`` int32.
    """
    check_atme_inputs(x, metric, size, owner, r=r, grid=grid, prefix=prefix, block=block, owner_values=False)  # the kernel checks owner
    if x.device.type != "cpu":
        raise ValueError(f"atme_step_cpu runs on CPU tensors, got {x.device.type} tensors")
    if torch.is_grad_enabled() and x.requires_grad:
        raise RuntimeError("atme_step_cpu has no backward; run training on the reference (cait_kernels.atme_step does so by itself)")
    if r == 0 and out is None:
        return x, size, owner
    if not available():
        load()  # raises the reason
    if out is None:
        return torch.ops.cait_cpu.atme_step(x, metric, size, owner, r, list(grid), prefix, block)
    x_out, size_out, owner_out = out
    step = torch.ops.cait_cpu.atme_step.out
    return step(x, metric, size, owner, r, list(grid), prefix, block, x_out=x_out, size_out=size_out, owner_out=owner_out)
