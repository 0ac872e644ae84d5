"""Image uploads: the body is held once, and a frame is refused by its header before its voxels arrive."""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import tracemalloc
from typing import Dict, Optional, Tuple

import numpy as np
import pytest
from starlette.requests import Request
from test_server_fixtures import TOKENS, make_volume

from SegAssistLib.api_models import FRAME_MEDIA_TYPE
from SegAssistLib.server.errors import ApiError
from SegAssistLib.server.limits import read_body
from SegAssistLib.transport import encode_frame

pytest_plugins = ["test_server_fixtures"]

MB = 1_000_000


# ---- read_body: one copy of the body ----------------------------------------------------------------
def _request(body_size: int, chunk: int, content_length: Optional[int]) -> Request:
    """A request whose body (``body_size`` bytes, ``i % 251`` at byte i) arrives in ``chunk``-sized pieces."""
    pattern = (np.arange(chunk + 251) % 251).astype(np.uint8).tobytes()
    sent = 0

    async def receive() -> dict:
        nonlocal sent
        n = min(chunk, body_size - sent)
        piece = pattern[sent % 251 : sent % 251 + n]  # a fresh bytes object, as a server hands over
        sent += n
        return {"type": "http.request", "body": piece, "more_body": sent < body_size}

    headers = [(b"content-length", str(content_length).encode())] if content_length is not None else []
    return Request({"type": "http", "method": "POST", "path": "/v1/images", "headers": headers}, receive)


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
def test_read_body_holds_the_body_once(declared):
    size = 40 * MB
    request = _request(size, 1 << 20, size if declared else None)
    tracemalloc.start()
    try:
        body = asyncio.run(read_body(request, 60.0))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(body) == size
    view = memoryview(body)
    assert view[0] == 0 and view[250] == 250 and view[251] == 0 and view[size - 1] == (size - 1) % 251
    assert peak < 1.3 * size, f"read_body peaked at {peak / MB:.0f} MB for a {size / MB:.0f} MB body"


def test_read_body_still_refuses_a_body_of_another_length_than_declared():
    async def short_then_end() -> dict:
        return {"type": "http.request", "body": b"x" * 50, "more_body": False}

    headers = [(b"content-length", b"100")]
    short = Request({"type": "http", "method": "POST", "path": "/v1/images", "headers": headers}, short_then_end)
    with pytest.raises(ApiError) as e:
        asyncio.run(read_body(short, 10.0))
    assert e.value.status_code == 400 and e.value.code == "truncated_body"
    with pytest.raises(ApiError) as e:
        asyncio.run(read_body(_request(200, 64, 100), 10.0))
    assert e.value.status_code == 400 and e.value.code == "truncated_body"


# ---- a real server: refusal by the frame header -----------------------------------------------------
def _frame_head(header: Dict) -> bytes:
    head = json.dumps(header).encode()
    return b"SGAF" + struct.pack("<I", len(head)) + head


def _meta(shape, dtype: str = "|u1", codec: str = "none", **more) -> Dict:
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    return {"dtype": dtype, "shape": list(shape), "codec": codec, "nbytes": nbytes, "payload_nbytes": nbytes, **more}


def _http_head(content_length: Optional[int]) -> bytes:
    length = f"Content-Length: {content_length}" if content_length is not None else "Transfer-Encoding: chunked"
    return (
        "POST /v1/images HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Bearer {TOKENS['alice']}\r\nContent-Type: {FRAME_MEDIA_TYPE}\r\n"
        f"{length}\r\n\r\n"
    ).encode()


def _read_reply(sock: socket.socket) -> Tuple[int, dict]:
    """Status and JSON body of one HTTP reply (read by its Content-Length: the connection may stay open)."""
    data = b""
    while True:
        chunk = sock.recv(65536)
        assert chunk, f"the server closed the connection without a full reply: {data!r}"
        data += chunk
        head, sep, body = data.partition(b"\r\n\r\n")
        if sep:
            fields = dict(line.split(b":", 1) for line in head.split(b"\r\n")[1:] if b":" in line)
            length = int({k.strip().lower(): v for k, v in fields.items()}[b"content-length"])
            if len(body) >= length:
                return int(head.split()[1]), json.loads(body[:length])


