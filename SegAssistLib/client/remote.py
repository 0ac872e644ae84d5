"""The client for one backend: the :class:`~SegAssistLib.engine.base.Engine` interface over HTTP."""

from __future__ import annotations

import contextlib
from typing import Any, Callable, List, Optional, Sequence, Union

import numpy as np

from SegAssistLib.api_models import (
    API_PREFIX,
    FRAME_MEDIA_TYPE,
    Health,
    ServerInfo,
    SessionInfo,
    StoredImage,
)
from SegAssistLib.client.errors import ImageConflictError, ImageNotFoundError, PayloadTooLargeError
from SegAssistLib.client.http import DEFAULT_TIMEOUT, HttpClient, ProgressBody, Timeout, path_id
from SegAssistLib.client.learning import LearningClient
from SegAssistLib.client.session import RemoteSession, wire_prompt
from SegAssistLib.engine.base import Capabilities, Engine
from SegAssistLib.image import Volume, normalise_modality
from SegAssistLib.prompts import Prompt, parse_prompt
from SegAssistLib.transport import available_codecs, encode_frame_parts, wire_volume

Progress = Callable[[int, int], None]
_THREADED_COMPRESSION_BYTES = 16 * 1024 * 1024
REPLAY_SECONDS_PER_PROMPT = 1.0  # extra read time when opening with a log: a CPU answers one in 0.1-0.5 s


