"""Files SegAssist writes for itself (checkpoints, adapters, the version registry, the datastore). Torch-free.

Atomic file writes: write a temporary file beside the target, fsync it, rename it, fsync the folder.

Each such file is a dict tagged ``"format"`` and ``"format_version"``, checked on reading by
:func:`check_format`.

A reader (or a process restarted after a crash) sees either no file or the complete file, never a
partial one. Temporary files are named ``.tmp-<random>-<final name>`` so that recovery can find
and remove the ones a killed writer left behind; they keep the final name's suffix because
SimpleITK picks the file format from it.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Type

TMP_PREFIX = ".tmp-"


def sitk_path(path: os.PathLike[str] | str) -> str:
    """``path`` as SimpleITK takes it; :class:`ImageError` when its name is not valid UTF-8.

    Linux allows any bytes in a name and Python carries the invalid ones as surrogates, which
    SimpleITK cannot convert: it aborts the whole process instead of raising.
    """
    from SegAssistLib.errors import ImageError

    text = os.fspath(path)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        shown = os.fsencode(text).decode("utf-8", "backslashreplace")
        raise ImageError(f"cannot use {shown}: the name is not valid UTF-8; rename it") from None
    return text


def _first_existing(path: Path) -> Path:
    return next(p for p in (path, *path.parents) if p.exists())


def output_problem(path: Path, folder: bool = False) -> Optional[str]:
    """Why ``path`` could not be written as a file (``folder``: created or filled as a folder), found
    before any work is done; None when nothing stands in the way."""
    path = Path(path).absolute()
    if path.exists():
        if folder and not path.is_dir():
            return f"{path} is a file, not a folder"
        if not folder and path.is_dir():
            return f"{path} is a folder: give a file name"
    parent = _first_existing(path.parent)
    if not parent.is_dir():
        return f"{parent} is a file, not a folder"
    target = path if folder and path.is_dir() else parent
    if not os.access(target, os.W_OK | os.X_OK):
        return f"folder {target} is not writable"
    return None


def temp_path_for(dest: Path) -> Path:
    return dest.with_name(f"{TMP_PREFIX}{uuid.uuid4().hex[:12]}-{dest.name}")


def is_temp_file(path: Path) -> bool:
    return path.name.startswith(TMP_PREFIX)


def fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (POSIX; a no-op where folders cannot be opened)."""
    try:
        fd = os.open(str(folder), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def atomic_write(dest: Path, writer: Callable[[Path], object], overwrite: bool = False) -> str:
    """Write ``dest`` through ``writer(temp_path)``; returns the SHA-256 of the written file.

    With ``overwrite=False`` (the default) an existing ``dest`` is an error: stored data is never
    replaced in place.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if not overwrite and dest.exists():
        raise FileExistsError(f"refusing to overwrite {dest}")
    tmp = temp_path_for(dest)
    try:
        writer(tmp)
        if not tmp.is_file():
            raise OSError(f"the writer did not create {tmp}")
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        digest = sha256_file(tmp)
        if not overwrite and dest.exists():
            raise FileExistsError(f"refusing to overwrite {dest}")
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(dest.parent)
    return digest


def atomic_write_bytes(dest: Path, data: bytes, overwrite: bool = False) -> str:
    return atomic_write(Path(dest), lambda p: Path(p).write_bytes(data), overwrite=overwrite)


def check_format(data: object, path: Path, fmt: str, version: int, what: str, error: Type[Exception]) -> Dict[str, Any]:
    """``data`` (read from ``path``) when it is a dict tagged ``"format": fmt`` with a ``"format_version"``
    of at most ``version``; otherwise ``error``, whose message calls the file a ``what``."""
    if not isinstance(data, dict) or data.get("format") != fmt:
        raise error(f"{path} is not a SegAssist {what} (no 'format': '{fmt}')")
    stated = data.get("format_version", 0)
    if isinstance(stated, bool) or not isinstance(stated, int):
        raise error(f"{path} is not a readable SegAssist {what}: its format_version is {stated!r}, not a number")
    if stated > version:
        raise error(
            f"{path} has {what} format {data['format_version']}, newer than this SegAssist reads ({version}): "
            "upgrade SegAssist"
        )
    return data
