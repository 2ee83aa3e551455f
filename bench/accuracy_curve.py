"""Accuracy at equal speed: top-1 against CPU img/s and FLOPs on the digits for dense, ATME / ToMe /
EViT-style one-shot and CAIT / ToMe / EViT-style fine-tuned alike, at six FLOPs ratios, 3 seeds (see
cait/benchmarks/curve.py). Hours on 2 cores; trained models are kept in --work (default
bench/runs/accuracy-curve), so a stopped run resumes and --time-only re-times them.

Same as `cait bench --accuracy --curve`; see `cait bench --help`.
    python bench/accuracy_curve.py --out bench/results/accuracy-curve-digits.json --plot bench/results/accuracy-curve-digits.png
    python bench/accuracy_curve.py --tune --out bench/results/accuracy-curve-tuning-digits.json   # how CAIT's keep ratios were chosen
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from cait.cli import main  # noqa: E402

if __name__ == "__main__":
    main(["bench", "--accuracy", "--curve", *sys.argv[1:]])
