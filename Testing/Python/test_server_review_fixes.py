"""Fixes from the review of the interactive server: a stored image above *this* server's limits (a
data directory shared with servers of higher limits) is a 413 and its file is kept; a stored file
this server may not read is kept (503); ``--issue-token`` on a file without a final newline; ``python
-m SegAssistLib.server`` errors in one line; the client bounds a reply's mask box by the session's
image before decompressing it; ``uploaded`` says whether this request stored the image; uploads are
frames only (415 otherwise)."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
import sys
import threading
import tracemalloc
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator, Tuple

import numpy as np
import pytest
from test_server_fixtures import TOKENS, assert_error, make_volume, raw

from SegAssistLib.client import PayloadTooLargeError, ProtocolError, SegAssistClient
from SegAssistLib.image import Volume
from SegAssistLib.prompts import PointPrompt
from SegAssistLib.server.auth import hash_token, issue_token, parse_token_file
from SegAssistLib.transport import encode_frame

pytest_plugins = ["test_server_fixtures"]

REPO = Path(__file__).resolve().parents[2]
FRAME = {"Content-Type": "application/x-segassist-frame"}


def _frame(volume: Volume, codec: str = "zlib") -> bytes:
    geometry = {"spacing": list(volume.spacing), "origin": list(volume.origin),
                "direction": [float(x) for x in np.asarray(volume.direction).ravel()]}  # fmt: skip
    return encode_frame(volume.array, geometry, codec=codec)


# ------------------------------------------------------------------ 1. limits on a shared data directory


@pytest.mark.parametrize("limit", [{"max_voxels": 5_000}, {"max_axis": 40}])
@pytest.mark.parametrize("first", ["lookup", "session"])
def test_a_server_with_lower_limits_leaves_a_shared_stored_image_alone(server_factory, tmp_path, limit, first):
    data_dir = tmp_path / "shared"
    volume = make_volume(shape=(10, 12, 50), seed=91)  # 6000 voxels, an axis of 50
    image_id = volume.content_hash()
    big = server_factory.start(data_dir=data_dir, image_cache_bytes=0)
    small = server_factory.start(data_dir=data_dir, **limit)  # another process on the same folder
    assert raw(big, "POST", "/v1/images", data=_frame(volume), headers=FRAME).status_code == 201
    stored = data_dir / "images" / f"{image_id}.sgaf"
    before = stored.read_bytes()

    if first == "session":  # the whole frame is read
        error = assert_error(raw(small, "POST", "/v1/sessions", json={"image_id": image_id}), 413, "image_too_large")
    else:  # "is it held?": its header only
        error = assert_error(raw(small, "GET", f"/v1/images/{image_id}"), 413, "image_too_large")
    assert "above this server's limits" in error["message"] and error["details"]["limit"] == next(iter(limit.values()))
    assert stored.read_bytes() == before  # kept, untouched
    assert_error(raw(small, "GET", f"/v1/images/{image_id}"), 413, "image_too_large")  # and still answered so
    with pytest.raises(PayloadTooLargeError):  # the client is told what an upload there would be told
        SegAssistClient(small.url, TOKENS["alice"]).open_session(volume)
    assert stored.read_bytes() == before

    # the big server no longer holds it in memory (a cache of 0 keeps only the newest upload) ...
    assert raw(big, "POST", "/v1/images", data=_frame(make_volume(shape=(8, 8, 8), seed=92)),
               headers=FRAME).status_code == 201  # fmt: skip
    # ... and still serves it, from the file the small server left alone
    assert raw(big, "GET", f"/v1/images/{image_id}").status_code == 200
    assert raw(big, "POST", "/v1/sessions", json={"image_id": image_id}).status_code == 201


_READ_AS_UNPRIVILEGED = """
import sys
from pathlib import Path
from SegAssistLib.server.errors import ApiError
from SegAssistLib.server.images import ImageStore
store = ImageStore(Path(sys.argv[1]), 1 << 30, 10**9, 4096)
for call in (store.info, store.get):
    try:
        call(sys.argv[2])
    except ApiError as exc:
        print(call.__name__, exc.status_code, exc.code, exc.message)
    else:
        print(call.__name__, "answered")
