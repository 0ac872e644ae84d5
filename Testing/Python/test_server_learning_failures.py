"""The learning loop over HTTP when something fails or is abandoned, and the effort a label records.

A real server on loopback with a datastore and the real client: a version this server cannot load is
refused before a rollback records it (and one promoted by a job is reported, not hidden), a client that
gave up on ``/next`` gets its case back instead of leaving it locked for hours, a label file the disk
refuses is the store's 503 with nothing saved, and a label counts every prompt its session took.
"""

from __future__ import annotations

import json
import socket
import threading
import time

import numpy as np
import pytest
from learning_fixtures import promote_base_weights, synthetic_case
from test_server_fixtures import TOKENS, assert_error, raw

from SegAssistLib.api_models import ArrayPayload
from SegAssistLib.client import SegAssistClient
from SegAssistLib.client.errors import ServerBusyError
from SegAssistLib.learning.registry import AdapterRegistry
from SegAssistLib.prompts import PointPrompt
from SegAssistLib.server.learning import MAX_CONCURRENT_RANKINGS

pytest_plugins = ["test_server_fixtures"]


@pytest.fixture
def learn_server(server_factory, tmp_path):
    return server_factory.start(learn_store=tmp_path / "store")


@pytest.fixture
def alice(learn_server):
    with SegAssistClient(learn_server.url, TOKENS["alice"], timeout=(5.0, 120.0)) as client:
        yield client


def _import(client: SegAssistClient, n: int, seed: int = 300):
    """``n`` cases: (case, volume, truth) each."""
    out = []
    for i in range(n):
        volume, truth = synthetic_case(seed + i)
        out.append((client.learning.import_image(volume, name=f"case_{i}"), volume, truth))
    return out


# ---------------------------------------------------------------------------------------- versions


def test_a_rollback_to_a_version_this_server_cannot_load_is_refused_and_changes_nothing(
    alice, learn_server, server_factory, tmp_path
):
    """v1's file was cut short after it served: the rollback answered 200 and marked v2 rolled back, while
    every session went on being answered by v2, the version the operator meant to take out of service."""
    base = alice.learning.status().engine_version
    registry = AdapterRegistry(tmp_path / "store")
    v1 = promote_base_weights(registry, server_factory.checkpoint)
    promote_base_weights(registry, server_factory.checkpoint, expected_current="v1")
    assert alice.learning.status().engine_version == f"{base}+v2"
    registry.file_path(v1).write_bytes(b"cut short by a full disk")
    before = registry.path.read_bytes()
    for body in ({"to": "v1", "expected_current": "v2"}, {}):  # named, and one step back
        error = assert_error(raw(learn_server, "POST", "/v1/learn/rollback", json=body), 409, "version_state")
        assert "version v1 cannot be loaded by this server" in error["message"], error
        assert "adapters/v1-full.pt" in error["message"] and str(tmp_path) not in error["message"], error
    assert registry.path.read_bytes() == before  # v2 current, promoted; no event recorded
    status = alice.learning.status()
    assert status.current_version["id"] == "v2" and status.engine_version == f"{base}+v2"
    assert status.version_error is None
    assert alice.learning.rollback("base") is None  # the base model needs no file: always possible
    assert alice.learning.status().engine_version == base


def test_a_promoted_version_the_workers_cannot_load_is_reported_until_one_they_can_is_current(
    alice, learn_server, tmp_path
):
    """A training job (another process) promotes a version this server cannot load: the workers keep the
    base model, and status showed current_version v1 beside the base model's engine_version, no error."""
    _import(alice, 1)
    before = alice.learning.status().engine_version
    registry = AdapterRegistry(tmp_path / "store")
    fields = {"base_identity": "0" * 16, "val_dice": 0.5, "incumbent": None, "incumbent_dice": 0.4}
    registry.add_version("lora", lambda path, _: path.write_bytes(b"not loadable here"), fields, promote=True,
                         expected_current=None)  # fmt: skip
    status = alice.learning.status()
    assert status.current_version["id"] == "v1" and status.engine_version == before
    assert status.version_error is not None and "v1" in status.version_error, status
    assert str(tmp_path) not in status.version_error
    info = raw(learn_server, "GET", "/v1/info").json()["model"]
    assert info["version"] == before and info["version_error"] == status.version_error
    assert alice.learning.rollback("base") is None  # back to what answers: nothing is wrong any more
    assert alice.learning.status().version_error is None
    assert raw(learn_server, "GET", "/v1/info").json()["model"]["version_error"] is None


# ---------------------------------------------------------------------------------------- next case


def test_next_hands_back_the_callers_own_unlabelled_case_before_locking_another(alice, learn_server):
    """A client whose /next reply never came (it gave up, the app closed) asked again and got a second case,
    the first staying locked to it, offered to nobody, for the lock's four hours."""
    cases = _import(alice, 4)
    first = alice.learning.next_case(strategy="first", proposal=False)  # the answer the client never saw
    again = alice.learning.next_case(strategy="first", lock_ttl_s=900.0)  # a new request id
    assert first.case.id == cases[0][0].id and again.case.id == first.case.id
    assert [c.id for c in alice.learning.cases() if c.locked_by == "alice"] == [first.case.id]
    assert not first.resumed and again.resumed and again.proposal is not None
    assert again.case.lock_expires == pytest.approx(time.time() + 900.0, abs=60.0)  # renewed as asked
    with SegAssistClient(learn_server.url, TOKENS["bob"]) as bob:  # another annotator: another case
        assert bob.learning.next_case(strategy="first", proposal=False).case.id == cases[1][0].id
    alice.learning.save_mask(first.case.id, cases[0][2], submit=False)  # a draft: the case is being labelled
    nxt = alice.learning.next_case(strategy="first", proposal=False)
    assert nxt.case.id == cases[2][0].id and not nxt.resumed
    peek = alice.learning.next_case(strategy="first", proposal=False, lock=False)  # no lock: a ranking as before
    assert peek.case.id == cases[3][0].id and not peek.resumed


