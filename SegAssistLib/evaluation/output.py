"""Writing the results of a long run (``segassist eval --json``, ``segassist bench``'s results.json)
so that they are never lost and never replace a file silently.

The output is checked before the run (:func:`probe_file`: the temporary name of the atomic write
is created and removed, which catches what ``os.access`` cannot, such as a name too long for the file
system once prefixed), and written at the end without replacing a file that appeared meanwhile unless
replacing was asked (:func:`write_results_file`). When that final write fails, the results go to a
clearly named rescue file beside the output, else in the temporary folder, and the error says where.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from pathlib import Path
from typing import List, Optional, Union

from SegAssistLib.errors import SegAssistError
from SegAssistLib.files import atomic_write_bytes, temp_path_for

RESCUE_TAG = "unsaved"


class ResultsSavedElsewhere(SegAssistError):
    """The results could not be written where asked; ``saved_to`` holds them instead."""

    def __init__(self, message: str, saved_to: Path):
        super().__init__(message)
        self.saved_to = saved_to


def _first_existing(folder: Path) -> Path:
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


def probe_file(path: Union[str, Path]) -> Optional[str]:
    """Why the atomic write of ``path`` would fail at the end of the run (None: it would not): its
    temporary file (:func:`~SegAssistLib.files.temp_path_for`, 18 characters longer than the name) is
    created and removed in the nearest existing folder, nothing else is left behind."""
    path = Path(path).absolute()
    probe = _first_existing(path.parent) / temp_path_for(path).name
    try:
        with open(probe, "x"):
            pass
    except OSError as exc:
        return f"a file cannot be created under its name: {exc.strerror or exc} (its temporary name {probe.name})"
    with contextlib.suppress(OSError):
        probe.unlink()
    return None


def rescue_candidates(path: Path) -> List[Path]:
    """Where the results go when ``path`` cannot be written: beside it, then in the temporary folder
    under a short name (for a name too long or a folder gone)."""
    stamp = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    suffix = "".join(path.suffixes[-1:]) or ".json"
    return [path.with_name(f"{path.name[: len(path.name) - len(suffix)]}.{RESCUE_TAG}-{stamp}{suffix}"),
            Path(tempfile.gettempdir()) / f"segassist-{RESCUE_TAG}-{stamp}{suffix}"]


def _rescue(data: bytes, path: Path) -> Optional[Path]:
    for candidate in rescue_candidates(path):
        try:
            atomic_write_bytes(candidate, data, overwrite=False)
        except OSError:
            continue
        return candidate
    return None


def write_results_file(data: bytes, path: Union[str, Path], overwrite: bool, what: str) -> Path:
    """Write ``data`` to ``path`` whole or not at all; an existing file, even one that appeared while
    the run went on, is replaced only with ``overwrite``. When the write fails the data are saved to a
    rescue file (:func:`rescue_candidates`) and :class:`ResultsSavedElsewhere` names both; ``what``
    names the output in the message (``"--json"``)."""
    path = Path(path)
    try:
        atomic_write_bytes(path, data, overwrite=overwrite)
        return path
    except FileExistsError:
        reason = "it appeared while the run went on (another run's results?) and --overwrite was not given"
    except OSError as exc:
        reason = str(exc.strerror or exc)
    saved = _rescue(data, path)
    if saved is None:
        raise SegAssistError(f"{what} {path} could not be written ({reason}), nor a copy beside it or in "
                             f"{tempfile.gettempdir()}: the results are lost")
    raise ResultsSavedElsewhere(f"{what} {path} not written: {reason}; the results were saved to {saved}", saved)
