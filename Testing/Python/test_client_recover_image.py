"""Recovering a session opened by image id after the server lost the image too: a clear error that
keeps the prompts, a wrong volume refused before anything changes, the right one brings the mask back."""

from __future__ import annotations

import numpy as np
import pytest
from test_server_fixtures import TOKENS, make_volume

from SegAssistLib.client import (
    ClientError,
    ImageLostError,
    ImageMismatchError,
    ImageNotFoundError,
    SegAssistClient,
    SessionNotFoundError,
)
from SegAssistLib.image import Volume
from SegAssistLib.prompts import PointPrompt, ScribblePrompt

pytest_plugins = ["test_server_fixtures"]

PROMPTS = [
    PointPrompt(position=(24.0, 20.0, 12.0)),
    ScribblePrompt(points=[(20.0, 18.0, 12.0), (28.0, 22.0, 12.0)]),
    PointPrompt(position=(30.0, 25.0, 14.0), positive=False),
]
LATER = PointPrompt(position=(5.0, 5.0, 3.0), positive=False)


def _session_by_id(server, volume: Volume):
    """A session opened by the id of an uploaded image (it holds no volume), with prompts and an
    undo step, and the mask they made."""
    client = SegAssistClient(server.url, TOKENS["alice"], retries=1)
    image_id = client.upload_image(volume).image_id
    session = client.open_session(image_id)
    for prompt in PROMPTS:
        session.add_prompt(prompt)
    session.undo()  # the third is undone: recovery must not bring it back
    return client, session


def _state(session):
    return (session.session_id, [p.model_dump() for p in session.local_prompts()], session.result())


def _same_state(session, state) -> None:
    session_id, prompts, mask = state
    assert session.session_id == session_id
    assert [p.model_dump() for p in session.local_prompts()] == prompts
    assert np.array_equal(session.result(), mask)


def test_a_session_opened_by_id_recovers_with_the_volume_after_the_server_lost_the_image(server_factory):
    volume = make_volume(seed=41)
    first = server_factory.start()  # no data directory: a restart loses the images
    client, session = _session_by_id(first, volume)
    before = session.result()
    assert before.any()
    state = _state(session)

    first.stop()
    server_factory.start(port=first.port)
    with pytest.raises(SessionNotFoundError):
        session.add_prompt(LATER)

    # no volume: a clear error naming the way out, and nothing lost
    with pytest.raises(ImageLostError) as lost:
        session.recover()
    assert isinstance(lost.value, ImageNotFoundError) and isinstance(lost.value, ClientError)
    assert lost.value.status == 404 and lost.value.code == "image_not_found"
    message = str(lost.value)
    assert "recover(volume=...)" in message and session.image_id in message and "prompts (2)" in message
    _same_state(session, state)
    with pytest.raises(ImageLostError):  # as often as asked, still nothing lost
        session.recover()
    _same_state(session, state)

    # another image: refused before anything is sent
    uploads = []
    for wrong, why in [
        (make_volume(seed=42), "voxels or geometry"),
        (Volume(volume.array, spacing=(1.0, 1.0, 2.0)), "voxels or geometry"),  # same voxels, other spacing
        (volume.array, "voxels or geometry"),  # a bare array: default geometry, not the session's
        (make_volume(shape=(20, 40, 48), seed=41), "shape is [20, 40, 48]"),
    ]:
        with pytest.raises(ImageMismatchError, match="not this session's image") as refused:
            session.recover(progress=lambda sent, total: uploads.append(sent), volume=wrong)
        assert why in str(refused.value) and isinstance(refused.value, ValueError)
        assert isinstance(refused.value, ClientError)
        _same_state(session, state)
    assert uploads == []
    with pytest.raises(ImageNotFoundError):  # nothing was uploaded
        client.image(session.image_id)

    # the right volume: uploaded, the prompts replayed, the same mask
    assert session.recover(progress=lambda sent, total: uploads.append(sent), volume=volume) is session
    assert uploads and client.image(session.image_id).image_id == session.image_id
    assert session.session_id != state[0]
    assert np.array_equal(session.result(), before)
    assert np.array_equal(session.fetch_result(), before)
    assert [p.kind for p in session.prompt_log().prompts] == ["point", "scribble"]
    assert session.can_undo and not session.can_redo
    session.add_prompt(LATER)
    assert np.array_equal(session.result(), session.fetch_result())
    session.undo()
    assert np.array_equal(session.result(), before)

    # the volume is kept: the next loss of the image needs it no more
    server = server_factory.running[-1]
    server.stop()
    server_factory.start(port=server.port)
    uploads.clear()
    session.recover(progress=lambda sent, total: uploads.append(sent))
    assert uploads and np.array_equal(session.fetch_result(), before)
    session.close()
    client.close()