"""


def test_a_stored_file_this_server_may_not_read_is_kept_and_answered_503(server_factory, tmp_path):
    """A data directory shared by servers under other accounts: a file another one wrote (``mkstemp``
    makes it 0600) is no damage, and this server never removes it."""
    data_dir = tmp_path / "shared"
    volume = make_volume(shape=(10, 12, 14), seed=93)
    image_id = volume.content_hash()
    server = server_factory.start(data_dir=data_dir)
    assert raw(server, "POST", "/v1/images", data=_frame(volume), headers=FRAME).status_code == 201
    server.stop()
    stored = data_dir / "images" / f"{image_id}.sgaf"
    before = stored.read_bytes()
    stored.chmod(0)

    command = [sys.executable, "-c", _READ_AS_UNPRIVILEGED, str(data_dir), image_id]
    if os.geteuid() == 0:  # root reads anything: drop the capabilities that let it
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv: cannot make a file unreadable")
        drop = "-dac_override,-dac_read_search"
        command = ["setpriv", f"--inh-caps={drop}", f"--bounding-set={drop}", *command]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert [line.split()[:3] for line in lines] == [["info", "503", "storage_unavailable"],
                                                    ["get", "503", "storage_unavailable"]]  # fmt: skip
    assert all("kept" in line and "Permission denied" in line for line in lines)
    stored.chmod(0o600)
    assert stored.read_bytes() == before


# ------------------------------------------------------------------ 2. --issue-token


def test_issue_token_puts_its_line_after_a_last_line_without_newline(tmp_path):
    path = tmp_path / "tokens.txt"
    alice_line = f"alice:sha256:{hash_token('a' * 40)}"
    path.write_text(alice_line)  # edited by hand: no final newline
    bob = issue_token(path, "bob")
    assert path.read_text().startswith(alice_line + "\n")  # the existing entry is as it was
    assert parse_token_file(path) == [("alice", hash_token("a" * 40)), ("bob", hash_token(bob))]
    carol = issue_token(path, "carol")  # a file that ends a line gets no blank line
    assert "\n\n" not in path.read_text() and path.read_text().endswith("\n")
    assert [user for user, _ in parse_token_file(path)] == ["alice", "bob", "carol"] and carol


# ------------------------------------------------------------------ 3. python -m SegAssistLib.server


def _damaged_store(folder: Path) -> Path:
    folder.mkdir()
    (folder / "images").mkdir()
    (folder / "labels").mkdir()
    (folder / "segassist.sqlite").write_bytes(b"not a database at all" * 100)
    return folder


@pytest.mark.parametrize("case", ["learn_store_with_files", "damaged_store", "images_is_a_file"])
def test_python_m_server_says_bad_settings_in_one_line(server_checkpoint, tmp_path, capsys, case):
    """Run in this process (``python -m SegAssistLib.server`` is ``sys.exit(main())``): a child would
    import torch again, seconds each."""
    from SegAssistLib.cli import main as segassist_main
    from SegAssistLib.server.cli import main as server_main

    if case == "learn_store_with_files":
        (tmp_path / "ls").mkdir()
        (tmp_path / "ls" / "notes.txt").write_text("hi")
        args, expected = ["--learn-store", str(tmp_path / "ls")], "notes.txt"
    elif case == "damaged_store":
        args, expected = ["--learn-store", str(_damaged_store(tmp_path / "ls"))], "damaged"
    else:
        (tmp_path / "dd").mkdir()
        (tmp_path / "dd" / "images").write_text("")
        args, expected = ["--data-dir", str(tmp_path / "dd")], "images"
    argv = ["--model", str(server_checkpoint), "--host", "127.0.0.1", "--port", "0", "--log-level", "warning", *args]
    said = []
    for run in (server_main, lambda argv: segassist_main(["serve", *argv])):
        assert run(argv) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and err.count("\n") == 1, err
        assert err.startswith("segassist serve: error: ") and expected in err
        said.append(err)
    assert said[0] == said[1]  # the same line from either entry point


# ------------------------------------------------------------------ 4. client: mask boxes bounded by the image

IMAGE_SHAPE = (8, 8, 8)
SESSION_ID, IMAGE_ID = "a" * 32, "b" * 64


def _zeros_payload(shape: Tuple[int, int, int]) -> dict:
    """An ArrayPayload of ``shape`` zeros, compressed without ever holding them (a few kB)."""
    import zstandard

    size = int(np.prod(shape))
    buffer = io.BytesIO()
    chunk = bytes(1 << 20)
    with zstandard.ZstdCompressor(level=3).stream_writer(buffer, closefd=False, size=size) as writer:
        for start in range(0, size, len(chunk)):
            writer.write(chunk[: min(len(chunk), size - start)])
    payload = buffer.getvalue()
    return {"dtype": "|u1", "shape": list(shape), "codec": "zstd", "nbytes": size,
            "payload_nbytes": len(payload), "data": base64.b64encode(payload).decode()}  # fmt: skip


class _Hostile(BaseHTTPRequestHandler):
    """A server that opens an 8**3 session, then answers with whatever box ``reply`` holds."""

    reply: dict = {}

    def log_message(self, *args) -> None:
        pass

    def _send(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _info(self) -> dict:
        return {"session_id": SESSION_ID, "image_id": IMAGE_ID, "shape": list(IMAGE_SHAPE), "device": "cpu",
                "n_prompts": 0, "can_undo": False, "can_redo": False, "state": "idle", "queue_length": 0,
                "idle_timeout_s": 60.0, "expires_in_s": 60.0}  # fmt: skip

    def do_GET(self) -> None:
        if self.path.endswith("/result"):
            self._send(200, {"session_id": SESSION_ID, "mask": self.reply["mask"], "n_prompts": 1})
        else:
            self._send(200, self._info())

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.path == "/v1/sessions":
            return self._send(201, self._info())
        self._send(200, {"session_id": SESSION_ID, **self.reply, "can_undo": True, "can_redo": False,
                         "n_prompts": 1, "latency_s": 0.0, "queue_wait_s": 0.0})  # fmt: skip

    def do_DELETE(self) -> None:
        self.send_response(204)
        self.end_headers()


@pytest.fixture
def hostile() -> Iterator[type]:
    handler = type("Handler", (_Hostile,), {"reply": {}})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    handler.url = f"http://127.0.0.1:{server.server_address[1]}"
    yield handler
    server.shutdown()
    server.server_close()


BOMB = (64, 1024, 1024)  # 64 MiB declared, a few kB sent


@pytest.mark.parametrize(
    "offset, shape, mask_shape, message",
    [
        ((0, 0, 0), BOMB, BOMB, "does not fit the image"),  # a box far larger than the image
        ((0, 0, 0), (8, 8, 8), BOMB, "holds an array of shape"),  # a box that fits, an array that does not
        ((-4, 0, 0), (4, 8, 8), (4, 8, 8), "does not fit the image"),  # numpy would count from the end
    ],
)
def test_a_mask_update_box_is_checked_against_the_image_before_it_is_decompressed(
    hostile, offset, shape, mask_shape, message
):
    hostile.reply = {"offset": list(offset), "shape": list(shape), "mask": _zeros_payload(mask_shape)}
    with SegAssistClient(hostile.url, "t" * 20) as client:
        session = client.open_session(IMAGE_ID)
        tracemalloc.start()
        try:
            with pytest.raises(ProtocolError) as refused:
                session.add_prompt(PointPrompt(position=(1, 1, 1)))
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 8 * 1024**2  # not the 64 MiB the reply declares
        assert message in str(refused.value)
        assert not session.result().any()  # the local mask is as it was


def test_a_result_larger_than_the_image_is_refused_before_it_is_decompressed(hostile):
    hostile.reply = {"mask": _zeros_payload(BOMB)}
    with SegAssistClient(hostile.url, "t" * 20) as client:
        session = client.open_session(IMAGE_ID)
        tracemalloc.start()
        try:
            with pytest.raises(ProtocolError) as refused:
                session.fetch_result()
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 8 * 1024**2
        assert "holds an array of shape" in str(refused.value)
        hostile.reply = {"mask": _zeros_payload(IMAGE_SHAPE)}  # the image's own shape is read as before
        assert session.fetch_result().shape == IMAGE_SHAPE


def test_a_box_that_fits_is_applied():
    from SegAssistLib.api_models import ArrayPayload, box_voxels

    box = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    voxels = box_voxels((1, 2, 3), (2, 3, 4), ArrayPayload.from_array(box), (3, 5, 7))
    assert np.array_equal(voxels, box)
    with pytest.raises(ValueError, match="does not fit the image of shape"):
        box_voxels((2, 2, 3), (2, 3, 4), ArrayPayload.from_array(box), (3, 5, 7))  # ends one past the image


# ------------------------------------------------------------------ 5. uploaded, 6. media type


def test_an_upload_over_a_damaged_stored_copy_says_it_stored_the_image(server_factory, tmp_path):
    data_dir = tmp_path / "data"
    volume = make_volume(shape=(10, 12, 14), seed=94)
    frame = _frame(volume, codec="none")  # no checksum of its own: only the hash finds a flipped byte
    server = server_factory.start(data_dir=data_dir)
    reply = raw(server, "POST", "/v1/images", data=frame, headers=FRAME)
    assert (reply.status_code, reply.json()["uploaded"]) == (201, True)
    server.stop()
    stored = data_dir / "images" / f"{volume.content_hash()}.sgaf"
    damaged = bytearray(stored.read_bytes())
    damaged[-100] ^= 0xFF
    stored.write_bytes(bytes(damaged))

    server = server_factory.start(data_dir=data_dir)
    reply = raw(server, "POST", "/v1/images", data=frame, headers=FRAME)
    assert (reply.status_code, reply.json()["uploaded"]) == (201, True)  # this request stored it
    assert stored.read_bytes() == frame
    reply = raw(server, "POST", "/v1/images", data=frame, headers=FRAME)
    assert (reply.status_code, reply.json()["uploaded"]) == (200, False)  # held now


@pytest.mark.parametrize("media", ["application/octet-stream", "text/plain", None])
def test_an_upload_that_is_not_typed_as_a_frame_is_415(shared_server, media):
    frame = _frame(make_volume(shape=(8, 8, 8), seed=95))
    headers = {"Content-Type": media} if media else {}
    error = assert_error(raw(shared_server, "POST", "/v1/images", data=frame, headers=headers), 415,
                         "unsupported_media_type")  # fmt: skip
    assert "application/x-segassist-frame" in error["message"]
