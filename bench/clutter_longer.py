"""Longer fine-tunes on the cluttered-digits proxy: the methods of ``cait bench --accuracy --curve
--clutter`` (cait/benchmarks/clutter_curve.py) at one FLOPs ratio with more epochs, one seed per run,
the same recipe sizing, validation and test canvases. Does more fine-tuning close CAIT's gap to dense?

    python bench/clutter_longer.py --seed 0 --weights W.pt --method "CAIT (fine-tuned)" --epochs 15 --out F.json
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from cait.benchmarks.clutter_curve import FINE_TUNED  # noqa: E402

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0, help="the dense run's seed (default: 0)")
    parser.add_argument("--weights", required=True, help="the dense state dict (bench/clutter_dense.py --weights, default settings)")
    parser.add_argument("--method", choices=FINE_TUNED, default=FINE_TUNED[0], help="which fine-tuned method (default: CAIT)")
    parser.add_argument("--ratio", type=float, default=0.5, help="FLOPs ratio (default: 0.5)")
    parser.add_argument("--epochs", type=int, default=15, help="fine-tuning epochs of 2,560 fresh canvases (default: 15)")
    parser.add_argument("--out", required=True, help="JSON file to write")
    args = parser.parse_args()
    if not os.path.isdir(os.path.dirname(os.path.abspath(args.out))):
        parser.error(f"--out {args.out}: the folder does not exist")
    if args.epochs < 1:
        parser.error("--epochs must be at least 1")

    from cait.benchmarks import clutter_curve as cc

    if not os.path.isfile(args.weights):
        parser.error(f"--weights {args.weights}: no such file")
    try:
        dense = cc.dense_from(args.weights, args.seed)
    except ValueError as error:
        parser.error(str(error))
    data = cc.Canvases(args.seed)
    start = time.perf_counter()
    try:
        _, scores = cc.train_point(args.method, dense, args.ratio, args.seed, args.epochs, data)
    except cc.Unreachable as error:
        parser.error(f"{args.method} cannot reach {args.ratio}x FLOPs: {error}")
    from cait.train.finetune import evaluate

    result = {"seed": args.seed, "epochs": args.epochs, "dense_top1": evaluate(dense, data.test)["top1"], **scores,
              "seconds": time.perf_counter() - start}  # fmt: skip
    print(json.dumps(result, indent=2))
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