class SegAssistClient(Engine):
    """Talks to one SegAssist backend. Thread-safe (one HTTP connection pool per thread).

    >>> client = SegAssistClient("http://127.0.0.1:8470", token)     # doctest: +SKIP
    >>> with client.open_session(volume) as session:                 # doctest: +SKIP
    ...     update = session.add_prompt(PointPrompt(position=(40, 52, 17)))
    ...     mask = session.result()
    """

    def __init__(
        self,
        url: str,
        token: Optional[str] = None,
        *,
        timeout: Timeout = DEFAULT_TIMEOUT,
        retries: int = 2,
        verify: Union[bool, str] = True,
        allow_insecure_token: bool = False,
    ) -> None:
        """``timeout``: (connect, read) seconds; ``verify``: TLS verification, or a CA bundle path."""
        self.http = HttpClient(url, token, timeout, retries, verify, allow_insecure_token)
        self._info: Optional[ServerInfo] = None

    @property
    def url(self) -> str:
        return self.http.base_url

    @property
    def learning(self) -> LearningClient:
        """The learning loop on this server (cases, labels, training, versions, next case)."""
        return LearningClient(self)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> SegAssistClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- server ------------------------------------------------------------------------------
    def health(self, timeout: Optional[Timeout] = None) -> Health:
        return self.http.reply("GET", f"{API_PREFIX}/health", Health.model_validate, timeout=timeout, auth=False)

    def info(self, refresh: bool = False) -> ServerInfo:
        if self._info is None or refresh:
            self._info = self.http.reply("GET", f"{API_PREFIX}/info", ServerInfo.model_validate)
        return self._info

    def capabilities(self) -> Capabilities:
        """What the server runs, read again on each call (one small GET): the server swaps in a promoted
        adapter, or rolls back, under a long-lived client, and the version is what a mask's
        provenance records. Not called per prompt: a mask update carries its own ``model_version``."""
        info = self.info(refresh=True)
        return Capabilities(
            name=info.model.name,
            version=info.model.version,
            licence=info.model.licence,
            prompt_kinds=tuple(info.prompt_kinds),
            patch_size=tuple(info.patch_size),  # type: ignore[arg-type]
            device=",".join(info.devices),
            description=info.model.description,
        )

    # ---- images ------------------------------------------------------------------------------
    def image(self, image_id: str) -> StoredImage:
        """What the server holds under this id; raises ImageNotFoundError when nothing."""
        path = f"{API_PREFIX}/images/{path_id(image_id, 'image id')}"
        return self.http.reply("GET", path, StoredImage.model_validate)

    def upload_image(self, volume: Union[Volume, np.ndarray], progress: Optional[Progress] = None) -> StoredImage:
        """Upload an image (stored under its content hash; a second upload stores nothing)."""
        vol = wire_volume(volume)
        image_id = vol.content_hash()
        codec = available_codecs()[0]
        header = {
            "spacing": list(vol.spacing),
            "origin": list(vol.origin),
            "direction": [float(x) for x in np.asarray(vol.direction).ravel()],
            "modality": vol.modality,
            "sha256": image_id,
        }
        limits = self.info().limits
        # found before compressing and sending it; checked in the server's order, and refused with the
        # details its 413 would carry (``details['limit']``: the limit the image is above)
        refusal, limit, longest = None, 0, max(vol.array.shape)
        if vol.array.size > limits.max_voxels:
            refusal = f"{vol.array.size} voxels, above this server's limit of {limits.max_voxels}"
            limit = limits.max_voxels
        elif longest > limits.max_axis:
            refusal = f"its longest axis has {longest} voxels, above this server's limit of {limits.max_axis}"
            limit = limits.max_axis
        if refusal is not None:
            raise PayloadTooLargeError(
                f"the image is too large: {refusal}", status=413, code="image_too_large", details={"limit": limit}
            )
        threads = -1 if vol.array.nbytes > _THREADED_COMPRESSION_BYTES else 0
        # the frame's two parts, sent one after the other: joined, the compressed image would be held twice
        prefix, payload = encode_frame_parts(vol.array, header, codec=codec, threads=threads)
        size = len(prefix) + len(payload)
        if size > limits.max_body_bytes:
            raise PayloadTooLargeError(
                f"the image is {size} bytes compressed, above this server's limit of {limits.max_body_bytes} bytes",
                status=413,
                code="body_too_large",
                details={"limit": limits.max_body_bytes},
            )
        return self.http.reply(
            "POST",
            f"{API_PREFIX}/images",
            StoredImage.model_validate,
            body=lambda: FrameBody(prefix, payload, progress),  # a fresh one for each attempt
            headers={"Content-Type": FRAME_MEDIA_TYPE},
            timeout=self.http.upload_timeout(),
        )

    def ensure_image(self, volume: Union[Volume, np.ndarray], progress: Optional[Progress] = None) -> str:
        """The image's id, uploading it only if the server does not hold it yet."""
        vol = wire_volume(volume)
        image_id = vol.content_hash()
        try:
            self.image(image_id)
        except ImageNotFoundError:
            # uploaded meanwhile by someone naming another modality: held, and sessions name theirs
            with contextlib.suppress(ImageConflictError):
                self.upload_image(vol, progress)
        return image_id

    # ---- sessions ----------------------------------------------------------------------------
    def open_session(
        self,
        volume: Union[Volume, np.ndarray, str],
        prompts: Optional[Sequence[Union[Prompt, dict]]] = None,
        *,
        progress: Optional[Progress] = None,
        modality: Optional[str] = None,
    ) -> RemoteSession:
        """Open a session on an image (a Volume, an array, or the id of an image the server holds).

        The image is uploaded only when the server does not hold it already; ``prompts`` (a
        stored log) are replayed first, each stroke in the form :func:`wire_prompt` chooses (as drawn when
        it lies in the image and is a lasso or a thin scribble, else as its slab);
        ``progress(sent, total)`` reports the upload. ``modality`` is spelt as a Volume takes it
        (``"ct"``, ``"MRI"``: sent as ``CT``, ``MR``); one it refuses raises ImageError before
        anything is sent.
        """
        modality = normalise_modality(modality) if modality else None  # an older server takes CT and MR only
        plist: List[Prompt] = [p if not isinstance(p, dict) else parse_prompt(p) for p in (prompts or [])]
        if isinstance(volume, str):
            if any(p.kind in ("scribble", "lasso") for p in plist):
                shape = self.image(volume).shape
                plist = [wire_prompt(p, shape) for p in plist]
            return RemoteSession(self, self._create_session(volume, plist, modality), None, plist, modality)
        vol = wire_volume(volume)
        plist = [wire_prompt(p, vol.array.shape) for p in plist]
        image_id = vol.content_hash()
        # the volume's own modality counts too: it is not part of the image's hash, so an image the
        # server already holds (uploaded without it, or by someone else) would not carry it
        modality = modality or vol.modality
        try:
            info = self._create_session(image_id, plist, modality)
        except ImageNotFoundError:
            # uploaded meanwhile by someone naming another modality: held, and the session names its own
            with contextlib.suppress(ImageConflictError):
                self.upload_image(vol, progress)
            info = self._create_session(image_id, plist, modality)
        return RemoteSession(self, info, vol, plist, modality)

    def session(self, session_id: str) -> RemoteSession:
        """Attach to an open session by id (the local mask and prompts start from the server's, so
        that ``recover()`` replays them; its earlier undo steps are not known here)."""
        path = f"{API_PREFIX}/sessions/{path_id(session_id, 'session id')}"
        info = self.http.reply("GET", path, SessionInfo.model_validate)
        session = RemoteSession(self, info, None, [])
        session._resync()
        return session

    def _create_session(self, image_id: str, prompts: List[Prompt], modality: Optional[str] = None) -> SessionInfo:
        body: dict[str, Any] = {"image_id": image_id, "prompts": [p.model_dump(mode="json") for p in prompts]}
        if modality:
            body["modality"] = modality
        timeout = self.http.read_timeout_plus(REPLAY_SECONDS_PER_PROMPT * len(prompts))
        # once: the server finishes an open whose client stopped waiting (a long replay); asking again
        # under the same id waits for that session instead of opening a second one, which would hold
        # one of the user's session slots until it expired
        return self.http.reply(
            "POST", f"{API_PREFIX}/sessions", SessionInfo.model_validate, json=body, timeout=timeout, once=True
        )


class FrameBody:
    """An upload body made of a frame's prefix and its payload, read one after the other (never
    joined). Like :class:`~SegAssistLib.client.http.ProgressBody`, which reads the payload, it has a
    length (Content-Length is sent) and reports ``progress(sent, total)`` over the whole frame."""

    def __init__(self, prefix: bytes, payload: bytes, progress: Optional[Progress] = None) -> None:
        self._prefix = prefix
        self._pos = 0
        head = len(prefix)
        report = None if progress is None else (lambda sent, total: progress(head + sent, head + total))
        self._payload = ProgressBody(payload, report)
        self.len = head + len(payload)

    def __len__(self) -> int:
        return self.len

    def read(self, size: int = -1) -> bytes:
        if self._pos < len(self._prefix) and size != 0:
            end = len(self._prefix) if size is None or size < 0 else min(len(self._prefix), self._pos + size)
            out = self._prefix[self._pos : end]
            self._pos = end
            return out
        return self._payload.read(size)
