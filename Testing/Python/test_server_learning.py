"""The learning loop over HTTP: a real server on loopback with a datastore, the real client.

Cases are imported by content hash, the next case comes with the model's proposal, a corrected
session is submitted as a label version with its provenance, a real training job runs in its own
process, the promoted version answers the next prompt without a restart, and rollback returns to
the base model. Every bad request gets the one error shape.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import List, Tuple

import numpy as np
import pytest
from learning_fixtures import promote_base_weights, synthetic_case
from test_server_fixtures import TOKENS, assert_error, make_volume, raw, run_pipelined

from SegAssistLib.client import SegAssistClient
from SegAssistLib.client.errors import BadRequestError, LearningConflictError, LearningDisabledError, NotFoundError
from SegAssistLib.errors import ImageError
from SegAssistLib.image import Volume, voxel_digest
from SegAssistLib.learning.registry import AdapterRegistry
from SegAssistLib.prompts import PointPrompt

pytest_plugins = ["test_server_fixtures"]

N_CASES = 4


@pytest.fixture
def learn_server(server_factory, tmp_path):
    return server_factory.start(learn_store=tmp_path / "store", max_json_bytes=2_000_000)


@pytest.fixture
def clients(learn_server):
    alice = SegAssistClient(learn_server.url, TOKENS["alice"], timeout=(5.0, 120.0))
    bob = SegAssistClient(learn_server.url, TOKENS["bob"], timeout=(5.0, 120.0))
    yield alice, bob
    alice.close()
    bob.close()


@pytest.fixture
def imported(clients):
    alice, _ = clients
    cases = []
    for i in range(N_CASES):
        volume, truth = synthetic_case(100 + i)
        cases.append((alice.learning.import_image(volume, name=f"case_{i}"), volume, truth))
    return cases


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0, b > 0
    return 2.0 * np.logical_and(a, b).sum() / max(1, a.sum() + b.sum())


def test_without_a_datastore_the_learning_endpoints_say_how_to_enable_them(alice, shared_server):
    with pytest.raises(LearningDisabledError, match="--learn-store"):
        alice.learning.status()
    assert_error(raw(shared_server, "GET", "/v1/learn/cases"), 404, "learning_disabled")


def test_import_list_lock_and_download(clients, imported, learn_server):
    alice, bob = clients
    case, volume, _ = imported[0]
    assert case.status == "new" and case.imported_by == "alice" and tuple(case.shape) == volume.array.shape
    assert [c.name for c in alice.learning.cases(status="new")] == [f"case_{i}" for i in range(N_CASES)]
    assert alice.learning.status().cases["new"] == N_CASES
    with pytest.raises(LearningConflictError, match="already"):
        alice.learning.import_image(volume, name="again")  # the same image is one case

    locked = alice.learning.lock(case.id)
    assert locked.locked_by == "alice" and locked.status == "in_progress"
    with pytest.raises(LearningConflictError) as exc:
        bob.learning.lock(case.id)
    assert exc.value.code == "case_locked"
    assert alice.learning.unlock(case.id).locked_by is None

    downloaded = bob.learning.case_volume(case.id)
    np.testing.assert_array_equal(downloaded.array, volume.array)
    np.testing.assert_allclose(downloaded.spacing, volume.spacing)
    with pytest.raises(LearningConflictError, match="already"):
        bob.learning.import_image(downloaded, name="downloaded")  # the case's own image: the same case

    assert_error(
        raw(learn_server, "POST", "/v1/learn/cases", json={"image_id": "e" * 64, "name": "x"}), 404, "image_not_found"
    )
    for bad in ("xyz", "0" * 17, "0" * 15 + "%00", "0" * 15 + "G"):
        assert_error(raw(learn_server, "GET", f"/v1/learn/cases/{bad}"), 400, "invalid_id")
    image_id = alice.learning.case(case.id).content_hash
    for name in ("tab\there", "x" * 257):  # a bad name is a bad request, whichever check finds it
        assert_error(
            raw(learn_server, "POST", "/v1/learn/cases", json={"image_id": image_id, "name": name}),
            422,
            "invalid_request",
        )
    for escape in ("../../etc/passwd", "..%2F..%2Fetc"):  # decoded to another path: no such route
        assert_error(raw(learn_server, "GET", f"/v1/learn/cases/{escape}"), 404, "not_found")
    assert_error(raw(learn_server, "GET", "/v1/learn/cases/" + "0" * 16), 404, "case_not_found")
    assert_error(raw(learn_server, "GET", "/v1/learn/cases", token="wrong-token"), 401, "unauthorized")
    assert_error(raw(learn_server, "GET", "/v1/learn/jobs/20260101-000000-abcdef"), 404, "job_not_found")
    assert_error(raw(learn_server, "GET", "/v1/learn/jobs/2026-01-01"), 400, "invalid_id")


def test_next_case_proposal_correction_and_submission(clients, imported, learn_server):
    alice, bob = clients
    nxt = alice.learning.next_case(strategy="first")
    first, volume, truth = imported[0]
    assert nxt.case.id == first.id and nxt.case.locked_by == "alice"
    assert nxt.case.lock_expires > time.time() + 3.9 * 3600  # a work session, as a lock by hand
    assert nxt.proposal is not None and nxt.proposal.shape == truth.shape
    assert 0.0 <= nxt.reply.proposal.agreement <= 1.0
    with pytest.raises(LearningConflictError):
        bob.learning.lock(first.id)

    prompts = nxt.initial_prompts()
    assert len(prompts) == int(nxt.proposal.any())
    assert all(p.made_by == nxt.reply.proposal.engine_version for p in prompts)  # its maker travels with it
    with alice.open_session(nxt.image_id, prompts) as session:
        centre = np.argwhere(truth).mean(0)
        update = session.add_prompt(PointPrompt(position=tuple(float(x) for x in centre[::-1])))
        assert update.info["model_version"] == session.status().model_version
        label = alice.learning.submit(first.id, session, seconds_spent=42.0)
        result = session.result()
    assert label.submitted and label.user == "alice" and label.has_prompt_log
    assert label.n_interactions == len(prompts) + 1 and label.seconds_spent == 42.0
    stored = learn_server.app.state.segassist.learning.store.prompt_log(label.id)  # names the image it is on
    assert stored.image is not None and stored.image.shape_ijk == volume.shape_ijk
    assert stored.image.sha256 == voxel_digest(volume.array) and stored.image.spacing == volume.spacing
    assert len(stored.prompts) == len(prompts) + 1
    assert label.model == update.info["model_version"]
    assert label.n_foreground == int(np.count_nonzero(result))
    case = alice.learning.case(first.id)
    assert case.status == "submitted" and case.locked_by is None
    assert [v.id for v in alice.learning.labels(first.id)] == [label.id]

    # the next case skips the submitted one; a mask of the wrong shape is refused and saves nothing
    second = alice.learning.next_case(strategy="first", proposal=False, lock_ttl_s=900.0)
    assert second.case.lock_expires == pytest.approx(time.time() + 900.0, abs=60.0)  # the duration asked for
    assert second.case.id == imported[1][0].id and second.proposal is None
    path = f"/v1/learn/cases/{second.case.id}/labels"
    from SegAssistLib.api_models import ArrayPayload

    wrong = ArrayPayload.from_array(np.zeros((3, 3, 3), np.uint8)).model_dump()
    assert_error(raw(learn_server, "POST", path, json={"mask": wrong}), 422, "invalid_shape")
    assert_error(raw(learn_server, "POST", path, json={}), 422, "invalid_request")
    for ttl in (0, 25 * 3600):
        assert_error(raw(learn_server, "POST", "/v1/learn/next", json={"lock_ttl_s": ttl}), 422, "invalid_request")
    # bob cannot save a label on alice's locked case
    with pytest.raises(LearningConflictError):
        bob.learning.save_mask(second.case.id, imported[1][2])
    assert alice.learning.labels(second.case.id) == []


def test_prompts_of_open_sessions_are_answered_between_the_cases_a_ranking_scores(server_factory, tmp_path):
    """Scoring by uncertainty runs the model about six times per candidate; it once ran as one job,
    so every click of every other session waited for the whole ranking. Each candidate is a job of
    its own now: a click that arrives meanwhile is answered before the ranking ends."""
    from SegAssistLib.engine.builtin import load_default_engine

    calls: List[Tuple[int, ...]] = []  # the image shape of each prompt the engine answers, in order

    class _Logged:
        def __init__(self, engine) -> None:
            self.engine = engine

        def __getattr__(self, name):
            return getattr(self.engine, name)

        def open_session(self, volume, prompts=None):
            session = self.engine.open_session(volume, prompts)
            add_prompt = session.add_prompt

            def logged(prompt):
                time.sleep(0.05)  # a slower machine: the ranking takes seconds
                calls.append(tuple(volume.array.shape))
                return add_prompt(prompt)

            session.add_prompt = logged
            return session

    server = server_factory.start(
        learn_store=tmp_path / "store",
        engine_factory=lambda device: _Logged(load_default_engine(server_factory.checkpoint, device=device)),
    )
    alice = SegAssistClient(server.url, TOKENS["alice"], timeout=(5.0, 120.0))
    bob = SegAssistClient(server.url, TOKENS["bob"], timeout=(5.0, 120.0))
    for i in range(N_CASES):
        alice.learning.import_image(synthetic_case(200 + i)[0], name=f"case_{i}")
    case_shape = tuple(synthetic_case(200)[0].array.shape)
    bobs_volume = make_volume(shape=(20, 36, 44))
    bob.upload_image(bobs_volume)
    ranked = []
    ranking = threading.Thread(target=lambda: ranked.append(alice.learning.next_case(strategy="uncertainty")))
    ranking.start()
    deadline = time.monotonic() + 60
    while case_shape not in calls and time.monotonic() < deadline:
        time.sleep(0.01)
    with bob.open_session(bobs_volume) as session:
        session.add_prompt(PointPrompt(position=(22.0, 18.0, 10.0)))
    ranking.join(120)
    assert ranked and ranked[0].case.locked_by == "alice"
    bobs_click = calls.index(tuple(bobs_volume.array.shape))
    assert case_shape in calls[bobs_click + 1 :], "the click waited for the whole ranking"
    alice.close()
    bob.close()


def test_a_repeated_save_or_next_case_takes_effect_once(clients, imported, learn_server):
    """A client whose reply was lost sends the request again under the same request id: the repeat
    gets the first answer, not a second label version or a second locked case."""
    from SegAssistLib.api_models import REQUEST_ID_HEADER, ArrayPayload

    alice, _ = clients
    first, _, truth = imported[0]
    headers = {REQUEST_ID_HEADER: "save-once-1"}
    body = {"mask": ArrayPayload.from_array(truth.astype(np.uint8)).model_dump(), "submit": False}
    path = f"/v1/learn/cases/{first.id}/labels"
    replies = [raw(learn_server, "POST", path, json=body, headers=headers) for _ in range(2)]
    assert [r.status_code for r in replies] == [201, 201] and replies[0].json() == replies[1].json()
    assert len(alice.learning.labels(first.id)) == 1
    other = raw(learn_server, "POST", path, json=body, headers={REQUEST_ID_HEADER: "save-once-2"})
    assert other.status_code == 201 and len(alice.learning.labels(first.id)) == 2  # a new id: a new version

    nxt = {"strategy": "first", "proposal": False}
    picks = [raw(learn_server, "POST", "/v1/learn/next", json=nxt, headers={REQUEST_ID_HEADER: "next-once"})
             for _ in range(2)]  # fmt: skip
    assert picks[0].json()["case"]["id"] == picks[1].json()["case"]["id"]
    locked = [c for c in alice.learning.cases() if c.locked_by == "alice"]
    assert [c.id for c in locked] == [picks[0].json()["case"]["id"]]  # one case locked, not two

    # the client: a reply that times out after the server saved is asked for again under its id
    from SegAssistLib.client.errors import BackendTimeoutError

    real, calls = alice.http._send, []

    def reply_lost_once(method, path, json, body, headers, *args):
        response = real(method, path, json, body, headers, *args)
        calls.append(headers)
        if len(calls) == 1:
            raise BackendTimeoutError("no answer within the read timeout")
        return response

    alice.http._send = reply_lost_once
    try:
        label = alice.learning.save_mask(first.id, truth, submit=False)
    finally:
        alice.http._send = real
    assert len(calls) == 2 and calls[0] == calls[1]  # the same request id twice
    assert [v.id for v in alice.learning.labels(first.id)][-1] == label.id
    assert len(alice.learning.labels(first.id)) == 3


def test_a_reviewer_accepts_or_rejects_a_submitted_label_once(clients, imported, learn_server):
    """No endpoint (nor command) reviewed a label: no case could become ``reviewed``. The caller is
    the reviewer; a repeat under the same request id records one review."""
    from SegAssistLib.api_models import REQUEST_ID_HEADER

    alice, bob = clients
    (first, _, truth), (second, _, _), (third, _, _) = imported[0], imported[1], imported[2]
    label = alice.learning.save_mask(first.id, truth)
    alice.learning.save_mask(second.id, truth)

    reviewed = bob.learning.review(first.id, accepted=True, note="clean edges", label_id=label.id)
    assert reviewed.reviewer == "bob" and reviewed.accepted and reviewed.note == "clean edges"
    assert reviewed.label_id == label.id and reviewed.case.status == "reviewed"
    assert alice.learning.case(first.id).status == "reviewed"
    assert alice.learning.status().cases["reviewed"] == 1

    path = f"/v1/learn/cases/{second.id}/review"
    headers = {REQUEST_ID_HEADER: "review-once-1"}
    replies = [raw(learn_server, "POST", path, json={"accepted": False}, headers=headers) for _ in range(2)]
    assert [r.status_code for r in replies] == [201, 201] and replies[0].json() == replies[1].json()
    assert replies[0].json()["reviewer"] == "alice" and replies[0].json()["case"]["status"] == "in_progress"
    # once more under a new id: the case is in progress again, nothing to review
    assert_error(raw(learn_server, "POST", path, json={"accepted": False}), 409, "case_state")

    assert_error(raw(learn_server, "POST", f"/v1/learn/cases/{third.id}/review", json={"accepted": True}),
                 409, "case_state")  # never submitted  # fmt: skip
    alice.learning.lock(first.id)
    newer = alice.learning.save_mask(first.id, truth)
    with pytest.raises(LearningConflictError, match="no longer the latest"):
        bob.learning.review(first.id, accepted=True, label_id=label.id)
    assert bob.learning.review(first.id, accepted=False, label_id=newer.id).case.status == "in_progress"
    for bad in ({}, {"accepted": True, "label_id": "x"}, {"accepted": True, "note": "n" * 2001},
                {"accepted": True, "extra": 1}):  # fmt: skip
        assert_error(raw(learn_server, "POST", path, json=bad), 422, "invalid_request")
    assert_error(raw(learn_server, "POST", "/v1/learn/cases/" + "0" * 16 + "/review", json={"accepted": True}),
                 404, "case_not_found")  # fmt: skip


def test_a_label_mask_is_checked_against_the_case_before_it_is_decompressed(clients, imported, learn_server):
    """A few kilobytes of zstd may declare gigabytes: a mask of another shape or dtype is refused
    from its declaration, before anything is decompressed."""
    import base64

    import zstandard

    alice, _ = clients
    case, _, truth = imported[0]
    alice.learning.lock(case.id)
    path = f"/v1/learn/cases/{case.id}/labels"
    declared = (100, 1024, 1024)
    payload = zstandard.ZstdCompressor().compress(bytes(int(np.prod(declared)) * 8))
    bomb = {"dtype": "<f8", "shape": list(declared), "codec": "zstd", "nbytes": int(np.prod(declared)) * 8,
            "payload_nbytes": len(payload), "data": base64.b64encode(payload).decode()}  # fmt: skip
    assert len(payload) < 100_000
    message = assert_error(raw(learn_server, "POST", path, json={"mask": bomb}), 422, "invalid_shape")["message"]
    assert str(list(declared)) in message and str(list(case.shape)) in message
    wrong_dtype = {**bomb, "shape": list(case.shape), "nbytes": int(np.prod(case.shape)) * 8}
    assert_error(raw(learn_server, "POST", path, json={"mask": wrong_dtype}), 422, "unsupported_dtype")
    assert alice.learning.labels(case.id) == []
    for bad in (truth.astype(np.int16) * 300, -truth.astype(np.int16), truth.astype(np.float32) * 0.9):
        # were cast to uint8 by the client before the server could check them: 300 was saved as 44,
        # -1 as 255, and a soft 0.9 as an empty label, submitted
        with pytest.raises(ImageError, match="label values must be"):
            alice.learning.save_mask(case.id, bad)
    assert alice.learning.labels(case.id) == []
    assert alice.learning.save_mask(case.id, truth).submitted  # the client's uint8 mask of the case's shape
    other, _, other_truth = imported[1]
    alice.learning.lock(other.id)  # label values given as int16 are fine when they are 0-255
    assert alice.learning.save_mask(other.id, other_truth.astype(np.int16) * 2).n_foreground == int(other_truth.sum())


def test_a_next_case_that_fails_after_locking_leaves_the_case_unlocked(clients, imported, learn_server):
    """The case was locked, then its image could not be served: the caller never learned its id, and
    the case stayed locked to them (invisible to everyone) for the lock's four hours."""
    alice, _ = clients
    learning = learn_server.app.state.segassist.learning

    def unreadable(case_id):
        raise OSError("disk gone")

    learning.case_image = unreadable
    try:
        reply = raw(learn_server, "POST", "/v1/learn/next", json={"strategy": "first", "proposal": False, "lock": True})
        assert reply.status_code == 500
    finally:
        del learning.case_image
    assert [c.locked_by for c in alice.learning.cases()] == [None] * N_CASES
    assert alice.learning.next_case(strategy="first", proposal=False).case.id == imported[0][0].id


