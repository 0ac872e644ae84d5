"""Many clients at once: one worker owns the engine, the queue is fair, a client sees its place."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from test_server_fixtures import TOKENS, make_volume

from SegAssistLib.client import SegAssistClient
from SegAssistLib.prompts import BoxPrompt, PointPrompt, ScribblePrompt
from SegAssistLib.server.worker import FairQueue, WorkerStopped

pytest_plugins = ["test_server_fixtures"]

PROMPTS = [
    PointPrompt(position=(24.0, 20.0, 12.0)),
    ScribblePrompt(points=[(20.0, 18.0, 12.0), (28.0, 22.0, 12.0)]),
    PointPrompt(position=(5.0, 5.0, 3.0), positive=False),
    BoxPrompt(min_corner=(12.0, 10.0, 5.0), max_corner=(36.0, 30.0, 19.0)),
]


def test_fair_queue_serves_sessions_in_turn():
    q = FairQueue(max_items=10)
    for n in range(4):
        q.put("busy", f"busy{n}")
    q.put("quick", "quick0")
    q.put("other", "other0")
    assert q.position("busy") == 0 and q.position("quick") == 1 and q.position("other") == 2
    assert q.position("absent") is None and len(q) == 6
    assert (q.waiting("busy"), q.waiting("quick"), q.waiting("absent")) == (4, 1, 0)  # each session's own
    order = [q.get()[1] for _ in range(6)]
    # one job per session per turn: the session that sent four does not hold up the others
    assert order == ["busy0", "quick0", "other0", "busy1", "busy2", "busy3"]


def test_fair_queue_bounds_its_length_and_closes():
    q = FairQueue(max_items=2)
    q.put("a", 1)
    q.put("b", 2)
    with pytest.raises(RuntimeError, match="waiting"):
        q.put("c", 3)
    q.put("c", 3, force=True)  # closing a session must always be possible
    assert sorted(q.close()) == [1, 2, 3]
    assert q.get() is None
    with pytest.raises(WorkerStopped):
        q.put("a", 4)


def test_one_session_cannot_fill_the_queue_for_everyone():
    q = FairQueue(max_items=8, max_per_key=3)
    for n in range(3):
        q.put("greedy", n)
    with pytest.raises(RuntimeError, match="this session already has 3 requests waiting"):
        q.put("greedy", 3)
    q.put("modest", "click")  # another session still gets in
    q.put("greedy", "close", force=True)
    assert len(q) == 5 and q.get() == ("greedy", 0) and q.get() == ("modest", "click")


def test_eight_clients_at_once(shared_server):
    volumes = [make_volume(seed=100 + n) for n in range(4)]  # two clients per image: uploads race
    start = threading.Barrier(8)

    def annotate(n: int):
        user = "alice" if n % 2 else "bob"
        with SegAssistClient(shared_server.url, TOKENS[user], timeout=(5.0, 120.0)) as client:
            start.wait(timeout=60)
            t0 = time.perf_counter()
            with client.open_session(volumes[n % 4]) as session:
                waits = [session.add_prompt(p).info["queue_wait_s"] for p in PROMPTS]
                result = session.result()
                assert np.array_equal(result, session.fetch_result())
                log = session.prompt_log()
            return n, result, len(log.prompts), waits, time.perf_counter() - t0

    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(annotate, range(8)))
    results = {n: result for n, result, *_ in outcomes}
    assert all(n_prompts == len(PROMPTS) for _, _, n_prompts, _, _ in outcomes)
    for n in range(4):  # same image, same prompts, concurrently: the same mask
        assert np.array_equal(results[n], results[n + 4])
    # every reply says how long it waited in the queue behind the other sessions
    assert all(len(waits) == len(PROMPTS) and min(waits) >= 0 for *_, waits, _ in outcomes)


def test_a_queued_client_sees_its_place(server_factory, blob_volume):
    server = server_factory.start()
    worker = server.app.state.segassist.pool.workers[0]
    client = SegAssistClient(server.url, TOKENS["alice"])
    session = client.open_session(blob_volume)
    assert session.status().state == "idle"
    gate = threading.Event()
    blocker = worker.submit("another-session", lambda engine: gate.wait(60))  # occupies the worker
    done = []
    prompting = threading.Thread(target=lambda: done.append(session.add_prompt(PROMPTS[0])))
    prompting.start()
    try:
        deadline = time.monotonic() + 30
        status = session.status()  # from another thread than the one waiting on the prompt
        while status.state != "queued" and time.monotonic() < deadline:
            prompting.join(0.01)
            status = session.status()
        assert status.state == "queued"
        assert status.queue_position == 1 and status.queue_length == 1  # behind the running job
    finally:
        gate.set()
        prompting.join(60)
    assert blocker.result(10) is True
    assert done and done[0].info["queue_wait_s"] > 0
    assert session.status().state == "idle"


def test_pipelined_replies_carry_the_state_their_own_operation_left(shared_server, blob_volume):
    """A reply read the session's prompt count and model version when it was built, not when its
    job ran: with requests pipelined on one session, a job queued behind ran in between and the
    reply carried that job's count and version (a reset's null). Deterministic: the worker is held
    while the requests queue, and the server's event loop is held until all of them have run."""
    from test_server_fixtures import raw, run_pipelined

    with SegAssistClient(shared_server.url, TOKENS["alice"]) as client:
        version = client.info().model.version
        session = client.open_session(blob_volume)
    sid = session.session_id
    point = {"kind": "point", "position": [24.0, 20.0, 12.0], "positive": True}
    other = {"kind": "point", "position": [20.0, 18.0, 12.0], "positive": True}
    requests_ = [  # queued in this order on the one session
        ("POST", f"/v1/sessions/{sid}/prompts", {"prompt": point}),
        ("GET", f"/v1/sessions/{sid}/result", None),
        ("POST", f"/v1/sessions/{sid}/prompts", {"prompt": other}),
        ("POST", f"/v1/sessions/{sid}/reset", None),
    ]
    replies = run_pipelined(shared_server, sid, requests_)
    first, result, second, reset = [r.json() for r in replies]
    assert (first["n_prompts"], first["model_version"]) == (1, version)
    assert result["n_prompts"] == 1
    assert (second["n_prompts"], second["model_version"]) == (2, version)
    assert (reset["n_prompts"], reset["model_version"]) == (2, None)
    raw(shared_server, "DELETE", f"/v1/sessions/{sid}")
