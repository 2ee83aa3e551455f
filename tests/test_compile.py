"""Every kernel configuration the dispatcher can pick builds for sm_80 and sm_90 on this CPU-only
machine: no register spills on the hot path, shared memory within the device limit, and the
attention's matrix products on tensor cores. (Compilation runs in worker processes without the
interpreter; the first run fills triton's cache and takes a minute or two.)"""

import pytest

from cait_kernels import aot


@pytest.fixture(scope="module")
def rows():
    return aot.report()


def test_every_configuration_builds_for_both_architectures(rows):
    builds = aot.all_builds()
    assert len(rows) == len(builds) * len(aot.ARCHS)
    assert {(r.label, r.arch) for r in rows} == {(b.label, arch) for b in builds for arch in aot.ARCHS}
    assert all(r.registers > 0 for r in rows)


def test_hot_kernels_do_not_spill(rows):
    spilled = [f"{r.label} sm_{r.arch}: {r.stack} B stack, {r.local} B local" for r in rows if r.hot and (r.stack or r.local)]
    assert not spilled, spilled


def test_shared_memory_fits_the_device(rows):
    assert all(r.shared <= aot.SHARED_LIMIT[r.arch] for r in rows), [r for r in rows if r.shared > aot.SHARED_LIMIT[r.arch]]


def test_half_precision_attention_runs_on_tensor_cores(rows):
    half = [r for r in rows if r.label.startswith(("attention fp16", "attention bf16"))]
    assert half and all(r.tensor_core > 0 for r in half), [r for r in half if not r.tensor_core]
    assert {r.arch for r in half} == set(aot.ARCHS)


def test_table_lists_every_row(rows):
    text = aot.table(rows)
    assert len(text.splitlines()) == len(rows) + 2 and "sm_90" in text and "(hot)" in text
