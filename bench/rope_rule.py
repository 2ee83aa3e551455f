"""Where a merged token sits for RoPE: anchor against centroid on small RoPE ViTs trained from scratch
on scikit-learn's digits (see cait/benchmarks/rope_rule.py). CPU; the training dominates.

Same as `cait bench --rope-rule`; see `cait bench --help`.
    python bench/rope_rule.py --weights /tmp/rope-weights --out bench/results/rope-rule-digits.json
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from cait.cli import main  # noqa: E402

if __name__ == "__main__":
    main(["bench", "--rope-rule", *sys.argv[1:]])
