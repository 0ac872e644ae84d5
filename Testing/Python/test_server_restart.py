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


def test_prompts_queued_when_the_server_stops_get_503_at_once(server_factory, monkeypatch):
    """uvicorn waits for open requests, cancels them after its grace period (a plain-text 500) and
    only then ran the app's shutdown, which failed queued jobs with the documented 503: a prompt
    queued behind others got the 500. The queues are drained when shutdown starts; the running
    prompt still finishes."""
    import threading
    import time

    import requests

    from SegAssistLib.engine import builtin

    add_prompt = builtin.BuiltinSession.add_prompt

    def slow(self, prompt):  # each prompt takes a while: the others wait in the queue
        time.sleep(1.5)
        return add_prompt(self, prompt)

    monkeypatch.setattr(builtin.BuiltinSession, "add_prompt", slow)
    server = server_factory.start()
    client = SegAssistClient(server.url, TOKENS["alice"])
    sessions = [client.open_session(make_volume(seed=61)) for _ in range(4)]
    headers = {"Authorization": f"Bearer {TOKENS['alice']}"}
    replies = {}

    def prompt(n: int) -> None:
        url = f"{server.url}/v1/sessions/{sessions[n].session_id}/prompts"
        body = {"prompt": {"kind": "point", "position": [24, 20, 12]}}
        replies[n] = requests.post(url, json=body, headers=headers, timeout=60)

    threads = [threading.Thread(target=prompt, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    time.sleep(0.5)
    started = time.monotonic()
    server.stop()
    for thread in threads:
        thread.join(60)
    assert time.monotonic() - started < 8  # not the 10 s grace period and then a cancel
    statuses = sorted(reply.status_code for reply in replies.values())
    assert statuses[0] == 200 and set(statuses[1:]) == {503}, statuses
    for reply in replies.values():
        if reply.status_code == 503:
            assert reply.json()["error"]["code"] == "shutting_down"
    client.close()
