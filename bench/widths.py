"""Speed by channel width on this CPU: the measurement behind CDCP's default ``align``.

Two parts, each on 1 and on all threads, every width timed interleaved with the others (fresh random
order per repeat, best of the repeats: contention on a shared machine only ever slows a run down):

1. MLP pairs ``C -> n -> C`` (``fc1`` then ``fc2``, fp32) for hidden widths ``n`` around DeiT-S's
   ``0.7 * 1536 = 1075``, at 197 rows (a batch-1 block), 99 rows (a merged batch-1 block) and 1576
   rows (batch 8), through ``F.linear`` (eager) and through the MKL packed GEMM that inductor's weight
   freezing runs (``torch.ops.mkl._mkl_linear``);
2. attention ``softmax(q k^T) v`` at 197 tokens, 6 heads, for head widths 24..64
   (``F.scaled_dot_product_attention``, equal q/k/v widths).

For each alignment ``a`` in 8/16/32/64 it prints the median throughput of the widths that are
multiples of ``a`` relative to the median of those that are not: ``1.00`` means alignment buys
nothing here.

    python bench/widths.py [--threads 1 2] [--repeats 30] [--out bench/results/widths-cpu.json]
"""

import argparse
import json
import os
import random
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from cait.benchmarks.latency import machine  # noqa: E402

ALIGNS = (8, 16, 32, 64)


def best_seconds(calls: dict, repeats: int, inner: int) -> dict:
    """Best seconds per call of every callable in ``calls``, interleaved in a fresh order per repeat."""
    seconds = {key: [] for key in calls}
    order = list(calls)
    for rep in range(repeats + 2):
        random.Random(rep).shuffle(order)
        for key in order:
            start = time.perf_counter()
            for _ in range(inner):
                calls[key]()
            if rep >= 2:
                seconds[key].append((time.perf_counter() - start) / inner)
    return {key: min(values) for key, values in seconds.items()}


def mlp_calls(channels: int, widths: range, rows: int, packed: bool) -> dict:
    x = torch.randn(rows, channels)
    calls = {}
    for n in widths:
        w1, b1, w2, b2 = torch.randn(n, channels), torch.randn(n), torch.randn(channels, n), torch.randn(channels)
        if packed:
            p1, p2 = torch.ops.mkl._mkl_reorder_linear_weight(w1, rows), torch.ops.mkl._mkl_reorder_linear_weight(w2, rows)
            calls[n] = lambda p1=p1, p2=p2, w1=w1, w2=w2, b1=b1, b2=b2: torch.ops.mkl._mkl_linear(
                torch.ops.mkl._mkl_linear(x, p1, w1, b1, rows), p2, w2, b2, rows
            )
        else:
            calls[n] = lambda w1=w1, w2=w2, b1=b1, b2=b2: F.linear(F.linear(x, w1, b1), w2, b2)
    return calls


def attention_calls(widths: range, tokens: int, heads: int) -> dict:
    calls = {}
    for d in widths:
        q, k, v = (torch.randn(1, heads, tokens, d) for _ in range(3))
        calls[d] = lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v)
    return calls


def summary(gflops: dict) -> dict:
    """Per alignment: median GFLOP/s of aligned widths / median of the others."""
    out = {}
    for a in ALIGNS:
        aligned = [g for n, g in gflops.items() if n % a == 0]
        others = [g for n, g in gflops.items() if n % a]
        if aligned and others:
            out[a] = statistics.median(aligned) / statistics.median(others)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, nargs="+", default=sorted({1, torch.get_num_threads()}))
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--out", help="write the rows as JSON")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows_out = []
    widths = range(1056, 1105)
    for threads in args.threads:
        torch.set_num_threads(threads)
        cases = [("mlp", rows, packed) for rows in (197, 99, 1576) for packed in (False, True)] + [("attention", 197, False)]
        for kind, rows, packed in cases:
            if kind == "mlp":
                calls = mlp_calls(384, widths, rows, packed)
                flop = {n: 4 * rows * 384 * n for n in widths}
                label = f"MLP 384->n->384, {rows} rows, {'MKL packed' if packed else 'F.linear'}"
            else:
                head_widths = range(24, 65)
                calls, flop = attention_calls(head_widths, rows, 6), {d: 4 * 6 * rows * rows * d for d in head_widths}
                label = f"attention, {rows} tokens, 6 heads, head width d"
            inner = max(1, round(2e-3 / (max(flop.values()) / 100e9)))  # about 2 ms per timed sample
            seconds = best_seconds(calls, args.repeats, inner)
            gflops = {n: flop[n] / seconds[n] / 1e9 for n in calls}
            ratios = summary(gflops)
            rows_out.append({"threads": threads, "case": label, "gflops": gflops, "aligned_vs_not": ratios})
            best = max(gflops.values())
            print(f"\n{label}, {threads} thread(s): best {best:.0f} GFLOP/s")
            print("  aligned / not: " + "  ".join(f"x{a}: {r:.3f}" for a, r in ratios.items()))
            print("  " + " ".join(f"{n}:{g / best:.2f}" for n, g in gflops.items()))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"machine": machine(), "repeats": args.repeats, "rows": rows_out}, f, indent=2)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