def test_one_damaged_case_is_passed_over_not_a_failure_for_everyone(clients, imported, learn_server, tmp_path):
    alice, _ = clients
    damaged = imported[0][0]
    (tmp_path / "store" / "images" / f"{damaged.id}.nii.gz").unlink()
    for strategy, proposal in (("first", False), ("random", False), ("uncertainty", True)):
        for seed in (0, 1):
            chosen = alice.learning.next_case(strategy=strategy, proposal=proposal, seed=seed, lock=True)
            assert chosen.case.id != damaged.id and chosen.image_id
            alice.learning.unlock(chosen.case.id)
    assert all(c.locked_by is None for c in alice.learning.cases())  # the damaged case was unlocked again
    for case, _, _ in imported[1:]:  # with no readable case left, the damage is the answer
        (tmp_path / "store" / "images" / f"{case.id}.nii.gz").unlink()
    reply = raw(learn_server, "POST", "/v1/learn/next", json={"strategy": "first", "proposal": False})
    assert "missing" in assert_error(reply, 500, "corrupt_data")["message"]


def test_a_case_image_is_recognised_from_the_store_without_reading_it(tmp_path):
    """Both hashes of a case's image (as imported, as served) are in the store: a label save after
    a restart does not read and hash the whole image; a store from before that still works."""
    from SegAssistLib.server.learning import LearningState
    from SegAssistLib.transport import wire_volume

    volume = Volume(np.arange(6 * 7 * 8, dtype=np.int16).reshape(6, 7, 8), spacing=(0.7, 0.7, 1.3),
                    origin=(-180.3, 12.1, 7.7))  # fmt: skip
    learning = LearningState(tmp_path / "store", tmp_path / "unused.pt")
    case = learning.store.import_volume(volume, name="ct", user="alice")
    served_id = wire_volume(learning.store.load_image(case.id)).content_hash()
    other_id = make_volume().content_hash()
    read = []
    real_load = learning.store.load_image
    learning.store.load_image = lambda case_id: read.append(case_id) or real_load(case_id)  # type: ignore[method-assign]
    assert learning.is_case_image(case.id, served_id) and learning.is_case_image(case.id, volume.content_hash())
    assert not learning.is_case_image(case.id, other_id)
    assert read == []
    with learning.store._write() as db:  # as a store written before the table held the served hash
        db.execute("DELETE FROM image_hashes")
    assert learning.is_case_image(case.id, served_id) and not learning.is_case_image(case.id, other_id)
    assert learning.is_case_image(case.id, volume.content_hash())
    assert read == [case.id]  # read once, then known
    learning.close()


