"""Files SegAssist writes for itself (checkpoints, adapters, the version registry, the datastore). Torch-free.

Atomic file writes: write a temporary file beside the target, fsync it, rename it, fsync the folder.
A write that must not replace a file publishes it as a hard link instead of renaming it, so that a
file another process created meanwhile is not replaced either.

Each such file is a dict tagged ``"format"`` and ``"format_version"``, checked on reading by
:func:`check_format`.

A reader (or a process restarted after a crash) sees either no file or the complete file, never a
partial one. Temporary files are named ``.tmp-<random>-<final name>`` so that recovery can find
and remove the ones a killed writer left behind. SimpleITK picks the file format from the suffix, and
its writers reject or rename some spellings of it (``.NII.GZ``, ``.Nii``, ``.MHA``; a dot inside the
name as in ``scan.img.nii.gz``): a name ending in one of :data:`IMAGE_SUFFIXES`, in any case, gets a
temporary name with the suffix in lower case and no other dot (``.tmp-<random>-scan_img.nii.gz``),
renamed to the exact name asked for once it is written.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import uuid
from pathlib import Path, PurePath
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Type

TMP_PREFIX = ".tmp-"

# the single-file image formats written through SimpleITK, which picks its writer by the suffix; a
# suffix before every shorter one it ends in (".seg.nrrd" before ".nrrd", ".nii.gz" before ".nii")
IMAGE_SUFFIXES = (".seg.nrrd", ".nii.gz", ".nrrd", ".nii", ".mha")


def image_suffix(name: str) -> Optional[str]:
    """The one of :data:`IMAGE_SUFFIXES` that ``name`` ends in, in any case (returned in lower case)."""
    lower = name.lower()
    return next((s for s in IMAGE_SUFFIXES if lower.endswith(s)), None)


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
    try:
        os.stat(path)  # a symbolic link that loops, on the way: exists() says no file, and writing fails late
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return f"{path} goes through a symbolic link that loops: it cannot be written"
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
    """A new temporary name beside ``dest``: ``.tmp-<random>-<name>``; for an image (see the module's
    docstring) the suffix in lower case and the rest of the name without dots."""
    name = dest.name
    suffix = image_suffix(name)
    if suffix:
        name = (name[: len(name) - len(suffix)].replace(".", "_") or "image") + suffix
    return dest.with_name(f"{TMP_PREFIX}{uuid.uuid4().hex[:12]}-{name}")


def _remove_temp_family(tmp: Path) -> None:
    """Remove ``tmp`` and what a writer left beside it under the same ``.tmp-<random>-`` (a header and
    data pair that SimpleITK wrote instead of one file)."""
    token = tmp.name[len(TMP_PREFIX) :].split("-", 1)[0]
    tmp.unlink(missing_ok=True)
    try:
        siblings = list(tmp.parent.glob(f"{TMP_PREFIX}{token}-*"))
    except OSError:
        return
    for sibling in siblings:
        with contextlib.suppress(OSError):  # a folder a writer made: not ours to empty
            sibling.unlink(missing_ok=True)


def is_temp_file(path: PurePath) -> bool:
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


def make_folder_durable(folder: Path) -> None:
    """Make ``folder`` and its missing parents, each new one's entry synced in its parent: a file renamed
    into a new folder (a case's first label) is durable only once the folder's own entry is, and a power
    loss could otherwise leave the file's record (synced by SQLite) pointing into a folder that is gone."""
    missing = [p for p in (folder, *folder.parents) if not p.exists()]
    folder.mkdir(parents=True, exist_ok=True)
    for made in reversed(missing):  # outermost first
        fsync_dir(made.parent)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def atomic_write(dest: Path, writer: Callable[[Path], object], overwrite: bool = False) -> str:
    """Write ``dest`` through ``writer(temp_path)``; returns the SHA-256 of the written file.

    With ``overwrite=False`` (the default) an existing ``dest`` is an error (:class:`FileExistsError`),
    also one created by another process while ``writer`` ran: stored data is never replaced in place.
    On any failure nothing is replaced and no temporary file is left.
    """
    return atomic_write_many([(dest, writer)], overwrite=overwrite)[0]


def _check_destination(dest: Path, overwrite: bool) -> None:
    if dest.is_dir():
        raise IsADirectoryError(errno.EISDIR, "a folder has the name of the file to write", str(dest))
    if not overwrite and dest.exists():
        raise FileExistsError(f"refusing to overwrite {dest}")


def atomic_write_many(files: Sequence[Tuple[Path, Callable[[Path], object]]], overwrite: bool = False) -> List[str]:
    """Write several files, all of them or none: each ``(dest, writer)`` through ``writer(temp_path)``
    beside its ``dest``; once every one is written and synced they are renamed into place, and a rename
    that fails puts back the ones already made (the file each replaced, or none). Returns their SHA-256.
    """
    files = [(Path(dest), writer) for dest, writer in files]
    for dest, _ in files:
        make_folder_durable(dest.parent)
        if not overwrite and dest.exists():
            raise FileExistsError(f"refusing to overwrite {dest}")
    temps: List[Path] = []
    digests: List[str] = []
    try:
        for dest, writer in files:
            tmp = temp_path_for(dest)
            temps.append(tmp)
            writer(tmp)
            if not tmp.is_file():
                raise OSError(f"the writer did not create {tmp}")
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            digests.append(sha256_file(tmp))
        for dest, _ in files:
            _check_destination(dest, overwrite)
        _rename_all([(tmp, dest) for tmp, (dest, _) in zip(temps, files)], overwrite)
    except BaseException:
        for tmp in temps:
            _remove_temp_family(tmp)
        raise
    for folder in dict.fromkeys(dest.parent for dest, _ in files):
        fsync_dir(folder)
    return digests


# os.link's errors on a filesystem without hard links (FAT, some network shares)
_NO_HARD_LINKS = frozenset({errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP})


def _publish(tmp: Path, dest: Path, overwrite: bool) -> None:
    """Move ``tmp`` to ``dest``: with ``overwrite`` a rename; without, a hard link (then ``tmp`` removed),
    which unlike a rename fails when ``dest`` exists, even one another process made after the check."""
    if overwrite:
        os.replace(tmp, dest)
        return
    try:
        os.link(tmp, dest)
    except FileExistsError:
        raise FileExistsError(f"refusing to overwrite {dest}") from None
    except OSError as exc:
        if exc.errno not in _NO_HARD_LINKS:
            raise
        _check_destination(dest, overwrite)  # no hard links here: checked, then renamed, as before
        os.replace(tmp, dest)
        return
    with contextlib.suppress(OSError):  # published; a temporary name left is swept as any other
        tmp.unlink()


def _rename_all(pairs: List[Tuple[Path, Path]], overwrite: bool) -> None:
    """Publish each temporary file as its destination (:func:`_publish`); when one fails, undo the ones made.

    With ``overwrite``, before each rename but the last, a file it would replace is kept under a backup
    name (a hard link, else the file itself moved aside), so that it can be put back; without, no file
    is replaced (:func:`_publish`)."""
    done: List[Tuple[Path, Optional[Path]]] = []
    try:
        for index, (tmp, dest) in enumerate(pairs):
            backup = None
            if overwrite and index < len(pairs) - 1 and os.path.lexists(dest):
                backup = dest.with_name(f"{TMP_PREFIX}{uuid.uuid4().hex[:12]}-old-{dest.name}")
                try:
                    os.link(dest, backup, follow_symlinks=False)
                except (OSError, NotImplementedError):
                    os.replace(dest, backup)
            try:
                _publish(tmp, dest, overwrite)
            except BaseException:
                if backup is not None:  # a file moved aside goes back; a link is the file itself
                    os.replace(backup, dest)
                raise
            done.append((dest, backup))
    except BaseException:
        for dest, backup in reversed(done):
            try:
                if backup is not None:
                    os.replace(backup, dest)
                else:
                    dest.unlink(missing_ok=True)
            except OSError:
                pass  # the earlier file stays under its backup name, for someone to find
        raise
    for _, backup in done:
        if backup is not None:
            with contextlib.suppress(OSError):
                backup.unlink(missing_ok=True)


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


def plain_data(value: Any, what: str, error: Type[Exception] = ValueError) -> Any:
    """``value`` as plain data, through a JSON round trip: what a file loaded with torch's
    ``weights_only=True`` reads back (a path or a numpy number pickles as an object it refuses).

    A path becomes its text and a numpy (or 0-d torch) number a Python number; as in JSON a tuple
    becomes a list and a number used as a key its text. Anything else is an ``error`` (its message
    calls ``value`` a ``what``) saying where ``value`` holds it, raised before any file is written.
    """
    refused: List[object] = []

    def convert(item: Any) -> Any:
        if isinstance(item, os.PathLike):
            return os.fspath(item)
        if getattr(item, "shape", None) == () and callable(getattr(item, "item", None)):
            return item.item()
        refused.append(item)
        raise TypeError(f"a value of type {type(item).__name__}")

    try:
        return json.loads(json.dumps(value, default=convert))
    except (TypeError, ValueError) as exc:
        where = _path_to(value, refused[-1]) if refused else None
        raise error(f"{what} must be plain data (JSON-compatible): {exc}{f' at {where}' if where else ''}") from exc


def _path_to(value: Any, target: object, path: str = "") -> Optional[str]:
    """Where ``target`` is in ``value``'s dicts and lists, as ``['key'][0]``; None: nowhere."""
    if value is target:
        return path
    if isinstance(value, dict):
        items: Any = value.items()
    elif isinstance(value, (list, tuple)):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        found = _path_to(item, target, f"{path}[{key!r}]")
        if found is not None:
            return found
    return None


def check_bundled(path: Path, what: str) -> None:
    """The bundled files (model, sample, split) live in the repository's ``Resources/``, beside the
    package: an install from a built wheel has the code alone. Say so, rather than "file not found"."""
    from SegAssistLib.errors import SegAssistError

    if not Path(path).is_file():
        raise SegAssistError(
            f"the bundled {what} is not at {path}: it ships in the repository's Resources/ folder, which an "
            "install from a built wheel lacks; install from a checkout of the repository (pip install -e DIR) "
            "or name your own file"
        )
