"""Happy paths through the real server and the real client: every prompt kind, upload once,
region replies, undo/redo/reset, prompt logs, info, close."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from test_server_fixtures import TOKENS, assert_error, make_volume, raw

from SegAssistLib.api_models import REQUEST_ID_HEADER
from SegAssistLib.client import SegAssistClient, SessionNotFoundError, SessionStateError
from SegAssistLib.prompts import BoxPrompt, LassoPrompt, MaskPrompt, PointPrompt, ScribblePrompt

pytest_plugins = ["test_server_fixtures"]

CENTRE = (24.0, 20.0, 12.0)  # (i, j, k) of the test volume's blob

PROMPTS = {
    "point+": PointPrompt(position=CENTRE),
    "point-": PointPrompt(position=(5.0, 5.0, 3.0), positive=False),
    "box2d": BoxPrompt(min_corner=(12.0, 10.0, 12.0), max_corner=(36.0, 30.0, 12.0)),
    "box3d": BoxPrompt(min_corner=(12.0, 10.0, 5.0), max_corner=(36.0, 30.0, 19.0)),
    "scribble+": ScribblePrompt(points=[(20.0, 18.0, 12.0), (28.0, 22.0, 12.0)]),
    "scribble-": ScribblePrompt(points=[(2.0, 2.0, 2.0), (8.0, 3.0, 2.0)], positive=False, width=2.0),
    "lasso+": LassoPrompt(points=[(14.0, 12.0, 12.0), (34.0, 12.0, 12.0), (34.0, 28.0, 12.0), (14.0, 28.0, 12.0)]),
    # drawn on a sagittal slice (i fixed): any orientation travels as its 2D slab, never a volume
    "lasso-": LassoPrompt(points=[(30.0, 2.0, 2.0), (30.0, 10.0, 2.0), (30.0, 10.0, 8.0)], positive=False),
}


def test_health_needs_no_token_and_info_describes_the_model(shared_server, alice):
    health = raw(shared_server, "GET", "/v1/health", token=None)
    assert health.status_code == 200 and health.json()["status"] == "ok"
    info = alice.info()
    assert info.model.name == "test"
    assert set(info.prompt_kinds) == {"point", "box", "scribble", "lasso", "mask"}
    assert info.patch_size == (64, 64, 64) and info.devices == ["cpu"]
    assert info.auth_required and info.user == "alice"
    assert info.limits.max_voxels == 400_000 and "zstd" in info.codecs
    caps = alice.capabilities()
    assert caps.name == "test" and caps.device == "cpu"


@pytest.mark.parametrize("name", sorted(PROMPTS))
def test_every_prompt_kind_updates_a_region_that_reassembles_to_the_full_result(alice, blob_volume, name):
    with alice.open_session(blob_volume) as session:
        update = session.add_prompt(PROMPTS[name])
        assert update.voxels.dtype == np.uint8 and update.voxels.ndim == 3
        lo = np.asarray(update.offset)
        assert np.all(lo >= 0) and np.all(lo + update.voxels.shape <= blob_volume.array.shape)
        assert update.info["reply_bytes"] > 0 and update.info["engine_s"] > 0
        assert np.array_equal(session.result(), session.fetch_result())
        assert session.can_undo and not session.can_redo


def test_mask_prompt_reply_is_only_the_changed_box(alice, blob_volume):
    mask = np.zeros(blob_volume.array.shape, np.uint8)
    mask[10:14, 20:25, 30:33] = 1
    with alice.open_session(blob_volume) as session:
        update = session.add_prompt(MaskPrompt.from_array(mask))
        assert update.offset == (10, 20, 30) and update.voxels.shape == (4, 5, 3)
        full = session.fetch_result()
        assert np.array_equal(full, mask) and np.array_equal(session.result(), mask)
        # nothing changes: an empty reply
        again = session.add_prompt(MaskPrompt.from_array(mask))
        assert again.voxels.size == 0


def test_a_sequence_of_region_replies_reassembles_exactly(alice, blob_volume):
    with alice.open_session(blob_volume) as session:
        for name in ("point+", "scribble+", "point-", "box3d", "lasso-"):
            session.add_prompt(PROMPTS[name])
            assert np.array_equal(session.result(), session.fetch_result()), name
        session.undo()
        session.undo()
        session.redo()
        assert np.array_equal(session.result(), session.fetch_result())
        session.reset()
        assert not session.result().any() and not session.fetch_result().any()
        session.undo()  # a reset is undoable
        assert np.array_equal(session.result(), session.fetch_result()) and session.result().any()


def test_undo_redo_reset_and_their_state_errors(alice, blob_volume):
    with alice.open_session(blob_volume) as session:
        assert not session.can_undo
        with pytest.raises(SessionStateError) as e:
            session.undo()
        assert e.value.status == 409 and e.value.code == "session_state"
        with pytest.raises(SessionStateError):
            session.redo()
        session.add_prompt(PROMPTS["point+"])
        first = session.result()
        session.add_prompt(PROMPTS["box2d"])
        session.undo()
        assert np.array_equal(session.result(), first) and session.can_redo
        session.redo()
        assert not session.can_redo
        status = session.status()
        assert status.n_prompts == 2 and status.state == "idle" and status.queue_position is None


def test_prompt_log_replays_to_the_same_mask(alice, blob_volume):
    with alice.open_session(blob_volume) as session:
        for name in ("point+", "scribble-", "lasso+"):
            session.add_prompt(PROMPTS[name])
        log = session.prompt_log()
        assert [p.kind for p in log.prompts] == ["point", "scribble", "lasso"]
        assert log.prompts[1].slab is not None  # a wide scribble: sent as its slab
        assert log.prompts[2].points is not None  # a lasso inside the image: sent as drawn
        assert log.prompts == session.local_prompts()
        expected = session.result()
    with alice.open_session(blob_volume, prompts=log.prompts) as replay:
        assert replay.status().n_prompts == 3
        assert np.array_equal(replay.result(), expected)


def test_an_image_is_uploaded_once(alice):
    vol = make_volume(seed=11)
    progress = []
    first = alice.upload_image(vol, progress=lambda sent, total: progress.append((sent, total)))
    assert first.uploaded and first.image_id == vol.content_hash()
    assert progress and progress[-1][0] == progress[-1][1]
    assert all(a[0] <= b[0] for a, b in zip(progress, progress[1:]))
    assert not alice.upload_image(vol).uploaded  # held already: stored nothing
    progress.clear()
    with alice.open_session(vol, progress=lambda s, t: progress.append(s)) as session:
        assert session.image_id == first.image_id
    assert progress == []  # opened by hash: no upload
    # another user's client sees the same content-addressed image without uploading
    with SegAssistClient(alice.url, TOKENS["bob"]) as bob:
        assert bob.image(first.image_id).shape == vol.array.shape
        with bob.open_session(first.image_id) as session:
            assert session.shape == vol.array.shape


def test_another_users_upload_never_changes_a_held_images_modality(shared_server, alice):
    """The image id leaves the modality out, and every session on the image reads the held volume
    (the engine normalises intensities by modality): a conflicting re-upload is refused, not applied."""
    from SegAssistLib.client import ImageConflictError, ImageNotFoundError
    from SegAssistLib.image import Volume

    vol = make_volume(seed=19)
    ct = Volume(vol.array, spacing=vol.spacing, modality="CT")
    assert alice.upload_image(ct).modality == "CT"
    with SegAssistClient(alice.url, TOKENS["bob"]) as bob:
        mr_volume = Volume(vol.array, spacing=vol.spacing, modality="MR")
        with pytest.raises(ImageConflictError) as refused:
            bob.upload_image(mr_volume)
        assert refused.value.status == 409 and refused.value.code == "image_conflict"
        assert "CT" in str(refused.value) and "POST /v1/sessions" in str(refused.value)

        def not_yet(image_id):  # bob's check ran just before alice's upload landed
            raise ImageNotFoundError("not held", status=404, code="image_not_found")

        bob.image, held_check = not_yet, bob.image
        assert bob.ensure_image(mr_volume) == ct.content_hash()  # held: the session names its modality
        bob.image = held_check
        assert bob.upload_image(vol).modality == "CT"  # no modality: the image as held, 200
        with bob.open_session(Volume(vol.array, spacing=vol.spacing, modality="MR")) as mr:  # MR for bob only
            sessions = shared_server.app.state.segassist.sessions._sessions
            assert sessions[mr.session_id].engine_session.modality == "MR"
            with alice.open_session(ct.content_hash()) as held:
                assert sessions[held.session_id].engine_session.modality == "CT"
    assert alice.image(ct.content_hash()).modality == "CT"


def test_open_session_uploads_when_the_server_lacks_the_image(alice):
    vol = make_volume(seed=12, dtype=np.int16)
    sent = []
    with alice.open_session(vol, progress=lambda s, t: sent.append(s)) as session:
        assert sent and session.image_id == vol.content_hash()
        info = alice.image(session.image_id)
        assert info.dtype == "<i2" and tuple(info.spacing) == vol.spacing


def test_big_endian_arrays_hash_like_the_server(alice):
    vol = make_volume(seed=13)
    big = make_volume(seed=13)
    big.array = vol.array.astype(">f4")
    assert alice.upload_image(big).image_id == vol.content_hash()


def test_closed_session_is_gone(alice, blob_volume):
    session = alice.open_session(blob_volume)
    session.close()
    session.close()  # closing twice is fine
    with pytest.raises(SessionNotFoundError) as e:
        session.add_prompt(PROMPTS["point+"])
    assert e.value.status == 404 and e.value.code == "session_not_found"


def test_sessions_belong_to_their_user(shared_server, alice, blob_volume):
    with alice.open_session(blob_volume) as session:
        with SegAssistClient(shared_server.url, TOKENS["bob"]) as bob, pytest.raises(SessionNotFoundError):
            bob.session(session.session_id)
        session.add_prompt(PROMPTS["point+"])
        attached = alice.session(session.session_id)
        assert attached.shape == session.shape
        assert np.array_equal(attached.result(), session.result())
        assert [p.kind for p in attached.local_prompts()] == ["point"]  # what recover() would replay


def test_a_repeated_request_id_is_answered_once(shared_server, alice, blob_volume):
    with alice.open_session(blob_volume) as session:
        path = f"/v1/sessions/{session.session_id}/prompts"
        body = {"prompt": PROMPTS["point+"].model_dump(mode="json")}
        headers = {REQUEST_ID_HEADER: "retry-1"}
        a = raw(shared_server, "POST", path, json=body, headers=headers)
        b = raw(shared_server, "POST", path, json=body, headers=headers)
        assert a.status_code == b.status_code == 200
        first, repeat = a.json(), b.json()
        first.pop("queue_wait_s"), repeat.pop("queue_wait_s")
        assert first == repeat and repeat["n_prompts"] == 1
        undo = {REQUEST_ID_HEADER: "retry-2"}
        raw(shared_server, "POST", f"/v1/sessions/{session.session_id}/undo", headers=undo)
        again = raw(shared_server, "POST", f"/v1/sessions/{session.session_id}/undo", headers=undo)
        assert again.status_code == 200  # the second undo is the first one's answer, not a 409


def test_a_repeated_session_create_opens_one_session(shared_server, alice, blob_volume):
    image_id = alice.ensure_image(blob_volume)
    headers = {REQUEST_ID_HEADER: "create-1"}
    a = raw(shared_server, "POST", "/v1/sessions", json={"image_id": image_id}, headers=headers)
    b = raw(shared_server, "POST", "/v1/sessions", json={"image_id": image_id}, headers=headers)
    assert a.status_code == 201 and a.json()["session_id"] == b.json()["session_id"]
    raw(shared_server, "DELETE", f"/v1/sessions/{a.json()['session_id']}")


def test_a_create_retried_while_the_first_still_opens_gets_the_same_session(shared_server, alice, blob_volume):
    """A client that lost its connection during a long replay retries with the same request id
    while the server is still opening the first session: one session, not an orphan and a twin."""
    image_id = alice.ensure_image(blob_volume)
    shape = blob_volume.array.shape
    replay = [PointPrompt(position=(shape[2] / 2, shape[1] / 2, shape[0] / 2)).model_dump()]  # about a second
    body = {"image_id": image_id, "prompts": replay}
    headers = {REQUEST_ID_HEADER: "create-while-opening"}
    start = threading.Barrier(2)
    replies = []

    def create():
        start.wait()
        replies.append(raw(shared_server, "POST", "/v1/sessions", json=body, headers=headers))

    threads = [threading.Thread(target=create) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r.status_code for r in replies] == [201, 201], [r.text for r in replies]
    ids = {r.json()["session_id"] for r in replies}
    assert len(ids) == 1 and replies[0].json()["n_prompts"] == len(replay)
    raw(shared_server, "DELETE", f"/v1/sessions/{ids.pop()}")


def test_replies_use_zlib_for_a_client_without_zstd(shared_server, alice, blob_volume):
    with alice.open_session(blob_volume) as session:
        reply = raw(
            shared_server,
            "POST",
            f"/v1/sessions/{session.session_id}/prompts",
            json={"prompt": PROMPTS["point+"].model_dump(mode="json")},
            headers={"X-SegAssist-Accept-Codecs": "zlib"},
        )
        assert reply.status_code == 200 and reply.json()["mask"]["codec"] == "zlib"


def _slab_log(volume) -> list:
    """The test volume's scribble and lasso prompts as the client sends them: slabs."""
    from SegAssistLib.prompts import to_slab

    strokes = [PROMPTS["scribble+"], PROMPTS["lasso+"], PROMPTS["lasso-"]]
    return [to_slab(p, volume.array.shape).model_dump(mode="json") for p in strokes]


