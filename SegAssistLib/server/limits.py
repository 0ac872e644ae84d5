"""Request-size limits and the checks of what a request describes against the image it targets."""

from __future__ import annotations

import asyncio
import contextlib
import math
import struct
from typing import Any, AsyncIterator, Callable, Dict, Optional, Sequence

import numpy as np
from starlette.requests import ClientDisconnect, Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from SegAssistLib.api_models import ACCEPT_CODECS_HEADER, ErrorCode
from SegAssistLib.errors import PromptError
from SegAssistLib.prompts import Prompt
from SegAssistLib.prompts import check_prompt_inside as library_check_prompt_inside
from SegAssistLib.server.errors import LIBRARY_ERRORS, ApiError, error_response, from_library_error
from SegAssistLib.transport import FRAME_MAGIC, MAX_HEADER_BYTES, TransportError, describe_value, unpack_frame


def _too_large(limit: int, what: str) -> ApiError:
    return ApiError(
        413, ErrorCode.BODY_TOO_LARGE, f"{what} is larger than the server's limit of {limit} bytes",
        {"limit": limit},
    )  # fmt: skip


#: A JSON body above this many bytes (or of no declared length) waits for a :class:`ParseSlots` slot
#: before it is read: parsed, JSON costs about 25 times its size in Python objects, and the parse
#: holds the event loop, so a few large bodies at once could take gigabytes and stall every request.
LARGE_JSON_BYTES = 1024**2
#: Large JSON bodies read and parsed at once; the others wait their turn.
LARGE_JSON_PARSES = 2
#: The scope key under which a request holds its slot (see :func:`release_parse_slot`).
PARSE_SLOT_KEY = "segassist.parse_slot"


class ParseSlots:
    """At most ``size`` large bodies read and parsed at once; ``active``, ``waiting`` and ``peak``
    (the most held at once) count them. Made on the server's event loop (its lifespan)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._semaphore = asyncio.Semaphore(size)
        self.active = 0
        self.waiting = 0
        self.peak = 0

    async def acquire(self) -> Callable[[], None]:
        """Waits for a slot; returns its release, which may be called more than once."""
        self.waiting += 1
        try:
            await self._semaphore.acquire()
        finally:
            self.waiting -= 1
        self.active += 1
        self.peak = max(self.peak, self.active)
        held = [True]

        def release() -> None:
            if held[0]:
                held[0] = False
                self.active -= 1
                self._semaphore.release()

        return release


class UploadSlots:
    """At most ``size`` uploads received and decoded at once, and one of each user at a time.

    An upload holds its slot while its body arrives (up to ``upload_timeout_s``), so without the
    per-user bound one user's slow uploads (a bad link, or on purpose) would take every slot and hold
    every other user's uploads for minutes. A user's further upload waits for that user's own first;
    any upload waits at most ``wait_s`` in all for its slots, then is answered 503 ``uploads_busy``
    with ``Retry-After``. Made on the server's event loop (its lifespan)."""

    def __init__(self, size: int, wait_s: float) -> None:
        self.size = size
        self.wait_s = wait_s
        self._slots = asyncio.Semaphore(size)
        self._users: Dict[str, asyncio.Semaphore] = {}  # the slot of each user with an upload in here
        self._holders: Dict[str, int] = {}  # each such user's uploads holding or waiting for it

    @contextlib.asynccontextmanager
    async def hold(self, user: str) -> AsyncIterator[None]:
        """Holds the user's slot and then one of the server's while the block runs."""
        deadline = asyncio.get_running_loop().time() + self.wait_s
        mine = self._users.setdefault(user, asyncio.Semaphore(1))
        self._holders[user] = self._holders.get(user, 0) + 1
        try:
            await self._acquire(mine, deadline, "this user's other upload is still being received")
            try:
                await self._acquire(self._slots, deadline, f"all {self.size} upload slots are taken")
                try:
                    yield
                finally:
                    self._slots.release()
            finally:
                mine.release()
        finally:
            self._holders[user] -= 1
            if not self._holders[user]:
                del self._holders[user], self._users[user]

    async def _acquire(self, semaphore: asyncio.Semaphore, deadline: float, why: str) -> None:
        if not semaphore.locked():  # free: taken at once, however little of the wait is left
            await semaphore.acquire()
            return
        try:
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                raise asyncio.TimeoutError()
            await asyncio.wait_for(semaphore.acquire(), left)
        except asyncio.TimeoutError:
            raise ApiError(
                503, ErrorCode.UPLOADS_BUSY,
                f"no upload slot came free within {self.wait_s:g} s ({why}): send it again later",
                headers={"Retry-After": str(max(1, math.ceil(self.wait_s / 3))), "Connection": "close"},
            ) from None  # fmt: skip


def release_parse_slot(request: Request) -> None:
    """A dependency of every route: the body has been parsed once dependencies run, so the request's
    large-body slot (if it holds one) goes to the next while the route itself runs."""
    release = request.scope.pop(PARSE_SLOT_KEY, None)
    if release is not None:
        release()


