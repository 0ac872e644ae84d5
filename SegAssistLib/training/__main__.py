"""``python -m SegAssistLib.training train|pack-training ...``: the training commands alone.

``segassist`` registers every subcommand, and some import SimpleITK or FastAPI; a GPU machine that
has only torch (plus MONAI and pydantic) trains from a pack through this entry point instead.
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from SegAssistLib.cli import run_handled
from SegAssistLib.training import cli


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m SegAssistLib.training", description=__doc__.split("\n\n")[0])
    cli.register(parser.add_subparsers(dest="command", required=True))
    return run_handled(parser.parse_args(argv), prog=parser.prog)


if __name__ == "__main__":
    sys.exit(main())
