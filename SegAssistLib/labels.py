"""Label masks as stored and sent: integer values 0-255. Numpy only, so clients can check a mask
before sending it without SimpleITK or torch."""

from __future__ import annotations

import numpy as np

from SegAssistLib.errors import ImageError


def as_labels(mask: np.ndarray) -> np.ndarray:
    """The mask as uint8 label values; :class:`ImageError` unless every value is an integer 0-255
    (a cast would wrap 256 to 0 and -1 to 255, and truncate 0.9 to 0)."""
    arr = np.asarray(mask)
    if arr.dtype == bool:
        return arr.astype(np.uint8)
    integral = arr.dtype.kind in "iu" or (
        arr.dtype.kind == "f" and bool(np.all(np.isfinite(arr))) and bool(np.all(arr == np.round(arr)))
    )
    if not integral:
        raise ImageError(f"label values must be integers 0-255, got dtype {arr.dtype} with other values")
    if arr.size and (arr.min() < 0 or arr.max() > 255):
        raise ImageError(f"label values must be 0-255, got {arr.min()}..{arr.max()}")
    return np.ascontiguousarray(arr.astype(np.uint8))
