"""Running the app on uvicorn: on a socket bound here (port 0 allowed), in this thread or another.

Binding the socket before uvicorn starts gives the real port at once (no race for a "free" port)
and lets a launcher read it from ``--port-file``.
"""

from __future__ import annotations

import os
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Optional

import uvicorn
from fastapi import FastAPI

from SegAssistLib.server.settings import DEFAULT_KEEP_ALIVE_S, DEFAULT_LIMIT_CONCURRENCY


def bind_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP explicitly: asyncio only sets TCP_NODELAY on accepted sockets whose proto says TCP,
    # and without it small replies wait ~40 ms for delayed ACKs.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    if os.name != "nt":  # on Windows SO_REUSEADDR would let two servers share a port
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host.strip("[]"), port))
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def write_port_file(path: Path, port: int) -> None:
    """Atomically, so a reader never sees a half-written number."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".port-")
    with os.fdopen(fd, "w") as f:
        f.write(str(port))
    os.replace(tmp, path)


class _DrainingServer(uvicorn.Server):
    """uvicorn, but jobs still queued when shutdown starts fail at once (503 ``shutting_down``).

    uvicorn waits for open requests (``timeout_graceful_shutdown``), then cancels them (a plain-text
    500) and only then runs the app's shutdown, which stopped the workers: a request queued behind
    others never got the documented 503. Now the queues are drained first; running jobs finish.
    """

    def __init__(self, config: uvicorn.Config, app: FastAPI) -> None:
        super().__init__(config)
        self._app = app

    async def shutdown(self, sockets: Optional[list] = None) -> None:
        state = getattr(self._app.state, "segassist", None)
        if state is not None:
            state.pool.drain()
        await super().shutdown(sockets)


def uvicorn_server(app: FastAPI, **config: Any) -> uvicorn.Server:
    config.setdefault("log_level", "info")
    config.setdefault("lifespan", "on")  # a model that fails to load stops the server
    config.setdefault("timeout_graceful_shutdown", 10)
    config.setdefault("limit_concurrency", DEFAULT_LIMIT_CONCURRENCY)
    config.setdefault("timeout_keep_alive", DEFAULT_KEEP_ALIVE_S)
    return _DrainingServer(uvicorn.Config(app, **config), app)


class ServerThread:
    """The app on a loopback port in a background thread (tests, benchmarks, embedding)."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, **config: Any) -> None:
        self.app = app
        self.host = host
        self._port = port
        config.setdefault("log_level", "warning")
        self._config = config
        self.server: Optional[uvicorn.Server] = None
        self._thread: Optional[threading.Thread] = None
        self.port: int = 0

    @property
    def url(self) -> str:
        scheme = "https" if self._config.get("ssl_certfile") else "http"
        return f"{scheme}://{self.host}:{self.port}"

    def start(self, timeout: float = 120.0) -> ServerThread:
        sock = bind_socket(self.host, self._port)
        self.port = sock.getsockname()[1]
        self.server = uvicorn_server(self.app, **self._config)
        self._thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [sock]}, name="segassist-uvicorn", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive():
                sock.close()
                raise RuntimeError("the server stopped during startup (see the log above)")
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"the server did not start within {timeout} s")
            self._thread.join(0.01)  # waits on the thread, doubling as the poll interval
        return self

    def stop(self, timeout: float = 30.0) -> None:
        if self.server is not None:
            self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
