"""Peak memory of ``cait.compress`` with ``copy=True`` (a deep copy of the source) against ``copy=False``
(the compressed model takes over the source's modules), with and without channel pruning.

Each case runs in a fresh process: build the timm model (random weights), reset the kernel's peak-RSS
mark (``/proc/self/clear_refs``, Linux), compress, and read the peak (``VmHWM``) and the resident set
after. Numbers are extra bytes over the process with the source model built, next to the size of its
weights::

    python bench/compress_memory.py --model vit_large_patch16_224
"""
import argparse
import json
import subprocess
import sys

CHILD = """
import gc, json, sys
import timm, torch, cait

def resident(field):
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith(field))

name, copy, prune = sys.argv[1], sys.argv[2] == "copy", sys.argv[3] == "prune"
torch.set_num_threads(1)
model = timm.create_model(name).eval()
gc.collect()
with open("/proc/self/clear_refs", "w") as refs:
    refs.write("5")  # the peak resident set starts again from the current one
before = resident("VmRSS:")
fast = cait.compress(model, merge=cait.ATME(flops=0.7), prune=cait.CDCP(qk=0.5, v=0.75, mlp=0.75) if prune else None, copy=copy)
gc.collect()
print(json.dumps({"peak": resident("VmHWM:") - before, "after": resident("VmRSS:") - before}))
"""


def measure(model: str, copy: bool, prune: bool) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, model, "copy" if copy else "take", "prune" if prune else "merge"],
        capture_output=True, text=True, check=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_large_patch16_224", help="timm model name (default: vit_large_patch16_224)")
    args = parser.parse_args()
    import timm
    import torch

    with torch.device("meta"):
        weights = sum(p.numel() * 4 for p in timm.create_model(args.model).parameters())
    print(f"{args.model}: {weights / 2**20:.0f} MiB of fp32 weights; extra resident memory over the built source model\n")
    print("| compress | copy | peak extra (MiB) | extra after (MiB) |")
    print("|---|---|---|---|")
    for prune in (False, True):
        for copy in (True, False):
            row = measure(args.model, copy, prune)
            what = "merge=0.7, prune=0.5/0.75/0.75" if prune else "merge=0.7"
            print(f"| {what} | {copy} | {row['peak'] / 2**20:.0f} | {row['after'] / 2**20:.0f} |", flush=True)


if __name__ == "__main__":
    main()
