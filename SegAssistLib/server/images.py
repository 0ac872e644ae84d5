"""Uploaded images, kept by content hash so that the same image is never uploaded twice.

Decoded volumes stay in memory (least recently used first out, within a byte budget). With a data
directory, the upload frame is also written to ``<data_dir>/images/<sha256>.sgaf`` (atomically:
temporary file, fsync, rename), so images survive a restart. File names are always the
server-computed hash, checked against a strict pattern; nothing a client sends becomes a path.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Optional, Tuple

import numpy as np

from SegAssistLib.api_models import IMAGE_ID_PATTERN, ImageHeader, StoredImage
from SegAssistLib.image import Volume, validate_image
from SegAssistLib.transport import ArrayMeta, TransportError, decode_array, unpack_frame

_ID = re.compile(IMAGE_ID_PATTERN)
log = logging.getLogger("segassist.server")


def is_image_id(value: str) -> bool:
    return bool(_ID.match(value))


def decode_image_frame(body: bytes, max_voxels: int) -> Tuple[Volume, ImageHeader, ArrayMeta]:
    """Check and decode an upload frame into a validated :class:`Volume` (CPU work: run off the loop)."""
    header, payload = unpack_frame(body)
    meta = ArrayMeta.from_dict(header)
    try:
        geometry = ImageHeader.model_validate(header)
    except ValueError as exc:
        raise TransportError(f"image header is invalid: {exc}", "malformed_body") from exc
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
    def __init__(self, data_dir: Optional[Path], cache_bytes: int, max_voxels: int) -> None:
        self._dir = Path(data_dir) / "images" if data_dir else None
        if self._dir:
            self._dir.mkdir(parents=True, exist_ok=True)
        self._cache: OrderedDict[str, Volume] = OrderedDict()
        self._cache_bytes = cache_bytes
        self._max_voxels = max_voxels
        self._lock = threading.Lock()

    def _path(self, image_id: str) -> Path:
        if not is_image_id(image_id) or self._dir is None:
            raise ValueError(f"not an image id: {image_id!r}")
        return self._dir / f"{image_id}.sgaf"

    def get(self, image_id: str) -> Optional[Volume]:
        """The volume, from memory or the data directory; None when not held. Blocking I/O."""
        if not is_image_id(image_id):
            return None
        with self._lock:
            volume = self._cache.get(image_id)
            if volume is not None:
                self._cache.move_to_end(image_id)
                return volume
        if self._dir is None:
            return None
        path = self._path(image_id)
        if not path.is_file():
            return None
        try:
            volume, _, _ = decode_image_frame(path.read_bytes(), self._max_voxels)
        except (ValueError, OSError) as exc:  # damaged on disk, or above a since-lowered limit
            log.warning("stored image %s is unreadable (%s): removed; it will be uploaded again", image_id, exc)
            path.unlink(missing_ok=True)
            return None
        self._remember(image_id, volume)
        return volume

    def has(self, image_id: str) -> bool:
        if not is_image_id(image_id):
            return False
        with self._lock:
            if image_id in self._cache:
                return True
        return self._dir is not None and self._path(image_id).is_file()

    def put(self, image_id: str, volume: Volume, frame: Optional[bytes]) -> None:
        if self._dir is not None and frame is not None:
            path = self._path(image_id)
            if not path.exists():
                fd, tmp = tempfile.mkstemp(dir=self._dir, prefix=".upload-", suffix=".tmp")
                try:
                    with os.fdopen(fd, "wb") as f:
                        f.write(frame)
                        f.flush()
                        os.fsync(f.fileno())
                    os.replace(tmp, path)
                finally:
                    if os.path.exists(tmp):
                        os.unlink(tmp)
        self._remember(image_id, volume)

    def _remember(self, image_id: str, volume: Volume) -> None:
        with self._lock:
            self._cache[image_id] = volume
            self._cache.move_to_end(image_id)
            total = sum(v.array.nbytes for v in self._cache.values())
            # Evict oldest first, but always keep the newest (a single image above the budget).
            while total > self._cache_bytes and len(self._cache) > 1:
                _, old = self._cache.popitem(last=False)
                total -= old.array.nbytes
