"""The Triton kernels at batches past CUDA's grid limits and at offsets past int32 (issue 26), each checked
against the PyTorch reference on a few images: the first two, the last two, and the three around the
first image that starts past ``2**31`` elements (where an int32 offset would wrap).

    python bench/large_batch.py            # on a CUDA GPU: ~12 GiB at most, seconds
    python bench/large_batch.py --dry-run  # the same cases at tiny shapes on the CPU (the interpreter)

Cases: attention at batch 6000 x 12 heads (a ``B * heads`` grid axis y held at most 65535 programs: it
failed from batch 5462) and at batch 8192 x 197 tokens x 12 heads of 64 channels (``qkv`` holds 3.7e9
elements: the last images start past ``2**31``); the ATME step and unmerge at batch 70000 (past 65535
images on a grid axis y) on DeiT's 14x14 grid with 160 channels (2.2e9 elements). Prints a Markdown table
(``bench/gpu_check.sh`` puts it into its summary); exit status 1 if a case fails.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

TOLERANCE = {"float16": 2e-3, "float32": 1e-5}  # relative error against the float64 reference (DESIGN.md, Numerics)


def probes(torch, batch: int, stride: int, device):
    """The images to check: the first two, the last two, and the three around the first image at least
    ``2**31`` elements in (``stride``: elements per image)."""
    past = -(-(2**31) // stride)
    return torch.tensor(sorted({i for i in (0, 1, past - 1, past, past + 1, batch - 2, batch - 1) if 0 <= i < batch}), device=device)


def rel_err(out, ref) -> float:
    out, ref = out.double(), ref.double()
    if out.isnan().any():
        return float("inf")
    return float((out - ref).norm() / ref.norm())


def attention_case(ck, torch, device, dtype, batch, tokens, heads, d):
    """Pruned attention (materialized layout, with the size bias) on ``batch`` images: one table row."""
    from cait_kernels.triton_attention import attention_config, attention_launches

    start = time.perf_counter()
    qkv = torch.randn(batch, tokens, heads * 3 * d, dtype=dtype, device=device)
    size = torch.randint(1, 5, (batch, tokens), device=device).float()
    args = dict(heads=heads, d_qk=d, d_v=d, scale=d**-0.5)
    out = ck.pruned_attention_triton(qkv, size=size, **args)
    ends = probes(torch, batch, qkv.stride(0), device)
    ref = ck.pruned_attention_reference(qkv[ends].double(), size=size[ends].double(), **args)
    launches = attention_launches(batch, tokens, heads, attention_config(tokens, d, d, dtype).block_m)
    grids = " + ".join(str(grid) for _, _, grid in launches)  # one launch per 65535 // heads images
    case = f"attention {heads} heads x {tokens} tokens x {d}"
    return case, batch, qkv.numel(), grids, ends.tolist(), rel_err(out[ends], ref), time.perf_counter() - start


def atme_unmerge_cases(ck, torch, device, dtype, batch, side, channels, r):
    """The ATME step (``r`` merges on a ``side x side`` grid, one prefix token) then unmerge of its output on
    ``batch`` images: two table rows. ``size`` and ``owner`` must equal the reference's, unmerge exactly."""
    from cait_kernels import block_count
    from cait_kernels.triton_atme import MERGE_CHANNELS, merge_grid
    from cait_kernels.triton_unmerge import unmerge_grid

    start = time.perf_counter()
    cells = side * side
    x = torch.randn(batch, 1 + cells, channels, dtype=dtype, device=device)
    metric = torch.randn(batch, 1 + cells, 32, device=device)
    size = torch.ones(batch, 1 + cells, device=device)
    owner = torch.arange(cells, dtype=torch.int32, device=device).expand(batch, -1).contiguous()
    ends = probes(torch, batch, x.stride(0), device)
    step = dict(r=r, grid=(side, side), prefix=1)
    new_x, new_size, new_owner = ck.atme_step_triton(x, metric, size, owner, **step)
    ref = ck.atme_step_reference(x[ends], metric[ends], size[ends], owner[ends], **step)
    exact = torch.equal(new_size[ends], ref[1]) and torch.equal(new_owner[ends], ref[2])
    error = rel_err(new_x[ends], ref[0]) if exact else float("inf")
    grid = merge_grid(batch, block_count((side, side), 2), channels, MERGE_CHANNELS[2])
    shape = f"{side}x{side} x {channels}, r={r}"
    rows = [(f"ATME step {shape}", batch, x.numel(), grid, ends.tolist(), error, time.perf_counter() - start)]
    del x, metric, size, owner, ref  # room for unmerge's output

    start = time.perf_counter()
    out = ck.unmerge_triton(new_x, new_owner, prefix=1)
    ends = probes(torch, batch, out.stride(0), device)
    same = torch.equal(out[ends], ck.unmerge_reference(new_x[ends], new_owner[ends], prefix=1))
    grid = unmerge_grid(batch, cells, channels)
    rows.append((f"unmerge {shape}", batch, out.numel(), grid, ends.tolist(), 0.0 if same else float("inf"), time.perf_counter() - start))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU through the Triton interpreter (seconds)")
    args = parser.parse_args(argv)
    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernels are decorated: before the import
    import torch

    import cait_kernels as ck

    if not args.dry_run and not torch.cuda.is_available():
        print("needs a CUDA GPU (or --dry-run)")
        return 1
    device = torch.device("cpu" if args.dry_run else "cuda")
    dtype = torch.float16
    torch.manual_seed(0)
    if args.dry_run:
        attention, atme = [(5, 16, 2, 16), (3, 20, 2, 24)], (6, 4, 24, 5)
    else:
        attention, atme = [(6000, 16, 12, 64), (8192, 197, 12, 64)], (70000, 14, 160, 49)  # (batch, tokens, heads, d); (batch, side, C, r)

    rows = []
    for shape in attention:
        rows.append(attention_case(ck, torch, device, dtype, *shape))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    rows += atme_unmerge_cases(ck, torch, device, dtype, *atme)

    where = torch.cuda.get_device_name() if device.type == "cuda" else "the CPU (interpreter, tiny shapes)"
    print(f"large-batch check on {where}, {str(dtype).removeprefix('torch.')}")
    print("| case | batch | elements | grid (x, y, z) per launch | past int32 offsets | images checked | rel. error | seconds | status |")
    print("|---|---|---|---|---|---|---|---|---|")
    failed = 0
    for case, batch, elements, grid, images, error, seconds in rows:
        ok = error < TOLERANCE[str(dtype).removeprefix("torch.")]
        failed += not ok
        past = "yes" if elements > 2**31 - 1 else "no"
        listed = ", ".join(map(str, images))
        status = "ok" if ok else "FAILED"
        print(f"| {case} | {batch} | {elements:.3g} | {grid} | {past} | {listed} | {error:.2e} | {seconds:.1f} | {status} |")
    if device.type == "cuda":
        print(f"\npeak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    return int(failed > 0)


if __name__ == "__main__":
    sys.exit(main())
