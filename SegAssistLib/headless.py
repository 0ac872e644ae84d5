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
from typing import Callable, List, Optional, Sequence, Tuple, Union

import numpy as np

from SegAssistLib.engine.base import Engine, EngineSession
from SegAssistLib.errors import PromptError, SegAssistError
from SegAssistLib.image import Volume
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
    path: Path, log: PromptLog, shape_ijk: Sequence[int], spacing: Sequence[float], image_name: str
) -> None:
    """A log recorded on an image of another shape or spacing holds voxel coordinates of that image:
    replayed here they would land somewhere else, silently."""
    if log.image is None:
        return
    shape = tuple(int(n) for n in shape_ijk)
    if shape != tuple(log.image.shape_ijk) or not np.allclose(spacing, log.image.spacing, rtol=1e-3, atol=1e-6):
        raise PromptError(
            f"{path}: the prompt log was recorded on an image of {list(log.image.shape_ijk)} voxels (i, j, k) "
            f"spaced {list(log.image.spacing)} mm; {image_name} has {list(shape)} spaced "
            f"{[round(float(x), 6) for x in spacing]} mm: its voxel coordinates would land elsewhere"
        )


def read_prompt_file(
    path: Union[str, Path], image: Optional[Tuple[Sequence[int], Sequence[float], str]] = None
) -> List[Prompt]:
    """Prompts from a SegAssist JSON file: a prompt log (``{"schema_version": ..., "prompts": [...]}``),
    an object with a ``prompts`` list, or a bare list of prompts; coordinates are voxel indices.

    ``image``: ``(shape_ijk, spacing, name)`` of the image the prompts are for; a prompt log that
    records another image is refused (see :func:`check_log_image`).
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
        if image is not None:
            check_log_image(path, log, *image)
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
