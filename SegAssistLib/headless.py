"""Prompts in, a mask out, with no scene: the part of batch segmentation that needs neither Slicer
nor torch. The Slicer logic (:mod:`SegAssistLib.slicer.logic`) and ``segassist segment`` share it.

- :func:`read_prompt_file`: SegAssist JSON prompts (voxel coordinates of the image) from a file;
- :func:`run_prompts`: open a session on any engine (a :class:`~SegAssistLib.client.SegAssistClient`
  or an in-process engine), apply the prompts in order, return the mask and the prompt log.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Union

import numpy as np

from SegAssistLib.engine.base import Engine, EngineSession
from SegAssistLib.errors import PromptError, SegAssistError
from SegAssistLib.image import Volume, geometry_difference
from SegAssistLib.prompt_mirror import Flips, mirror_prompt, mirrored_axes
from SegAssistLib.prompts import Prompt, PromptLog, describe_validation_error, parse_prompt

ProgressCallback = Callable[[float, str], None]


def no_progress(fraction: float, message: str) -> None:
    """The default progress callback: nothing to report to."""


class Cancelled(SegAssistError):
    """The user cancelled a job (raised from a progress callback)."""

    code = "cancelled"


@dataclass
class EngineRun:
    """What the engine made from the prompts: no nodes, so it can cross threads."""

    mask: np.ndarray  # uint8 [k, j, i] on the volume's grid
    prompt_log: PromptLog
    model: str
    latencies_s: List[float]

    @property
    def voxel_count(self) -> int:
        return int(np.count_nonzero(self.mask))


def check_log_image(
    path: Path,
    log: PromptLog,
    shape_ijk: Sequence[int],
    spacing: Sequence[float],
    image_name: str,
    origin: Optional[Sequence[float]] = None,
    direction: Optional[Sequence[Sequence[float]]] = None,
) -> None:
    """A log recorded on an image of another shape, spacing, origin or direction holds voxel
    coordinates of that image: replayed here they would land somewhere else, silently (a flipped
    copy of the same scan has the same shape and spacing). Origin and direction (ITK's, LPS) are
    compared when both the log (schema 1.3) and the caller give them, with the tolerances of
    :func:`~SegAssistLib.image.geometry_difference`."""
    if log.image is None:
        return
    recorded = log.image
    shape = tuple(int(n) for n in shape_ijk)
    if shape != tuple(recorded.shape_ijk) or not np.allclose(spacing, recorded.spacing, rtol=1e-3, atol=1e-6):
        raise PromptError(
            f"{path}: the prompt log was recorded on an image of {list(recorded.shape_ijk)} voxels (i, j, k) "
            f"spaced {list(recorded.spacing)} mm; {image_name} has {list(shape)} spaced "
            f"{[round(float(x), 6) for x in spacing]} mm: its voxel coordinates would land elsewhere"
        )
    # each side's geometry on a 1-voxel stand-in; origin and direction only when both sides have them
    here, there = Volume(np.zeros((1, 1, 1)), spacing), Volume(np.zeros((1, 1, 1)), recorded.spacing)
    if origin is not None and recorded.origin is not None:
        here.origin, there.origin = tuple(float(x) for x in origin), recorded.origin
    if direction is not None and recorded.direction is not None:
        here.direction = np.asarray(direction, float).reshape(3, 3)
        there.direction = np.asarray(recorded.direction, float)
    difference = geometry_difference(here, there)
    if difference:
        raise PromptError(
            f"{path}: the prompt log was recorded on an image placed otherwise in space: {image_name} has "
            f"{difference} recorded in the log (same shape and spacing: a flipped, reoriented or moved copy?): "
            "its voxel coordinates would land elsewhere"
        )


def _stored_in_reverse(log: PromptLog, image: tuple) -> Optional[Flips]:
    """The axes along which ``image`` holds the log's image in reverse order (None: not that image)."""
    recorded = log.image
    if recorded is None or recorded.origin is None or recorded.direction is None or len(image) < 5:
        return None
    shape_ijk, spacing, _, origin, direction = image[:5]
    if origin is None or direction is None or tuple(int(n) for n in shape_ijk) != tuple(recorded.shape_ijk):
        return None
    return mirrored_axes(shape_ijk, spacing, origin, direction, recorded.spacing, recorded.origin, recorded.direction)


def image_of(volume: Volume, name: str) -> tuple:
    """What :func:`read_prompt_file` checks a prompt log against: the volume's whole geometry."""
    return (volume.shape_ijk, volume.spacing, name, volume.origin, volume.direction)


def read_prompt_file(path: Union[str, Path], image: Optional[tuple] = None) -> List[Prompt]:
    """Prompts from a SegAssist JSON file: a prompt log (``{"schema_version": ..., "prompts": [...]}``),
    an object with a ``prompts`` list, or a bare list of prompts; coordinates are voxel indices.

    ``image``: ``(shape_ijk, spacing, name)`` or ``(shape_ijk, spacing, name, origin, direction)`` of the
    image the prompts are for (origin and direction as ITK's, LPS: see :func:`image_of`); a prompt log
    that records another image is refused (see :func:`check_log_image`). A log of the same image whose
    voxels the caller holds in reverse order along some axes (Slicer's copy of a left-handed file) has its
    prompts moved to the caller's order (:mod:`SegAssistLib.prompt_mirror`).
    """
    path = Path(path)
    if not path.is_file():
        raise PromptError(f"prompt file not found: {path}")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise PromptError(f"cannot read prompts from {path}: {exc}") from exc
    if isinstance(data, dict) and "schema_version" in data:
        try:
            log = PromptLog.model_validate(data)
        except ValueError as exc:  # pydantic's ValidationError is a ValueError
            raise PromptError(f"{path}: invalid prompt log: {describe_validation_error(exc)}") from exc
        if image is None:
            return list(log.prompts)
        try:
            check_log_image(path, log, *image)
        except PromptError:
            flips = _stored_in_reverse(log, image)
            if flips is None:
                raise
            # the same image with its voxels in another order (Slicer's, of a left-handed file)
            return [mirror_prompt(p, flips, tuple(image[0])[::-1]) for p in log.prompts]
        return list(log.prompts)
    items = data.get("prompts") if isinstance(data, dict) else data
    if not isinstance(items, list):
        raise PromptError(f"{path}: expected a list of prompts or an object with a 'prompts' list")
    prompts = []
    for index, item in enumerate(items):
        try:
            prompts.append(parse_prompt(item))
        except PromptError as exc:
            raise PromptError(f"{path}: prompt {index + 1} of {len(items)}: {exc}") from exc
    return prompts


def _open_session(engine: Engine, volume: Volume, progress: ProgressCallback) -> EngineSession:
    from SegAssistLib.client import SegAssistClient

    if isinstance(engine, SegAssistClient):

        def uploaded(sent: int, total: int) -> None:
            progress(0.05 + 0.25 * sent / max(total, 1), f"Uploading the image ({100 * sent // max(total, 1)} %)")

        return engine.open_session(volume, progress=uploaded)
    return engine.open_session(volume)


def run_prompts(
    engine: Engine,
    volume: Volume,
    prompts: Sequence[Prompt],
    progress: Optional[ProgressCallback] = None,
) -> EngineRun:
    """Open a session on ``volume``, apply ``prompts`` in order, return the mask; the session is closed.

    Touches no MRML node: the Slicer module runs it on its worker thread. ``progress`` may raise
    :class:`Cancelled` to stop between steps (also after the last prompt, before the result).
    """
    report = progress or no_progress
    if not prompts:
        raise PromptError("no prompts: place at least one point, box, scribble or lasso")
    report(0.05, "Opening a session")
    session = _open_session(engine, volume, report)
    latencies: List[float] = []
    try:
        for index, prompt in enumerate(prompts):
            report(0.3 + 0.65 * index / len(prompts), f"Prompt {index + 1} of {len(prompts)}: {prompt.kind}")
            started = time.perf_counter()
            session.add_prompt(prompt)
            latencies.append(time.perf_counter() - started)
        # a cancel pressed while the last prompt ran takes effect here, before the result is fetched
        report(0.95, "Reading the result")
        mask = np.asarray(session.result(), np.uint8)
        log = session.prompt_log()
    finally:
        with contextlib.suppress(SegAssistError, OSError):
            session.close()
    caps = engine.capabilities()
    return EngineRun(mask=mask, prompt_log=log, model=f"{caps.name} {caps.version}".strip(), latencies_s=latencies)