#: A frame header, the body length the request declares (None: chunked), the status and code expected.
#: Every body is at most the shared server's 4 MB limit: the middleware lets it in, the header refuses it.
_HEADER_CASES = {
    "too many voxels": (_meta((100, 100, 100)), None, 413, "image_too_large"),
    "axis too long": (_meta((4, 4, 300)), None, 413, "image_too_large"),
    "unsupported dtype": ({**_meta((8, 8, 8)), "dtype": "<c8"}, None, 422, "unsupported_dtype"),
    "unknown codec": (_meta((8, 8, 8), codec="lzma"), None, 422, "unsupported_codec"),
    "nbytes off": ({**_meta((8, 8, 8)), "nbytes": 511}, None, 422, "invalid_shape"),
    "not 3D": (_meta((64, 64)), None, 422, "invalid_image"),
    "bad geometry": (_meta((8, 8, 8), spacing=[1, True, 1]), None, 400, "malformed_body"),
    "payload_nbytes disagrees with Content-Length": (_meta((40, 40, 40)), 3 * MB, 400, "truncated_body"),
}


@pytest.mark.parametrize("name", list(_HEADER_CASES))
def test_a_frame_refused_by_its_header_is_answered_before_its_voxels_arrive(shared_server, name):
    """Only the frame header is sent, with a Content-Length of megabytes more: the reply must come
    while the server still waits for the voxels (the old server read the whole body first, and
    here would wait for it until its 600 s upload timeout)."""
    header, declared, status, code = _HEADER_CASES[name]
    head = _frame_head(header)
    if declared is None:
        declared = len(head) + header["payload_nbytes"]
    with socket.create_connection(("127.0.0.1", shared_server.port), timeout=10) as sock:
        sock.sendall(_http_head(declared) + head)  # and none of the voxels
        got_status, reply = _read_reply(sock)
    assert (got_status, reply["error"]["code"]) == (status, code), reply


@pytest.mark.parametrize(
    "start, code",
    [(b"GIF89a" + bytes(64), "malformed_body"), (b"SGAF" + struct.pack("<I", 5) + b"{nope", "malformed_body"),
     (b"SGAF" + struct.pack("<I", 10**6), "malformed_body")],
    ids=["not a frame", "header not JSON", "header length too large"],
)  # fmt: skip
def test_a_body_that_is_no_frame_is_refused_by_its_first_bytes(shared_server, start, code):
    with socket.create_connection(("127.0.0.1", shared_server.port), timeout=10) as sock:
        sock.sendall(_http_head(3 * MB) + start)
        status, reply = _read_reply(sock)
    assert (status, reply["error"]["code"]) == (400, code), reply


def _chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


def test_a_chunked_upload_is_refused_by_its_header_too(shared_server):
    head = _frame_head(_meta((100, 100, 100)))  # 1 000 000 voxels, above the 400 000 limit
    with socket.create_connection(("127.0.0.1", shared_server.port), timeout=10) as sock:
        sock.sendall(_http_head(None) + _chunk(head[:5]) + _chunk(head[5:]))
        status, reply = _read_reply(sock)
    assert (status, reply["error"]["code"]) == (413, "image_too_large"), reply


def test_a_chunked_body_longer_than_its_frame_is_refused(shared_server):
    frame = encode_frame(make_volume(seed=31).array, {"spacing": [1, 1, 1]}, codec="zlib")
    with socket.create_connection(("127.0.0.1", shared_server.port), timeout=10) as sock:
        sock.sendall(_http_head(None) + _chunk(frame) + _chunk(b"more"))  # no end: never read
        status, reply = _read_reply(sock)
    assert (status, reply["error"]["code"]) == (400, "truncated_body"), reply


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_an_upload_whose_header_arrives_in_tiny_pieces_is_stored(shared_server, chunked):
    volume = make_volume(seed=32 + chunked)
    frame = encode_frame(volume.array, {"spacing": list(volume.spacing)}, codec="zlib")
    pieces = [frame[i : i + 3] for i in range(0, 60, 3)] + [frame[60:]]
    with socket.create_connection(("127.0.0.1", shared_server.port), timeout=30) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(_http_head(None if chunked else len(frame)))
        for piece in pieces:
            sock.sendall(_chunk(piece) if chunked else piece)
        if chunked:
            sock.sendall(b"0\r\n\r\n")
        status, reply = _read_reply(sock)
    assert status in (200, 201), reply
    assert reply["image_id"] == volume.content_hash() and reply["shape"] == list(volume.array.shape)


def test_the_server_takes_uploads_after_refusing_many_by_their_header(shared_server, alice):
    """Refused uploads give their upload slot back (more refusals here than the server has slots)."""
    head = _frame_head(_meta((100, 100, 100)))
    for _ in range(4):
        with socket.create_connection(("127.0.0.1", shared_server.port), timeout=10) as sock:
            sock.sendall(_http_head(len(head) + 1_000_000) + head)
            assert _read_reply(sock)[0] == 413
    volume = make_volume(seed=34)
    assert alice.upload_image(volume).image_id == volume.content_hash()
