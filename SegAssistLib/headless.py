"""Prompts in, a mask out, with no scene: the part of batch segmentation that needs neither Slicer
nor torch. The Slicer logic (:mod:`SegAssistLib.slicer.logic`) and ``segassist segment`` share it.

- :func:`read_prompt_file`: SegAssist JSON prompts (voxel coordinates of the image) from a file
  (:func:`read_prompts`: with the engine settings a prompt log records, and notes such as a log
  recorded on an image of the same grid with other voxel values: another scan);
- :func:`run_prompts`: open a session on any engine (a :class:`~SegAssistLib.client.SegAssistClient`
  or an in-process engine), apply the prompts in order, return the mask and the prompt log. Given a
  log's engine settings (:func:`recorded_settings`), an in-process engine answers with them, and
  the run notes where the backend answered with others (a server's own settings).
- :func:`replay_prompts`: the prompts of several files in the voxel order their logs were recorded in.
  A log recorded on the same image stored with some axes in reverse order (Slicer's copy of a
  left-handed file, a copy re-saved the other way) gives its recorded mask only on the voxels in the
  log's order: the network is not flip-symmetric. ``run_prompts(..., flips=)`` runs the session on
  the image put back in that order, with the log's own prompts, and turns the mask back.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from SegAssistLib.engine.base import Engine, EngineSession
from SegAssistLib.errors import PromptError, SegAssistError
from SegAssistLib.image import Volume, geometry_difference, voxel_digest
from SegAssistLib.prompt_log import LOG_KEYS, READ, EngineSettings, PromptLog, describe_log_error
from SegAssistLib.prompt_mirror import (
    Flips,
    mirror_prompt,
    mirrored_axes,
    reverse_axes,
    reversed_volume,
    some_flips,
)
from SegAssistLib.prompts import Prompt, check_prompt_inside, parse_prompt

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
    #: what the caller should know about the run, one line each: the backend answered with engine
    #: settings other than those the prompts were recorded with, so the mask may differ
    notes: List[str] = field(default_factory=list)
    #: the axes ``[k, j, i]`` along which the engine saw the volume reversed (``run_prompts(flips=)``:
    #: the replayed log's voxel order; None: the volume's own). ``prompt_log``'s prompts name voxels of
    #: that order (:func:`~SegAssistLib.prompt_mirror.reversed_volume` of the volume), the mask is in
    #: the volume's own
    flips: Optional[Flips] = None

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
    voxels: Union[np.ndarray, Voxels, None] = None,
) -> Optional[str]:
    """A log recorded on an image of another shape, spacing, origin or direction holds voxel
    coordinates of that image: replayed here they would land somewhere else, silently (a flipped
    copy of the same scan has the same shape and spacing). Origin and direction (ITK's, LPS) are
    compared when both the log (schema 1.3) and the caller give them, with the tolerances of
    :func:`~SegAssistLib.image.geometry_difference`.

    On the same grid, the note of :func:`voxels_note` when the caller gives the image's ``voxels``
    (array order ``[k, j, i]``) and they are not those the log records: returned, not raised (None: no
    note)."""
    if log.image is None:
        return None
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
    return voxels_note(path, log, voxels, image_name)


class Voxels:
    """An image's voxels (``[k, j, i]``) and their digest (:func:`~SegAssistLib.image.voxel_digest`) in each
    voxel order asked for, computed once each, when first asked for: one replay reads several logs of the
    same voxels and may write one (``ImageInfo.from_volume(..., digest=)``), and a digest of a CT takes
    a tenth of a second or more. The array must not change while the object is in use."""

    def __init__(self, array: np.ndarray):
        self.array = array
        self._digests: Dict[Flips, str] = {}

    def digest(self, flips: Optional[Flips] = None) -> str:
        """The digest of the voxels reversed along the axes ``flips`` (``[k, j, i]``; None: as they are)."""
        key = tuple(bool(f) for f in (flips or (False, False, False)))
        if key not in self._digests:  # a reversed view: the digest reads it in slabs, nothing copied whole
            self._digests[key] = voxel_digest(reverse_axes(np.asarray(self.array), key))  # type: ignore[arg-type]
        return self._digests[key]


def voxels_note(
    path: Path,
    log: PromptLog,
    voxels: Union[np.ndarray, Voxels, None],
    image_name: str,
    flips: Optional[Flips] = None,
) -> Optional[str]:
    """What to tell the user when the log's image (same grid, checked by the caller) held other voxel
    values than ``voxels`` (``[k, j, i]``, in the log's order once reversed along ``flips``): another scan
    of the same protocol, a follow-up, another reconstruction of the series. A note, not a refusal: the
    prompts still name voxels of this grid. None when they are the same, or when either side has no
    digest (a log written before the digest was, ``voxels`` not given): the digest is computed only when
    the log records one, and once per :class:`Voxels` and order."""
    recorded = None if log.image is None else log.image.recorded_digest()
    if recorded is None or voxels is None:
        return None
    if not isinstance(voxels, Voxels):
        voxels = Voxels(voxels)
    if voxels.digest(flips) == recorded:
        return None
    return (
        f"{path}: the prompt log was recorded on an image with other voxel values than {image_name} (the same "
        "grid, but another image.sha256: another scan, or another series of the same protocol?): the mask may "
        "differ from the recorded one"
    )


@dataclass(frozen=True, eq=False)  # eq: an array field has no one truth value
class ReplayImage:
    """The image prompts are read for, as :func:`read_prompts` checks a prompt log against it: its grid
    (``origin`` and ``direction`` as ITK's, LPS; None: not known, then not compared), the name the
    messages give it, and its voxels (``[k, j, i]``, best as :class:`Voxels`, so that reading several
    logs computes their digest once; None: not compared, no note on another scan of the same grid)."""

    shape_ijk: Tuple[int, int, int]
    spacing: Tuple[float, float, float]
    name: str
    origin: Optional[Tuple[float, float, float]] = None
    direction: Optional[np.ndarray] = None
    voxels: Union[Voxels, np.ndarray, None] = None

    def __post_init__(self) -> None:  # plain numbers, whatever sequence (VTK's, numpy's) they came in
        set_field = object.__setattr__  # frozen
        set_field(self, "shape_ijk", tuple(int(n) for n in self.shape_ijk))
        set_field(self, "spacing", tuple(float(x) for x in self.spacing))
        if self.origin is not None:
            set_field(self, "origin", tuple(float(x) for x in self.origin))
        if self.direction is not None:
            set_field(self, "direction", np.asarray(self.direction, float).reshape(3, 3))

    @classmethod
    def coerce(cls, image: Union[ReplayImage, Sequence, None]) -> Optional[ReplayImage]:
        """``image`` as given to :func:`read_prompts`: one of these, or the tuple form of earlier versions
        (``(shape_ijk, spacing, name)``, with ``origin, direction`` and then ``voxels`` optionally after)."""
        if image is None or isinstance(image, ReplayImage):
            return image
        if not 3 <= len(image) <= 6:
            raise TypeError(f"image: a ReplayImage or (shape_ijk, spacing, name[, origin, direction[, voxels]]), "
                            f"got a sequence of {len(image)}")  # fmt: skip
        return cls(*image)

    @property
    def placed(self) -> bool:
        """Whether its origin and direction are known (a log's voxel order can then be compared)."""
        return self.origin is not None and self.direction is not None


def _stored_in_reverse(log: PromptLog, image: ReplayImage) -> Optional[Flips]:
    """The axes along which ``image`` holds the log's image in reverse order (None: not that image)."""
    recorded = log.image
    if recorded is None or recorded.origin is None or recorded.direction is None or not image.placed:
        return None
    if tuple(image.shape_ijk) != tuple(recorded.shape_ijk):
        return None
    return mirrored_axes(image.shape_ijk, image.spacing, image.origin, image.direction,  # type: ignore[arg-type]
                         recorded.spacing, recorded.origin, recorded.direction)  # fmt: skip


def _order_known(log: PromptLog, image: ReplayImage) -> bool:
    """Whether both the log and the caller give the image's origin and direction: then a log that reads
    without being reversed was recorded in the caller's voxel order."""
    recorded = log.image
    return recorded is not None and recorded.origin is not None and recorded.direction is not None and image.placed


def image_of(volume: Volume, name: str) -> ReplayImage:
    """What :func:`read_prompt_file` checks a prompt log against: the volume's whole geometry, and its
    voxels (a log recorded on other voxel values of the same grid is noted, see :func:`voxels_note`) as
    :class:`Voxels`, so that reading several logs with one :class:`ReplayImage` computes their digest once."""
    return ReplayImage(volume.shape_ijk, volume.spacing, name, volume.origin, volume.direction, Voxels(volume.array))


@dataclass
class PromptFile:
    """The prompts of one file, and what its prompt log records of the engine that answered them
    (None: not recorded, as in a bare list of prompts or a log of schema 1.3 or before)."""

    path: Path
    prompts: List[Prompt]
    settings: Optional[EngineSettings] = None
    model: Optional[str] = None
    #: what the user should know before the mask is trusted, one line each: the log was recorded on an
    #: image of the same grid with other voxel values (:func:`voxels_note`)
    notes: List[str] = field(default_factory=list)
    #: the voxel order the prompts were recorded in: the axes ``[k, j, i]`` along which the caller's image
    #: holds the log's image in reverse (all False: the caller's own order). None: a file that records no
    #: order (markups, a bare list of prompts, a log without its image's origin and direction, a caller
    #: that gives none): its prompts are taken in the caller's order. :func:`replay_prompts`
    flips: Optional[Flips] = None
    #: the prompts as the log records them, in its own voxel order, when that is not the caller's
    #: (``prompts`` are these moved to the caller's order): what a replay that gives the recorded
    #: mask applies, on the voxels in that order
    recorded_prompts: Optional[List[Prompt]] = None
    #: every model version that answered the log's prompts when more than one did (schema 1.5: a version
    #: promoted while the session was open): no one model replays it to its mask (:func:`model_note`)
    models: Optional[List[str]] = None

    def prompts_in(self, flips: Optional[Flips], shape_kji: Sequence[int]) -> List[Prompt]:
        """The prompts on the caller's image (``shape_kji``) reversed along ``flips`` (None: as it is):
        the log's own when that is its order, else ``prompts`` moved (:func:`mirror_prompt`)."""
        if flips is None or not any(flips):
            return list(self.prompts)
        if self.recorded_prompts is not None and self.flips == tuple(flips):
            return list(self.recorded_prompts)
        return [mirror_prompt(p, flips, tuple(shape_kji)) for p in self.prompts]


def read_prompt_file(path: Union[str, Path], image: Union[ReplayImage, Sequence, None] = None) -> List[Prompt]:
    """Prompts from a SegAssist JSON file: a prompt log (``{"schema_version": ..., "prompts": [...]}``),
    an object with a ``prompts`` list, or a bare list of prompts; coordinates are voxel indices. An object
    with any key of a log (:data:`~SegAssistLib.prompt_log.LOG_KEYS`: ``image``, ``engine``, ``model``, ...)
    is read as a log, which must then name its ``schema_version``: its image and engine settings are never
    dropped unread. A Slicer markups file is refused with a line that says where markups are read.
    :func:`read_prompts` also gives the engine settings a log records.

    ``image``: the image the prompts are for, a :class:`ReplayImage` (:func:`image_of` makes one of a
    volume; the tuple form of earlier versions is read too); a prompt log that records another image is
    refused (see :func:`check_log_image`). A log of the same image whose voxels the caller holds in
    reverse order along some axes (Slicer's copy of a left-handed file) has its prompts moved to the
    caller's order (:mod:`SegAssistLib.prompt_mirror`). A log recorded on the same
    grid with other voxel values is read; :func:`read_prompts` gives the note that says so.
    """
    return read_prompts(path, image).prompts


def read_prompts(path: Union[str, Path], image: Union[ReplayImage, Sequence, None] = None) -> PromptFile:
    """The prompts of a file as :func:`read_prompt_file` reads them, with the engine settings and model
    its prompt log records (schema 1.4), which a replay needs to give the recorded mask."""
    path, image = Path(path), ReplayImage.coerce(image)
    data = _read_json(path)
    if _is_markups(data):
        raise PromptError(f"{path} is a Slicer markups file: only Slicer reads markups, from a .mrk.json file "
                          "(Resources/Examples/batch_segment.py, or the SegAssist module); give SegAssist JSON "
                          "prompts here (docs/prompts.md)")  # fmt: skip
    if isinstance(data, dict) and LOG_KEYS & data.keys():  # a log: also one without schema_version is checked
        try:
            log = PromptLog.model_validate(data, context=READ)
        except ValueError as exc:  # pydantic's ValidationError is a ValueError
            raise PromptError(f"{path}: invalid prompt log: {describe_log_error(exc, data)}") from exc
        prompts, note, flips, recorded = list(log.prompts), None, None, None
        if image is not None:
            try:
                note = check_log_image(path, log, image.shape_ijk, image.spacing, image.name, image.origin,
                                       image.direction, image.voxels)  # fmt: skip
            except PromptError:
                flips = _stored_in_reverse(log, image)
                if flips is None:
                    raise
                # the same image with its voxels in another order (Slicer's, of a left-handed file): the
                # prompts moved to the caller's order; the digest compared in the log's
                recorded = prompts
                prompts = [mirror_prompt(p, flips, tuple(image.shape_ijk)[::-1]) for p in log.prompts]
                note = voxels_note(path, log, image.voxels, image.name, flips)
            else:
                if _order_known(log, image):  # the log's order is the caller's
                    flips = (False, False, False)
        return PromptFile(path, prompts, log.engine, log.model, [note] if note else [], flips, recorded,
                          list(log.models) if log.models else None)  # fmt: skip
    items = data.get("prompts") if isinstance(data, dict) else data
    if not isinstance(items, list):
        raise PromptError(f"{path}: expected a list of prompts or an object with a 'prompts' list")
    prompts = []
    for index, item in enumerate(items):
        try:
            prompts.append(parse_prompt(item))
        except PromptError as exc:
            raise PromptError(f"{path}: prompt {index + 1} of {len(items)}: {exc}") from exc
    return PromptFile(path, prompts)


def _read_json(path: Path) -> object:
    """The JSON of a prompt file, read as UTF-8 whatever the locale's encoding (a byte order mark skipped)."""
    if not path.is_file():
        raise PromptError(f"prompt file not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, ValueError) as exc:  # UnicodeDecodeError is a ValueError
        raise PromptError(f"cannot read prompts from {path}: {exc}") from exc
    except RecursionError:  # JSON nested thousands deep: no prompt file is
        raise PromptError(f"cannot read prompts from {path}: its JSON is nested too deeply to be prompts") from None


def _is_markups(data: object) -> bool:
    """Whether ``data`` is a Slicer markups file's JSON (``{"@schema": ".../markups-schema-...", "markups": [...]}``:
    its coordinates are physical, which only Slicer converts)."""
    if not isinstance(data, dict):
        return False
    schema = data.get("@schema")
    return isinstance(data.get("markups"), list) or (isinstance(schema, str) and "markups" in schema.lower())


def check_prompts(files: Sequence[PromptFile], shape_kji: Sequence[int]) -> None:
    """Refuse, before a model loads or an image is sent anywhere, files that hold no prompt at all, and
    a prompt that lies outside the image of array shape ``shape_kji`` (the engine's rule,
    :func:`~SegAssistLib.prompts.check_prompt_inside`), naming its file and its place there (``prompt 2
    of 3``, as a file's unreadable prompts are named). ``files``' prompts are in the caller's voxel order."""
    if not any(file.prompts for file in files):
        names = ", ".join(str(file.path) for file in files)
        raise PromptError(f"no prompts in {names}: place at least one point, box, scribble or lasso")
    for file in files:
        for index, prompt in enumerate(file.prompts):
            try:
                check_prompt_inside(prompt, shape_kji)
            except PromptError as exc:
                raise PromptError(f"{file.path}: prompt {index + 1} of {len(file.prompts)}: {exc}") from exc


def _order_words(flips: Flips) -> str:
    axes = [name for name, f in zip("kji", flips) if f][::-1]
    return f"reversed along {' and '.join(axes)}" if axes else "in its own order"


def replay_order(files: Sequence[PromptFile]) -> Optional[Flips]:
    """The voxel order a replay of ``files`` runs in, so that a log's prompts meet the voxels they were
    recorded on: the axes ``[k, j, i]`` along which the caller's image holds their logs' image in
    reverse (None: the caller's own order, also when no file records an order). Logs recorded in
    different orders of the image (one by ``segassist segment --log`` on a left-handed file, one in
    Slicer on its copy of it) are refused: no one order replays them both."""
    ordered = [f for f in files if f.flips is not None]
    for other in ordered[1:]:
        if tuple(other.flips) != tuple(ordered[0].flips):  # type: ignore[arg-type]
            raise PromptError(
                f"{ordered[0].path} and {other.path} were recorded on this image with its voxels in different "
                f"orders (this image {_order_words(ordered[0].flips)} vs {_order_words(other.flips)}): "
                "replay them separately"
            )
    return some_flips(ordered[0].flips if ordered else None)


def replay_prompts(files: Sequence[PromptFile], shape_kji: Sequence[int]) -> Tuple[List[Prompt], Optional[Flips]]:
    """The prompts of ``files`` in order, all in the voxel order of :func:`replay_order`, and that order
    (``run_prompts(..., flips=)``): a log's as it records them, the others (markups, a bare list: the
    caller's order) moved to it. ``shape_kji``: the caller's image."""
    flips = replay_order(files)
    return [prompt for file in files for prompt in file.prompts_in(flips, shape_kji)], flips


def distinct_settings(files: Sequence[PromptFile]) -> List[EngineSettings]:
    """The different engine settings the prompt logs among ``files`` record, in order of first use."""
    found: List[EngineSettings] = []
    for file in files:
        if file.settings is not None and file.settings not in found:
            found.append(file.settings)
    return found


def recorded_settings(files: Sequence[PromptFile], replaced: Sequence[str] = ()) -> Optional[EngineSettings]:
    """The engine settings the prompt logs among ``files`` were recorded with (None: none records any),
    to be applied in process. Logs recorded with settings that differ in other fields than ``replaced``
    (those the caller sets itself: ``--edge-band`` replaces ``edge_band``, ``edge_beta`` and
    ``edge_max_voxels``) are refused: no one setting replays them both. Where the settings are not
    applied (a server answers with its own) call nothing: :func:`settings_notes` after the run tells."""
    recorded = [f for f in files if f.settings is not None]
    if not recorded:
        return None
    blank = {name: getattr(recorded[0].settings, name) for name in replaced}

    def kept(settings: EngineSettings) -> EngineSettings:
        return settings.model_copy(update=blank)

    for other in recorded[1:]:
        if kept(other.settings) != kept(recorded[0].settings):  # type: ignore[arg-type]
            differ = "; ".join(recorded[0].settings.differences(other.settings))  # type: ignore[union-attr]
            raise PromptError(
                f"{recorded[0].path} and {other.path} were recorded with different engine settings ({differ}): "
                "replay them separately"
            )
    return recorded[0].settings


def settings_note(recorded: EngineSettings, used: Optional[EngineSettings], backend: str) -> Optional[str]:
    """What to tell the user when prompts recorded with ``recorded`` were answered with ``used`` (None:
    the same, nothing to tell)."""
    if used == recorded:
        return None
    if used is None:
        return (
            f"the prompts were recorded with engine settings that {backend} does not report "
            "(it cannot apply them): the mask may differ from the recorded one"
        )
    differ = "; ".join(recorded.differences(used))
    return (
        f"the prompts were recorded with engine settings other than those {backend} answered with "
        f"({differ}; recorded vs used): the mask may differ from the recorded one"
    )


def settings_notes(files: Sequence[PromptFile], used: Optional[EngineSettings], backend: str) -> List[str]:
    """:func:`settings_note` for each of the different settings the logs among ``files`` record (a
    backend that answered every prompt with its own ``used``); with more than one, each note names
    its files."""
    found = distinct_settings(files)
    notes = []
    for settings in found:
        note = settings_note(settings, used, backend)
        if note and len(found) > 1:
            names = ", ".join(str(f.path) for f in files if f.settings == settings)
            note = f"{names}: {note}"
        if note:
            notes.append(note)
    return notes


def model_note(files: Sequence[PromptFile], used: Optional[str]) -> Optional[str]:
    """What to tell the user when the logs among ``files`` were recorded with one model and ``used`` (the
    replay's ``prompt_log.model``) answered (None: the same, or nothing recorded to compare); or, first,
    when a log's prompts were answered by more than one model version (``PromptFile.models``: one promoted
    while the session was open), which no replay by one model gives back exactly."""
    mixed = [file for file in files if file.models and len(file.models) > 1]
    if mixed:
        versions = ", ".join(dict.fromkeys(model for file in mixed for model in file.models))  # type: ignore[union-attr]
        return (
            f"{', '.join(str(file.path) for file in mixed)}: the prompt log's answers came from more than one model "
            f"version ({versions}: one went live while the session was open), replayed with {used or 'one'}: the "
            "mask may differ from the recorded one"
        )
    models = sorted({file.model for file in files if file.model})
    if len(models) != 1 or not used or used == models[0]:
        return None
    return (
        f"the prompt log was recorded with model {models[0]}, replayed with {used}: the mask may differ from "
        "the recorded one"
    )


def _open_session(
    engine: Engine, volume: Volume, progress: ProgressCallback, settings: Optional[EngineSettings] = None
) -> EngineSession:
    from SegAssistLib.client import SegAssistClient

    if isinstance(engine, SegAssistClient):  # a server answers with its own settings

        def uploaded(sent: int, total: int) -> None:
            progress(0.05 + 0.25 * sent / max(total, 1), f"Uploading the image ({100 * sent // max(total, 1)} %)")

        return engine.open_session(volume, progress=uploaded)
    if settings is not None and isinstance(getattr(engine, "settings", None), EngineSettings):
        return engine.open_session(volume, settings=settings)  # the built-in engine: a session of those settings
    return engine.open_session(volume)


def run_prompts(
    engine: Engine,
    volume: Volume,
    prompts: Sequence[Prompt],
    progress: Optional[ProgressCallback] = None,
    settings: Optional[EngineSettings] = None,
    flips: Optional[Flips] = None,
) -> EngineRun:
    """Open a session on ``volume``, apply ``prompts`` in order, return the mask; the session is closed.

    Touches no MRML node: the Slicer module runs it on its worker thread. ``progress`` may raise
    :class:`Cancelled` to stop between steps (also after the last prompt, before the result).
    ``settings``: the engine settings the prompts were recorded with (:func:`recorded_settings`): the
    built-in engine answers with them; where the backend cannot (a server answers with its own), the
    run's ``notes`` say so when its settings differ.

    ``flips`` (:func:`replay_prompts`): the prompts name voxels of ``volume`` reversed along these axes
    ``[k, j, i]`` (a log's voxel order): the session, in process or on a server, is opened on that
    image (:func:`~SegAssistLib.prompt_mirror.reversed_volume`, a copy), as the log was recorded, and
    the mask is turned back to ``volume``'s order. The run's prompt log stays in the log's order
    (:attr:`EngineRun.flips`).
    """
    report = progress or no_progress
    if not prompts:
        raise PromptError("no prompts: place at least one point, box, scribble or lasso")
    flips = some_flips(flips)
    if flips is not None:
        volume = reversed_volume(volume, flips)
    report(0.05, "Opening a session")
    session = _open_session(engine, volume, report, settings)
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
    if flips is not None:  # back to the caller's voxel order
        mask = np.ascontiguousarray(reverse_axes(mask, flips))
    caps = engine.capabilities()
    model = f"{caps.name} {caps.version}".strip()
    note = None if settings is None else settings_note(settings, log.engine, model)
    return EngineRun(mask=mask, prompt_log=log, model=model, latencies_s=latencies, notes=[note] if note else [],
                     flips=flips)  # fmt: skip
