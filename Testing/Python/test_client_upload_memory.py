"""An image upload holds its compressed frame once: the frame's prefix and payload are sent one after
the other, never joined into a second copy; a retried upload sends the same whole frame again."""

from __future__ import annotations

import json
import threading
import tracemalloc
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import List

import numpy as np
import pytest
import requests
from test_server_fixtures import TOKENS

from SegAssistLib.client import SegAssistClient
from SegAssistLib.client.remote import FrameBody
from SegAssistLib.image import Volume
from SegAssistLib.transport import decode_frame, encode_frame, encode_frame_parts

pytest_plugins = ["test_server_fixtures"]


def _random_volume(nbytes: int, seed: int) -> Volume:
    """Voxels that do not compress: the compressed frame is as large as the image."""
    side = round((nbytes) ** (1 / 3))
    array = np.random.default_rng(seed).integers(0, 256, (side, side, side), dtype=np.uint8)
    return Volume(array, spacing=(1.0, 1.0, 1.25))


def _read_all(body, block: int = 16384) -> bytes:
    """What an HTTP connection sends: the body read in blocks until it ends."""
    parts = []
    while True:
        chunk = body.read(block)
        if not chunk:
            return b"".join(parts)
        parts.append(chunk)


def test_the_frame_body_reads_as_the_joined_frame_and_reports_progress_to_its_end():
    volume = _random_volume(300_000, seed=1)
    header = {"spacing": [1.0, 1.0, 1.25]}
    prefix, payload = encode_frame_parts(volume.array, header, codec="zlib")
    assert prefix + payload == encode_frame(volume.array, header, codec="zlib")
    seen: List[tuple] = []
    body = FrameBody(prefix, payload, lambda sent, total: seen.append((sent, total)))
    assert len(body) == body.len == len(prefix) + len(payload)
    for block in (1, 7, 16384, -1):  # a read may stop at the end of the prefix: the rest follows
        seen.clear()
        body = FrameBody(prefix, payload, lambda sent, total: seen.append((sent, total)))
        assert body.read(0) == b""
        sent = _read_all(body, block) if block > 0 else body.read(-1) + _read_all(body)
        assert sent == prefix + payload
        assert seen[-1] == (len(sent), len(sent)) and [s for s, _ in seen] == sorted(s for s, _ in seen)
    read_header, array = decode_frame(sent)
    assert read_header["spacing"] == [1.0, 1.0, 1.25] and np.array_equal(array, volume.array)
    assert _read_all(FrameBody(prefix, payload, None)) == sent  # no progress asked: the same bytes


def test_an_upload_holds_the_compressed_image_once(shared_server, monkeypatch):
    """The client's peak Python memory while it compresses and sends an image that does not compress
    (frame about as large as the image): joining prefix and payload held the frame twice (a peak
    near twice the frame), sending them one after the other holds it once."""
    pytest.importorskip("zstandard")  # zlib.compress itself holds its output twice for a moment
    client = SegAssistClient(shared_server.url, TOKENS["alice"])
    info = client.info()  # asked before measuring; the shared server's limits, raised for this image
    limits = info.limits.model_copy(update={"max_voxels": 10**8, "max_body_bytes": 10**9})
    client._info = info.model_copy(update={"limits": limits})
    volume = _random_volume(6_000_000, seed=2)
    sent: List[int] = []

    def send(method, path, body=None, **kwargs):  # reads the body through as a connection does
        assert method == "POST" and path.endswith("/images")
        reader, n = body(), 0
        while True:
            chunk = reader.read(16384)
            if not chunk:
                break
            n += len(chunk)
        sent.append(n)
        shape = list(volume.array.shape)
        geometry = {"spacing": [1.0, 1.0, 1.25], "origin": [0.0, 0.0, 0.0], "direction": np.eye(3).ravel().tolist()}
        return {"image_id": volume.content_hash(), "shape": shape, "dtype": "|u1", **geometry}

    monkeypatch.setattr(client.http, "json", send)
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        client.upload_image(volume)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    frame = sent[0]
    assert frame > volume.array.nbytes  # incompressible: stored, a little larger
    assert peak < 1.4 * frame, f"peak {peak} bytes for a frame of {frame}: the frame was held twice"
    client.close()


class _BusyOnce:
    """A front for the server that reads the first image upload whole and answers the server's 503
    (queue full) to it, then forwards everything; it keeps every upload body it saw."""

    def __init__(self, backend: str) -> None:
        self.uploads: List[bytes] = []
        self._upstream = requests.Session()
        self._upstream.trust_env = False
        front = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def handle_one(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else None
                if self.command == "POST" and self.path.endswith("/images"):
                    front.uploads.append(body)
                    if len(front.uploads) == 1:
                        error = {"status": 503, "code": "queue_full", "message": "busy, try again shortly"}
                        self.answer(503, json.dumps({"error": error}).encode(), "application/json")
                        return
                skip = ("host", "content-length", "connection", "accept-encoding")
                headers = {k: v for k, v in self.headers.items() if k.lower() not in skip}
                reply = front._upstream.request(
                    self.command, backend + self.path, data=body, headers=headers, timeout=60
                )
                self.answer(reply.status_code, reply.content, reply.headers.get("Content-Type", ""))

            def answer(self, status: int, content: bytes, content_type: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(content)))
                self.end_headers()
                self.wfile.write(content)

            do_GET = do_POST = handle_one

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._upstream.close()


def test_an_upload_answered_busy_is_sent_again_whole(shared_server):
    front = _BusyOnce(shared_server.url)
    volume = _random_volume(200_000, seed=3)
    progress: List[tuple] = []
    try:
        with SegAssistClient(front.url, TOKENS["alice"], retries=2) as client:
            stored = client.upload_image(volume, progress=lambda sent, total: progress.append((sent, total)))
        assert stored.uploaded and stored.image_id == volume.content_hash()
        assert len(front.uploads) == 2 and front.uploads[0] == front.uploads[1]  # the same whole frame twice
        header, array = decode_frame(front.uploads[1])
        assert header["sha256"] == stored.image_id and np.array_equal(array, volume.array)
        total = len(front.uploads[1])
        assert progress.count((total, total)) == 2  # each attempt reports its end
    finally:
        front.close()