def test_a_volume_is_needed_only_when_the_server_lost_the_image(server_factory, tmp_path):
    volume = make_volume(seed=43)
    first = server_factory.start(data_dir=tmp_path / "data")  # the image survives a restart
    client, session = _session_by_id(first, volume)
    before = session.result()
    first.stop()
    server_factory.start(port=first.port, data_dir=tmp_path / "data")
    session.recover()  # no volume, none needed
    assert np.array_equal(session.fetch_result(), before)
    with pytest.raises(ImageMismatchError):  # checked even when no upload is needed
        session.recover(volume=make_volume(seed=44))
    assert np.array_equal(session.result(), before)
    session.close()
    client.close()


def test_move_to_refuses_another_image_before_changing_server_and_takes_the_right_one(server_factory):
    volume = make_volume(seed=45)
    first = server_factory.start()
    client, session = _session_by_id(first, volume)
    before = session.result()
    state = _state(session)
    first.stop()
    second = server_factory.start()  # another port, holding nothing
    other = SegAssistClient(second.url, TOKENS["alice"], retries=1)

    with pytest.raises(ImageMismatchError):
        session.move_to(other, volume=make_volume(seed=46))
    assert session.client is client  # still the first server's: nothing changed
    _same_state(session, state)

    with pytest.raises(ImageLostError, match=r"recover\(volume=\.\.\.\)"):
        session.move_to(other)
    _same_state(session, state)

    uploads = []
    session.move_to(other, lambda sent, total: uploads.append(sent), volume)
    assert session.client is other and uploads
    assert np.array_equal(session.result(), before)
    assert np.array_equal(session.fetch_result(), before)
    session.close()
    other.close()
    client.close()


def test_an_image_dropped_from_a_running_servers_memory_is_uploaded_again(server_factory):
    """Not only a restart: a server without a data directory forgets its least recently used image
    when its cache is full. The session sends it again (opened by id, with the volume given)."""
    volume = make_volume(seed=47)
    server = server_factory.start(image_cache_bytes=1)  # holds the newest image only
    client, session = _session_by_id(server, volume)
    before = session.result()
    session.close()
    client.upload_image(make_volume(seed=48))  # the session's image leaves the server's memory
    with pytest.raises(ImageNotFoundError):
        client.image(session.image_id)
    with pytest.raises(ImageLostError):
        session.recover()
    uploads = []
    session.recover(progress=lambda sent, total: uploads.append(sent), volume=volume)
    assert uploads and np.array_equal(session.fetch_result(), before)
    session.close()
    client.close()


def test_recovering_a_live_session_closes_the_one_it_replaces(server_factory):
    """recover() after a timeout, or to be safe, on a session the server still held opened a new one
    and left the old one open: each held one of the user's session slots until it expired, and a
    few recoveries later opening a session was refused (429). move_to() left one on the first server."""
    first = server_factory.start(max_sessions_per_user=2)
    client = SegAssistClient(first.url, TOKENS["alice"], retries=1)
    session = client.open_session(make_volume(seed=47))
    session.add_prompt(PROMPTS[0])
    before = session.result()
    replaced = []
    for _ in range(3):
        replaced.append(session.session_id)
        session.recover()
        assert np.array_equal(session.result(), before)
    for session_id in replaced:
        with pytest.raises(SessionNotFoundError):
            client.session(session_id)
    client.open_session(make_volume(seed=48)).close()  # the user's second slot is free

    second = server_factory.start()
    other = SegAssistClient(second.url, TOKENS["alice"], retries=1)
    on_first = session.session_id
    session.move_to(other)
    assert np.array_equal(session.result(), before)
    with pytest.raises(SessionNotFoundError):  # not left open on the server it left
        client.session(on_first)
    session.close()
    other.close()
    client.close()
