"""One-shot methods on the cluttered-digits proxy (cait/benchmarks/clutter.py): the dense model saved
by ``bench/clutter_dense.py --weights``, merged by ATME, ToMe and EViT-style pruning at the same
FLOPs, no training, top-1 on the seed's test canvases.

    python bench/clutter_oneshot.py --seed 0 --weights W.pt --out bench/results/clutter-oneshot-p8-d6-seed0-cpu.json
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from cait.benchmarks.clutter import DEPTH  # noqa: E402

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0, help="the dense run's seed (default: 0)")
    parser.add_argument("--weights", required=True, help="state dict from bench/clutter_dense.py --weights")
    parser.add_argument("--depth", type=int, default=DEPTH, help=f"the dense run's blocks (default: {DEPTH})")
    parser.add_argument("--out", required=True, help="JSON file to write")
    args = parser.parse_args()

    import torch

    from cait.benchmarks.clutter import deit_tiny_patch8, one_shot

    if not os.path.isdir(os.path.dirname(os.path.abspath(args.out))):
        parser.error(f"--out {args.out}: the folder does not exist")
    dense = deit_tiny_patch8(args.seed, depth=args.depth)
    try:
        dense.load_state_dict(torch.load(args.weights))
    except (OSError, RuntimeError) as error:
        parser.error(f"--weights {args.weights}: not a state dict of the {args.depth}-block proxy ViT ({str(error).splitlines()[0]})")
    rows = one_shot(dense.eval(), args.seed)
    for row in rows:
        print(f"{row['method']:>6} target {row['target']:.2f} FLOPs {row['flops_ratio']:.3f} top-1 {100 * row['top1']:.1f}%")
    with open(args.out, "w") as f:
        json.dump({"seed": args.seed, "rows": rows}, f, indent=2)