def _watch_slab_decoding(monkeypatch) -> list:
    """Patches slab decoding to record, per call, whether it ran on an event loop's thread."""
    import asyncio

    from SegAssistLib import prompts

    on_loop, unpack = [], prompts._unpack_bits

    def watched(*args, **kwargs):
        try:
            asyncio.get_running_loop()
            on_loop.append(True)
        except RuntimeError:  # a thread-pool worker: no loop runs here
            on_loop.append(False)
        return unpack(*args, **kwargs)

    monkeypatch.setattr(prompts, "_unpack_bits", watched)
    return on_loop


def test_replayed_slabs_are_checked_off_the_event_loop(shared_server, alice, blob_volume, monkeypatch):
    """Checking a slab decompresses it (up to 4096 x 4096 bits): done while the body was validated,
    on the event loop, a small body of many slabs froze the server for every user."""
    image_id = alice.upload_image(blob_volume).image_id
    log = _slab_log(blob_volume)
    assert all("slab" in p for p in log)
    on_loop = _watch_slab_decoding(monkeypatch)
    reply = raw(shared_server, "POST", "/v1/sessions", json={"image_id": image_id, "prompts": log})
    assert reply.status_code == 201, reply.text
    assert reply.json()["n_prompts"] == 3
    assert on_loop and not any(on_loop)
    raw(shared_server, "DELETE", f"/v1/sessions/{reply.json()['session_id']}")
    # a bad prompt among them still answers like a body that fails validation
    bad = [*log, {**log[0], "slab": {**log[0]["slab"], "data": "AAAA"}}]
    reply = raw(shared_server, "POST", "/v1/sessions", json={"image_id": image_id, "prompts": bad})
    error = assert_error(reply, 422, "invalid_prompt")
    assert "prompts.3" in error["message"] and "slab" in error["message"]
    assert error["details"]["errors"][0]["loc"][:3] == ["body", "prompts", "3"]
    assert_error(raw(shared_server, "POST", "/v1/sessions", json={"image_id": image_id, "prompts": 5}),
                 422, "invalid_prompt")  # fmt: skip


