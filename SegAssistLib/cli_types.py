"""argparse types shared by the ``segassist`` subcommands: a bad number is refused with the reason
before any work starts. Torch-free."""

from __future__ import annotations

import argparse
from pathlib import Path

from SegAssistLib.files import IMAGE_SUFFIXES, image_suffix


def number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def _at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    return parse


positive_int = _at_least(1)
non_negative_int = _at_least(0)


def non_negative_mm(text: str) -> float:
    value = number(text)
    if not 0.0 <= value < float("inf"):  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be a finite number of mm, at least 0, got {text}")
    return value


# the mask files the subcommands write (segment --out, learn next --out): SimpleITK picks its writer
# by the suffix, so another suffix wrote a PNG slice, or failed after the model had run. Any case is
# accepted: the file is written under a temporary name with the suffix in lower case
# (files.temp_path_for), then renamed to the name given.
MASK_SUFFIXES = IMAGE_SUFFIXES


def is_mask_path(path) -> bool:
    """Whether ``path``'s name ends in one of :data:`MASK_SUFFIXES` (any case)."""
    return image_suffix(Path(path).name) is not None
