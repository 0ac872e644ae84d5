"""Upload slots: one user's slow uploads cannot hold every other user's.

An upload holds one of the server's ``max_concurrent_uploads`` slots while its body arrives (up to
``upload_timeout_s``, 600 s by default). Each user's uploads take one slot at a time, so a user who
sends two uploads a byte at a time leaves the other slot to everyone else; and no upload waits
longer than ``upload_slot_wait_s`` for a slot: then 503 ``uploads_busy`` with ``Retry-After``.
Raw sockets on a real server on loopback send the slow uploads.
"""

from __future__ import annotations

import json
import socket
import time
from typing import List

import requests
from test_server_fixtures import TOKENS, make_volume

from SegAssistLib.api_models import FRAME_MEDIA_TYPE
from SegAssistLib.client import SegAssistClient
from SegAssistLib.transport import encode_frame

pytest_plugins = ["test_server_fixtures"]


def _slow_upload(port: int, token: str, frame: bytes) -> socket.socket:
    """An upload whose headers and first bytes arrive, and then nothing more (a 1 byte/s sender)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    head = (
        f"POST /v1/images HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n"
        f"Content-Type: {FRAME_MEDIA_TYPE}\r\nContent-Length: {len(frame)}\r\n\r\n"
    ).encode()
    sock.sendall(head + frame[:1000])
    return sock


def _reply_of(sock: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def _frame(seed: int) -> bytes:
    volume = make_volume(seed=seed)
    return encode_frame(volume.array, {"spacing": list(volume.spacing)}, codec="zlib")


def test_one_users_slow_uploads_leave_a_slot_to_the_others(server_factory):
    server = server_factory.start(max_concurrent_uploads=2, upload_timeout_s=60)
    slow: List[socket.socket] = []
    try:
        for seed in (1, 2):  # as many slow uploads as the server has slots, all alice's
            slow.append(_slow_upload(server.port, TOKENS["alice"], _frame(seed)))
        time.sleep(0.5)  # both are in (the old server gave them both slots, for up to 60 s)
        reply = requests.post(
            server.url + "/v1/images",
            data=_frame(3),
            headers={"Authorization": f"Bearer {TOKENS['bob']}", "Content-Type": FRAME_MEDIA_TYPE},
            timeout=15,  # the old server answered once alice's uploads timed out (60 s here)
        )
        assert reply.status_code == 201, reply.text
    finally:
        for sock in slow:
            sock.close()


def test_an_upload_waits_for_a_slot_a_bounded_time(server_factory):
    server = server_factory.start(max_concurrent_uploads=2, upload_timeout_s=60, upload_slot_wait_s=1.0)
    first = _slow_upload(server.port, TOKENS["alice"], _frame(4))
    try:
        time.sleep(0.3)
        second = _slow_upload(server.port, TOKENS["alice"], _frame(5))  # alice's own slot is taken
        with second:
            reply = _reply_of(second)
        head, _, body = reply.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503"), reply[:300]
        assert b"retry-after:" in head.lower()
        error = json.loads(body)["error"]
        assert error["code"] == "uploads_busy" and "upload" in error["message"]
    finally:
        first.close()
    # the slots are given back: alice uploads again
    volume = make_volume(seed=6)
    with SegAssistClient(server.url, TOKENS["alice"], timeout=(5.0, 15.0)) as alice:
        assert alice.upload_image(volume).image_id == volume.content_hash()