def test_a_session_on_another_image_is_not_saved_as_a_label(clients, imported, learn_server):
    alice, _ = clients
    (first, first_volume, truth), (second, second_volume, _) = imported[0], imported[1]
    assert first_volume.array.shape == second_volume.array.shape  # same shape: only the voxels differ
    with alice.open_session(first_volume) as session:
        session.add_prompt(PointPrompt(position=tuple(float(x) for x in np.argwhere(truth).mean(0)[::-1])))
        with pytest.raises(BadRequestError) as exc:
            alice.learning.submit(second.id, session)
        assert exc.value.code == "image_mismatch" and second.id in str(exc.value)
        assert alice.learning.labels(second.id) == [] and alice.learning.case(second.id).status == "new"
        label = alice.learning.submit(first.id, session)  # the uploaded image is the case's own
    assert label.submitted and [v.id for v in alice.learning.labels(first.id)] == [label.id]


def test_rollback_refuses_a_version_made_for_other_base_weights(clients, learn_server, tmp_path):
    alice, _ = clients
    registry = AdapterRegistry(tmp_path / "store")
    fields = {"base_identity": "0" * 16, "val_dice": 0.5, "incumbent": None, "incumbent_dice": 0.4}
    registry.add_version("lora", lambda path, _: path.write_bytes(b"weights of another base model"),
                         fields, promote=True, expected_current=None)  # fmt: skip
    assert alice.learning.rollback("base") is None
    with pytest.raises(LearningConflictError, match="base model") as exc:
        alice.learning.rollback("v1")
    assert exc.value.code == "version_state" and alice.learning.versions().current is None


