"""Segmentation benchmark: digit canvases, dense vs CAIT vs ALGM-style vs ToMe with unmerge vs token
pruning at three FLOPs targets, all fine-tuned alike (see cait/benchmarks/segmentation.py). CPU, an
hour or more on 2 cores; trained models are kept in --work (default bench/runs/segmentation), so a
stopped run resumes and --time-only re-times them.

Same as `cait bench --segmentation`; see `cait bench --help`.
    python bench/segmentation.py --out bench/results/segmentation-digits.json --picture bench/results/segmentation-regions.png \
        --plot bench/results/segmentation-digits.png
    python bench/segmentation.py --tune --out bench/results/segmentation-tuning-digits.json   # how the plans were chosen
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from cait.cli import main  # noqa: E402

if __name__ == "__main__":
    main(["bench", "--segmentation", *sys.argv[1:]])
