"""The client at the edges of HTTP: a reply cut off mid-body, a token read with its newline, timeouts
for large bodies and long replays, a close that fails while the caller's own error propagates, and
an image refused before it is compressed and sent. Real servers on loopback: a SegAssist server,
and a bare socket that drops a reply half-way (what a proxy or a crashing server does)."""

from __future__ import annotations

import socket
import threading

import numpy as np
import pytest
import requests
from test_server_fixtures import TOKENS, raw

from SegAssistLib.api_models import FRAME_MEDIA_TYPE
from SegAssistLib.client.errors import BackendUnavailableError, PayloadTooLargeError, SessionNotFoundError
from SegAssistLib.client.http import HttpClient
from SegAssistLib.image import Volume
from SegAssistLib.transport import encode_frame

pytest_plugins = ["test_server_fixtures"]


class _HalfReply:
    """A server that answers every connection with the headers of a chunked reply and part of its
    body, then closes the connection."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.connections = 0
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                self.connections += 1
                conn.recv(65536)
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
                    b'40\r\n{"status": "o'
                )

    def close(self) -> None:
        self.sock.close()


def test_a_reply_cut_off_mid_body_is_a_lost_connection_and_safe_requests_are_repeated():
    server = _HalfReply()
    try:
        http = HttpClient(server.url, timeout=(2.0, 2.0), retries=2)
        with pytest.raises(BackendUnavailableError, match="cannot reach"):
            http.request("GET", "/v1/health")
        assert server.connections == 3  # a read: tried again twice
        before = server.connections
        with pytest.raises(BackendUnavailableError):
            http.request("POST", "/v1/sessions/x/prompts", json={}, safe=False)
        assert server.connections == before + 1  # a change: never repeated by this layer
    finally:
        server.close()


def test_a_token_read_with_its_newline_is_stripped_and_a_bad_one_never_echoed():
    http = HttpClient("http://127.0.0.1:8470", "alice-token-0123456789abcdef\n")
    sent = http.session.prepare_request(requests.Request("GET", http.base_url + "/v1/info"))
    assert sent.headers["Authorization"] == "Bearer alice-token-0123456789abcdef"
    with pytest.raises(ValueError, match="spaces or control characters") as exc:
        HttpClient("http://127.0.0.1:8470", "alice-token 0123456789abcdef")
    assert "0123456789abcdef" not in str(exc.value)


def test_large_bodies_are_sent_under_the_read_timeout_and_replays_get_time_per_prompt():
    http = HttpClient("http://127.0.0.1:8470", timeout=(5.0, 120.0))
    assert http.upload_timeout() == (120.0, 120.0)  # urllib3 sends a body under the connect timeout
    assert http.read_timeout_plus(30.0) == (5.0, 150.0)
    assert HttpClient("http://127.0.0.1:8470", timeout=10.0).upload_timeout() == (10.0, 10.0)


def test_a_failed_close_does_not_hide_the_callers_error_and_can_be_tried_again(alice, blob_volume):
    session = alice.open_session(blob_volume)
    url = alice.http.base_url
    alice.http.base_url = "http://127.0.0.1:9"  # the server is out of reach while the block fails
    try:
        with pytest.raises(KeyError, match="the caller's own error"), session:
            raise KeyError("the caller's own error")
    finally:
        alice.http.base_url = url
    session.close()  # the first close never reached the server: this one does
    with pytest.raises(SessionNotFoundError):
        session.status()


def test_an_image_over_the_axis_limit_is_refused_before_it_is_sent(alice):
    long_axis = Volume(np.zeros((8, 8, 300), np.float32) + np.arange(300, dtype=np.float32))  # limit 256
    with pytest.raises(PayloadTooLargeError, match="longest axis has 300 voxels") as exc:
        alice.upload_image(long_axis)
    assert exc.value.code == "image_too_large"


@pytest.mark.parametrize(
    "shape, limit",
    [((8, 8, 300), 256), ((80, 80, 80), 400_000), ((10, 300, 300), 400_000)],
    ids=["axis", "voxels", "both"],
)
def test_an_image_refused_before_it_is_sent_names_the_limit_as_the_server_would(alice, shared_server, shape, limit):
    """``details['limit']`` (errors.py and docs/api.md promise it) was empty in the client's own
    refusals; an image above both limits is refused on the voxel count first, as the server does."""
    array = np.zeros(shape, np.float32)
    with pytest.raises(PayloadTooLargeError) as exc:
        alice.upload_image(Volume(array))
    server = raw(shared_server, "POST", "/v1/images", data=encode_frame(array, {}),
                 headers={"Content-Type": FRAME_MEDIA_TYPE}).json()["error"]  # fmt: skip
    assert (exc.value.status, exc.value.code, exc.value.details) == (413, "image_too_large", {"limit": limit})
    assert (server["status"], server["code"], server["details"]) == (413, "image_too_large", {"limit": limit})


def test_an_image_over_the_body_limit_once_compressed_names_the_limit(alice):
    info = alice.info()
    alice._info = info.model_copy(update={"limits": info.limits.model_copy(update={"max_body_bytes": 100})})
    noise = np.random.default_rng(0).normal(size=(8, 8, 8)).astype(np.float32)  # does not compress
    with pytest.raises(PayloadTooLargeError, match="above this server's limit of 100 bytes") as exc:
        alice.upload_image(Volume(noise))
    assert (exc.value.code, exc.value.details) == ("body_too_large", {"limit": 100})


def test_a_proxy_from_the_environment_never_sees_loopback_traffic(shared_server, monkeypatch):
    """Hospital networks set http_proxy; a proxy cannot reach this machine's backend, and the token
    must not pass through it. Remote servers still go through the proxy the environment names."""
    proxy = _HalfReply()  # any connection it receives would break the request
    try:
        for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
            monkeypatch.setenv(name, proxy.url)
        for name in ("NO_PROXY", "no_proxy"):
            monkeypatch.delenv(name, raising=False)
        client = HttpClient(shared_server.url, "alice-token-123456")
        assert client.request("GET", "/v1/health").json()["status"] == "ok"
        assert proxy.connections == 0
        assert HttpClient("https://segassist.example.org").session.trust_env
        # the CA bundle the environment names still counts for an https tunnel to localhost
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", "/etc/ssl/tunnel-ca.pem")
        assert HttpClient("https://localhost:8470")._verify == "/etc/ssl/tunnel-ca.pem"
        assert HttpClient("https://localhost:8470", verify=False)._verify is False
    finally:
        proxy.close()


def test_close_ends_the_connections_of_every_thread(shared_server):
    """The Slicer module drops a client from the GUI thread while its worker thread holds open
    connections to the old server."""
    client = HttpClient(shared_server.url)
    sessions = []

    def use() -> None:
        client.request("GET", "/v1/health")
        sessions.append(client.session)

    worker = threading.Thread(target=use)
    worker.start()
    worker.join(30)
    use()
    pools = [s.get_adapter(shared_server.url).poolmanager.pools for s in sessions]
    assert len(sessions) == 2 and all(len(p) == 1 for p in pools)
    client.close()
    assert all(len(p) == 0 for p in pools)
    assert client.request("GET", "/v1/health").json()["status"] == "ok"  # usable again: fresh connections


def test_close_ends_the_connection_of_a_request_that_failed(server_factory):
    """urllib3 2 closes a pool's connections only when nothing holds the pool any more, and an error
    raised from a local variable holds its reply (and so the pool) in a reference cycle until the
    garbage collector runs: close() after a 404 left the connection open, and a TLS server then
    waited its whole graceful-shutdown time for it."""
    import gc
    import time

    from SegAssistLib.client import SegAssistClient
    from SegAssistLib.client.errors import ImageNotFoundError

    server = server_factory.start()
    connections = server.server.server_state.connections
    client = SegAssistClient(server.url, TOKENS["alice"])
    gc.disable()  # the cycle, if any, must not be collected behind the test's back
    try:
        try:  # as a caller would write it
            client.open_session("0" * 64)  # an image the server does not hold
        except ImageNotFoundError:
            pass
        else:
            pytest.fail("a session on an image the server does not hold opened")
        assert len(connections) == 1
        client.close()
        deadline = time.monotonic() + 1  # well inside the server's keep-alive time, which would end it too
        while connections and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not connections, "the failed request's connection is still open after close()"
    finally:
        gc.enable()