def test_a_rollback_from_a_version_a_job_replaced_meanwhile_is_refused(clients, learn_server, tmp_path):
    """The operator saw v1 current and asked for one step back while a job promoted v2: the server went back
    from v2 to v1, putting the version meant to go back in service. With the version the operator saw
    (``expected_current``) it answers 409 ``version_state`` naming both and changes nothing."""
    alice, _ = clients
    learning = learn_server.app.state.segassist.learning
    registry = AdapterRegistry(tmp_path / "store")

    def promote(expected_current):  # a version the server can load (a rollback to it loads it first)
        return promote_base_weights(registry, learning.checkpoint, expected_current)

    promote(None)
    seen = alice.learning.versions().current
    assert seen == "v1"  # the operator decides to take v1 out of service ...
    promote("v1")  # ... and a training job promotes v2 before the rollback arrives
    before = registry.path.read_bytes()
    with pytest.raises(LearningConflictError, match="the current version is v2, not v1 as expected") as exc:
        alice.learning.rollback(expected_current=seen)
    assert exc.value.code == "version_state"
    for body in ({"expected_current": "v1"}, {"to": "base", "expected_current": "v1"},
                 {"to": "v1", "expected_current": "base"}):  # fmt: skip
        error = assert_error(raw(learn_server, "POST", "/v1/learn/rollback", json=body), 409, "version_state")
        assert "the current version is v2, not" in error["message"], error
    assert_error(raw(learn_server, "POST", "/v1/learn/rollback", json={"expected_current": "../v2"}), 422,
                 "invalid_request")  # fmt: skip
    assert registry.path.read_bytes() == before  # nothing changed
    done = alice.learning.rollback_detailed(expected_current="v2")  # from the version current now: done
    assert (done.current, done.previous) == ("v1", "v2")
    reply = raw(learn_server, "POST", "/v1/learn/rollback", json={"to": "base", "expected_current": "v1"})
    assert reply.status_code == 200 and reply.json() == {"current": None, "previous": "v1"}, reply.text
    reply = raw(learn_server, "POST", "/v1/learn/rollback", json={"to": "v2"})  # without a check, as before
    assert reply.status_code == 200 and reply.json() == {"current": "v2", "previous": None}, reply.text


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity", "2"])
def test_training_settings_out_of_range_are_refused(learn_server, value):
    body = f'{{"kind": "salt", "min_improvement": {value}}}'
    reply = raw(learn_server, "POST", "/v1/learn/train", data=body, headers={"Content-Type": "application/json"})
    assert "min_improvement" in assert_error(reply, 422, "invalid_request")["message"]


