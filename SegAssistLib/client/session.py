"""A session on the server, with the engine session's interface and a local copy of the mask.

Replies carry only the changed box of the mask; the session writes each into its local copy, so
:meth:`RemoteSession.result` costs no transfer. :meth:`RemoteSession.fetch_result` asks the server
for the whole mask (the two are equal; the tests check it).

The session also remembers which prompts produced the current mask, so that after the server
lost the session (restart, idle expiry) :meth:`RemoteSession.recover` opens a new one and
replays them: the mask comes back, the undo history does not. A session opened by image id holds
no copy of the image: if the server lost that too, ``recover(volume=...)`` sends it again.

Lassos and thin scribbles inside the image travel as drawn (:func:`wire_prompt`), so that the
server's network sees the stroke the local engine's would; wide scribbles, and lassos reaching
past the image, travel as the slab they cover on their slice: a few hundred bytes of packed bits
and an offset, never a volume. A scribble with a vertex past the image travels as drawn, and the
server refuses it as the engine does in-process.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Tuple, TypeVar, Union

import numpy as np

from SegAssistLib.api_models import API_PREFIX, MaskUpdateReply, SessionInfo, box_voxels
from SegAssistLib.client.errors import (
    ClientError,
    ImageConflictError,
    ImageLostError,
    ImageMismatchError,
    ImageNotFoundError,
    ProtocolError,
    SessionNotFoundError,
)
from SegAssistLib.client.http import one_line, parsed_reply, path_id
from SegAssistLib.engine.base import EngineSession, MaskUpdate
from SegAssistLib.errors import PromptError
from SegAssistLib.image import Volume
from SegAssistLib.prompt_log import PromptLog
from SegAssistLib.prompts import (
    WIDE_SCRIBBLE_WIDTH,
    LassoPrompt,
    Prompt,
    ScribblePrompt,
    inside_image,
    parse_prompt,
    require_prompt,
    to_slab,
)
from SegAssistLib.transport import wire_volume

if TYPE_CHECKING:
    from SegAssistLib.client.remote import SegAssistClient


def wire_prompt(prompt: Prompt, shape_kji: Sequence[int]) -> Prompt:
    """The form a prompt travels in to a server, for the image of array shape ``shape_kji``.

    A lasso, or a thin scribble (width below 2), travels as drawn when every vertex lies in the
    image (:func:`travels_as_drawn`): the engine draws the points form inside its patch, where a
    slab holds whole image voxels that the engine resamples into the patch; across 5 to 10 mm
    slices the slab of a scribble inked about twice the voxels, and the server answered otherwise
    than a local engine given the same stroke. The vertices cost some tens of bytes each (a long
    freehand stroke: a few kB, against a few hundred bytes of slab), far below the server's request
    limit (:data:`~SegAssistLib.prompt_limits.MAX_STROKE_VERTICES` bounds them).

    A wide scribble (width 2 or more) inside the image, and a lasso reaching past it, travel as
    their slab (:func:`to_slab`): the stroke rasterised on the image's grid, cropped to the image
    (a server of any version takes that; the engine draws a points-form lasso past the image as
    this same slab). A scribble with a vertex past the image travels as drawn: the engine refuses it
    in-process (every scribble vertex must lie in the image, :func:`~SegAssistLib.prompts.check_prompt_inside`),
    and the server with the same message (its cropped slab used to travel, and the server answered
    a stroke the engine refused in-process). A stroke that cannot be a slab travels as drawn too and the
    server judges it: one outside the image, one not on a single slice, or one larger than a slab
    may be. Any other prompt travels as it is.
    """
    if travels_as_drawn(prompt, shape_kji) or _scribble_past_the_image(prompt, shape_kji):
        return prompt
    try:
        return to_slab(prompt, shape_kji)
    except PromptError:
        return prompt


def _scribble_past_the_image(prompt: Prompt, shape_kji: Sequence[int]) -> bool:
    """A scribble in points form with a vertex outside the image (by the server's rule)."""
    if not isinstance(prompt, ScribblePrompt) or prompt.points is None:
        return False
    return not bool(inside_image(np.asarray(prompt.points, float).reshape(-1, 3)[:, ::-1], shape_kji).all())


def travels_as_drawn(prompt: Prompt, shape_kji: Sequence[int]) -> bool:
    """Whether :func:`wire_prompt` sends a scribble or lasso in points form as it is: a lasso or a
    scribble of width below :data:`~SegAssistLib.prompts.WIDE_SCRIBBLE_WIDTH`, every vertex in the
    image by the server's rule (voxel centres at integers, half a voxel of slack)."""
    if not isinstance(prompt, (ScribblePrompt, LassoPrompt)) or prompt.points is None:
        return False
    if isinstance(prompt, ScribblePrompt) and prompt.width >= WIDE_SCRIBBLE_WIDTH:
        return False
    points_kji = np.asarray(prompt.points, float).reshape(-1, 3)[:, ::-1]
    return bool(inside_image(points_kji, shape_kji).all())


# longest waits (connect, read) for closing a replaced session: its server may be the one that is gone
_CLOSE_OLD_TIMEOUT = (2.0, 5.0)


def _short_timeout(client: SegAssistClient) -> Tuple[float, float]:
    """The client's (connect, read) timeouts, each at most :data:`_CLOSE_OLD_TIMEOUT`'s."""
    connect, read = client.http._pair()
    return tuple(min(mine or cap, cap) for mine, cap in zip((connect, read), _CLOSE_OLD_TIMEOUT))  # type: ignore[return-value]


class _History:
    """The prompt lists behind each undo step, mirroring the server's undo/redo (for recovery).

    Prompts a session is opened with are replayed on the server one by one, each an undo step
    there: so they are here (undoing one of them and recovering must not bring it back).
    """

    def __init__(self, prompts: List[Prompt]) -> None:
        self.states: List[Tuple[Prompt, ...]] = [tuple(prompts[:n]) for n in range(len(prompts) + 1)]
        self.cursor = len(prompts)

    @property
    def current(self) -> List[Prompt]:
        return list(self.states[self.cursor])

    def push(self, state: Tuple[Prompt, ...]) -> None:
        del self.states[self.cursor + 1 :]
        self.states.append(state)
        self.cursor += 1

    def apply(self, op: str, prompt: Optional[Prompt] = None) -> None:
        if op == "prompt":
            self.push(self.states[self.cursor] + (prompt,))
        elif op == "reset":
            self.push(())
        elif op == "undo":
            self.cursor = max(0, self.cursor - 1)
        elif op == "redo":
            self.cursor = min(len(self.states) - 1, self.cursor + 1)


F = TypeVar("F", bound=Callable[..., Any])


def _one_at_a_time(method: F) -> F:
    """Run the session method under the session's lock (calls from several threads take turns)."""

    @functools.wraps(method)
    def locked(self: RemoteSession, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            return method(self, *args, **kwargs)

    return locked  # type: ignore[return-value]


#: what a status reply read before a prompt's (or undo's) reply may still bring: the server's queue
#: and expiry, not the undo state, prompt count or mask version, which the later reply set
_VOLATILE_FIELDS = ("state", "queue_position", "queue_length", "idle_timeout_s", "expires_in_s", "device")


class RemoteSession(EngineSession):
    """A session on a SegAssist server. Its methods may be called from several threads: they take
    turns (one request of the session at a time), so the local mask and undo history stay the server's."""

    def __init__(
        self,
        client: SegAssistClient,
        info: SessionInfo,
        volume: Optional[Volume],
        prompts: List[Prompt],
        modality: Optional[str] = None,
    ) -> None:
        self.client = client
        self.info = info
        self._volume = volume  # kept (not copied) so recover() can upload again if the server lost it
        self._modality = modality  # the session's, asked for again on recovery
        self._history = _History(prompts)
        self._mask = np.zeros(tuple(info.shape), np.uint8)
        self._closed = False
        # a change the server may have made without this client seeing the reply (a read timeout
        # twice over, a gateway's error, a reply damaged on the way): the next call fetches the
        # server's mask and prompts first (so does recover(), for the prompts), and the next update
        # returned covers what changed since the mask the caller last saw (``_seen``)
        self._out_of_sync = False
        self._seen: Optional[np.ndarray] = None
        # one call at a time: replies applied and undo steps moved in the order threads happen to
        # finish would leave the local mask and prompts other than the server's, silently
        self._lock = threading.RLock()
        # status() runs beside a call that holds the lock (a UI polls the queue while a prompt runs):
        # ``info`` changes under this one, and every change by a call that moves the session's state
        # counts in ``_info_generation``, so that a status reply read before it cannot undo it
        self._info_lock = threading.Lock()
        self._info_generation = 0
        if prompts:  # the replayed prompts made a mask: start from the server's copy
            try:
                self._mask = self.fetch_result()
            except BaseException:  # the caller gets no session: the server's must not hold a place
                with contextlib.suppress(Exception):
                    self.client.http.request("DELETE", self._path)
                raise

    # ---- identity and state --------------------------------------------------------------------
    @property
    def session_id(self) -> str:
        return self.info.session_id

    @property
    def image_id(self) -> str:
        return self.info.image_id

    @property
    def shape(self) -> Tuple[int, int, int]:
        return tuple(self.info.shape)  # type: ignore[return-value]

    @property
    def can_undo(self) -> bool:
        return self.info.can_undo

    @property
    def can_redo(self) -> bool:
        return self.info.can_redo

    @property
    def _path(self) -> str:
        return f"{API_PREFIX}/sessions/{path_id(self.session_id, 'session id')}"

    def status(self) -> SessionInfo:
        """State on the server: ``idle``, ``queued`` (with ``queue_position``) or ``running``.

        It does not wait for a call of the session that runs on another thread (a prompt), and takes
        from a reply read before such a call's own only the queue, state and expiry: the undo state
        and prompt count stay those of the later reply."""
        with self._info_lock:
            generation, path = self._info_generation, self._path
        reply = self.client.http.reply("GET", path, SessionInfo.model_validate)
        with self._info_lock:
            if reply.session_id != self.info.session_id:  # recovered meanwhile: the reply is the old session's
                return self.info
            if generation == self._info_generation:
                self.info = reply
            else:
                self.info = self.info.model_copy(update={name: getattr(reply, name) for name in _VOLATILE_FIELDS})
            return self.info

    def _set_info(self, info: SessionInfo) -> None:
        """Take ``info`` as the session's, from a call that moved the session's state (see status())."""
        with self._info_lock:
            self.info = info
            self._info_generation += 1

    # ---- the engine session interface ------------------------------------------------------------
    @_one_at_a_time
    def add_prompt(self, prompt: Union[Prompt, Dict[str, Any], str]) -> MaskUpdate:
        p = require_prompt(prompt if not isinstance(prompt, (dict, str)) else parse_prompt(prompt))
        p = wire_prompt(p, self.shape)
        update = self._mutate("prompts", {"prompt": p.model_dump(mode="json")})
        self._history.apply("prompt", p)
        return update

    @_one_at_a_time
    def undo(self) -> MaskUpdate:
        update = self._mutate("undo")
        self._follow("undo", self._history.cursor > 0)
        return update

    @_one_at_a_time
    def redo(self) -> MaskUpdate:
        update = self._mutate("redo")
        self._follow("redo", self._history.cursor < len(self._history.states) - 1)
        return update

    def _follow(self, op: str, known_here: bool) -> None:
        """Move the local history as the server did. After a resync or attach it starts at the
        server's current prompts without the earlier steps: a step it does not know is read back."""
        if known_here:
            self._history.apply(op)
            return
        try:
            self._history = _History(list(self.prompt_log().prompts))
        except ClientError:  # the step was done and its update is right: the next call resyncs the rest
            self._out_of_sync = True

    @_one_at_a_time
    def reset(self) -> MaskUpdate:
        update = self._mutate("reset")
        self._history.apply("reset")
        return update

    def result(self) -> np.ndarray:
        """The current mask (a copy of the local one, kept up to date by every reply)."""
        return self._mask.copy()

    def fetch_result(self) -> np.ndarray:
        """The current mask as the server holds it (one full transfer)."""
        from SegAssistLib.api_models import ResultReply

        def mask(data: Any) -> np.ndarray:  # the whole image's box: decompressed no further than the image
            return box_voxels((0, 0, 0), self.shape, ResultReply.model_validate(data).mask, self.shape, "mask")

        return self.client.http.reply("GET", self._path + "/result", mask)

    def prompt_log(self) -> PromptLog:
        """The server's log of the session, with the engine settings it answered with and the image it
        works on (grid and voxel digest; a server older than either sends none)."""
        return self._prompt_log()

    def _prompt_log(self, timeout: Optional[Tuple[float, float]] = None) -> PromptLog:
        params = {"engine": "true", "image": "true"}
        return self.client.http.reply(
            "GET", self._path + "/prompt-log", PromptLog.model_validate, params=params, timeout=timeout
        )

    def local_prompts(self) -> List[Prompt]:
        """The prompts behind the current mask, as this client saw them (what recover() replays)."""
        return self._history.current

    @_one_at_a_time
    def close(self) -> None:
        if self._closed:
            return
        with contextlib.suppress(SessionNotFoundError):  # already gone (expired, restarted): closed
            self.client.http.request("DELETE", self._path)
        self._closed = True  # only now: a close that failed can be tried again

    def __enter__(self) -> RemoteSession:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.close()
            return
        # the block's own error is the one to see; a server that cannot be told to close lets the
        # session expire when idle
        with contextlib.suppress(ClientError):
            self.close()

    # ---- recovery --------------------------------------------------------------------------------
    @_one_at_a_time
    def recover(
        self,
        progress: Optional[Callable[[int, int], None]] = None,
        volume: Optional[Union[Volume, np.ndarray]] = None,
    ) -> RemoteSession:
        """Open a new server session on the same image and replay the prompts of the current mask.

        Use it after :class:`SessionNotFoundError` (server restarted, session expired). The image
        is uploaded again only if the server no longer holds it: the session's own volume (opened
        with one), else ``volume``. A session opened by image id holds none; when the server lost
        the image too, this raises :class:`ImageLostError` (an :class:`ImageNotFoundError`) and keeps
        the session's prompts: call ``recover(volume=...)`` with the image to bring the mask back.
        A ``volume`` other than the session's image (its content hash, of voxels and geometry, is
        the image id) is refused with :class:`ImageMismatchError` before anything is sent or
        changed; the right one is kept for later recoveries. The server session it replaces is
        closed if the server still holds it (a recover() after a timeout, or to be safe): left open,
        it would hold one of the user's session slots until it expired.
        """
        return self._recover(self.client, progress, volume)

    def _recover(
        self,
        client: SegAssistClient,
        progress: Optional[Callable[[int, int], None]],
        volume: Optional[Union[Volume, np.ndarray]],
    ) -> RemoteSession:
        """recover() on the server of ``client``: this session's own, or the one it moves to. Until the
        new session is open, nothing of this object changes (its client, its id): a failure leaves it
        on its server as it was (move_to() to a server that cannot be reached, or refuses the open)."""
        vol = self._checked_volume(volume)
        if vol is not None:
            self._volume = vol
        previous, old_path = self.client, self._path
        prompts = self._history.current
        if self._out_of_sync:  # a change this client did not see: the server's prompts, if it still has them
            prompts = self._server_prompts(moving=client is not previous) or prompts
        # the session first, the upload only on 404: one round trip when the server holds the image,
        # and an image the server dropped from its memory between a check and the open is sent again
        try:
            info = client._create_session(self.image_id, prompts, self._modality)
        except ImageNotFoundError as exc:
            if self._volume is None:
                raise self._image_lost(client, exc, len(prompts)) from exc
            with contextlib.suppress(ImageConflictError):  # held meanwhile, with another modality
                client.upload_image(self._volume, progress)
            info = client._create_session(self.image_id, prompts, self._modality)
        # the new session exists: from here on this object is it (a failure of the mask's transfer
        # below leaves it to be taken by the next call, as after a lost reply)
        self.client = client
        self._set_info(info)
        self._close_old(previous, old_path)
        self._history = _History(prompts)
        self._closed = False
        self._out_of_sync = False
        if not prompts:
            self._mask = np.zeros(tuple(info.shape), np.uint8)
            return self
        try:
            self._mask = self.fetch_result()
        except BaseException:
            self._lose_track()
            raise
        return self

    @_one_at_a_time
    def move_to(
        self,
        client: SegAssistClient,
        progress: Optional[Callable[[int, int], None]] = None,
        volume: Optional[Union[Volume, np.ndarray]] = None,
    ) -> RemoteSession:
        """Go on with another server (a local backend restarted, on a new port): :meth:`recover` there
        (and close the session on the first server, if it still answers).

        A ``volume`` that is not the session's image is refused before the session changes server.
        The session changes server only once its new session is open there: when that fails (the
        server cannot be reached, or refuses), it raises and the session goes on where it was."""
        return self._recover(client, progress, volume)

    def _server_prompts(self, moving: bool) -> Optional[List[Prompt]]:
        """The prompts of the session on its server (the mask's, after a change this client did not
        see), or None when the server lost the session. When moving to another server, the one it
        leaves may be gone (a backend that restarted elsewhere): it is asked once, with short
        timeouts, and None when it does not answer (the local prompts serve)."""
        try:
            return list(self._prompt_log(_short_timeout(self.client) if moving else None).prompts)
        except SessionNotFoundError:
            return None
        except ClientError:
            if not moving:
                raise
            return None

    def _close_old(self, client: SegAssistClient, path: str) -> None:
        """Close the session this one replaced, if its server still holds it (recover() on a session
        that was alive, after a timeout or to be safe): else it would hold one of the user's session
        slots until it expired. Best effort, one try with short timeouts: a server that lost it or
        cannot be reached (a backend that restarted elsewhere) has nothing to free."""
        with contextlib.suppress(ClientError):
            client.http.request("DELETE", path, timeout=_short_timeout(client), safe=False)

    def _checked_volume(self, volume: Optional[Union[Volume, np.ndarray]]) -> Optional[Volume]:
        """``volume`` in wire form if it is the session's image (None stays None); else
        :class:`ImageMismatchError` (the prompts are voxel positions in the session's image)."""
        if volume is None:
            return None
        if volume is self._volume:
            return self._volume  # the session's own, checked when it was opened
        vol = wire_volume(volume)
        image_id = vol.content_hash()
        if image_id == self.image_id:
            return vol
        shape = tuple(int(n) for n in vol.array.shape)
        how = (
            f"its shape is {list(shape)}, the session's {list(self.shape)}"
            if shape != self.shape
            else "its voxels or geometry (spacing, origin, direction) differ"
        )
        raise ImageMismatchError(
            f"the volume given is not this session's image ({how}): its id is {image_id}, the session's "
            f"{self.image_id}. The session's prompts are positions in its own image, so they cannot be "
            "replayed on another; pass the image the session was opened on (nothing was changed)"
        )

    def _image_lost(self, client: SegAssistClient, exc: ImageNotFoundError, n_prompts: int) -> ImageLostError:
        kept = f"the session keeps its prompts ({n_prompts})" if n_prompts else "the session had no prompts"
        return ImageLostError(
            f"the server at {client.url} no longer holds this session's image {self.image_id} (it "
            "restarted without a data directory, or dropped it), and this session has no copy to upload "
            f"again (it was opened by image id, or attached by session id): call recover(volume=...) with "
            f"that image; {kept}",
            status=exc.status,
            code=exc.code,
            details=exc.details,
        )

    # ---- internals -------------------------------------------------------------------------------
    def _mutate(self, op: str, body: Optional[dict] = None) -> MaskUpdate:
        if self._out_of_sync:
            self._resync()
        started = time.perf_counter()
        try:
            response = self.client.http.request("POST", f"{self._path}/{op}", json=body, once=True)
        except ClientError as exc:
            # a session gone is gone (recover() starts again from the local prompts); any other
            # failure of the repeat leaves the first try's outcome open: the next call resyncs
            if exc.outcome_unknown and not isinstance(exc, SessionNotFoundError):
                self._lose_track()
            raise
        round_trip = time.perf_counter() - started
        try:
            return self._take(op, response.content, round_trip)
        except Exception as exc:
            # a 2xx came back: the server did it, whatever its reply says; the next call resyncs
            self._lose_track()
            if isinstance(exc, ClientError):
                exc.outcome_unknown = True
                raise
            if not isinstance(exc, (ValueError, TypeError, IndexError, KeyError)):
                raise
            error = ProtocolError(f"POST {self._path}/{op}: the reply is not a valid mask update: {one_line(exc)}")
            error.outcome_unknown = True
            raise error from exc

    def _lose_track(self) -> None:
        """The server may have changed the session without this client applying it: resync next."""
        if self._seen is None:
            self._seen = self._mask  # replaced, not changed, by the resync
        self._out_of_sync = True

    def _take(self, op: str, content: bytes, round_trip: float) -> MaskUpdate:
        """Apply a mask update reply to the local copy (raises before changing it when it is damaged)."""

        def decoded(data: bytes) -> Tuple[MaskUpdateReply, np.ndarray]:
            reply = MaskUpdateReply.model_validate_json(data)
            if reply.mask is None:
                return reply, np.zeros((0, 0, 0), np.uint8)
            # checked against the image before it is decompressed, and no further than the box
            return reply, box_voxels(reply.offset, reply.shape, reply.mask, self._mask.shape)

        reply, voxels = parsed_reply(f"POST {self._path}/{op}", decoded, content, once=True)
        update = MaskUpdate(
            offset=tuple(reply.offset),  # type: ignore[arg-type]
            voxels=voxels,
            latency_s=round_trip,
            info={
                **reply.info,
                "engine_s": reply.latency_s,
                "queue_wait_s": reply.queue_wait_s,
                "model_version": reply.model_version,
                "round_trip_s": round_trip,
                "reply_bytes": len(content),
            },
        )
        update.apply_to(self._mask)
        fields = {"can_undo": reply.can_undo, "can_redo": reply.can_redo, "n_prompts": reply.n_prompts}
        if "model_version" in reply.model_fields_set:  # the mask's, as a status reply would say
            fields["model_version"] = reply.model_version
        with self._info_lock:
            self.info = self.info.model_copy(update=fields)
            self._info_generation += 1
        if self._seen is not None:  # also what changed while out of sync: the caller never saw it
            update = MaskUpdate.between(self._seen, self._mask, latency_s=update.latency_s, info=update.info)
            self._seen = None
        return update

    def _resync(self) -> None:
        """Take the server's mask and prompts (after a reply was lost, or when attaching)."""
        self._mask = self.fetch_result()
        self._history = _History(list(self.prompt_log().prompts))
        self._out_of_sync = False
