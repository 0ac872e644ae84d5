"""How long the client waits: no limit when asked (as in requests), and a training job waited for
through a server that is briefly out of reach, until the caller's own deadline and no later."""

from __future__ import annotations

import fcntl
import json
import os
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import List, Tuple

import pytest
from test_server_fixtures import TOKENS

from SegAssistLib.client import SegAssistClient
from SegAssistLib.client.errors import BackendUnavailableError, JobWaitTimeoutError
from SegAssistLib.learning.jobs import _lock_path, jobs_folder
from SegAssistLib.prompts import PointPrompt

pytest_plugins = ["test_server_fixtures"]


@pytest.mark.parametrize("timeout", [None, (5.0, None)])
def test_no_read_limit_is_a_timeout_requests_users_know(server_factory, blob_volume, timeout):
    server = server_factory.start()
    client = SegAssistClient(server.url, TOKENS["alice"], timeout=timeout)
    with client, client.open_session(blob_volume, prompts=[PointPrompt(position=(24, 20, 12))]) as session:
        assert session.add_prompt(PointPrompt(position=(25, 20, 12))) is not None


@pytest.mark.parametrize("timeout", [0, -1.0, float("nan"), (5.0,), (5.0, 0), "30", True])
def test_a_timeout_that_is_no_duration_is_refused_at_once(timeout):
    with pytest.raises(ValueError, match="timeout must be seconds above 0"):
        SegAssistClient("http://127.0.0.1:9", timeout=timeout)


def test_waiting_for_a_job_ends_at_the_callers_deadline_not_a_poll_later(server_factory, tmp_path):
    server = server_factory.start(learn_store=tmp_path / "store")
    job_id = "20261124-185500-abcdef"  # a job that runs as long as this test does (its pid: ours)
    folder = jobs_folder(tmp_path / "store") / job_id
    folder.mkdir(parents=True)
    (folder / "status.json").write_text(json.dumps({"job_id": job_id, "state": "running", "pid": os.getpid()}))
    with open(_lock_path(tmp_path / "store"), "a+") as lock:  # the training lock a running worker holds
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        client = SegAssistClient(server.url, TOKENS["alice"])
        assert client.learning.job(job_id).state == "running"
        t0 = time.monotonic()
        with pytest.raises(JobWaitTimeoutError, match="still running after 1.0 s"):
            client.learning.wait_for_job(job_id, timeout=1.0, poll_s=30.0)
        assert time.monotonic() - t0 < 10


def test_waiting_for_a_job_outlasts_a_server_out_of_reach_until_the_deadline():
    with socket.socket() as free:  # a port nobody listens on: a server restarting
        free.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{free.getsockname()[1]}"
    client = SegAssistClient(url, TOKENS["alice"])
    t0 = time.monotonic()
    with pytest.raises(BackendUnavailableError):
        client.learning.wait_for_job("20261124-185500-abcdef", timeout=2.0, poll_s=0.2)
    waited = time.monotonic() - t0
    assert 2.0 <= waited < 10  # polled on through the outage, gave up at the deadline


def test_waiting_for_a_job_on_a_server_that_never_answers_ends_at_the_deadline():
    """A hung server (it takes the connection, never replies): each poll waited the client's whole
    read timeout, so the wait overran its deadline by it and raised BackendTimeoutError, not the
    JobWaitTimeoutError it promises."""
    with socket.create_server(("127.0.0.1", 0), backlog=16) as hung:  # never accepts: the kernel queues
        client = SegAssistClient(f"http://127.0.0.1:{hung.getsockname()[1]}", TOKENS["alice"], timeout=(5.0, 8.0))
        t0 = time.monotonic()
        with pytest.raises(JobWaitTimeoutError, match="no reply from the server within the 1.0 s"):
            client.learning.wait_for_job("20261124-185500-abcdef", timeout=1.0, poll_s=0.2)
        assert time.monotonic() - t0 < 4
        client.close()


class _RestartingBehindAProxy(BaseHTTPRequestHandler):
    """A reverse proxy in front of a server that restarts while a job runs: after one status it answers
    the proxy's own 502 and 504 pages, a plain 503 page, then the server's busy 503s (more than the
    client's own retries), and then the job's status again, done."""

    replies: List[Tuple[int, str, bytes]] = []
    seen: List[int] = []

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        n = len(self.seen)
        status, media, body = self.replies[min(n, len(self.replies) - 1)]
        self.seen.append(status)
        self.send_response(status)
        self.send_header("Content-Type", media)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def _status(state: str) -> Tuple[int, str, bytes]:
    return 200, "application/json", json.dumps({"job_id": "20261124-185500-abcdef", "state": state}).encode()


def test_waiting_for_a_job_outlasts_a_restart_behind_a_proxy():
    """The wait ended at the proxy's first 502 page (ServerError), and at the third busy 503 in a row
    (ServerBusyError), although the job went on: a restart behind a proxy looks like that."""
    busy = json.dumps({"error": {"status": 503, "code": "queue_full", "message": "the queue is full"}}).encode()
    _RestartingBehindAProxy.replies = [
        _status("running"),
        (502, "text/html", b"<html><body><h1>502 Bad Gateway</h1></body></html>"),
        (504, "text/html", b"<html><body><h1>504 Gateway Time-out</h1></body></html>"),
        *[(503, "text/plain", b"Service Unavailable")] * 3,
        *[(503, "application/json", busy)] * 3,
        _status("done"),
    ]
    _RestartingBehindAProxy.seen = []
    proxy = ThreadingHTTPServer(("127.0.0.1", 0), _RestartingBehindAProxy)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    seen = []
    try:
        client = SegAssistClient(f"http://127.0.0.1:{proxy.server_address[1]}", TOKENS["alice"])
        final = client.learning.wait_for_job("20261124-185500-abcdef", timeout=60, poll_s=0.05, progress=seen.append)
    finally:
        proxy.shutdown()
        proxy.server_close()
    assert final.state == "done" and [s.state for s in seen] == ["running", "done"]
    assert _RestartingBehindAProxy.seen == [200, 502, 504, 503, 503, 503, 503, 503, 503, 200]


def test_waiting_for_a_job_the_server_does_not_know_ends_at_once(server_factory, tmp_path):
    """Only an unreachable or busy server is waited through: the server's own answer that the job does
    not exist ends the wait at the first poll."""
    from SegAssistLib.client.errors import NotFoundError

    server = server_factory.start(learn_store=tmp_path / "store")
    client = SegAssistClient(server.url, TOKENS["alice"])
    t0 = time.monotonic()
    with pytest.raises(NotFoundError):
        client.learning.wait_for_job("20261124-185500-abcdef", timeout=30, poll_s=0.05)
    assert time.monotonic() - t0 < 10
