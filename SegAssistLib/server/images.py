"""Uploaded images, kept by content hash so that the same image is never uploaded twice.

Decoded volumes stay in memory (least recently used first out, within a byte budget). With a data
directory, the upload frame is also written to ``<data_dir>/images/<sha256>.sgaf`` (atomically:
temporary file, fsync, rename, fsync of the folder), so images survive a restart. File names are
always the server-computed hash, checked against a strict pattern; nothing a client sends becomes a
path. A stored image is read and decoded once however many requests want it at once (they share
the one read), and "is it held?" (:meth:`ImageStore.info`) reads only the stored frame's header.

A stored file that no longer decodes (damaged) is removed, and the image is simply uploaded again.
So is one whose voxels decode but no longer hash to its id (a flipped bit in a frame without a
checksum, codec ``none`` or zstd without one): the hash is checked once each time the file is read
into memory, never per request. A stored image above *this* server's voxel or axis limit is not
damaged: a data directory may be shared by servers with other limits (one per GPU, a CPU box), or
the limit was lowered since. It is answered 413 ``image_too_large`` and its file is left alone. A
file that cannot be *read* right now (too many open files, out of memory, interrupted:
:data:`TRANSIENT_ERRNOS`), or that this server's account may not read (:data:`PERMISSION_ERRNOS`: a
data directory shared by servers under other accounts), is kept and the request answers 503
``storage_unavailable``; another lasting read error (EIO) removes it like a damaged one, so that
uploading the image again repairs the store.
Temporary ``.upload-*.tmp`` files that a killed server left behind are removed when the store is
opened, once they are older than :data:`STALE_UPLOAD_S` (a data directory may be shared by several
server processes, so a fresh one may belong to a live upload).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import errno
import logging
import os
import re
import struct
import tempfile
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import numpy as np
from pydantic import ValidationError

from SegAssistLib.api_models import IMAGE_ID_PATTERN, ErrorCode, ImageHeader, StoredImage
from SegAssistLib.errors import ImageError
from SegAssistLib.files import fsync_dir
from SegAssistLib.image import Volume, validate_image
from SegAssistLib.server.errors import ApiError, describe_errors, error_list
from SegAssistLib.server.limits import check_image_shape
from SegAssistLib.transport import (
    MAX_HEADER_BYTES,
    ArrayMeta,
    TransportError,
    decode_array,
    describe_value,
    unpack_frame,
)

_ID = re.compile(IMAGE_ID_PATTERN)
log = logging.getLogger("segassist.server")

#: read errors that say "not now" (descriptors or memory exhausted, interrupted), not "this file is bad"
TRANSIENT_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.EAGAIN, errno.EINTR, errno.ENOMEM, errno.EBUSY})
UPLOAD_TMP_PREFIX, UPLOAD_TMP_SUFFIX = ".upload-", ".tmp"
#: A temporary upload file untouched for this long belongs to no live writer (a write takes seconds).
STALE_UPLOAD_S = 15 * 60.0
#: the fields of a frame header that describe the voxels (ArrayMeta); the others are ImageHeader's
ARRAY_FIELDS = tuple(f.name for f in dataclasses.fields(ArrayMeta))
#: read errors that say "this server may not read it", not "this file is bad": the file is kept
PERMISSION_ERRNOS = frozenset({errno.EACCES, errno.EPERM})
#: a stored image that cannot be kept: the errors of decoding it (an ApiError other than
#: ``image_too_large``, such as 422 for a shape that is not 3D; see :func:`_raise_if_over_limit`)
_DAMAGED = (TransportError, ImageError, ValueError, ApiError)


def _read_file(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _unavailable(image_id: str, exc: OSError) -> ApiError:
    return ApiError(
        503, ErrorCode.STORAGE_UNAVAILABLE,
        f"stored image {image_id} cannot be read right now ({exc.strerror or exc}); it is kept: retry later",
        headers={"Retry-After": "2"},
    )  # fmt: skip


def _refused(image_id: str, exc: OSError) -> ApiError:
    return ApiError(
        503, ErrorCode.STORAGE_UNAVAILABLE,
        f"stored image {image_id} cannot be read by this server ({exc.strerror or exc}); it is kept: the data "
        "directory's permissions must let this server's account read it",
    )  # fmt: skip


def _raise_if_over_limit(image_id: str, exc: Exception) -> None:
    """Raise a 413 for a stored image above this server's limits (the file is left alone: it is not
    damaged, and servers sharing the data directory may have higher limits); return for other errors."""
    code = getattr(exc, "code", None)
    if code != ErrorCode.IMAGE_TOO_LARGE:
        return
    message = getattr(exc, "message", None) or str(exc)
    raise ApiError(
        413, ErrorCode.IMAGE_TOO_LARGE,
        f"stored image {image_id} is above this server's limits: {message}",
        getattr(exc, "details", None),
    ) from exc  # fmt: skip


def is_image_id(value: str) -> bool:
    return isinstance(value, str) and _ID.fullmatch(value) is not None


def image_header(header: Dict[str, Any]) -> ImageHeader:
    """The geometry of a frame header: every field that is not one of :data:`ARRAY_FIELDS`, checked
    by :class:`ImageHeader`. A field it does not know is refused (``invalid_request``, 422, naming
    it), as in a JSON body; a field of the wrong type is ``malformed_body`` (400). Either way the
    message is one line and ``details.errors`` lists each problem."""
    try:
        return ImageHeader.model_validate({k: v for k, v in header.items() if k not in ARRAY_FIELDS})
    except ValidationError as exc:
        errors = exc.errors()
        details = {"errors": error_list(errors)}
        unknown = [str(e["loc"][0]) for e in errors if e.get("type") == "extra_forbidden" and e.get("loc")]
        if unknown:
            known = ", ".join(list(ImageHeader.model_fields) + list(ARRAY_FIELDS))
            named = ", ".join(describe_value(name, 40) for name in unknown[:5]) + (" ..." if len(unknown) > 5 else "")
            raise TransportError(
                f"the image header has fields this server does not know: {named} (it knows {known})",
                ErrorCode.INVALID_REQUEST, details,
            ) from None  # fmt: skip
        raise TransportError(f"image header is invalid: {describe_errors(errors)}", "malformed_body", details) from None


def decode_image_frame(body: bytes, max_voxels: int, max_axis: int) -> Tuple[Volume, ImageHeader, ArrayMeta]:
    """Check and decode an upload frame into a validated :class:`Volume` (CPU work: run off the loop).
    An image above the voxel or axis limit is refused (413) before anything is decompressed."""
    header, payload = unpack_frame(body)
    meta = ArrayMeta.from_dict(header)
    check_image_shape(meta.shape, max_voxels, max_axis)
    geometry = image_header(header)
    array = decode_array(meta, payload, max_voxels)
    volume = Volume(
        array=array,
        spacing=geometry.spacing,
        origin=geometry.origin,
        direction=np.asarray(geometry.direction, float).reshape(3, 3),
        modality=geometry.modality,
    )
    validate_image(volume, max_voxels=max_voxels)
    return volume, geometry, meta


def header_info(image_id: str, prefix: bytes, frame_bytes: int, max_voxels: int, max_axis: int) -> StoredImage:
    """What :func:`image_info` says of a stored frame, from its first bytes (magic, header length and
    header) and its length; raises what decoding the whole frame would for anything but the voxels."""
    header, rest = unpack_frame(prefix)
    meta = ArrayMeta.from_dict(header)
    check_image_shape(meta.shape, max_voxels, max_axis)
    geometry = image_header(header)
    meta.check(max_voxels)
    head_bytes = len(prefix) - len(rest)
    if frame_bytes != head_bytes + meta.payload_nbytes:
        raise TransportError(
            f"the frame has {frame_bytes} bytes, its header declares {head_bytes + meta.payload_nbytes}",
            "truncated_body",
        )
    shape = tuple(int(n) for n in meta.shape)
    if len(shape) != 3 or min(shape) < 2:
        raise ImageError(f"image must be a 3D volume, got shape {list(shape)}")
    # the checks of validate_image that read no voxels (geometry, dtype), on a stand-in of 8 voxels
    # that passes those that do (a Volume also turns float16 into float32, as the decoded image is)
    volume = Volume(
        array=np.arange(8).reshape(2, 2, 2).astype(meta.dtype),
        spacing=geometry.spacing,
        origin=geometry.origin,
        direction=np.asarray(geometry.direction, float).reshape(3, 3),
        modality=geometry.modality,
    )
    validate_image(volume, max_voxels=max_voxels)
    return image_info(image_id, volume).model_copy(update={"shape": shape})


def image_info(image_id: str, volume: Volume, uploaded: bool = False) -> StoredImage:
    return StoredImage(
        image_id=image_id,
        shape=tuple(int(n) for n in volume.array.shape),
        dtype=volume.array.dtype.str,
        spacing=volume.spacing,
        origin=volume.origin,
        direction=[float(x) for x in np.asarray(volume.direction).ravel()],
        modality=volume.modality,
        uploaded=uploaded,
    )


class ImageStore:
    def __init__(self, data_dir: Optional[Path], cache_bytes: int, max_voxels: int, max_axis: int) -> None:
        self._dir = Path(data_dir) / "images" if data_dir else None
        if self._dir:
            self._dir.mkdir(parents=True, exist_ok=True)
            self._sweep_stale_uploads()
        self._cache: OrderedDict[str, Volume] = OrderedDict()
        self._cache_bytes = cache_bytes
        self._max_voxels = max_voxels
        self._max_axis = max_axis
        self._lock = threading.Lock()
        #: reads of stored images under way, by id: a request for one of them waits for its result
        self._loading: Dict[str, concurrent.futures.Future] = {}

    def _sweep_stale_uploads(self, now: Optional[float] = None) -> None:
        """Remove the temporary upload files a killed server left behind (see the module docstring)."""
        assert self._dir is not None
        now = time.time() if now is None else now
        for tmp in self._dir.glob(f"{UPLOAD_TMP_PREFIX}*{UPLOAD_TMP_SUFFIX}"):
            try:
                if now - tmp.stat().st_mtime > STALE_UPLOAD_S:
                    tmp.unlink()
                    log.info("removed %s, a temporary upload file left by an earlier server", tmp.name)
            except FileNotFoundError:
                pass  # another process swept it first
            except OSError as exc:
                log.warning("could not remove the stale upload file %s: %s", tmp, exc)

    def _path(self, image_id: str) -> Path:
        if not is_image_id(image_id) or self._dir is None:
            raise ValueError(f"not an image id: {image_id!r}")
        return self._dir / f"{image_id}.sgaf"

    def _held(self, image_id: str) -> Optional[Volume]:
        with self._lock:
            volume = self._cache.get(image_id)
            if volume is not None:
                self._cache.move_to_end(image_id)
            return volume

    def get(self, image_id: str) -> Optional[Volume]:
        """The volume, from memory or the data directory; None when not held. Blocking I/O.

        A stored image is read and decoded once however many requests ask for it at once: the
        first reads it, the others wait for that read and share its volume (or its error)."""
        if not is_image_id(image_id):
            return None
        with self._lock:
            volume = self._cache.get(image_id)
            if volume is not None:
                self._cache.move_to_end(image_id)
                return volume
            if self._dir is None:
                return None
            loading = self._loading.get(image_id)
            first = loading is None
            if first:
                loading = self._loading[image_id] = concurrent.futures.Future()
        assert loading is not None
        if not first:
            return loading.result()  # what the first read found: the volume, None, or its error
        try:
            volume = self._load(image_id)
        except BaseException as exc:
            with self._lock:
                del self._loading[image_id]
            loading.set_exception(exc)
            raise
        with self._lock:  # remembered first (by _load): a request from now on finds it held
            del self._loading[image_id]
        loading.set_result(volume)
        return volume

    def _load(self, image_id: str) -> Optional[Volume]:
        """Read and decode the stored frame of an image, and keep it in memory (see :meth:`get`)."""
        path = self._path(image_id)
        if not path.is_file():
            return None
        try:
            data = _read_file(path)
        except FileNotFoundError:  # removed meanwhile (by a process sharing the data directory)
            return None
        except OSError as exc:
            self._unreadable(image_id, path, exc)
            return None
        try:
            volume, _, _ = decode_image_frame(data, self._max_voxels, self._max_axis)
        except _DAMAGED as exc:
            _raise_if_over_limit(image_id, exc)  # above this server's limits: 413, the file kept
            self._damaged(image_id, path, exc)
            return None
        del data  # the frame: only the volume stays
        actual = volume.content_hash()  # once per read from disk: a codec without a checksum misses a flipped bit
        if actual != image_id:
            self._damaged(image_id, path, ValueError(f"its voxels and geometry hash to {actual}"))
            return None
        return self._remember(image_id, volume)

    def _unreadable(self, image_id: str, path: Path, exc: OSError) -> None:
        """A stored file that cannot be read: 503 when that may pass or is this server's permission,
        else (EIO) it is removed."""
        if exc.errno in TRANSIENT_ERRNOS:  # the file may be fine: keep it, ask to retry
            log.warning("stored image %s cannot be read right now (%s): kept", image_id, exc)
            raise _unavailable(image_id, exc) from exc
        if exc.errno in PERMISSION_ERRNOS:  # another account's file, fine for it: never this server's to remove
            log.error("stored image %s cannot be read by this server (%s): kept", image_id, exc)
            raise _refused(image_id, exc) from exc
        # a lasting failure (EIO, ...): the file is a copy of an upload; dropping it lets
        # the client upload the image again, which writes it anew, rather than leaving it stuck
        log.warning("stored image %s cannot be read (%s): removed; it will be uploaded again", image_id, exc)
        try:
            path.unlink(missing_ok=True)
        except OSError as gone:
            log.error("could not remove the unreadable stored image %s: %s", path, gone)

    @staticmethod
    def _damaged(image_id: str, path: Path, exc: Exception) -> None:
        """A stored file that cannot be kept (see the module docstring): removed, so that the image
        is uploaded again. A data directory that refuses the removal (read-only) costs a log line:
        the request is answered as if the file were gone, and an upload of the image is then served
        from memory."""
        log.warning("stored image %s is damaged (%s): removed; it will be uploaded again",
                    image_id, describe_value(str(exc), 300))  # fmt: skip
        try:
            path.unlink(missing_ok=True)
        except OSError as gone:
            log.error("could not remove the damaged stored image %s: %s", path, gone)

    def info(self, image_id: str) -> Optional[StoredImage]:
        """What :func:`image_info` says of the image, without decoding its voxels; None when not held.
        Blocking I/O.

        A held volume answers from memory; a stored one from its frame's header alone (its first
        bytes), checked as decoding checks it, but for the voxels: a file whose header is damaged or
        whose length does not match that header is removed as :meth:`get` removes it; an image above
        this server's limits is a 413 ``image_too_large`` and its file is kept (as :meth:`get` does).
        Damaged voxels are found (and the file removed) when a session is opened on the image, which
        then answers 404 ``image_not_found``."""
        if not is_image_id(image_id):
            return None
        volume = self._held(image_id)
        if volume is not None:
            return image_info(image_id, volume)
        if self._dir is None:
            return None
        path = self._path(image_id)
        try:
            with open(path, "rb") as f:
                start = f.read(8)
                head_len = struct.unpack("<I", start[4:8])[0] if len(start) == 8 else 0
                prefix = start + f.read(min(head_len, MAX_HEADER_BYTES + 1))
                size = os.fstat(f.fileno()).st_size
        except FileNotFoundError:
            return None
        except OSError as exc:
            self._unreadable(image_id, path, exc)
            return None
        try:
            return header_info(image_id, prefix, size, self._max_voxels, self._max_axis)
        except _DAMAGED as exc:
            _raise_if_over_limit(image_id, exc)  # above this server's limits: 413, the file kept
            self._damaged(image_id, path, exc)
            return None

    def has(self, image_id: str) -> bool:
        if not is_image_id(image_id):
            return False
        with self._lock:
            if image_id in self._cache:
                return True
        return self._dir is not None and self._path(image_id).is_file()

    def put(self, image_id: str, volume: Volume, frame: Optional[bytes]) -> Volume:
        """Hold an uploaded image (in memory, and on disk with a data folder); returns the volume held.

        A held image is never replaced: when one is already in memory under this id (an upload of
        it that came first), that one is kept and returned, modality included. A disk that refuses
        the write (full, read-only) costs the copy on disk only: the image is served from memory,
        and uploaded again by the client if it leaves memory before its sessions end."""
        with self._lock:
            held = self._cache.get(image_id)
            if held is not None:
                self._cache.move_to_end(image_id)
                return held
        if self._dir is not None and frame is not None:
            try:
                self._write(image_id, frame)
            except OSError as exc:
                log.error("image %s could not be stored on disk (%s): held in memory only", image_id, exc)
        return self._remember(image_id, volume)

    def _write(self, image_id: str, frame: bytes) -> None:
        path = self._path(image_id)
        if path.exists():
            return
        # Not files.atomic_write: that reads the whole file back to hash it, and refuses an existing
        # target (two processes uploading the same image at once is fine here).
        fd, tmp = tempfile.mkstemp(dir=self._dir, prefix=UPLOAD_TMP_PREFIX, suffix=UPLOAD_TMP_SUFFIX)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(frame)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        fsync_dir(self._dir)  # the rename itself survives a power cut

    def _remember(self, image_id: str, volume: Volume) -> Volume:
        """Keep ``volume`` in memory unless one is held under ``image_id`` already; returns the one held."""
        with self._lock:
            held = self._cache.setdefault(image_id, volume)
            self._cache.move_to_end(image_id)
            total = sum(v.array.nbytes for v in self._cache.values())
            # Evict oldest first, but always keep the newest (a single image above the budget).
            while total > self._cache_bytes and len(self._cache) > 1:
                _, old = self._cache.popitem(last=False)
                total -= old.array.nbytes
            return held
