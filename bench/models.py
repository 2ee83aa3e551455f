"""Model benchmark: dense timm ViTs vs cait-compressed copies, timed side by side on this machine.

    python bench/models.py --models deit_small_patch16_224 --merge-flops 0.6 --batch 8
    python bench/models.py --out bench/results/models-cpu.json   # the full table

Random weights unless --checkpoint is given (speed does not depend on the weights). FLOPs are per
image, multiply-add = 2, counted by torch.utils.flop_counter.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import timm
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import cait  # noqa: E402
from cait.benchmark import as_json, compare, machine, table  # noqa: E402

DEFAULT_MODELS = ["deit_tiny_patch16_224", "deit_small_patch16_224", "deit_base_patch16_224"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=DEFAULT_MODELS, help="timm model names (default: DeiT-T/S/B at 224)")
    p.add_argument("--merge-flops", nargs="+", type=float, default=[0.8, 0.6], metavar="F",
                   help="ATME FLOPs targets, one compressed variant each (default: 0.8 0.6)")
    p.add_argument("--block", type=int, default=2, choices=(2, 4), help="ATME tile side (default: 2)")
    p.add_argument("--batch", nargs="+", type=int, default=[1, 8], help="batch sizes (default: 1 8)")
    p.add_argument("--repeats", type=int, default=15, help="timed repeats per model, after 2 warm-up runs (default: 15)")
    p.add_argument("--checkpoint", help="weights file for the (single) model, loaded with timm")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", help="write the rows and the machine description to this JSON file")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.checkpoint and len(args.models) != 1:
        sys.exit("--checkpoint needs exactly one model in --models")
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for name in args.models:
        dense = timm.create_model(name, checkpoint_path=args.checkpoint or "").eval()
        variants = {"dense": dense}
        for target in args.merge_flops:
            variants[f"ATME flops={target}"] = cait.compress(dense, merge=cait.ATME(flops=target, block=args.block))
        for batch in args.batch:
            rows += compare(name, variants, batch, args.repeats)
            print(table(rows[-len(variants):]), "\n", flush=True)
    info = machine()
    print(f"machine: {info}")
    if len(rows) > len(variants):
        print("\n" + table(rows))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"machine": info, "repeats": args.repeats, "rows": as_json(rows)}, f, indent=2)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
