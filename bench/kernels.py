"""Kernel benchmark: the Triton ops against their peers on a GPU, and the ahead-of-time compile report
(registers, spills, shared memory, tensor-core instructions for sm_80/sm_90) on any machine.

Same as `cait bench --kernels`; see `cait bench --help`.
    python bench/kernels.py --out bench/results/kernels-<device>.json
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from cait.cli import main  # noqa: E402

if __name__ == "__main__":
    main(["bench", "--kernels", *sys.argv[1:]])
