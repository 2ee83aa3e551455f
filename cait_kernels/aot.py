"""Ahead-of-time compilation of every kernel configuration, for a GPU this machine need not have.

``triton.compile`` builds PTX and a cubin for ``sm_80``/``sm_90`` without a driver, and the
``cuobjdump`` inside triton's wheel reads the cubin back: registers, stack (spilled registers) and
local memory per thread, shared memory per program, and the tensor-core instructions (``HMMA`` on
sm_80, ``HGMMA``/``HMMA`` on sm_90) in the SASS. The interpreter accepts code the compiler rejects;
this is what proves the kernels build for a real GPU. ``cait bench --kernels`` prints the table,
``tests/test_compile.py`` checks it.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import re
import subprocess
import tempfile
from pathlib import Path
from typing import NamedTuple

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import triton_atme, triton_attention, triton_unmerge
from ._builds import Build

ARCHS = (80, 90)
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}  # bytes of shared memory one program may use (A100, H100)


class Resources(NamedTuple):
    """What the compiler made of one :class:`Build` for one architecture."""

    label: str
    arch: int
    registers: int
    stack: int
    local: int
    shared: int
    tensor_core: int
    hot: bool


def cuobjdump() -> Path:
    """The ``cuobjdump`` that ships inside triton's NVIDIA backend."""
    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


def compile_build(build: Build, arch: int) -> Resources:
    """Compile ``build`` for ``sm_<arch>`` and read its resource usage from the cubin."""
    signature = dict(build.signature, **{name: "constexpr" for name in build.constants})
    source = ASTSource(build.kernel, signature, build.constants)
    compiled = triton.compile(
        source, target=GPUTarget("cuda", arch, 32), options={"num_warps": build.num_warps, "num_stages": build.num_stages}
    )
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "kernel.cubin")
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        usage = _run(cuobjdump(), "--dump-resource-usage", cubin)
        sass = _run(cuobjdump(), "-sass", cubin)
    fields = {key: int(value) for key, value in re.findall(r"\b(REG|STACK|LOCAL):(\d+)", usage)}
    return Resources(
        label=build.label,
        arch=arch,
        registers=fields["REG"],
        stack=fields["STACK"],
        local=fields["LOCAL"],
        shared=int(compiled.metadata.shared),
        tensor_core=len(re.findall(r"\b(?:HGMMA|HMMA)\.", sass)),
        hot=build.hot,
    )


def _run(*command) -> str:
    return subprocess.run([str(c) for c in command], check=True, capture_output=True, text=True).stdout


def all_builds() -> list[Build]:
    """Every configuration the dispatcher can pick, from each kernel module's ``aot_builds``."""
    return [*triton_attention.aot_builds(), *triton_atme.aot_builds(), *triton_unmerge.aot_builds()]


def report(archs=ARCHS, select: str = "", workers: int | None = None, progress=None) -> list[Resources]:
    """Compile every build of :func:`all_builds` whose label contains ``select`` for every
    architecture, on ``workers`` processes (default: one per CPU). ``progress`` wraps an iterable
    (e.g. ``tqdm``). Rows come back in build order."""
    jobs = [(index, arch) for index, build in enumerate(all_builds()) if select in build.label for arch in archs]
    context = multiprocessing.get_context("spawn")
    interpret = os.environ.pop("TRITON_INTERPRET", None)  # workers compile, never interpret: they inherit this environment
    try:
        with concurrent.futures.ProcessPoolExecutor(workers or os.cpu_count(), mp_context=context) as pool:
            rows = pool.map(_compile_job, jobs)
            return list(progress(rows, total=len(jobs)) if progress else rows)
    finally:
        if interpret is not None:
            os.environ["TRITON_INTERPRET"] = interpret


def _compile_job(job: tuple[int, int]) -> Resources:
    """A worker's job: kernels do not pickle, so it rebuilds the list (importing the kernels fresh) and compiles one entry."""
    index, arch = job
    return compile_build(all_builds()[index], arch)


def table(rows: list[Resources]) -> str:
    """A plain-text table of :func:`report` rows."""
    header = f"{'kernel configuration':<58} {'arch':>6} {'regs':>5} {'spill B':>8} {'local B':>8} {'smem KiB':>9} {'tensor-core':>12}"
    lines = [header, "-" * len(header)]
    for r in rows:
        label = r.label + (" (hot)" if r.hot else "")
        lines.append(
            f"{label:<58} {'sm_' + str(r.arch):>6} {r.registers:>5} {r.stack:>8} {r.local:>8} {r.shared / 1024:>9.1f} {r.tensor_core:>12}"
        )
    return "\n".join(lines)