def test_a_replay_above_the_prompt_limit_is_refused_before_a_slab_is_decoded(server_factory, monkeypatch):
    server = server_factory.start(max_prompts_per_session=3)
    volume = make_volume(seed=31)
    with SegAssistClient(server.url, TOKENS["alice"]) as client:
        image_id = client.upload_image(volume).image_id
    log = _slab_log(volume)
    on_loop = _watch_slab_decoding(monkeypatch)
    reply = raw(server, "POST", "/v1/sessions", json={"image_id": image_id, "prompts": log + log[:1]})
    error = assert_error(reply, 409, "prompt_limit")
    assert "4 prompts" in error["message"] and on_loop == []


def test_an_added_slab_prompt_is_checked_off_the_event_loop(shared_server, alice, blob_volume, monkeypatch):
    """As a replay's: a prompt's slab checked while the body was validated, on the event loop, cost
    every other request 33 to 42 ms per 2.9 kB body, even when the prompt was then refused."""
    on_loop = _watch_slab_decoding(monkeypatch)
    with alice.open_session(blob_volume) as session:
        path = f"/v1/sessions/{session.session_id}/prompts"
        for prompt in _slab_log(blob_volume):
            reply = raw(shared_server, "POST", path, json={"prompt": prompt})
            assert reply.status_code == 200, reply.text
        assert on_loop and not any(on_loop)
        # a bad one answers as before, like a body that fails validation
        log = _slab_log(blob_volume)
        bad = {**log[0], "slab": {**log[0]["slab"], "data": "AAAA"}}
        error = assert_error(raw(shared_server, "POST", path, json={"prompt": bad}), 422, "invalid_prompt")
        assert "prompt.scribble.slab" in error["message"]
        assert error["details"]["errors"][0]["loc"][:3] == ["body", "prompt", "scribble"]
        outside = {**log[0], "slab": {**log[0]["slab"], "offset": [30, 0, 0]}}
        assert_error(raw(shared_server, "POST", path, json={"prompt": outside}), 422, "prompt_outside_image")
        for not_a_prompt in (None, 5, "point"):
            assert_error(raw(shared_server, "POST", path, json={"prompt": not_a_prompt}), 422, "invalid_prompt")
        assert_error(raw(shared_server, "POST", path, json={}), 422, "invalid_request")
        assert session.status().n_prompts == 3


