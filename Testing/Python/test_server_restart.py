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
    assert upload.status_code == 201 and upload.json()["image_id"] == image_id  # this request stored it
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


def _upload_frame(server, array: np.ndarray, **geometry) -> dict:
    from test_server_fixtures import raw

    from SegAssistLib.transport import encode_frame

    reply = raw(server, "POST", "/v1/images", data=encode_frame(array, geometry, codec="zlib"),
                headers={"Content-Type": "application/x-segassist-frame"})  # fmt: skip
    assert reply.status_code == 201, reply.text
    return reply.json()


def _count_decodes(monkeypatch, delay_s: float = 0.0) -> list:
    """Counts the stored frames the server decodes (each call still decodes, after ``delay_s``)."""
    import time

    from SegAssistLib.server import images as images_module

    calls = []
    decode = images_module.decode_image_frame

    def counted(*args, **kwargs):
        calls.append(1)
        time.sleep(delay_s)
        return decode(*args, **kwargs)

    monkeypatch.setattr(images_module, "decode_image_frame", counted)
    return calls


def test_is_an_image_held_is_answered_from_the_stored_header_alone(server_factory, tmp_path, monkeypatch):
    """GET /v1/images/{id} read and decoded the whole stored volume (once per request at once) to
    answer its shape and geometry; it now reads the frame's header, and answers as before."""
    from concurrent.futures import ThreadPoolExecutor

    from test_server_fixtures import assert_error, raw

    data_dir = tmp_path / "data"
    first = server_factory.start(data_dir=data_dir)
    rotation = [0.0, -1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0]
    rng = np.random.default_rng(5)
    uploads = [  # float16 is held as float32; a modality and a direction travel in the header
        _upload_frame(
            first,
            rng.normal(0, 300, (6, 7, 8)).astype(np.float16),
            spacing=[0.5, 0.7, 2.0],
            origin=[-10.0, 3.5, 7.0],
            direction=rotation,
            modality="CT",
        ),  # fmt: skip
        _upload_frame(first, rng.integers(0, 255, (5, 4, 3), dtype=np.uint8)),
        _upload_frame(first, rng.integers(-1000, 2000, (3, 9, 2)).astype("<i2"), modality="MR"),
    ]
    from_memory = [raw(first, "GET", f"/v1/images/{u['image_id']}").json() for u in uploads]
    assert from_memory == [{**u, "uploaded": False} for u in uploads]
    assert from_memory[0]["dtype"] == "<f4"
    first.stop()

    decodes = _count_decodes(monkeypatch)
    second = server_factory.start(data_dir=data_dir)
    paths = [f"/v1/images/{u['image_id']}" for u in uploads] * 3
    with ThreadPoolExecutor(6) as pool:
        replies = list(pool.map(lambda path: raw(second, "GET", path), paths))
    assert [r.json() for r in replies] == from_memory * 3
    assert decodes == []  # no stored image read whole
    assert not second.app.state.segassist.images._cache  # nor kept in memory

    # a stored frame shorter than its header declares is damaged: dropped, to be uploaded again
    stored = data_dir / "images" / f"{uploads[1]['image_id']}.sgaf"
    stored.write_bytes(stored.read_bytes()[:-1])
    assert_error(raw(second, "GET", f"/v1/images/{uploads[1]['image_id']}"), 404, "image_not_found")
    assert not stored.exists()


def test_concurrent_opens_on_a_stored_image_decode_it_once(server_factory, tmp_path, monkeypatch):
    """After a restart every open of a session on an image held on disk only read and decoded the
    whole frame by itself: eight opens at once, eight decoded copies. The first read is shared."""
    from concurrent.futures import ThreadPoolExecutor

    from test_server_fixtures import raw

    data_dir = tmp_path / "data"
    first = server_factory.start(data_dir=data_dir)
    image_id = SegAssistClient(first.url, TOKENS["alice"]).upload_image(make_volume(seed=35)).image_id
    first.stop()

    decodes = _count_decodes(monkeypatch, delay_s=0.5)  # slow: every open arrives while it reads
    second = server_factory.start(data_dir=data_dir)
    with ThreadPoolExecutor(6) as pool:
        replies = list(pool.map(lambda _: raw(second, "POST", "/v1/sessions", json={"image_id": image_id}), range(6)))
    assert [r.status_code for r in replies] == [201] * 6, [r.text for r in replies]
    assert len(decodes) == 1
    assert not second.app.state.segassist.images._loading
    for reply in replies:
        raw(second, "DELETE", f"/v1/sessions/{reply.json()['session_id']}")
