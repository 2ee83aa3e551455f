"""CUDA's launch limits and the kernels' offsets at sizes no CPU test could run (issue 26).

CUDA runs at most ``2**31 - 1`` programs on grid axis x and 65535 on axes y and z; the interpreter
enforces neither, so a grid with the batch on axis y passes every CPU test and fails on a GPU (the
attention kernel's ``B * heads`` axis y did from batch 5462 at 12 heads, merge and unmerge from 65536).
Here, on the CPU:
- every launch in ``cait_kernels/triton_*.py`` takes its grid from a pure ``*_grid`` (or ``*_launches``)
  function (the modules' source is scanned, so a new kernel or launch without one fails), and each is
  evaluated at huge shapes (batch 100000, 16 heads, 4097 tokens, grids up to the ATME kernels' 46340
  cells) against CUDA's limits, and refuses a shape past them with a ``ValueError`` naming it;
- every kernel casts its image index to int64 before using it (the source is read), the launchers
  refuse tensors whose offsets inside one image would pass int32, and the interpreter runs each kernel
  on images placed past ``2**31`` elements in one virtual buffer (only touched pages take memory; a
  wrapped int32 offset crashes the interpreter, so those runs happen in a child process).
"""

from __future__ import annotations

import ast
import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cait_kernels import _launch, block_count, triton_atme, triton_attention, triton_unmerge
from cait_kernels.triton_atme import MAX_CELLS, MERGE_CHANNELS

CUDA_MAX_GRID = (2**31 - 1, 65535, 65535)  # x, y, z: written out here again, so a wrong constant in _launch fails too
ROOT = Path(__file__).resolve().parents[1]
KERNEL_MODULES = sorted(path.stem for path in (ROOT / "cait_kernels").glob("triton_*.py"))

BATCHES = (1, 256, 5462, 6000, 65535, 65536, 70000, 100_000)
TOKENS = (1, 64, 197, 4097)
HEADS = (1, 12, 16)
GRIDS = ((14, 14), (64, 64), (215, 215), (1, MAX_CELLS), (MAX_CELLS, 1), (3, MAX_CELLS // 3))  # up to the ATME kernels' cells
CHANNELS = (1, 384, 1024, 8192)


def attention_grids():
    for batch, n, heads, d, dtype in itertools.product(BATCHES, TOKENS, HEADS, (32, 64, 128), (torch.float16, torch.float32)):
        block_m = triton_attention.attention_config(n, d, d, dtype).block_m
        yield from (grid for _, _, grid in triton_attention.attention_launches(batch, n, heads, block_m))


def forest_grids():
    for batch, grid, block in itertools.product(BATCHES, GRIDS, (2, 4)):
        yield triton_atme.forest_grid(batch, block_count(grid, block), block)


def merge_grids():
    for batch, grid, block, channels in itertools.product(BATCHES, GRIDS, (2, 4), CHANNELS):
        yield triton_atme.merge_grid(batch, block_count(grid, block), channels, MERGE_CHANNELS[block])


def unmerge_grids():
    for batch, grid, channels in itertools.product(BATCHES, GRIDS, CHANNELS):
        yield triton_unmerge.unmerge_grid(batch, grid[0] * grid[1], channels)


# Every grid function a launch uses: its grids at huge shapes, and a call past the limits with the words its error must say.
GRID_FUNCTIONS = {
    "triton_attention.attention_launches": (
        attention_grids,
        lambda: triton_attention.attention_launches(1, 4097, 70000, 32),  # 70000 heads of one image: over on axis y
        "images=1, tokens=4097, heads=70000",
    ),
    "triton_atme.forest_grid": (forest_grids, lambda: triton_atme.forest_grid(2**31, 4, 2), "batch=2147483648"),
    "triton_atme.merge_grid": (merge_grids, lambda: triton_atme.merge_grid(8, 4, 2**24, 128), "channels=16777216"),
    "triton_unmerge.unmerge_grid": (unmerge_grids, lambda: triton_unmerge.unmerge_grid(2**26, 4096, 8), "batch=67108864, cells=4096"),
}


def launches(module: str):
    """``(kernel, grid function)`` for every launch ``kernel[grid](...)`` in ``cait_kernels/<module>.py``. The
    grid function is the ``*_grid`` or ``*_launches`` function whose call is the launch's ``grid``, or is
    assigned to the name the launch uses (``grid = f(...)``, or ``for ..., grid in f(...)``) in the same
    function; None if there is none."""
    tree = ast.parse((ROOT / "cait_kernels" / f"{module}.py").read_text())
    for function in (node for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)):
        assigned = {}
        for node in ast.walk(function):
            if isinstance(node, ast.Assign):
                assigned.update({target.id: node.value for target in node.targets if isinstance(target, ast.Name)})
            if isinstance(node, ast.For):
                names = node.target.elts if isinstance(node.target, ast.Tuple) else [node.target]
                assigned.update({name.id: node.iter for name in names if isinstance(name, ast.Name)})
        for node in ast.walk(function):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript):
                grid = node.func.slice
                if isinstance(grid, ast.Name):
                    grid = assigned.get(grid.id, grid)
                computed = isinstance(grid, ast.Call) and isinstance(grid.func, ast.Name) and grid.func.id.endswith(("_grid", "_launches"))
                yield ast.unparse(node.func.value), f"{module}.{grid.func.id}" if computed else None


