"""The ``cait`` command line: one module per command, each owning its arguments (``add_parser``) and
its work (``run``); :mod:`.common` holds what they share.

Commands: ``plan``, ``compress``, ``finetune``, ``eval``, ``info``, ``export``, ``bench``, ``visualize``.
"""

from __future__ import annotations

import argparse

from .. import __version__
from . import bench, compress, eval, export, finetune, info, plan, visualize
from .common import EXAMPLES

COMMANDS = (plan, compress, finetune, eval, info, export, bench, visualize)


def build_parser() -> argparse.ArgumentParser:
    """The ``cait`` parser with every command's sub-parser."""
    parser = argparse.ArgumentParser(
        prog="cait",
        description="Compress timm Vision Transformers: merge neighbouring tokens (ATME) and prune channels consistently (CDCP). "
        "Every command explains its flags: cait COMMAND --help.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"cait {__version__}", help="print the version of cait and exit")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except (ValueError, NotImplementedError, FileNotFoundError, IsADirectoryError) as error:
        parser.exit(2, f"cait {args.command}: error: {error}\n")
    except ImportError as error:  # an optional extra that is not installed (e.g. transformers for a Hugging Face file)
        if not getattr(error, "cait_extra", None):
            raise
        parser.exit(2, f"cait {args.command}: error: {error}\n")
    except RuntimeError as error:
        if "Unknown model" not in str(error):
            raise
        parser.exit(2, f"cait {args.command}: error: {error}\n")
