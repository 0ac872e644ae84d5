"""The Python packages the SegAssist module installs into Slicer's Python, found without a restart.

Plain Python (no Qt, no pydantic): the module and the segment editor effect use it before those
packages are there. Python's import system caches what each folder on ``sys.path`` holds; a package
pip put there after that (the module's *Install* button) stays unseen until the caches are dropped
(:func:`importlib.invalidate_caches`). So every check here drops them first, and the effect retries
its imports when it is activated (:func:`import_again`) instead of reporting the missing package
until Slicer restarts.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Callable, List, Mapping, Optional


def import_again(load: Callable[[], object]) -> Optional[ImportError]:
    """Call ``load`` (a function that imports what needs the installed packages) with the import
    caches dropped first; the :class:`ImportError` it raised, or None once it succeeded.

    A module whose import failed is not left behind in ``sys.modules`` (Python removes it), so a
    second try after the package was installed imports it whole."""
    importlib.invalidate_caches()
    try:
        load()
    except ImportError as exc:
        return exc
    return None


def missing_packages(required: Mapping[str, str]) -> List[str]:
    """The requirements (``required``: import name -> requirement, e.g. ``{"pydantic": "pydantic>=2.6"}``)
    whose module cannot be found, looked up afresh (a package installed meanwhile counts)."""
    importlib.invalidate_caches()
    return [requirement for module, requirement in required.items() if importlib.util.find_spec(module) is None]


def pip_ensure_installer(
    import_module: Callable[[str], object] = importlib.import_module,
) -> Optional[Callable[[str, str], object]]:
    """``install(requirements_path, requester)`` through Slicer's high-level installer,
    ``slicer.packaging.pip_ensure`` (Slicer 5.12 and later: checks, asks, installs with progress,
    offers a restart when an imported package changed); None in a Slicer without it (the caller falls
    back to ``slicer.util.pip_install``).

    ``slicer.packaging`` is a submodule that ``import slicer`` does not load, so it is imported here:
    looking for the attribute on ``slicer`` misses it until something else happened to import it."""
    try:
        packaging = import_module("slicer.packaging")
    except ImportError:
        return None
    ensure = getattr(packaging, "pip_ensure", None)
    load = getattr(packaging, "load_requirements", None)
    if not callable(ensure) or not callable(load):
        return None

    def install(requirements_path: str, requester: str) -> object:
        return ensure(load(requirements_path), requester=requester)

    return install
