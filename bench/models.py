"""Model benchmark (CPU or GPU): dense timm ViTs vs cait-compressed copies, timed side by side.

Same as `cait bench`; see `python bench/models.py --help`.
    python bench/models.py --out models-cpu.json
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from cait.cli import main  # noqa: E402

if __name__ == "__main__":
    main(["bench", *sys.argv[1:]])
