"""The ``segassist`` command: one subcommand per job, each registered by the module that does it."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from typing import Callable, List, Optional

# (module, attribute) of each subcommand's register(subparsers); imported lazily so that
# `segassist --help` and torch-free subcommands start fast and work without torch.
SUBCOMMANDS = [
    ("SegAssistLib.demo", "register"),
    ("SegAssistLib.segment_cli", "register"),
    ("SegAssistLib.evaluation.cli", "register"),
    ("SegAssistLib.evaluation.bench", "register"),
    ("SegAssistLib.training.cli", "register"),
    ("SegAssistLib.server.cli", "register"),
    ("SegAssistLib.learning.cli", "register"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="segassist", description="Interactive 3D segmentation of CT and MRI")
    sub = parser.add_subparsers(dest="command", required=True)
    for module_name, attr in SUBCOMMANDS:
        if importlib.util.find_spec(module_name) is None:
            continue  # a part not installed in this build; a part that is there but breaks must show
        getattr(importlib.import_module(module_name), attr)(sub)
    return parser


# optional packages and the extra that installs each (pyproject.toml)
EXTRA_OF = {"torch": "engine", "monai": "engine", "skimage": "engine", "fastapi": "server", "uvicorn": "server",
            "starlette": "server", "zstandard": "server", "matplotlib": "evaluation", "vtk": "slicer",
            "slicer": "slicer"}


def run_handled(args: argparse.Namespace, prog: str = "segassist") -> int:
    """Run the parsed subcommand: a SegAssistError or a file problem is one line on stderr (exit 2),
    Ctrl-C is exit 130; anything else is a bug and keeps its traceback."""
    from SegAssistLib.errors import SegAssistError

    # "segassist learn save", or a script's name alone (run_script)
    command = " ".join(c for c in (prog, args.command, getattr(args, "learn_command", None)) if c)
    try:
        return int(args.func(args) or 0)
    except SegAssistError as exc:
        print(f"{command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a file or folder the command was pointed at: name it, no traceback
        where = f": {exc.filename}" if exc.filename else ""
        print(f"{command}: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:  # a part this install does not have: say which extra brings it
        top = (exc.name or "").split(".")[0]
        if top not in EXTRA_OF:
            raise
        print(f"{command}: error: this command needs {top}, which this install lacks: "
              f"pip install 'segassist[{EXTRA_OF[top]}]'", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def run_script(main: Callable[[], int], prog: str) -> int:
    """Run a script's ``main`` (``benchmarks/*.py``) as :func:`run_handled` runs a subcommand: bad input
    (a SegAssistError, a missing file or folder) is one line on stderr, ``PROG: error: ...``, exit 2,
    not a traceback; Ctrl-C is exit 130."""
    return run_handled(argparse.Namespace(func=lambda _args: main(), command=None), prog=prog)


def main(argv: Optional[List[str]] = None) -> int:
    return run_handled(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