def kernels(module: str) -> dict[str, ast.FunctionDef]:
    """The ``@triton.jit`` functions of ``cait_kernels/<module>.py`` that read a program id (its kernels), by name."""
    tree = ast.parse((ROOT / "cait_kernels" / f"{module}.py").read_text())
    return {
        node.name: node
        for node in tree.body
        if isinstance(node, ast.FunctionDef)
        and any(ast.unparse(d) == "triton.jit" for d in node.decorator_list)
        and "tl.program_id" in ast.unparse(node)
    }


def test_the_limits_are_cudas():
    assert _launch.MAX_GRID == CUDA_MAX_GRID


@pytest.mark.parametrize("module", KERNEL_MODULES)
def test_every_launch_takes_its_grid_from_a_grid_function(module):
    found = list(launches(module))
    assert found, f"no kernel launch found in cait_kernels/{module}.py"
    inline = [kernel for kernel, grid in found if grid is None]
    assert not inline, f"{inline}: compute the grid with a *_grid function that calls _launch.check_grid"
    unknown = {grid for _, grid in found} - set(GRID_FUNCTIONS)
    assert not unknown, f"{unknown}: add the grid function and its huge shapes to GRID_FUNCTIONS in {__file__}"
    assert {kernel for kernel, _ in found} == set(kernels(module)), "every kernel must be launched through a grid function"


def test_every_grid_function_is_in_use():
    used = {grid for module in KERNEL_MODULES for _, grid in launches(module)}
    assert used == set(GRID_FUNCTIONS)


@pytest.mark.parametrize("name", sorted(GRID_FUNCTIONS))
def test_grids_at_huge_shapes_fit_cudas_limits(name):
    grids, _, _ = GRID_FUNCTIONS[name]
    count = 0
    for grid in grids():
        assert 1 <= len(grid) <= 3 and all(isinstance(p, int) and p >= 1 for p in grid), grid
        assert all(p <= limit for p, limit in zip(grid, CUDA_MAX_GRID)), (name, grid)
        count += 1
    assert count >= 90


@pytest.mark.parametrize("name", sorted(GRID_FUNCTIONS))
def test_a_shape_past_the_limits_is_refused_by_name(name):
    _, too_big, words = GRID_FUNCTIONS[name]
    with pytest.raises(ValueError, match=f"{words}.*over CUDA's limit"):
        too_big()