@pytest.mark.parametrize(
    "path, body, field",
    [
        ("/v1/learn/train", '{"kind": "salt", "seed": -1}', "seed"),
        ("/v1/learn/train", '{"kind": "salt", "seed": 1180591620717411303424}', "seed"),
        ("/v1/learn/train", '{"kind": "salt", "time_budget_s": 1e300}', "time_budget_s"),
        ("/v1/learn/next", '{"strategy": "random", "proposal": false, "seed": -1}', "seed"),
        ("/v1/learn/next", '{"strategy": "random", "proposal": false, "seed": true}', "seed"),  # was seed 1
        ("/v1/learn/train", '{"kind": "salt", "seed": true}', "seed"),
        ("/v1/learn/cases/0123456789abcdef/labels", '{"n_interactions": 9223372036854775808}', "n_interactions"),
        ("/v1/learn/train", '{"kind": "salt", "batch_size": 1000000000}', "batch_size"),  # exhausted memory
        ("/v1/learn/train", '{"kind": "salt", "batch_size": 65}', "batch_size"),
        ("/v1/learn/train", '{"kind": "salt", "val_clicks": 1000000000}', "val_clicks"),
        ("/v1/learn/train", '{"kind": "salt", "val_clicks": 21}', "val_clicks"),
    ],
)
def test_seeds_and_budgets_out_of_range_are_refused_not_a_server_error(learn_server, path, body, field):
    reply = raw(learn_server, "POST", path, data=body, headers={"Content-Type": "application/json"})
    assert field in assert_error(reply, 422, "invalid_request")["message"]


