"""The cluttered-digits proxy (cait/benchmarks/clutter.py): dense top-1 of a DeiT-Tiny-shaped ViT with
8-pixel patches trained from scratch, one seed. CPU: about 10 s per batch of 64 on 2 busy cores.

    python bench/clutter_dense.py --train 2000 --epochs 4 --out bench/results/clutter-dense-cpu.json
"""

import argparse
import json
import os
import platform
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from cait.benchmarks.clutter import EPOCHS, TRAIN  # noqa: E402

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0, help="data and model seed (default: 0)")
    parser.add_argument("--train", type=int, default=TRAIN, help=f"fresh training canvases per epoch (default: {TRAIN})")
    parser.add_argument("--test", type=int, default=1000, help="test canvases (default: 1000)")
    parser.add_argument("--epochs", type=int, default=EPOCHS, help=f"training epochs (default: {EPOCHS})")
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--weights", help="also save the trained model's state dict to this file")
    args = parser.parse_args()

    import timm
    import torch
    from tqdm.auto import tqdm

    from cait.benchmarks.clutter import dense_run

    with tqdm(total=args.epochs, desc="epochs") as bar:
        result, model = dense_run(args.seed, args.train, args.test, args.epochs, progress=bar)
    if args.weights:
        torch.save(model.state_dict(), args.weights)
    machine = {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(), "torch": torch.__version__,
               "timm": timm.__version__}  # fmt: skip
    print(json.dumps(result, indent=2))
    with open(args.out, "w") as f:
        json.dump({"machine": machine, **result}, f, indent=2)
