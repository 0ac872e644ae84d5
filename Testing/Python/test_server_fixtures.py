"""Fixtures of the server and client tests: a tiny real checkpoint, real servers on loopback.

Loaded as a pytest plugin (``pytest_plugins``) by the test_server_* and test_client_* modules, so
the session-scoped fixtures exist once however many modules use them. Every server here is the
real app with the real built-in engine on a tiny network, served by uvicorn on 127.0.0.1.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import pytest
import requests

from SegAssistLib.api_models import ErrorCode
from SegAssistLib.image import Volume
from SegAssistLib.server.auth import hash_token
from SegAssistLib.server.settings import Limits, ServerSettings

TOKENS: Dict[str, str] = {
    "alice": "alice-token-0123456789abcdef",
    "bob": "bob-token-0123456789abcdef",
}


class ManualClock:
    """A time source the test moves by hand (idle expiry without waiting)."""

    def __init__(self) -> None:
        self.now = time.monotonic()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make_volume(shape=(24, 40, 48), seed: int = 0, dtype=np.float32, spacing=(1.0, 1.0, 1.5)) -> Volume:
    """A bright ellipsoid on a noisy background: something to segment."""
    rng = np.random.default_rng(seed)
    k, j, i = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    blob = ((k / 0.6) ** 2 + (j / 0.5) ** 2 + (i / 0.45) ** 2) < 1
    array = (blob * 200 + rng.normal(0, 20, shape)).astype(dtype)
    return Volume(array, spacing=spacing)


@pytest.fixture(scope="session")
def server_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch = pytest.importorskip("torch")
    from SegAssistLib.engine.network import NetworkConfig, build_network, save_checkpoint

    torch.manual_seed(0)
    config = NetworkConfig(channels=(8, 16, 32), strides=(2, 2))
    path = tmp_path_factory.mktemp("model") / "m.pt"
    return save_checkpoint(path, build_network(config), config, {"name": "test"})


class Servers:
    """Starts real servers (each its own app and engine) and stops them all at teardown."""

    def __init__(self, checkpoint: Path) -> None:
        self.checkpoint = checkpoint
        self.running: List = []

    def start(
        self,
        port: int = 0,
        clock: Optional[Callable[[], float]] = None,
        tokens: Optional[Dict[str, str]] = None,
        data_dir: Optional[Path] = None,
        tls: Optional[tuple] = None,
        learn_store: Optional[Path] = None,
        engine_factory: Optional[Callable] = None,
        **limits,
    ):
        from SegAssistLib.server.app import create_app
        from SegAssistLib.server.runner import ServerThread

        tokens = TOKENS if tokens is None else tokens
        settings = ServerSettings(
            model=self.checkpoint,
            token_hashes=[(user, hash_token(token)) for user, token in tokens.items()],
            data_dir=data_dir,
            learn_store=learn_store,
            limits=Limits(**limits),
        )
        kwargs = {"clock": clock} if clock is not None else {}
        if engine_factory is not None:
            kwargs["engine_factory"] = engine_factory
        uvicorn_config = {"ssl_certfile": str(tls[0]), "ssl_keyfile": str(tls[1])} if tls else {}
        server = ServerThread(create_app(settings, **kwargs), port=port, **uvicorn_config).start()
        self.running.append(server)
        return server

    def stop_all(self) -> None:
        for server in self.running:
            server.stop()
        self.running.clear()


@pytest.fixture
def server_factory(server_checkpoint: Path) -> Iterator[Servers]:
    s = Servers(server_checkpoint)
    yield s
    s.stop_all()


@pytest.fixture(scope="session")
def shared_server(server_checkpoint: Path):
    """One server for the tests that do not change its configuration or clock."""
    s = Servers(server_checkpoint)
    server = s.start(max_voxels=400_000, max_axis=256, max_body_bytes=4_000_000, max_json_bytes=512_000)
    yield server
    s.stop_all()


@pytest.fixture
def alice(shared_server):
    from SegAssistLib.client import SegAssistClient

    with SegAssistClient(shared_server.url, TOKENS["alice"], timeout=(5.0, 60.0)) as c:
        yield c


@pytest.fixture(scope="session")
def blob_volume() -> Volume:
    return make_volume()


def raw(server, method: str, path: str, token: Optional[str] = TOKENS["alice"], **kwargs) -> requests.Response:
    """A request with no client library in between (to send what the client never would)."""
    headers = dict(kwargs.pop("headers", {}) or {})
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return requests.request(method, server.url + path, headers=headers, timeout=30, **kwargs)


def assert_error(response: requests.Response, status: int, code: str) -> dict:
    """The reply has the one error shape, with this status and code."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert error["status"] == status and error["code"] == code, error
    assert set(error) <= {"status", "code", "message", "details"}
    assert isinstance(error["message"], str) and len(error["message"]) > 10
    assert code in ErrorCode.all()
    return error


Pipelined = Sequence[Tuple[str, str, Optional[dict]]]  # (method, path, JSON body) of each request


def run_pipelined(server, session_id: str, requests_: Pipelined) -> List[requests.Response]:
    """Send ``requests_`` (method, path, JSON body) on one session so that their jobs queue in this
    order behind a job that holds the worker, then hold the server's event loop until all of them
    have run: no reply is built before the last job ran, whatever the timing. The replies, in order."""
    worker = server.app.state.segassist.pool.workers[0]
    loop = server.server.servers[0].get_loop()
    gate, ran = threading.Event(), threading.Event()
    blocker = worker.submit("another-session", lambda engine: gate.wait(60))  # occupies the worker
    replies: List[Optional[requests.Response]] = [None] * len(requests_)
    threads = []
    try:
        for n, (method, path, body) in enumerate(requests_):

            def send(n=n, method=method, path=path, body=body) -> None:
                replies[n] = raw(server, method, path, json=body)

            threads.append(threading.Thread(target=send))
            threads[-1].start()
            deadline = time.monotonic() + 30
            # queued, in order: this session's own jobs (other sessions' closes may wait beside them)
            while worker.waiting(session_id) < n + 1 and time.monotonic() < deadline:
                time.sleep(0.005)
            assert worker.waiting(session_id) == n + 1
        worker.submit(session_id, lambda engine: ran.set())  # runs after them

        def hold_the_loop() -> None:  # no reply is built until every job has run
            gate.set()
            ran.wait(30)

        loop.call_soon_threadsafe(hold_the_loop)
        assert ran.wait(30)
    finally:
        gate.set()
        for thread in threads:
            thread.join(60)
    assert blocker.result(10) is True
    return replies  # type: ignore[return-value]