def test_a_next_request_whose_caller_left_while_it_ranked_locks_nothing(alice, learn_server):
    """The ranking waits behind the model; the caller closes its connection meanwhile (a read timeout):
    the chosen case was locked to it all the same, and the caller never learned which."""
    _import(alice, 2)
    state = learn_server.app.state.segassist
    worker = state.pool.workers[0]
    gate = threading.Event()
    blocker = worker.submit("another-session", lambda engine: gate.wait(60))  # the model is busy
    body = json.dumps({"strategy": "uncertainty", "proposal": False}).encode()
    request = (
        f"POST /v1/learn/next HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKENS['alice']}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body  # no request id: nobody will ask for this answer again
    host, port = learn_server.url.rsplit("/", 1)[-1].split(":")
    try:
        with socket.create_connection((host, int(port)), timeout=10) as conn:
            conn.sendall(request)
            deadline = time.monotonic() + 30
            while not worker.waiting("learn:alice") and time.monotonic() < deadline:  # the ranking waits
                time.sleep(0.01)
            assert worker.waiting("learn:alice"), "the ranking should be waiting for the model"
        # the caller is gone; the model is free again
    finally:
        gate.set()
        blocker.result(10)
    slots = state.learning.ranking_slots()  # held by the request from before its ranking to after the lock
    deadline = time.monotonic() + 60
    while slots._value < MAX_CONCURRENT_RANKINGS:  # the request ran to its end
        assert time.monotonic() < deadline, "the abandoned ranking did not finish"
        time.sleep(0.05)
    assert [c.locked_by for c in alice.learning.cases()] == [None, None]


# ---------------------------------------------------------------------------------------- labels


def test_a_label_from_a_session_counts_every_prompt_it_took(alice, learn_server):
    """The effort: clicks undone and a reset count (SessionInfo.n_prompts); the label recorded only the
    prompts behind its final mask (1 here), the measure deciding whether adaptation helps."""
    (case, volume, truth), = _import(alice, 1)  # fmt: skip
    alice.learning.lock(case.id)
    centre = np.argwhere(truth).mean(0)[::-1]
    with alice.open_session(volume) as session:
        for shift in (0.0, 1.0, -1.0, 2.0):
            session.add_prompt(PointPrompt(position=tuple(float(x + shift) for x in centre)))
        session.undo()
        session.undo()
        session.reset()
        session.add_prompt(PointPrompt(position=tuple(float(x) for x in centre)))
        assert session.status().n_prompts == 5
        label = alice.learning.submit(case.id, session, seconds_spent=30.0, submit=False)
        assert label.n_interactions == 5
        log = learn_server.app.state.segassist.learning.store.prompt_log(label.id)
        assert len(log.prompts) == 1  # the provenance: the prompts behind the mask saved
        given = alice.learning.submit(case.id, session, n_interactions=3)  # a count the client gives wins
        assert given.n_interactions == 3


def test_a_label_file_the_disk_refuses_is_the_stores_503_and_nothing_is_saved(alice, learn_server, tmp_path):
    """A disk error writing the label file answered 500 internal_error ("a bug"), and the client marked the
    save outcome_unknown although nothing was saved. Here the case's label folder cannot be made: a file
    holds its name (a real failure of the file system, also for root, whom permissions never stop)."""
    (case, _, truth), = _import(alice, 1)  # fmt: skip
    alice.learning.lock(case.id)
    blocked = tmp_path / "store" / "labels" / case.id
    blocked.parent.mkdir(parents=True, exist_ok=True)
    blocked.write_bytes(b"")
    body = {"mask": ArrayPayload.from_array(truth.astype(np.uint8)).model_dump()}
    reply = raw(learn_server, "POST", f"/v1/learn/cases/{case.id}/labels", json=body)
    error = assert_error(reply, 503, "storage_unavailable")
    assert reply.headers.get("Retry-After") and "nothing was saved" in error["message"], error
    assert str(tmp_path) not in error["message"], error
    with pytest.raises(ServerBusyError, match="cannot write a label file") as exc:
        alice.learning.save_mask(case.id, truth)
    assert not exc.value.outcome_unknown and exc.value.code == "storage_unavailable"
    assert alice.learning.labels(case.id) == []
    assert sorted(p.name for p in (tmp_path / "store" / "labels").iterdir()) == [case.id]  # no file left behind
    case_now = alice.learning.case(case.id)
    assert (case_now.status, case_now.locked_by) == ("in_progress", "alice")
    blocked.unlink()  # the disk recovers: the same save works
    assert alice.learning.save_mask(case.id, truth).version == 1


def test_an_image_the_disk_refuses_is_a_storage_error_and_no_case(tmp_path):
    """The same for an import: the image file cannot be written (its folder's name taken by a file)."""
    from SegAssistLib.learning import Datastore
    from SegAssistLib.learning.errors import StoreAccessError

    store = Datastore(tmp_path / "store")
    (tmp_path / "store" / "images").mkdir(exist_ok=True)
    (tmp_path / "store" / "images").rmdir()
    (tmp_path / "store" / "images").write_bytes(b"")
    volume, _ = synthetic_case(5)
    with pytest.raises(StoreAccessError, match="cannot write the image") as exc:
        store.import_volume(volume, name="refused", user="alice")
    assert str(tmp_path) not in exc.value.public and "nothing was saved" in exc.value.public
    assert store.list_cases() == []
    store.close()