def test_added_prompts_are_checked_a_few_at_a_time(shared_server, alice, blob_volume, monkeypatch):
    """A flood of large slabs, each checked on its own pool thread, starved the event loop of the GIL
    (health took 100 ms instead of 10): the checks of added prompts share a few threads."""
    from concurrent.futures import ThreadPoolExecutor

    from SegAssistLib import prompts
    from SegAssistLib.server.routes_sessions import PROMPT_CHECK_THREADS

    unpack, lock, running, most = prompts._unpack_bits, threading.Lock(), [0], [0]

    def slow_unpack(*args, **kwargs):
        if threading.current_thread().name.startswith("segassist-infer"):  # the engine reads the prompt
            return unpack(*args, **kwargs)
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.1)  # a large slab's check
        with lock:
            running[0] -= 1
        return unpack(*args, **kwargs)

    monkeypatch.setattr(prompts, "_unpack_bits", slow_unpack)
    with alice.open_session(blob_volume) as session:
        path = f"/v1/sessions/{session.session_id}/prompts"
        body = {"prompt": _slab_log(blob_volume)[0]}
        with ThreadPoolExecutor(8) as pool:
            replies = list(pool.map(lambda _: raw(shared_server, "POST", path, json=body), range(8)))
    assert all(r.status_code == 200 for r in replies), [r.text for r in replies]
    assert most[0] == PROMPT_CHECK_THREADS


