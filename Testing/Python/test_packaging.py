"""What an install of the backend (``segassist[engine,server]``, or the Slicer module's
requirements-backend.txt) must hold: every third-party package that the server, the learning loop
and training import when they load. A missing one would surface as an ImportError (an HTTP 500) on
a user's machine, never here, where the development environment has everything."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path
from typing import Iterable, Set

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "SegAssistLib"
# the backend's entry points: the server (its learning routes included), learning, training
BACKEND_ENTRY_MODULES = (
    "SegAssistLib.server.app",
    "SegAssistLib.server.cli",
    "SegAssistLib.learning.cli",
    "SegAssistLib.learning.trainer",
    "SegAssistLib.learning.active",
    "SegAssistLib.training.train",
)
# import name -> the distribution that brings it (starlette is imported directly: declared itself)
DISTRIBUTION_OF = {"skimage": "scikit-image", "SimpleITK": "simpleitk"}


def _module_file(name: str) -> Path:
    path = ROOT.joinpath(*name.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def _top_level_imports(path: Path) -> Iterable[str]:
    """Modules imported at module level (not inside functions: those are optional features)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))  # whatever the locale
    for node in tree.body:
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module
            yield from (f"{node.module}.{alias.name}" for alias in node.names)


def third_party_imports(entry_modules: Iterable[str]) -> Set[str]:
    seen: Set[str] = set()
    third_party: Set[str] = set()
    todo = list(entry_modules)
    stdlib = set(sys.stdlib_module_names)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        if name.split(".")[0] == "SegAssistLib":
            path = _module_file(name)
            if path.is_file():
                todo.extend(_top_level_imports(path))
                parent = name.rsplit(".", 1)[0]
                if parent != name:
                    todo.append(parent)
            continue
        top = name.split(".")[0]
        if top not in stdlib and top != "__future__":
            third_party.add(top)
    return third_party


def _names(requirements: Iterable[str]) -> Set[str]:
    return {re.split(r"[<>=!~\[ ;]", r.strip(), maxsplit=1)[0].lower() for r in requirements if r.strip()}


def test_the_backend_install_holds_every_package_the_backend_imports():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    declared = _names(project["dependencies"]) | _names(extras["engine"]) | _names(extras["server"])
    backend_file = ROOT / "SegAssist" / "Resources" / "requirements-backend.txt"
    client_file = ROOT / "SegAssist" / "Resources" / "requirements.txt"
    in_slicer = _names(ln for f in (backend_file, client_file) for ln in f.read_text().splitlines()
                       if not ln.startswith("#"))
    needed = {DISTRIBUTION_OF.get(m, m).lower() for m in third_party_imports(BACKEND_ENTRY_MODULES)}
    assert {"torch", "fastapi", "numpy"} <= needed  # the scan follows the imports
    assert needed - declared == set(), "imported by the backend but in neither the core nor [engine,server]"
    assert needed - in_slicer - {"numpy", "simpleitk", "scipy"} == set(), (
        "imported by the backend but not in the Slicer module's requirements files (numpy, SimpleITK and "
        "scipy come with Slicer)"
    )


BLOCKER = """
import importlib.abc, sys
BLOCK = {"torch", "monai", "skimage", "fastapi", "uvicorn", "starlette", "zstandard", "matplotlib"}
class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in BLOCK:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Blocker())
from SegAssistLib.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_core_install_runs_the_command_line_and_names_the_extra_a_command_needs(tmp_path):
    """Core dependencies only (as in Slicer's Python): every subcommand's help works, and one that
    needs the model says which extra to install instead of a traceback."""
    import subprocess

    def run(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", BLOCKER, *argv], capture_output=True, text=True, timeout=120,
                              cwd=tmp_path)

    assert run("--help").returncode == 0
    for command in ("demo", "segment", "eval", "bench", "train", "pack-training", "serve", "learn"):
        result = run(command, "--help")
        assert result.returncode == 0, (command, result.stderr[-500:])
    result = run("demo", "--out", str(tmp_path / "demo"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "needs torch, which this install lacks: pip install 'segassist[engine]'" in result.stderr


def test_the_package_without_the_repositorys_resources_says_where_the_bundled_files_are(tmp_path):
    """A built wheel holds the code alone (the model, sample and split are in the repository's
    Resources/): the demo said "image file not found", as if the user had named a wrong file."""
    import shutil
    import subprocess

    site = tmp_path / "site"
    shutil.copytree(PACKAGE, site / "SegAssistLib", ignore=shutil.ignore_patterns("__pycache__"))
    run = subprocess.run(
        [sys.executable, "-m", "SegAssistLib.cli", "demo", "--out", str(tmp_path / "out")],
        cwd=str(tmp_path), env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr
    assert f"the bundled sample image is not at {site / 'Resources'}" in run.stderr
    assert "install from a checkout of the repository (pip install -e DIR)" in run.stderr
