"""Connections: uvicorn runs with a bound on open connections, set by ``segassist serve --limit-concurrency``.

Without one, thousands of idle (or slowly sending) connections all stay open; with it, a request
that arrives while the server holds that many connections is answered 503 at once. uvicorn has no
timeout for a request's headers: docs/api.md says to put a server beyond loopback behind a reverse
proxy that has one.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests
from fastapi import FastAPI

from SegAssistLib.server.runner import uvicorn_server

pytest_plugins = ["test_server_fixtures"]

REPO = Path(__file__).resolve().parents[2]


def test_the_server_bounds_connections_and_keep_alive_by_default():
    from SegAssistLib.server.settings import DEFAULT_KEEP_ALIVE_S, DEFAULT_LIMIT_CONCURRENCY

    config = uvicorn_server(FastAPI()).config
    assert config.limit_concurrency == DEFAULT_LIMIT_CONCURRENCY == 256
    assert config.timeout_keep_alive == DEFAULT_KEEP_ALIVE_S == 5
    assert uvicorn_server(FastAPI(), limit_concurrency=3).config.limit_concurrency == 3


def _idle_connection(port: int) -> socket.socket:
    """A connection that has sent part of a request's headers and nothing since."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(b"GET /v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    return sock


def test_limit_concurrency_reaches_uvicorn(server_checkpoint, tmp_path):
    port_file = tmp_path / "port"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("SEGASSIST_TOKEN", None)
    server = subprocess.Popen(
        [sys.executable, "-m", "SegAssistLib.server", "--port", "0", "--port-file", str(port_file),
         "--model", str(server_checkpoint), "--limit-concurrency", "2", "--exit-with-parent",
         "--log-level", "warning"],
        cwd=REPO, env=env, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not port_file.is_file():
            assert server.poll() is None, server.stderr.read().decode()[-2000:]  # type: ignore[union-attr]
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.05)
        port = int(port_file.read_text())
        url = f"http://127.0.0.1:{port}/v1/health"
        assert requests.get(url, timeout=10).status_code == 200
        idle = [_idle_connection(port) for _ in range(2)]
        try:
            time.sleep(0.3)  # both accepted
            assert requests.get(url, timeout=10).status_code == 503  # 2 open already: the limit
        finally:
            for sock in idle:
                sock.close()
        deadline = time.monotonic() + 10
        while requests.get(url, timeout=10).status_code != 200:  # they are closed: room again
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        server.stdin.close()  # type: ignore[union-attr]  # --exit-with-parent: it stops
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(10)
        server.stderr.close()  # type: ignore[union-attr]
