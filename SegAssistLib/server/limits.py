"""Request-size limits and the checks of what a request describes against the image it targets."""

from __future__ import annotations

import asyncio
import math
from typing import Callable, Sequence

import numpy as np
from starlette.requests import ClientDisconnect, Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from SegAssistLib.api_models import ErrorCode
from SegAssistLib.prompts import BoxPrompt, LassoPrompt, MaskPrompt, PointPrompt, Prompt, ScribblePrompt
from SegAssistLib.server.errors import ApiError, error_response
from SegAssistLib.transport import describe_value


def _too_large(limit: int, what: str) -> ApiError:
    return ApiError(
        413, ErrorCode.BODY_TOO_LARGE, f"{what} is larger than the server's limit of {limit} bytes",
        {"limit": limit},
    )  # fmt: skip


class BodyLimitMiddleware:
    """Refuse bodies above a per-path limit: early from Content-Length, else while streaming.

    ``limit_for(path)`` gives the byte limit of a request path. A declared length above it is
    answered 413 before a byte of the body is read.
    """

    def __init__(self, app: ASGIApp, limit_for: Callable[[str], int]) -> None:
        self.app = app
        self.limit_for = limit_for

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
        if declared is not None and (declared < 0 or declared > limit):
            if declared < 0:
                response = error_response(400, ErrorCode.MALFORMED_BODY, "Content-Length is not a number")
            else:
                err = _too_large(limit, f"request body ({declared} bytes)")
                response = error_response(err.status_code, err.code, err.message, err.details)
            response.headers["Connection"] = "close"
            await response(scope, receive, send)
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

        await self.app(scope, limited_receive, send)


async def read_body(request: Request, timeout_s: float) -> bytes:
    """The whole body; raises ApiError on a disconnect, a timeout, or fewer bytes than declared.

    The timeout keeps a stalled or deliberately slow upload from holding an upload slot forever.
    """
    chunks = bytearray()

    async def receive_all() -> None:
        async for chunk in request.stream():
            chunks.extend(chunk)

    try:
        await asyncio.wait_for(receive_all(), timeout_s)
    except ClientDisconnect as exc:
        raise ApiError(400, ErrorCode.TRUNCATED_BODY, "the client disconnected during the upload") from exc
    except asyncio.TimeoutError as exc:
        raise ApiError(
            408, ErrorCode.UPLOAD_TIMEOUT,
            f"the body did not arrive within {timeout_s:g} s ({len(chunks)} bytes received)",
            headers={"Connection": "close"},
        ) from exc  # fmt: skip
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) != len(chunks):
        raise ApiError(
            400, ErrorCode.TRUNCATED_BODY, f"body has {len(chunks)} bytes but Content-Length said {declared}"
        )
    return bytes(chunks)


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
    """Refuse a prompt that lies outside the image (voxel centres at integers, half a voxel of slack)."""
    size_ijk = np.asarray(shape_kji[::-1], float)
    lo_ok, hi_ok = -0.5, size_ijk - 0.5

    def outside(points: np.ndarray) -> np.ndarray:
        return np.any((points < lo_ok) | (points > hi_ok), axis=1)

    bad = None
    if isinstance(prompt, PointPrompt):
        if outside(np.asarray([prompt.position]))[0]:
            bad = f"point {list(prompt.position)}"
    elif isinstance(prompt, (ScribblePrompt, LassoPrompt)) and prompt.slab is not None:
        lo, hi = prompt.slab.bounds()
        if np.any(lo < 0) or np.any(hi > np.asarray(shape_kji)):
            bad = f"{prompt.kind} slab box {lo.tolist()}..{hi.tolist()} (array order k, j, i)"
    elif isinstance(prompt, (ScribblePrompt, LassoPrompt)):
        pts = np.asarray(prompt.points, float)
        out = outside(pts)
        if out.any():
            first = pts[np.argmax(out)].tolist()
            bad = f"{prompt.kind} vertex {first} ({int(out.sum())} of {len(pts)} vertices)"
    elif isinstance(prompt, BoxPrompt):
        corners = np.asarray([prompt.min_corner, prompt.max_corner], float)
        if outside(corners).any():  # as strict as the engine: a box corner past the edge is refused
            bad = f"box {list(prompt.min_corner)}..{list(prompt.max_corner)}"
    elif isinstance(prompt, MaskPrompt):
        lo = [int(n) for n in prompt.offset]  # Python ints: a huge client number cannot wrap
        hi = [a + int(n) for a, n in zip(lo, prompt.shape)]
        if any(a < 0 for a in lo) or any(b > int(n) for b, n in zip(hi, shape_kji)):
            bad = f"mask box {lo}..{hi} (array order k, j, i)"
    if bad:
        raise ApiError(
            422,
            ErrorCode.PROMPT_OUTSIDE_IMAGE,
            f"{bad} lies outside the image (i, j, k sizes {[int(s) for s in size_ijk]}); prompts are "
            "voxel indices (i, j, k) of the image the session was opened on",
        )