class BodyLimitMiddleware:
    """Refuse bodies above a per-path limit: early from Content-Length, else while streaming.

    ``limit_for(path)`` gives the byte limit of a request path. A declared length above it is
    answered 413 before a byte of the body is read.

    ``parse_slots(path)`` gives the :class:`ParseSlots` a large body to this path waits for (None:
    it waits for none, as an upload, which is streamed and bounded by its own slots). A body
    declared above :data:`LARGE_JSON_BYTES`, or of no declared length, is received here (a slow
    sender holds no slot) and handed on to be parsed only once it holds a slot; the slot is
    released when the route starts (:func:`release_parse_slot`), at the latest
    when the reply starts or the request ends.
    """

    def __init__(
        self,
        app: ASGIApp,
        limit_for: Callable[[str], int],
        parse_slots: Callable[[str], Optional[ParseSlots]] = lambda path: None,
    ) -> None:
        self.app = app
        self.limit_for = limit_for
        self.parse_slots = parse_slots

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope["path"])
        declared = None
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = -1

        async def refuse(err: ApiError) -> None:
            """Answer ``err`` without reading the rest of the body (the connection closes after it)."""
            response = error_response(err.status_code, err.code, err.message, err.details)
            response.headers["Connection"] = "close"
            await response(scope, receive, send)

        if declared is not None and (declared < 0 or declared > limit):
            if declared < 0:
                await refuse(ApiError(400, ErrorCode.MALFORMED_BODY, "Content-Length is not a number"))
            else:
                await refuse(_too_large(limit, f"request body ({declared} bytes)"))
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise _too_large(limit, "request body")
            return message

        slots = self.parse_slots(scope["path"]) if scope.get("method") not in ("GET", "HEAD") else None
        if slots is None or (declared is not None and declared <= LARGE_JSON_BYTES):
            await self.app(scope, limited_receive, send)
            return
        # the body first (a slow sender holds no slot), then the slot, then the app parses it
        body = bytearray()
        more = True
        while more:
            try:
                message = await limited_receive()
            except ApiError as err:  # above the limit: raised here, outside the app and its error handlers
                await refuse(err)
                return
            if message["type"] != "http.request":  # gone: the app answers as to any disconnect
                await self.app(scope, receive, send)
                return
            body.extend(message.get("body", b""))
            more = message.get("more_body", False)
        replayed = False

        async def replay_receive() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        release = await slots.acquire()
        scope[PARSE_SLOT_KEY] = release

        async def releasing_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                release()
            await send(message)

        try:
            await self.app(scope, replay_receive, releasing_send)
        finally:
            release()


#: Checks a frame's JSON header (and its length in bytes, magic and length field included) as soon
#: as it has arrived; returns the frame's total length in bytes (or None); raises to refuse it.
FrameHeaderCheck = Callable[[Dict[str, Any], int], Optional[int]]


