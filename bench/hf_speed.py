"""Compressed Hugging Face backbones against the HF models themselves and the same architecture in timm.

HF ``ViTModel`` base (224 px, patch 16) and ``Dinov2Model`` small (224 px, patch 14), random weights,
HF's default attention (sdpa), compressed two ways to about 0.5x FLOPs: the README's recipe (ATME 0.7 +
CDCP 0.5/0.75/0.75) and merging alone (ATME 0.5); each timed in this process, interleaved
(cait.benchmarks.latency.time_interleaved): the HF model, the timm model that computes the same
function (cait.hf.to_timm), each compressed model through HF's calling convention (cait.hf.HFCompressed),
and the recipe's CompressedViT alone (the wrapper's own cost: the merged tokens spread back to the grid).

    python bench/hf_speed.py [--batch 8] [--repeats 6] [--out bench/results/hf-cpu.json]
"""

import argparse
import json
import os
import statistics
import sys

import torch

# the repository root instead of bench/, whose kernels.py would shadow the `kernels` package transformers imports
sys.path[0] = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")

import cait  # noqa: E402
from cait.benchmarks.latency import machine, time_interleaved  # noqa: E402

VARIANTS = {
    "recipe": dict(merge=cait.ATME(flops=0.7), prune=cait.CDCP(qk=0.5, v=0.75, mlp=0.75)),
    "merging": dict(merge=cait.ATME(flops=0.5)),
}


def models() -> dict:
    import transformers

    torch.manual_seed(0)
    vit = transformers.ViTModel(transformers.ViTConfig())  # google/vit-base-patch16-224's shape
    dino = transformers.Dinov2Model(transformers.Dinov2Config(
        hidden_size=384, num_hidden_layers=12, num_attention_heads=6, image_size=224, patch_size=14))  # fmt: skip
    return {"HF ViTModel base": vit.eval(), "HF Dinov2Model small": dino.eval()}


def measure(name: str, hf, batch: int, repeats: int) -> dict:
    fast = {k: cait.compress(hf, **v).eval() for k, v in VARIANTS.items()}
    timm_model = cait.hf.to_timm(hf).eval()
    contenders = {"HF": hf, "timm (same function)": timm_model, **{f"cait {k}": m for k, m in fast.items()},
                  "cait recipe (CompressedViT)": fast["recipe"].backbone}  # fmt: skip
    images = torch.randn(batch, *fast["recipe"].backbone.input_size)
    seconds = time_interleaved(contenders, images, repeats, progress=False)
    median = {k: statistics.median(v) for k, v in seconds.items()}
    dense_flops = cait.flops(timm_model)
    row = {"model": name, "batch": batch, "repeats": repeats, "gflops_dense": dense_flops / 1e9,
           "img_per_s": {k: batch / v for k, v in median.items()}, "variants": {}}  # fmt: skip
    for k, m in fast.items():
        row["variants"][k] = {
            "flops_ratio": cait.flops(m.backbone) / dense_flops,
            "speedup_vs_hf": median["HF"] / median[f"cait {k}"],
            "speedup_vs_timm": median["timm (same function)"] / median[f"cait {k}"],
        }
    speeds = ", ".join(f"{k} {v:.2f}" for k, v in row["img_per_s"].items())
    print(f"{name} ({row['gflops_dense']:.2f} GFLOPs dense); img/s {speeds}", flush=True)
    for k, v in row["variants"].items():
        print(f"  {k}: FLOPs {v['flops_ratio']:.3f}x, vs HF {v['speedup_vs_hf']:.2f}x, vs timm {v['speedup_vs_timm']:.2f}x", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    import transformers

    rows = [measure(name, hf, args.batch, args.repeats) for name, hf in models().items()]
    variants = {"recipe": "ATME 0.7 + CDCP 0.5/0.75/0.75", "merging": "ATME 0.5"}
    result = {"machine": {**machine(), "transformers": transformers.__version__}, "variants": variants, "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