def test_training_batch_size_and_validation_clicks_have_upper_bounds_above_their_defaults():
    from pydantic import ValidationError

    from SegAssistLib.api_learning import MAX_TRAIN_BATCH_SIZE, MAX_VAL_CASES, MAX_VAL_CLICKS, TrainRequest
    from SegAssistLib.learning.trainer import AdapterTrainConfig

    defaults = AdapterTrainConfig()
    assert defaults.batch_size < MAX_TRAIN_BATCH_SIZE == 64 and defaults.val_clicks < MAX_VAL_CLICKS == 20
    assert defaults.max_val_cases < MAX_VAL_CASES == 200
    assert TrainRequest(batch_size=64, val_clicks=20, max_val_cases=200).settings() == {
        "kind": "salt", "batch_size": 64, "val_clicks": 20, "max_val_cases": 200}  # fmt: skip
    bounds = (("batch_size", MAX_TRAIN_BATCH_SIZE), ("val_clicks", MAX_VAL_CLICKS), ("max_val_cases", MAX_VAL_CASES))
    for name, bound in bounds:
        with pytest.raises(ValidationError, match=rf"(?s){name}.*less than or equal to {bound}"):
            TrainRequest(**{name: bound + 1})


def test_a_case_list_offset_beyond_sqlites_integers_is_refused_not_a_server_error(learn_server):
    for offset in ("9223372036854775808", "99999999999999999999999"):  # OverflowError in SQLite: a 500
        reply = raw(learn_server, "GET", f"/v1/learn/cases?offset={offset}")
        assert "offset" in assert_error(reply, 422, "invalid_request")["message"]
    assert raw(learn_server, "GET", "/v1/learn/cases?offset=9223372036854775807").status_code == 200


def test_a_damaged_store_is_the_servers_fault_not_the_request(clients, imported, learn_server, tmp_path):
    alice, _ = clients
    case, _, _ = imported[0]
    (tmp_path / "store" / "images" / f"{case.id}.nii.gz").unlink()
    reply = raw(learn_server, "GET", f"/v1/learn/cases/{case.id}/image")
    assert "missing" in assert_error(reply, 500, "corrupt_data")["message"]


def test_a_damaged_image_does_not_fail_the_diversity_ranking_for_everyone(clients, learn_server, tmp_path):
    """Once a case was submitted, diversity read every candidate's image and every submitted case's
    before any per-case error handling: one lost image file failed ``next`` (500) for the whole team."""
    alice, _ = clients
    cases = []
    for i in range(5):  # images no other test ranked: the server caches embeddings by the file's checksum
        volume, truth = synthetic_case(700 + i)
        cases.append((alice.learning.import_image(volume, name=f"case_{i}"), truth))
    for case, truth in cases[:2]:
        assert alice.learning.save_mask(case.id, truth).submitted  # taken up: candidates are measured against them
    images = tmp_path / "store" / "images"
    (images / f"{cases[0][0].id}.nii.gz").unlink()  # a submitted case's image lost
    (images / f"{cases[4][0].id}.nii.gz").unlink()  # a candidate's image lost
    readable = {cases[2][0].id, cases[3][0].id}
    for strategy in ("diversity", "uncertainty"):
        body = {"strategy": strategy, "proposal": False, "lock": False}
        reply = raw(learn_server, "POST", "/v1/learn/next", json=body)
        assert reply.status_code == 200, reply.text
        assert reply.json()["case"]["id"] in readable


def test_a_rollback_to_a_version_whose_file_is_gone_names_it_from_the_store(learn_server, tmp_path):
    """The 409 once named the file by the server's absolute path: where its files are is not the client's
    business (the registry's own errors name ``adapters/...``)."""
    learning = learn_server.app.state.segassist.learning
    registry = AdapterRegistry(tmp_path / "store")
    fields = {"base_identity": learning.base_identity(), "val_dice": 0.5, "incumbent": None, "incumbent_dice": 0.4}
    record = registry.add_version("salt", lambda path, _: path.write_bytes(b"weights"), fields, promote=True,
                                  expected_current=None)  # fmt: skip
    registry.file_path(record).unlink()
    error = assert_error(raw(learn_server, "POST", "/v1/learn/rollback", json={"to": record.id}), 409, "version_state")
    assert f"the file of version {record.id} is missing" in error["message"]
    assert f"adapters/{record.file}" in error["message"] and str(tmp_path) not in error["message"]



def test_a_failed_jobs_status_shows_no_server_path(learn_server, tmp_path):
    """A job's status is served as its worker wrote it: a failure named the server's files by their
    absolute paths ("adapter file not found: /srv/.../store/adapters/v1-lora.pt"), and a dead worker's
    log tail carried its traceback's. Here a job folder as an older release left it, and a worker that
    died mid-traceback: the replies name files from the store, or by their last part."""
    import json

    from SegAssistLib.learning.jobs import jobs_folder

    store = tmp_path / "store"
    older = jobs_folder(store) / "20260101-000000-0dd000"
    older.mkdir(parents=True)
    (older / "status.json").write_text(json.dumps({
        "state": "failed", "phase": "finished", "error": f"adapter file not found: {store}/adapters/v1-lora.pt",
    }))  # fmt: skip
    dead = jobs_folder(store) / "20260101-000001-dead00"
    dead.mkdir()
    (dead / "status.json").write_text(json.dumps({"state": "running", "phase": "training", "pid": 2**22 + 7}))
    (dead / "worker.log").write_text(
        f"Traceback (most recent call last):\n  File \"{tmp_path}/lib/trainer.py\", line 9, in run\n"
        f"OSError: [Errno 5] Input/output error: '{store}/images/0123456789abcdef.nii.gz'\n"
    )
    replies = {path: raw(learn_server, "GET", path) for path in (
        "/v1/learn/jobs", f"/v1/learn/jobs/{older.name}", f"/v1/learn/jobs/{dead.name}", "/v1/learn/status"
    )}  # fmt: skip
    for path, reply in replies.items():
        assert reply.status_code == 200, (path, reply.text)
        assert str(tmp_path) not in reply.text, (path, reply.text)
    assert replies[f"/v1/learn/jobs/{older.name}"].json()["error"] == "adapter file not found: adapters/v1-lora.pt"
    died = replies[f"/v1/learn/jobs/{dead.name}"].json()
    assert died["state"] == "failed" and "images/0123456789abcdef.nii.gz" in died["log_tail"]