async def read_body(
    request: Request, timeout_s: float, check_frame_header: Optional[FrameHeaderCheck] = None
) -> memoryview:
    """The whole body; raises ApiError on a disconnect, a timeout, or fewer bytes than declared.

    The timeout keeps a stalled or deliberately slow upload from holding an upload slot forever.

    The body is held once: with a Content-Length it goes into a buffer of exactly that size (whose
    memory is committed as the bytes arrive, not up front; :class:`BodyLimitMiddleware` has refused
    a length above the path's limit already), a chunked body grows as it comes, and the result is
    a view of that buffer, never a copy.

    With ``check_frame_header`` the body is a SegAssist frame: as soon as its magic, header length
    and JSON header have arrived, the header is parsed and passed to ``check_frame_header``, so an
    image that is refused by its header (too large, wrong dtype or shape, malformed, a payload
    size that does not match the body) is refused before the rest of the body is read. Such a
    refusal answers with ``Connection: close``: the unread rest of the body is never read.
    """
    text = request.headers.get("content-length")
    try:
        declared: Optional[int] = int(text) if text is not None else None
    except ValueError:  # the middleware refuses it first; here only when read_body is used alone
        declared = None
    if declared is not None and declared < 0:
        declared = None
    buffer = memoryview(np.empty(declared, np.uint8)) if declared is not None else None
    chunks = bytearray()  # a body without Content-Length (chunked transfer) grows here
    filled = 0
    header_end: Optional[int] = None  # bytes of magic, header length and header, once known
    frame_total: Optional[int] = None  # bytes the frame header declares in all
    need_header = check_frame_header is not None

    def prefix(n: int) -> bytes:  # a small copy (at most 8 + MAX_HEADER_BYTES): the bytearray may grow
        return bytes(buffer[:n]) if buffer is not None else bytes(chunks[:n])

    def check_header() -> None:
        nonlocal header_end, frame_total, need_header
        assert check_frame_header is not None
        if header_end is None:
            if filled < 8:
                return
            start = prefix(8)
            (head_len,) = struct.unpack("<I", start[4:8])
            if start[:4] != FRAME_MAGIC or head_len > MAX_HEADER_BYTES:
                unpack_frame(start)  # raises the error that decoding the whole body would
            header_end = 8 + head_len
        if filled < header_end:
            return
        need_header = False
        header, _ = unpack_frame(prefix(header_end))
        frame_total = check_frame_header(header, header_end)
        if frame_total is not None and declared is not None and frame_total != declared:
            raise TransportError(
                f"the frame header declares a frame of {frame_total} bytes (header and payload_nbytes), "
                f"but Content-Length is {declared} (truncated body?)",
                "truncated_body",
            )

    def refused(exc: Exception) -> ApiError:
        """The reply to a frame refused by its header: the rest of its body stays unread."""
        err = exc if isinstance(exc, ApiError) else from_library_error(exc)
        err.headers = {**(err.headers or {}), "Connection": "close"}
        return err

    async def receive_all() -> None:
        nonlocal filled
        async for chunk in request.stream():
            n = len(chunk)
            if buffer is not None:
                if filled + n > len(buffer):
                    raise ApiError(
                        400, ErrorCode.TRUNCATED_BODY, f"body is longer than the {declared} bytes Content-Length said",
                        headers={"Connection": "close"},
                    )  # fmt: skip
                buffer[filled : filled + n] = chunk
            else:
                chunks.extend(chunk)
            filled += n
            if need_header:
                try:
                    check_header()
                except (ApiError,) + LIBRARY_ERRORS as exc:
                    raise refused(exc) from exc
            if frame_total is not None and filled > frame_total:  # only without Content-Length
                raise refused(
                    TransportError(
                        f"body is longer than the {frame_total} bytes its frame header declares", "truncated_body"
                    )
                )

    try:
        await asyncio.wait_for(receive_all(), timeout_s)
    except ClientDisconnect as exc:
        raise ApiError(400, ErrorCode.TRUNCATED_BODY, "the client disconnected during the upload") from exc
    except asyncio.TimeoutError as exc:
        raise ApiError(
            408, ErrorCode.UPLOAD_TIMEOUT,
            f"the body did not arrive within {timeout_s:g} s ({filled} bytes received)",
            headers={"Connection": "close"},
        ) from exc  # fmt: skip
    if declared is not None and declared != filled:
        raise ApiError(400, ErrorCode.TRUNCATED_BODY, f"body has {filled} bytes but Content-Length said {declared}")
    return buffer if buffer is not None else memoryview(chunks)


def check_reply_codec(codec: str, nbytes: int, limit: int) -> None:
    """Refuse (406 ``not_acceptable``) a reply that would carry ``nbytes`` of array uncompressed (codec
    ``none``, the answer to a client that lists no codec the server writes) above ``limit``: such
    replies (base64 in JSON, a third larger) cost the server their size several times over while
    they are built and sent. Below the limit a client that reads neither zlib nor zstd is still
    answered."""
    if codec == "none" and nbytes > limit:
        raise ApiError(
            406, ErrorCode.NOT_ACCEPTABLE,
            f"this reply would carry {nbytes} bytes uncompressed, above the server's limit of {limit} for "
            f"uncompressed replies: list zlib (in every standard library) or zstd in {ACCEPT_CODECS_HEADER}",
            {"limit": limit},
        )  # fmt: skip


def check_image_shape(shape: Sequence[int], max_voxels: int, max_axis: int) -> None:
    """Refuse an image by its declared shape, before it is decompressed.

    ``shape`` comes from the client (checked integers, see ``ArrayMeta.check``); its product is an
    exact Python int, so a shape such as [2**32, 2**32, 1] cannot wrap to a small number.
    """
    if len(shape) != 3:
        raise ApiError(422, ErrorCode.INVALID_IMAGE, f"image must be 3D, got shape {list(shape)}")
    dims = [int(n) for n in shape]
    size = math.prod(dims)
    if size > max_voxels:
        shown = size if size < 10**30 else "more than 10^30"  # str() of a huge int can itself fail
        raise ApiError(
            413, ErrorCode.IMAGE_TOO_LARGE, f"image has {shown} voxels, above the limit of {max_voxels}",
            {"limit": max_voxels},
        )  # fmt: skip
    if max(dims) > max_axis:
        raise ApiError(
            413, ErrorCode.IMAGE_TOO_LARGE,
            f"image shape {describe_value(dims)} has an axis longer than the limit of {max_axis} voxels",
            {"limit": max_axis},
        )  # fmt: skip


def check_prompt_inside(prompt: Prompt, shape_kji: Sequence[int]) -> None:
    """Refuse (422 ``prompt_outside_image``) a prompt that lies outside the image, by the engine's
    rule (:func:`SegAssistLib.prompts.check_prompt_inside`: half a voxel of slack; a lasso in points
    form may reach past the edge, its part in the image is drawn)."""
    try:
        library_check_prompt_inside(prompt, shape_kji)
    except PromptError as exc:
        raise ApiError(
            422,
            ErrorCode.PROMPT_OUTSIDE_IMAGE,
            f"{exc}; prompts are voxel indices (i, j, k) of the image the session was opened on",
        ) from None
