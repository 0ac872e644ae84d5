"""A server restarted under a client: a clear error while it is down, then recovery."""

from __future__ import annotations

import numpy as np
import pytest
from test_server_fixtures import TOKENS, make_volume

from SegAssistLib.client import BackendUnavailableError, SegAssistClient, SessionNotFoundError
from SegAssistLib.prompts import PointPrompt, ScribblePrompt

pytest_plugins = ["test_server_fixtures"]

FIRST = [PointPrompt(position=(24.0, 20.0, 12.0)), ScribblePrompt(points=[(20.0, 18.0, 12.0), (28.0, 22.0, 12.0)])]
LATER = PointPrompt(position=(5.0, 5.0, 3.0), positive=False)


@pytest.mark.parametrize("keep_images", [True, False], ids=["data-dir", "memory-only"])
def test_server_restarted_under_a_client(server_factory, tmp_path, keep_images):
    data_dir = tmp_path / "data" if keep_images else None
    first = server_factory.start(data_dir=data_dir)
    client = SegAssistClient(first.url, TOKENS["alice"], retries=1)
    volume = make_volume(seed=31)
    session = client.open_session(volume)
    for prompt in FIRST:
        session.add_prompt(prompt)
    session.undo()
    session.redo()
    before = session.result()

    first.stop()
    with pytest.raises(BackendUnavailableError) as down:
        session.add_prompt(LATER)
    assert first.url in str(down.value)
    with pytest.raises(BackendUnavailableError):
        client.health()

    server_factory.start(port=first.port, data_dir=data_dir)  # the same address, a fresh process state
    assert client.health().status == "ok"
    with pytest.raises(SessionNotFoundError) as gone:
        session.add_prompt(LATER)
    assert "restarted" in str(gone.value)

    uploads = []
    session.recover(progress=lambda sent, total: uploads.append(sent))
    assert bool(uploads) is not keep_images  # with a data directory the image survived the restart
    assert np.array_equal(session.result(), before)
    assert np.array_equal(session.fetch_result(), before)
    assert [p.kind for p in session.prompt_log().prompts] == ["point", "scribble"]
    session.add_prompt(LATER)
    assert np.array_equal(session.result(), session.fetch_result())
    session.close()


def test_a_damaged_stored_image_is_dropped_and_uploaded_again(server_factory, tmp_path):
    data_dir = tmp_path / "data"
    volume = make_volume(seed=32)
    first = server_factory.start(data_dir=data_dir)
    client = SegAssistClient(first.url, TOKENS["alice"])
    image_id = client.upload_image(volume).image_id
    stored = data_dir / "images" / f"{image_id}.sgaf"
    assert stored.is_file() and not list((data_dir / "images").glob(".upload-*"))  # no temporary left
    first.stop()
    stored.write_bytes(stored.read_bytes()[:100])  # damaged while the server was down
    second = server_factory.start(data_dir=data_dir)
    client = SegAssistClient(second.url, TOKENS["alice"])
    uploads = []
    with client.open_session(volume, progress=lambda sent, total: uploads.append(sent)) as session:
        assert uploads and session.image_id == image_id
    assert stored.is_file()


def test_an_image_uploaded_again_over_a_damaged_file_opens_at_once(server_factory, tmp_path):
    """A plain "upload, then open" (no client library): the upload answered "already held" by the
    damaged file and kept nothing, and the open then found the file damaged: 404."""
    from test_server_fixtures import raw

    from SegAssistLib.transport import encode_frame

    data_dir = tmp_path / "data"
    volume = make_volume(seed=33)
    first = server_factory.start(data_dir=data_dir)
    image_id = SegAssistClient(first.url, TOKENS["alice"]).upload_image(volume).image_id
    first.stop()
    stored = data_dir / "images" / f"{image_id}.sgaf"
    stored.write_bytes(stored.read_bytes()[:100])
    second = server_factory.start(data_dir=data_dir)
    frame = encode_frame(volume.array, {"spacing": list(volume.spacing), "origin": list(volume.origin),
                                        "direction": np.asarray(volume.direction).ravel().tolist()})  # fmt: skip
    headers = {"Content-Type": "application/x-segassist-frame"}
    upload = raw(second, "POST", "/v1/images", data=frame, headers=headers)
    assert upload.status_code == 200 and upload.json()["image_id"] == image_id
    opened = raw(second, "POST", "/v1/sessions", json={"image_id": image_id})
    assert opened.status_code == 201, opened.text


def test_a_disk_that_refuses_the_upload_costs_only_the_copy_on_disk(server_factory, tmp_path, caplog):
    import errno

    data_dir = tmp_path / "data"
    server = server_factory.start(data_dir=data_dir)
    images = server.app.state.segassist.images

    def disk_full(image_id, frame):
        raise OSError(errno.ENOSPC, "No space left on device")

    images._write = disk_full
    client = SegAssistClient(server.url, TOKENS["alice"])
    volume = make_volume(seed=34)
    with client.open_session(volume) as session:  # uploaded, held in memory: the session works
        assert session.add_prompt(PointPrompt(position=(24.0, 20.0, 12.0))).voxels.size
    assert not list((data_dir / "images").glob("*.sgaf"))
    assert "could not be stored on disk" in caplog.text and "No space left" in caplog.text