def test_a_damaged_registry_is_the_servers_fault_and_rollback_to_base_recovers(learn_server, tmp_path):
    registry = tmp_path / "store" / "adapters" / "registry.json"
    registry.parent.mkdir(parents=True, exist_ok=True)
    registry.write_text("{not json")
    for path in ("/v1/learn/status", "/v1/learn/versions"):
        error = assert_error(raw(learn_server, "GET", path), 500, "corrupt_data")
        assert "adapters/registry.json is not valid JSON" in error["message"]
        assert str(tmp_path) not in error["message"]  # the server's folders are not the client's business
    assert raw(learn_server, "POST", "/v1/learn/rollback", json={"to": "v1"}).status_code == 500
    reply = raw(learn_server, "POST", "/v1/learn/rollback", json={"to": "base"})
    assert reply.status_code == 200, reply.text
    versions = raw(learn_server, "GET", "/v1/learn/versions").json()
    assert versions["current"] is None and versions["versions"] == []
    assert [e["action"] for e in versions["events"]] == ["set_aside", "rollback"]
    aside = sorted(registry.parent.glob("registry.damaged-*.json"))
    assert len(aside) == 1 and aside[0].read_text() == "{not json"  # kept for whoever repairs it


def _submit_truths(alice, imported) -> None:
    for case, _, truth in imported:
        label = alice.learning.save_mask(case.id, truth, seconds_spent=10.0)
        assert label.submitted and label.model is None and not label.has_prompt_log  # drawn elsewhere


def test_training_job_promotes_a_version_that_answers_without_restart(clients, imported, learn_server):
    alice, bob = clients
    _submit_truths(alice, imported)
    base_version = alice.info().model.version
    extra_volume, _ = synthetic_case(200)
    extra = alice.learning.import_image(extra_volume, name="annotated while a version is promoted")
    alice.learning.lock(extra.id)
    annotating = alice.open_session(extra_volume)
    annotating.add_prompt(PointPrompt(position=(14.0, 14.0, 10.0)))
    with alice.open_session(imported[0][1]) as session:
        session.add_prompt(PointPrompt(position=(14.0, 14.0, 10.0)))
        assert session.status().model_version == base_version

        # min_improvement -1: promote whatever the validation says (this test is about the plumbing)
        job = alice.learning.train(kind="lora", max_steps=4, time_budget_s=120, val_clicks=1, min_improvement=-1.0)
        assert job.state in ("starting", "running")
        with pytest.raises(LearningConflictError) as exc:
            bob.learning.train(kind="salt", max_steps=4)
        assert exc.value.code == "training_busy"
        seen = []
        final = alice.learning.wait_for_job(job.job_id, timeout=300, poll_s=0.2, progress=seen.append)
        assert final.state == "done", final
        assert seen and seen[-1].state == "done"
        assert [j.job_id for j in alice.learning.jobs()] == [job.job_id]
        # the finished worker is collected, not left a zombie: its /proc entry goes once the server reaps
        # it (the reaper thread may run a moment after the worker exits on a loaded machine: polled)
        stat = Path(f"/proc/{final.model_extra['pid']}/stat")
        deadline = time.monotonic() + 60
        alice.learning.jobs()
        while stat.exists() and time.monotonic() < deadline:
            time.sleep(0.1)  # still exiting, or exited and not reaped yet
        assert not stat.exists(), f"worker {final.model_extra['pid']} was not reaped within 60 s"

        versions = alice.learning.versions()
        assert versions.current == "v1" and versions.versions[0]["kind"] == "lora"
        # a label keeps the version that answered its prompts, not the one swapped in since
        annotating.fetch_result()
        draft = alice.learning.submit(extra.id, annotating, submit=False)
        assert (draft.model, draft.adapter_version) == (base_version, None)
        annotating.add_prompt(PointPrompt(position=(15.0, 14.0, 10.0)))
        label = alice.learning.submit(extra.id, annotating)
        assert (label.model, label.adapter_version) == (f"{base_version}+v1", "v1")
        annotating.close()
        update = session.add_prompt(PointPrompt(position=(15.0, 14.0, 10.0)))  # same session, new version
        assert update.info["model_version"] == f"{base_version}+v1"
        assert alice.info(refresh=True).model.version == f"{base_version}+v1"
        assert alice.learning.status().engine_version == f"{base_version}+v1"

        assert alice.learning.rollback("base") is None
        update = session.add_prompt(PointPrompt(position=(14.0, 15.0, 10.0)))
        assert update.info["model_version"] == base_version
    with pytest.raises(NotFoundError):
        alice.learning.rollback("v9")
    assert_error(raw(learn_server, "POST", "/v1/learn/rollback", json={"to": "../v1"}), 422, "invalid_request")
    # a finished job cannot be cancelled any more: cancel answers its final state
    assert alice.learning.cancel(job.job_id).state == "done"


def _wait_until_started(learning, job_id: str, timeout_s: float = 120.0):
    deadline = time.monotonic() + timeout_s
    while True:
        status = learning.job(job_id)
        if status.state != "starting" or time.monotonic() > deadline:
            return status
        time.sleep(0.1)


