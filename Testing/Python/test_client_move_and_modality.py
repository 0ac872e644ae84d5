"""A move_to() that fails leaves the session on its server, usable; open_session() takes an image
uploaded meanwhile naming another modality; a session's modality is spelt as a Volume takes it."""

from __future__ import annotations

import numpy as np
import pytest
from test_server_fixtures import TOKENS, make_volume, raw

from SegAssistLib.client import (
    BackendUnavailableError,
    ImageNotFoundError,
    LimitExceededError,
    SegAssistClient,
    SessionNotFoundError,
)
from SegAssistLib.errors import ImageError
from SegAssistLib.image import Volume
from SegAssistLib.prompts import PointPrompt

pytest_plugins = ["test_server_fixtures"]

FIRST = PointPrompt(position=(24.0, 20.0, 12.0))
LATER = PointPrompt(position=(30.0, 22.0, 12.0))


def _server_modality(server, user: str, session_id: str) -> str:
    """The modality the server's engine session works with."""
    return server.app.state.segassist.sessions.get(user, session_id).engine_session.modality


def _open_with_a_prompt(server):
    client = SegAssistClient(server.url, TOKENS["alice"], retries=1)
    session = client.open_session(make_volume(seed=101))
    session.add_prompt(FIRST)
    return client, session


def test_a_move_to_a_server_that_cannot_be_reached_leaves_the_session_where_it_was(server_factory):
    first = server_factory.start()
    client, session = _open_with_a_prompt(first)
    gone = server_factory.start()
    gone.stop()  # an address where nothing listens any more
    dead = SegAssistClient(gone.url, TOKENS["alice"], retries=0)
    session_id, before = session.session_id, session.result()

    with pytest.raises(BackendUnavailableError):
        session.move_to(dead)
    assert session.client is client and session.session_id == session_id
    assert np.array_equal(session.result(), before)
    session.add_prompt(LATER)  # goes on, on the first server
    assert np.array_equal(session.result(), session.fetch_result())
    assert raw(first, "GET", f"/v1/sessions/{session_id}").json()["n_prompts"] == 2
    session.close()
    client.close()


def test_a_move_to_a_server_that_refuses_the_session_leaves_it_where_it_was(server_factory):
    first = server_factory.start()
    client, session = _open_with_a_prompt(first)
    full = server_factory.start(max_sessions_per_user=1)
    other = SegAssistClient(full.url, TOKENS["alice"], retries=1)
    taken = other.open_session(make_volume(seed=102))  # the user's only place there
    session_id = session.session_id

    with pytest.raises(LimitExceededError):
        session.move_to(other)
    assert session.client is client and session.session_id == session_id
    session.add_prompt(LATER)
    assert raw(first, "GET", f"/v1/sessions/{session_id}").json()["n_prompts"] == 2

    taken.close()
    before = session.result()
    session.move_to(other)  # now it moves, and the session it leaves is closed
    assert session.client is other and session.session_id != session_id
    assert np.array_equal(session.fetch_result(), before)
    with pytest.raises(SessionNotFoundError):
        client.session(session_id)
    session.close()
    other.close()
    client.close()


class _Racing(SegAssistClient):
    """A client whose upload comes second: another user uploads the same image, naming ``modality``,
    between this client's 404 and its upload (the race of two users opening the same new image)."""

    def __init__(self, url: str, token: str, other: SegAssistClient, modality: str) -> None:
        super().__init__(url, token)
        self.other, self.modality, self.raced = other, modality, False

    def upload_image(self, volume, progress=None):
        if not self.raced:
            self.raced = True
            v = volume if isinstance(volume, Volume) else Volume(volume)
            self.other.upload_image(Volume(v.array, v.spacing, v.origin, v.direction, modality=self.modality))
        return super().upload_image(volume, progress)


def test_open_session_takes_an_image_uploaded_meanwhile_naming_another_modality(shared_server):
    volume = Volume(make_volume(seed=103).array, spacing=(1.0, 1.0, 1.5), modality="MR")
    bob = SegAssistClient(shared_server.url, TOKENS["bob"])
    me = _Racing(shared_server.url, TOKENS["alice"], bob, "CT")
    with me.open_session(volume) as session:
        assert me.raced and me.image(session.image_id).modality == "CT"  # held as the first upload named it
        assert _server_modality(shared_server, "alice", session.session_id) == "MR"  # the session's own


@pytest.mark.parametrize("spelt", ["mr", "MRI", " Mr ", "mri"])
def test_a_sessions_modality_is_spelt_as_a_volume_takes_it(shared_server, alice, spelt):
    volume = make_volume(seed=104)
    with alice.open_session(volume, modality=spelt) as session:
        assert _server_modality(shared_server, "alice", session.session_id) == "MR"
    # and on the wire, for a client that sends it as it is
    image_id = alice.ensure_image(volume)
    reply = raw(shared_server, "POST", "/v1/sessions", json={"image_id": image_id, "modality": spelt})
    assert reply.status_code == 201, reply.text
    assert _server_modality(shared_server, "alice", reply.json()["session_id"]) == "MR"
    raw(shared_server, "DELETE", f"/v1/sessions/{reply.json()['session_id']}")


def test_a_modality_a_volume_refuses_is_refused_before_anything_is_sent(shared_server, alice):
    volume = make_volume(seed=105)
    with pytest.raises(ImageError, match="PET"):
        alice.open_session(volume, modality="PET")
    with pytest.raises(ImageNotFoundError):  # nothing was uploaded
        alice.image(volume.content_hash())
