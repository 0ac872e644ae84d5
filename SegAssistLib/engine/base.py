"""The engine interface every model family implements. Torch-free.

An :class:`Engine` describes itself (:class:`Capabilities`) and opens :class:`EngineSession` objects
on an image. A session takes prompts one at a time and answers each with a :class:`MaskUpdate`: the
box of the mask that changed and its new voxels, so that callers (the server, the Slicer effect)
only move and write what changed.
"""

from __future__ import annotations

import abc
from dataclasses import asdict, dataclass, field
from typing import List, Optional, Tuple

import numpy as np

from SegAssistLib.image import Volume
from SegAssistLib.prompt_log import ImageInfo, PromptLog
from SegAssistLib.prompts import Prompt, set_voxel_bounds


@dataclass(frozen=True)
class Capabilities:
    name: str
    version: str
    licence: str
    prompt_kinds: Tuple[str, ...]
    patch_size: Tuple[int, int, int]
    device: str
    description: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class MaskUpdate:
    """New voxels of the mask inside a box; ``offset`` and ``voxels`` are in array order ``[k, j, i]``.

    An update with an empty box (``voxels.size == 0``) means nothing changed.
    """

    offset: Tuple[int, int, int]
    voxels: np.ndarray
    latency_s: float = 0.0
    info: dict = field(default_factory=dict)

    @property
    def slices(self) -> Tuple[slice, slice, slice]:
        return tuple(slice(o, o + n) for o, n in zip(self.offset, self.voxels.shape))  # type: ignore[return-value]

    def apply_to(self, mask: np.ndarray) -> None:
        """Write the update into a full-size mask in place."""
        if self.voxels.size:
            mask[self.slices] = self.voxels

    @classmethod
    def between(cls, before: np.ndarray, after: np.ndarray, **kwargs) -> MaskUpdate:
        """The smallest box holding every voxel that differs between two masks (of the same 3D shape),
        found a few rows at a time (:func:`~SegAssistLib.prompts.set_voxel_bounds`): memory stays a
        few MB besides the box's copy, whatever the masks' size."""
        if before.shape != after.shape or before.ndim != 3:
            raise ValueError(f"masks of the same 3D shape expected, got {before.shape} and {after.shape}")
        bounds = set_voxel_bounds(before.shape, lambda rows: before[rows] != after[rows])
        if bounds is None:
            return cls(offset=(0, 0, 0), voxels=np.zeros((0, 0, 0), np.uint8), **kwargs)
        lo, hi = bounds
        box = tuple(slice(a, b) for a, b in zip(lo, hi))
        return cls(offset=tuple(int(x) for x in lo), voxels=after[box].copy(), **kwargs)


class EngineSession(abc.ABC):
    """One image, one target structure, a history of prompts with undo and redo.

    Not thread-safe: a session's methods must not run at the same time on several threads, readers
    included (while a prompt is answered, :meth:`result` may show a mask that is never committed, and
    concurrent prompts or undos corrupt the history). Callers serialise the calls of a session: the
    server runs each session's jobs on one worker at a time, the Slicer module from its own thread.
    Separate sessions may be used from separate threads as far as their engine allows (the built-in
    engine: see :class:`~SegAssistLib.engine.builtin.BuiltinEngine`)."""

    @abc.abstractmethod
    def add_prompt(self, prompt: Prompt) -> MaskUpdate:
        """Apply one prompt; raises PromptError (image unchanged) when the prompt is invalid."""

    @abc.abstractmethod
    def undo(self) -> MaskUpdate:
        """Revert the last prompt; raises SessionError when there is nothing to undo."""

    @abc.abstractmethod
    def redo(self) -> MaskUpdate:
        """Re-apply the last undone prompt; raises SessionError when there is nothing to redo."""

    @abc.abstractmethod
    def reset(self) -> MaskUpdate:
        """Forget every prompt and clear the mask (this itself can be undone)."""

    @abc.abstractmethod
    def result(self) -> np.ndarray:
        """The current mask, uint8 in array order, the image's shape."""

    @abc.abstractmethod
    def prompt_log(self) -> PromptLog:
        """The prompts that produced the current result, replayable."""

    def image_info(self) -> Optional[ImageInfo]:
        """The image this session works on, as a prompt log records it (grid and voxel digest), for the
        logs that are kept (a submitted label's); None when the engine does not say (this default)."""
        return None

    def close(self) -> None:  # noqa: B027 - optional hook, a no-op by default
        """Release memory held for this session."""

    @property
    def model_version(self) -> Optional[str]:
        """The version of the model that made the current mask: set by each prompt, brought back with
        the mask by undo and redo; None when no model made it (no prompt yet, a reset, an initial mask
        given by the caller without a ``made_by``, such as a segment drawn by hand) or when the engine does
        not keep track (this default). An initial mask that names its maker (a proposal) is credited to
        it. A prompt the model does not run for (a first negative click) leaves it as it was."""
        return None

    @property
    def can_undo(self) -> bool:
        return False

    @property
    def can_redo(self) -> bool:
        return False


class Engine(abc.ABC):
    @abc.abstractmethod
    def capabilities(self) -> Capabilities: ...

    @abc.abstractmethod
    def open_session(self, volume: Volume, prompts: Optional[List[Prompt]] = None) -> EngineSession:
        """Open a session; ``prompts`` (for example a stored log) are replayed first."""