def test_a_running_job_can_be_cancelled(clients, imported):
    alice, _ = clients
    _submit_truths(alice, imported)
    job = alice.learning.train(kind="salt", max_steps=100_000, time_budget_s=300, val_clicks=1)
    status = _wait_until_started(alice.learning, job.job_id)
    assert status.state not in ("starting", "done", "failed"), status
    alice.learning.cancel(job.job_id)
    final = alice.learning.wait_for_job(job.job_id, timeout=120, poll_s=0.2)
    assert final.state == "cancelled", final
    assert alice.learning.versions().current is None  # nothing promoted from a cancelled job


def test_jobs_waiting_when_the_server_stops_get_503_and_change_nothing(clients, imported, learn_server):
    """A next-case request and a prompt queued behind a running job when the worker stops: both
    answer 503 ``shutting_down`` (not 500), and the case stays unlocked."""
    alice, _ = clients
    session = alice.open_session(imported[0][1])
    worker = learn_server.app.state.segassist.pool.workers[0]
    gate = threading.Event()
    blocker = worker.submit("another-session", lambda engine: gate.wait(60))  # occupies the worker
    replies = {}

    def ask(name, call):
        replies[name] = call()

    askers = [
        threading.Thread(target=ask, args=("next", lambda: raw(learn_server, "POST", "/v1/learn/next", json={}))),
        threading.Thread(target=ask, args=("prompt", lambda: raw(
            learn_server, "POST", f"/v1/sessions/{session.session_id}/prompts",
            json={"prompt": PointPrompt(position=(5.0, 5.0, 5.0)).model_dump(mode="json")},
        ))),
    ]  # fmt: skip
    stopper = threading.Thread(target=worker.stop)
    try:
        for t in askers:
            t.start()
        deadline = time.monotonic() + 30
        while len(worker._queue) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(worker._queue) == 2, "both requests should be waiting behind the blocker"
        stopper.start()
        for t in askers:
            t.join(30)
    finally:
        gate.set()
        blocker.result(10)
    stopper.join(30)
    for name in ("next", "prompt"):
        assert_error(replies[name], 503, "shutting_down")
    assert alice.learning.case(imported[0][0].id).locked_by is None


def test_rolling_back_to_base_works_even_when_the_base_file_is_gone(clients, learn_server, tmp_path, server_checkpoint):
    """The emergency path needs no base identity; a version check that cannot read the base says so (409)."""
    alice, _ = clients
    registry = AdapterRegistry(tmp_path / "store")
    fields = {"base_identity": "0" * 16, "val_dice": 0.5, "incumbent": None, "incumbent_dice": 0.4}
    registry.add_version("lora", lambda path, _: path.write_bytes(b"weights"), fields, promote=True,
                         expected_current=None)  # fmt: skip
    moved = server_checkpoint.with_suffix(".moved")
    server_checkpoint.rename(moved)
    try:
        assert alice.learning.rollback("base") is None
        with pytest.raises(LearningConflictError, match="cannot check the version against the base model"):
            alice.learning.rollback("v1")
    finally:
        moved.rename(server_checkpoint)


def test_status_and_info_name_a_version_promoted_while_no_session_ran(clients, learn_server, tmp_path,
                                                                     server_checkpoint):
    """The workers swap versions before a job; with no session active, status and info once kept naming
    the old model although the next prompt would be answered by the new one."""
    from SegAssistLib.engine.network import load_checkpoint
    from SegAssistLib.learning.deploy import save_full_version

    alice, _ = clients
    before = alice.learning.status().engine_version
    base = load_checkpoint(server_checkpoint)
    fields = {"base_identity": base.identity, "val_dice": 0.5, "incumbent": None, "incumbent_dice": 0.4}
    AdapterRegistry(tmp_path / "store").add_version(
        "full", lambda path, _: save_full_version(path, base.network, base.config, base.identity, {}), fields,
        promote=True, expected_current=None,
    )  # fmt: skip
    assert alice.learning.status().engine_version == f"{before}+v1"
    assert alice.info(refresh=True).model.version == f"{before}+v1"
    assert alice.learning.rollback("base") is None
    assert raw(learn_server, "GET", "/v1/info").json()["model"]["version"] == before


def test_a_label_credits_the_version_that_made_its_mask_with_a_reset_queued_behind(clients, imported, learn_server):
    """The save read the session's model version after its job, when a reset queued behind it had run:
    the label credited no model (the reset's null). Deterministic: the worker is held while both
    requests queue, and the event loop is held until both jobs have run."""
    alice, _ = clients
    case, volume, truth = imported[0]
    alice.learning.lock(case.id)
    session = alice.open_session(alice.learning.case(case.id).content_hash)
    centre = np.argwhere(truth).mean(0)
    version = session.add_prompt(PointPrompt(position=tuple(float(x) for x in centre[::-1]))).info["model_version"]
    sid = session.session_id
    queued = [
        ("POST", f"/v1/learn/cases/{case.id}/labels", {"session_id": sid, "submit": False}),
        ("POST", f"/v1/sessions/{sid}/reset", None),
    ]
    replies = run_pipelined(learn_server, sid, queued)
    saved, reset = replies
    assert saved.status_code == 201 and reset.status_code == 200, (saved.text, reset.text)
    assert version is not None and saved.json()["model"] == version
    assert reset.json()["model_version"] is None
    session.close()
