"""Segmentation benchmark: digit canvases, dense vs CAIT vs ToMe with unmerge vs token pruning, all
fine-tuned alike (see cait/benchmarks/segmentation.py). CPU, about 21 minutes on 2 cores.

Same as `cait bench --segmentation`; see `cait bench --help`.
    python bench/segmentation.py --out bench/results/segmentation-digits.json --picture bench/results/segmentation-regions.png
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from cait.cli import main  # noqa: E402

if __name__ == "__main__":
    main(["bench", "--segmentation", *sys.argv[1:]])
