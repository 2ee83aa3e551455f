"""Accuracy benchmark: a small ViT trained from scratch on scikit-learn's digits, compressed to about
0.5x FLOPs by every method (see cait/benchmarks/accuracy.py). CPU, about 20 minutes on 2 cores.

Same as `cait bench --accuracy`; see `cait bench --help`.
    python bench/accuracy.py --out bench/results/accuracy-digits.json
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from cait.cli import main  # noqa: E402

if __name__ == "__main__":
    main(["bench", "--accuracy", *sys.argv[1:]])
