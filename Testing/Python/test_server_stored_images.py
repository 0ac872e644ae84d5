"""Images stored in a data directory are checked when a restarted server reads them: voxels that no
longer hash to the image's id are dropped (404, the client uploads again), never served; a data
directory that refuses the removal costs no 500. (An image above a since-lowered limit is answered 413
and left alone: test_server_review_fixes.)"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from test_server_fixtures import TOKENS, assert_error, make_volume, raw

from SegAssistLib.client import SegAssistClient
from SegAssistLib.image import Volume, voxel_digest
from SegAssistLib.transport import encode_frame

pytest_plugins = ["test_server_fixtures"]

FRAME = {"Content-Type": "application/x-segassist-frame"}


def _store(server_factory, data_dir: Path, volume: Volume, codec: str = "none") -> Path:
    """Upload ``volume`` (as a frame of ``codec``) to a server on ``data_dir``, stop it; the stored file."""
    server = server_factory.start(data_dir=data_dir)
    frame = encode_frame(volume.array, {"spacing": list(volume.spacing)}, codec=codec)
    reply = raw(server, "POST", "/v1/images", data=frame, headers=FRAME)
    assert reply.status_code == 201, reply.text
    server.stop()
    stored = data_dir / "images" / f"{volume.content_hash()}.sgaf"
    assert stored.is_file()
    return stored


def _served_digest(server, session_id: str) -> str:
    log = raw(server, "GET", f"/v1/sessions/{session_id}/prompt-log", params={"image": "true"}).json()
    return log["image"]["sha256"]


def test_a_stored_image_whose_voxels_changed_on_disk_is_dropped_not_served(server_factory, tmp_path):
    data_dir = tmp_path / "data"
    volume = make_volume(shape=(10, 12, 14), seed=81)
    image_id = volume.content_hash()
    stored = _store(server_factory, data_dir, volume)  # codec none: no checksum of its own
    data = bytearray(stored.read_bytes())
    data[-100] ^= 0x7F  # one voxel's byte, flipped while the server was down
    stored.write_bytes(bytes(data))

    server = server_factory.start(data_dir=data_dir)
    assert_error(raw(server, "POST", "/v1/sessions", json={"image_id": image_id}), 404, "image_not_found")
    assert not stored.exists()  # dropped: the next upload writes it anew
    assert_error(raw(server, "GET", f"/v1/images/{image_id}"), 404, "image_not_found")

    client = SegAssistClient(server.url, TOKENS["alice"])
    uploads = []
    with client.open_session(volume, progress=lambda sent, total: uploads.append(sent)) as session:
        assert uploads and session.image_id == image_id
        assert _served_digest(server, session.session_id) == voxel_digest(volume.array)
    assert stored.is_file()


def test_an_intact_stored_image_is_served_after_a_restart(server_factory, tmp_path):
    data_dir = tmp_path / "data"
    volume = make_volume(shape=(10, 12, 14), seed=82)
    stored = _store(server_factory, data_dir, volume, codec="zlib")
    server = server_factory.start(data_dir=data_dir)
    reply = raw(server, "POST", "/v1/sessions", json={"image_id": volume.content_hash()})
    assert reply.status_code == 201, reply.text
    assert _served_digest(server, reply.json()["session_id"]) == voxel_digest(volume.array)
    assert stored.is_file()


@pytest.fixture
def immutable():
    """Make a folder immutable (``chattr +i``: not even root may remove a file in it); undone at teardown."""
    if shutil.which("chattr") is None:
        pytest.skip("chattr is not available")
    made = []

    def make(folder: Path) -> None:
        if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0:
            pytest.skip("this file system or user cannot make a folder immutable")
        made.append(folder)

    yield make
    for folder in made:
        subprocess.run(["chattr", "-i", str(folder)], check=True)


def test_a_damaged_stored_image_the_data_directory_will_not_let_go_is_still_a_404(server_factory, tmp_path, immutable):
    data_dir = tmp_path / "data"
    volume = make_volume(shape=(10, 12, 14), seed=84)
    image_id = volume.content_hash()
    stored = _store(server_factory, data_dir, volume, codec="zlib")
    stored.write_bytes(stored.read_bytes()[:100])  # damaged while the server was down
    immutable(stored.parent)  # a read-only data directory: the damaged file cannot be removed

    server = server_factory.start(data_dir=data_dir)
    assert_error(raw(server, "GET", f"/v1/images/{image_id}"), 404, "image_not_found")
    assert_error(raw(server, "POST", "/v1/sessions", json={"image_id": image_id}), 404, "image_not_found")
    # uploaded again, the image is served from memory (the disk refuses its copy)
    with SegAssistClient(server.url, TOKENS["alice"]).open_session(volume) as session:
        assert session.image_id == image_id
        assert np.array_equal(session.fetch_result(), np.zeros(volume.array.shape, np.uint8))
