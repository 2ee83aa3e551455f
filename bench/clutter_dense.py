"""The cluttered-digits proxy (cait/benchmarks/clutter.py): dense top-1 of a ViT of DeiT-Tiny's width
with 8-pixel patches (6 blocks; --depth 12 for DeiT-Tiny's 12) trained from scratch on fresh canvases
every epoch, one seed. CPU (2 cores): about 0.65 s per step of 64 with 12 blocks, 0.36 s with 6.

    python bench/clutter_dense.py --seed 0 --out bench/results/clutter-dense-p8-d6-seed0-cpu.json --weights W.pt
"""

import argparse
import json
import os
import platform
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from cait.benchmarks.clutter import DEPTH, EPOCHS, TRAIN  # noqa: E402

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0, help="data and model seed (default: 0)")
    parser.add_argument("--train", type=int, default=TRAIN, help=f"fresh training canvases per epoch (default: {TRAIN})")
    parser.add_argument("--test", type=int, default=1000, help="test canvases (default: 1000)")
    parser.add_argument("--epochs", type=int, default=EPOCHS, help=f"training epochs (default: {EPOCHS})")
    parser.add_argument("--depth", type=int, default=DEPTH, help=f"blocks (default: {DEPTH}; DeiT-Tiny has 12)")
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--weights", help="also save the trained model's state dict to this file (cait bench --accuracy --curve "
                        "--clutter and bench/clutter_oneshot.py read it: keep the default --train and --depth, which fix the "
                        "normalization and the model)")  # fmt: skip
    args = parser.parse_args()
    for flag, path in (("--out", args.out), ("--weights", args.weights)):
        if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            parser.error(f"{flag} {path}: the folder does not exist")

    import timm
    import torch
    from tqdm.auto import tqdm

    from cait.benchmarks.clutter import dense_run

    with tqdm(total=args.epochs, desc="epochs") as bar:
        result, model = dense_run(args.seed, args.train, args.test, args.epochs, args.depth, progress=bar)
    if args.weights:
        torch.save(model.state_dict(), args.weights)
    machine = {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(), "torch": torch.__version__,
               "timm": timm.__version__}  # fmt: skip
    print(json.dumps(result, indent=2))
    with open(args.out, "w") as f:
        json.dump({"machine": machine, **result}, f, indent=2)
