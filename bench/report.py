"""Every benchmark number in one run: the model table (and the kernel table on a GPU), the accuracy
and segmentation results read from bench/results, as report.json, report.md and PNG plots
(see cait/benchmarks/report.py).

Same as `cait bench --all` / `make bench`; see `cait bench --help`.
    python bench/report.py [--device cuda] [--quick] [--out DIR]
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from cait.cli import main  # noqa: E402

if __name__ == "__main__":
    main(["bench", "--all", *sys.argv[1:]])