@pytest.mark.parametrize("heads", HEADS + (7, 65535))
def test_attention_launches_split_the_batch_only_past_the_limit(heads):
    for batch in BATCHES:
        found = triton_attention.attention_launches(batch, 197, heads, 64)
        assert [start for start, _, _ in found] == [0] + [stop for _, stop, _ in found[:-1]] and found[-1][1] == batch
        assert all(grid == (4, (stop - start) * heads) for start, stop, grid in found)
        assert len(found) == math.ceil(batch / (65535 // heads))  # one launch while batch * heads <= 65535


def test_attention_in_several_launches_equals_one(monkeypatch, kernel_device):
    """The batch split into launches (here of 2 images: axis y capped at 5) gives the same bits as one launch."""
    qkv = torch.randn(7, 19, 2 * 3 * 24, device=kernel_device)
    size = torch.randint(1, 4, (7, 19), device=kernel_device).float()
    args = dict(heads=2, d_qk=24, d_v=24, scale=0.2, size=size)
    one = triton_attention.pruned_attention_triton(qkv, **args)
    monkeypatch.setattr(triton_attention, "MAX_GRID", (2**31 - 1, 5, 5))
    assert len(triton_attention.attention_launches(7, 19, 2, 32)) == 4
    assert torch.equal(triton_attention.pruned_attention_triton(qkv, **args), one)


def test_check_grid():
    assert _launch.check_grid("k", (2**31 - 1, 65535, 65535), batch=1) == (2**31 - 1, 65535, 65535)
    with pytest.raises(ValueError, match=r"k: batch=70000 needs 70000 programs on grid axis y .* limit of 65535"):
        _launch.check_grid("k", (3, 70000), batch=70000)
    with pytest.raises(ValueError, match="1 to 3 axes"):
        _launch.check_grid("k", (1, 1, 1, 1))


# -- offsets -------------------------------------------------------------------------------------


@pytest.mark.parametrize("module", KERNEL_MODULES)
def test_kernels_cast_the_image_index_to_int64(module):
    """Each kernel names its batch index ``image`` and uses it only as ``image.to(tl.int64)`` (or assigns it
    as int64): an int32 ``image * stride`` wraps past ``2**31`` elements (e.g. B=8192, N=197, W=2304)."""
    assert kernels(module)
    for name, tree in kernels(module).items():
        parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        assigned = [node.value for node in ast.walk(tree) if isinstance(node, ast.Assign) and ast.unparse(node.targets[0]) == "image"]
        assert len(assigned) == 1, f"{name}: assign the batch index to `image` once"
        if is_int64(assigned[0]):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Name) and node.id == "image" and isinstance(node.ctx, ast.Load):
                use = parents[node]
                ok = isinstance(use, ast.Attribute) and use.attr == "to" and is_int64(parents[use])
                assert ok, f"{name}: `{ast.unparse(parents[use] if isinstance(use, ast.Attribute) else use)}` uses image as int32"


def is_int64(node) -> bool:
    """Whether ``node`` is ``<something>.to(tl.int64)``."""
    return isinstance(node, ast.Call) and ast.unparse(node.func).endswith(".to") and [ast.unparse(a) for a in node.args] == ["tl.int64"]


def test_check_offsets():
    fine = torch.empty_strided((3, 4, 5), (2**40, 2**20, 1), device="meta")  # any batch stride; 3 * 2**20 + 4 inside an image
    _launch.check_offsets("k", x=fine)
    wide = torch.empty_strided((3, 4, 5), (1, 2**30, 1), device="meta")  # token-major view of a large buffer
    with pytest.raises(ValueError, match=r"k: x of shape \(3, 4, 5\) and strides \(1, 1073741824, 1\) spans 3221225476 elements"):
        _launch.check_offsets("k", y=fine, x=wide)


def far_rows(rows: int, width: int) -> torch.Tensor:
    """A meta ``(2, rows, width)`` tensor whose rows lie ``2**30`` elements apart (an image spans past int32)."""
    return torch.empty_strided((2, rows, width), (1, 2**30, 1), device="meta")


def test_launchers_refuse_offsets_past_int32_before_launching():
    with pytest.raises(ValueError, match="attention_kernel: qkv"):
        triton_attention.launch_attention(far_rows(4, 3 * 16), 1, 16, 16, 0.25, None, None, None)
    owner = torch.zeros(2, 16, dtype=torch.int32, device="meta")
    with pytest.raises(ValueError, match="unmerge_kernel: x"):
        triton_unmerge.launch_unmerge(far_rows(17, 8), owner, 1)
    x, size = far_rows(17, 8), torch.ones(2, 17, device="meta")
    with pytest.raises(ValueError, match="ATME kernels: x"):
        triton_atme.launch_atme(x, torch.empty(2, 17, 8, device="meta"), size, owner, 3, (4, 4), 1, 2)
    with pytest.raises(ValueError, match="ATME kernels: metric"):
        triton_atme.launch_atme(x.contiguous(), x, size, owner, 3, (4, 4), 1, 2)


def test_launchers_refuse_grids_past_the_limits_before_launching():
    batch = 2**26  # meta tensors: no memory
    owner = torch.empty(batch, 4096, dtype=torch.int32, device="meta")
    with pytest.raises(ValueError, match="unmerge_kernel: batch=67108864, cells=4096"):
        triton_unmerge.launch_unmerge(torch.empty(batch, 4097, 8, device="meta"), owner, 1)
    with pytest.raises(ValueError, match="attention_kernel: images=1, tokens=3, heads=70000"):  # axis y holds heads x images
        triton_attention.launch_attention(torch.empty(2, 3, 70000 * 3, device="meta"), 70000, 1, 1, 0.25, None, None, None)


STRIDE = 2**30 + 2**20  # elements between images: image 2 starts past 2**31, where an int32 offset wraps


def far_images(*shapes: tuple[int, ...]) -> list[torch.Tensor]:
    """Three images of tensors of the given per-image shapes, image ``i`` of each at ``i * STRIDE`` in one
    fp32 buffer of about ``2**31`` elements (virtual: only the pages the random values touch take memory)."""
    numels = [math.prod(shape) for shape in shapes]
    base = torch.empty(2 * STRIDE + sum(numels))
    views = []
    for shape, offset in zip(shapes, itertools.accumulate([0, *numels])):
        strides = [math.prod(shape[d + 1 :]) for d in range(len(shape))]
        view = base.as_strided((3, *shape), (STRIDE, *strides), offset)
        view.copy_(torch.randn(3, *shape))
        views.append(view)
    return views


def far_offset_error(op: str) -> float:
    """Run ``op``'s Triton kernel(s) on images past ``2**31`` elements; its largest deviation from the reference."""
    import cait_kernels as ck

    if op == "attention":
        qkv, size = far_images((37, 2 * 3 * 24), (37,))
        size.abs_().add_(0.5)
        args = dict(heads=2, d_qk=24, d_v=24, scale=0.2)
        out = ck.pruned_attention_triton(qkv, size=size, **args)
        return float((out - ck.pruned_attention_reference(qkv.contiguous(), size=size.contiguous(), **args)).abs().max())
    owner = torch.arange(36, dtype=torch.int32).expand(3, -1).contiguous()
    if op == "atme":
        x, metric = far_images((37, 24), (37, 8))
        size = torch.ones(3, 37)
        out = ck.atme_step_triton(x, metric, size, owner, r=7, grid=(6, 6), prefix=1)
        ref = ck.atme_step_reference(x.contiguous(), metric.contiguous(), size, owner, r=7, grid=(6, 6), prefix=1)
        exact = torch.equal(out[1], ref[1]) and torch.equal(out[2], ref[2])
        return float((out[0] - ref[0]).abs().max()) if exact else float("inf")
    (x,) = far_images((37, 24))
    return float((ck.unmerge_triton(x, owner, prefix=1) - ck.unmerge_reference(x.contiguous(), owner, prefix=1)).abs().max())


OPS = ("attention", "atme", "unmerge")


@pytest.fixture(scope="module")
def far_runs():
    """One child process runs every op (a line of JSON each, as it finishes): ``(results, exit status, stderr)``."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, __file__, *OPS], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    results = {}
    for line in done.stdout.splitlines():
        results.update(json.loads(line))
    return results, done.returncode, done.stderr[-2000:]


@pytest.mark.parametrize("op", OPS)
def test_images_past_int32_offsets_in_the_interpreter(op, far_runs):
    results, status, stderr = far_runs
    assert op in results, f"the child stopped before {op} finished: exit status {status} (-11: an offset wrapped) {stderr}"
    assert results[op] < 1e-5


if __name__ == "__main__":  # the child process of far_runs
    torch.manual_seed(0)
    for op in sys.argv[1:]:
        print(json.dumps({op: far_offset_error(op)}), flush=True)
