"""Why merged models keep less of their FLOPs saving at batch 1 on CPU: two measurements.

1. Matrix products: GFLOP/s of ``F.linear`` on DeiT-T/S layer shapes by row count (197 tokens of a
   dense batch-1 block down to the 50 of a late merged block) on 1 and on all threads.
2. A free merge: the compressed model as it is, and the same model with every merge step replaced
   by a slice to the same token count (no merge cost, same shapes), timed side by side with dense.

    python bench/small_batch.py [--models deit_tiny_patch16_224 ...] [--variant merge=0.7,prune=0.5/0.75/0.75]
        [--out bench/results/small-batch-cpu.json]
"""

import argparse
import json
import os
import statistics
import sys
import time
import types

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from cait.benchmarks.latency import build_variant, machine, parse_variant, time_interleaved  # noqa: E402
from cait.tokens import TokenState  # noqa: E402

ROWS = (197, 150, 100, 64, 50)
SHAPES = {"DeiT-T": ((192, 576), (192, 768), (768, 192)), "DeiT-S": ((384, 1152), (384, 1536), (1536, 384))}


def gemm_gflops(rows: int, inputs: int, outputs: int, repeats: int = 60) -> float:
    """GFLOP/s of ``F.linear`` on a ``(rows, inputs)`` batch and ``(outputs, inputs)`` weight (median)."""
    x, weight, bias = torch.randn(rows, inputs), torch.randn(outputs, inputs), torch.randn(outputs)
    for _ in range(10):
        F.linear(x, weight, bias)
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        F.linear(x, weight, bias)
        seconds.append(time.perf_counter() - start)
    return 2 * rows * inputs * outputs / statistics.median(seconds) / 1e9


def gemm_table() -> list[dict]:
    threads = torch.get_num_threads()
    table = []
    for n_threads in sorted({1, threads}):
        torch.set_num_threads(n_threads)
        for model, shapes in SHAPES.items():
            for inputs, outputs in shapes:
                row = {"threads": n_threads, "shape": f"{model} {inputs}->{outputs}"}
                row.update({str(rows): gemm_gflops(rows, inputs, outputs) for rows in ROWS})
                table.append(row)
    torch.set_num_threads(threads)
    return table


def slice_merge(block, state: TokenState, metric) -> TokenState:
    """A merge step that costs nothing: the first ``T - r`` tokens (same shapes as a real merge)."""
    r = block.count(state)
    keep = state.x.shape[1] - r
    return state.merged(state.x[:, :keep], state.size[:, :keep], state.owner) if r else state


def free_merge_rows(models: list[str], variant: str, batch: int, repeats: int) -> list[dict]:
    import timm

    rows = []
    for name in models:
        dense = timm.create_model(name).eval()
        real = build_variant(dense, parse_variant(variant))
        free = build_variant(dense, parse_variant(variant))
        for block in free.blocks:
            block.merge = types.MethodType(slice_merge, block)
        images = torch.randn(batch, 3, 224, 224)
        seconds = time_interleaved({"dense": dense, "real": real, "free": free}, images, repeats, progress=False)
        base = statistics.median(seconds["dense"])
        rows.append(
            {
                "model": name,
                "variant": variant,
                "batch": batch,
                "dense_ms": 1e3 * base,
                "speedup": base / statistics.median(seconds["real"]),
                "speedup_free_merge": base / statistics.median(seconds["free"]),
            }
        )
    return rows


def markdown(gemm: list[dict], merges: list[dict]) -> str:
    lines = ["| threads | layer (in->out) | " + " | ".join(f"{r} rows" for r in ROWS) + " |", "|" + "---|" * (2 + len(ROWS))]
    lines += [f"| {g['threads']} | {g['shape']} | " + " | ".join(f"{g[str(r)]:.0f}" for r in ROWS) + " |" for g in gemm]
    lines += ["", "| model | variant | batch | dense ms | speedup | speedup, free merge |", "|---|---|---|---|---|---|"]
    lines += [
        f"| {m['model']} | {m['variant']} | {m['batch']} | {m['dense_ms']:.1f} | {m['speedup']:.2f}x | {m['speedup_free_merge']:.2f}x |"
        for m in merges
    ]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["deit_tiny_patch16_224", "deit_small_patch16_224"], help="timm model names")
    parser.add_argument("--variant", default="merge=0.7,prune=0.5/0.75/0.75", help="compressed variant (as in `cait bench`)")
    parser.add_argument("--batch", type=int, default=1, help="images per forward (default: 1)")
    parser.add_argument("--repeats", type=int, default=15, help="timed repeats per model (default: 15)")
    parser.add_argument("--out", help="also write the tables and the machine to this JSON file")
    args = parser.parse_args(argv)
    gemm = gemm_table()
    merges = free_merge_rows(args.models, args.variant, args.batch, args.repeats)
    print("GEMM GFLOP/s by rows (F.linear, fp32, medians), then the model with a free merge:\n")
    print(markdown(gemm, merges))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"machine": machine(), "gemm_gflops": gemm, "free_merge": merges}, f, indent=1)


if __name__ == "__main__":
    main()