def test_the_prompt_log_carries_engine_settings_only_for_a_client_that_asks(alice, shared_server, blob_volume):
    """Schema 1.4 added the engine's settings to a log; a client reading 1.3 logs refuses a log with
    them (an unknown field), and the client reads the server's log to resynchronise. So they travel
    only to a client that asks (this one does), and the log still replays to the same mask."""
    from test_server_fixtures import raw

    with alice.open_session(blob_volume) as session:
        session.add_prompt(PROMPTS["point+"])
        log = session.prompt_log()
        plain = raw(shared_server, "GET", f"/v1/sessions/{session.session_id}/prompt-log").json()
        asked = raw(shared_server, "GET", f"/v1/sessions/{session.session_id}/prompt-log?engine=true").json()
    assert log.engine is not None and asked["engine"] == log.engine.model_dump()
    assert "engine" not in plain and {k: v for k, v in asked.items() if k != "engine"} == plain
    assert plain["image"] is None  # nor the image: a client that does not ask gets the log it always got


def test_the_prompt_log_names_its_image_for_a_client_that_asks(alice, shared_server, blob_volume):
    """The client asks for the image the session works on (grid and voxel digest), so a log it saves
    says which image its voxel coordinates belong to, as a log written by ``segassist segment`` does."""
    from test_server_fixtures import raw

    from SegAssistLib.image import voxel_digest
    from SegAssistLib.prompt_log import ImageInfo

    with alice.open_session(blob_volume) as session:
        session.add_prompt(PROMPTS["point+"])
        log = session.prompt_log()
        asked = raw(shared_server, "GET", f"/v1/sessions/{session.session_id}/prompt-log?image=true").json()
    assert log.image is not None and log.image.shape_ijk == blob_volume.shape_ijk
    assert log.image.sha256 == voxel_digest(blob_volume.array) and log.image.spacing == blob_volume.spacing
    assert log.image.origin == blob_volume.origin
    assert ImageInfo.model_validate(asked["image"]) == log.image and "engine" not in asked
