"""Checks of what a new label version is given: its mask, its prompt log, its count of prompts. Torch-free."""

from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np

from SegAssistLib.errors import ImageError, PromptError
from SegAssistLib.io import as_labels
from SegAssistLib.learning.errors import DatastoreError
from SegAssistLib.prompt_log import PromptLog
from SegAssistLib.prompts import describe_validation_error

PromptLogLike = Union[PromptLog, str, dict, None]


def parse_prompt_log(value: PromptLogLike) -> Optional[PromptLog]:
    """The prompt log a label version is given, parsed; a bad one is a :class:`PromptError`."""
    if value is None or isinstance(value, PromptLog):
        return value
    try:
        if isinstance(value, str):
            return PromptLog.from_json(value)
        if isinstance(value, dict):
            return PromptLog.model_validate(value)
    except PromptError:
        raise
    except Exception as exc:
        raise PromptError(f"invalid prompt log: {describe_validation_error(exc)}") from exc
    raise PromptError(f"a prompt log must be a PromptLog, JSON text or a dict, got {type(value).__name__}")


def is_count(value: object, limit: int) -> bool:
    """An integer 0..limit (a whole float such as 3.0 counts; bools, NaN, text do not)."""
    if isinstance(value, (bool, str)) or not isinstance(value, (int, float, np.number)):
        return False
    return bool(np.isfinite(value)) and int(value) == value and 0 <= value <= limit


def check_mask(mask: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """A label version's mask as labels (0-255) on its case's grid of ``shape``, else a :class:`DatastoreError`."""
    arr = np.asarray(mask)
    if arr.ndim != 3 or tuple(arr.shape) != tuple(shape):
        raise DatastoreError(f"label shape {arr.shape} does not match the case's image shape {tuple(shape)}")
    try:
        return as_labels(arr)
    except ImageError as exc:
        raise DatastoreError(str(exc)) from exc
