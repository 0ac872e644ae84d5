"""A backend on this machine, started for the user: ``python -m SegAssistLib.server`` in a child.

The child listens on a free loopback port (it binds port 0 and reports the port through a file,
so there is no race for the port) and requires a fresh random token, passed in its environment,
never on its command line. The launcher polls health until a deadline. The child stops when the
launcher calls :meth:`LocalBackend.stop`, at the launcher's exit, and when the launcher dies
however it dies: the child watches its standard input, a pipe from the launcher that the
operating system closes when the launcher ends.

A running backend is reused: its URL, token and pid live in a state file (mode 0600) in the
state directory; a new launcher that finds a healthy backend there with the same model (path, size
and modification time), device, Python, options and environment (``env``) uses it instead of
starting another (it lives as long as the process that started it). The server runs in the state
directory: relative paths among the options (``--data-dir store``) are made absolute against the
launcher's working folder first, so two projects giving the same relative path get their own.

The server needs torch, MONAI and FastAPI; when the client runs in a Python without them (Slicer's),
give ``python=`` (or ``SEGASSIST_SERVER_PYTHON``) pointing at a Python that has them. A start that
fails says why in one line, from this start's own lines of the log (each start appends a marker line
to ``backend-*.log`` and reads only what follows it); :attr:`LocalBackendError.missing_modules` names
the packages that Python lacks. :meth:`LocalBackend.cancel` ends a start under way from another
thread at once (the child is loading the model: nothing to shut down gracefully).
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import os
import re
import secrets
import socket
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple
from urllib.parse import urlsplit

from SegAssistLib.client.errors import ClientError
from SegAssistLib.client.remote import SegAssistClient

PYTHON_ENV = "SEGASSIST_SERVER_PYTHON"
STATE_DIR_ENV = "SEGASSIST_STATE_DIR"
_TOKEN_ENV = "SEGASSIST_TOKEN"  # read by the server (SegAssistLib.server.auth)
_PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the folder holding SegAssistLib


class LocalBackendError(ClientError):
    """The local backend could not be started: the message says why in one line (the last line this
    start wrote to its log) and names the log; ``log_lines`` holds this start's last lines, and
    ``missing_modules`` the packages the server's Python lacks (empty when that was not the cause)."""

    code = "local_backend_failed"

    def __init__(self, message: str, log_lines: Sequence[str] = (), log_file: Optional[os.PathLike] = None) -> None:
        super().__init__(message)
        self.log_lines: List[str] = list(log_lines)
        self.log_file = log_file
        self.missing_modules: List[str] = missing_modules(self.log_lines)


#: How the server says that its Python lacks packages (``segassist serve``'s own check, SegAssistLib.server.cli)
_LACKS = re.compile(r"needs (.+?), which this install lacks")
#: ... and how Python says it (an import before that check: numpy, pydantic)
_NO_MODULE = re.compile(r"No module named '([A-Za-z0-9_]+)")


def missing_modules(log_lines: Sequence[str]) -> List[str]:
    """The packages a failed start's log lines say the server's Python lacks (top-level names; not
    SegAssistLib itself, whose absence is a broken checkout, not a package to install)."""
    found: List[str] = []
    for line in log_lines:
        lacks = _LACKS.search(line)
        names = [n.strip() for n in lacks.group(1).split(",")] if lacks else _NO_MODULE.findall(line)
        found += [n for n in names if n and n != "SegAssistLib" and n not in found]
    return found


class ServerPythonError(LocalBackendError):
    """The server's Python interpreter could not be executed at all."""

    code = "server_python_failed"


# Variables a Python reads at startup to find its standard library and packages. Inside Slicer they
# point at Slicer's own Python; another interpreter started with them fails or imports the wrong
# packages, so a server run by a different interpreter starts without them.
_INTERPRETER_VARIABLES = ("PYTHONHOME", "PYTHONPATH", "PYTHONSTARTUP", "PYTHONEXECUTABLE", "PYTHONUSERBASE")


def default_state_dir() -> Path:
    if os.environ.get(STATE_DIR_ENV):
        return Path(os.environ[STATE_DIR_ENV])
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA", Path.home() / "AppData" / "Local"))
        return base / "SegAssist"
    return Path(os.environ.get("XDG_STATE_HOME", Path.home() / ".local" / "state")) / "segassist"


def _port_answers(url: str, timeout_s: float = 0.5) -> bool:
    """Whether something accepts connections at the URL's host and port (loopback: immediate)."""
    parsed = urlsplit(url)
    try:
        with socket.create_connection((parsed.hostname or "127.0.0.1", parsed.port or 80), timeout=timeout_s):
            return True
    except OSError:
        return False


def process_alive(pid: int) -> bool:
    """True while the process exists and is not a zombie waiting to be reaped."""
    if pid <= 0:
        return False
    if sys.platform == "win32":  # pragma: no cover - no Windows in CI
        import ctypes

        handle = ctypes.windll.kernel32.OpenProcess(0x1000, False, pid)  # QUERY_LIMITED_INFORMATION
        if not handle:
            return False
        code = ctypes.c_ulong()
        ctypes.windll.kernel32.GetExitCodeProcess(handle, ctypes.byref(code))
        ctypes.windll.kernel32.CloseHandle(handle)
        return code.value == 259  # STILL_ACTIVE
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True  # no /proc (macOS): kill(0) said it exists


# Windows gives a console program started from a GUI program (Slicer) a visible console window of
# its own; closing it would kill the backend
_NO_CONSOLE_WINDOW = getattr(subprocess, "CREATE_NO_WINDOW", 0) if sys.platform == "win32" else 0


def _absolute_if_path(program: str) -> str:
    """``program`` made absolute when it names a file by path (``.venv/bin/python``); a bare name
    (``python3``) is left for the search path."""
    if os.sep in program or (os.altsep and os.altsep in program):
        # not resolve(): a virtual environment's python is a symlink to the base interpreter, and
        # started through the link's target it would not see the environment's packages
        return os.path.abspath(program)
    return program


#: The server's options that name files or folders (``python -m SegAssistLib.server --help``). The
#: server runs in the state folder, so a relative path given in ``extra_args`` is made absolute
#: against the caller's working folder, where it was meant, before it joins the backend's identity.
PATH_OPTIONS = ("--model", "--token-file", "--data-dir", "--learn-store", "--tls-cert", "--tls-key")


def _path_option(name: str) -> Optional[str]:
    """The path option ``name`` stands for: itself, or an abbreviation of exactly one (the server's
    parser takes unambiguous abbreviations); None for any other option."""
    if not name.startswith("--") or len(name) < 3:
        return None
    matches = [option for option in PATH_OPTIONS if option.startswith(name)]
    return matches[0] if len(matches) == 1 else None


def _absolute_path_args(args: Sequence[str]) -> Tuple[List[str], List[str]]:
    """``args`` with the values of :data:`PATH_OPTIONS` made absolute, given as ``--opt value`` or
    ``--opt=value``; and the checkpoints among them (the values of ``--model``)."""
    out: List[str] = []
    models: List[str] = []
    pending: Optional[str] = None  # the path option whose value comes next
    for arg in (str(a) for a in args):
        if pending is not None:
            value = os.path.abspath(arg) if arg else arg
            out.append(value)
            if pending == "--model":
                models.append(value)
            pending = None
            continue
        name, eq, value = arg.partition("=")
        option = _path_option(name)
        if option is None:
            out.append(arg)
        elif eq:
            value = os.path.abspath(value) if value else value
            out.append(f"{name}={value}")
            if option == "--model":
                models.append(value)
        else:
            out.append(arg)
            pending = option
    return out, models


def _file_stamp(path: str) -> Optional[List[int]]:
    """Size and modification time (ns) of a file: weights overwritten in place make another backend."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


def _same_file(a: str, b: str) -> bool:
    """Whether two interpreter paths name the same file (False when either cannot be found)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _write_private(path: Path, text: str) -> None:
    """Atomically write a file only this user can read (it holds a token)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".state-")
    try:
        os.chmod(tmp, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


class LocalBackend:
    """Start a backend on loopback, or reuse the one already running with the same model (and
    checkpoint contents, by size and modification time), device, Python, options and ``env``.

    >>> with LocalBackend(model="weights.pt") as backend:     # doctest: +SKIP
    ...     session = backend.client().open_session(volume)
    """

    _shared: Dict[Tuple[str, str], LocalBackend] = {}
    _shared_lock = threading.Lock()

    def __init__(
        self,
        model: Optional[os.PathLike] = None,
        device: str = "cpu",
        *,
        state_dir: Optional[os.PathLike] = None,
        python: Optional[str] = None,
        extra_args: Sequence[str] = (),
        startup_timeout: float = 180.0,
        reuse: bool = True,
        env: Optional[Dict[str, str]] = None,
    ) -> None:
        self.model = str(Path(model).resolve()) if model else None
        self.device = device
        # absolute: the server runs in the state folder, where relative paths would mean other files
        self.state_dir = Path(os.path.abspath(state_dir or default_state_dir()))
        self.python = _absolute_if_path(python or os.environ.get(PYTHON_ENV) or sys.executable)
        # relative paths in the options meant the caller's folder (the server runs in the state folder)
        self.extra_args, extra_models = _absolute_path_args(extra_args)
        self.startup_timeout = startup_timeout
        self.reuse = reuse
        self.env = {str(k): str(v) for k, v in (env or {}).items()}
        self.url: Optional[str] = None
        self.token: Optional[str] = None
        self.pid: Optional[int] = None
        self.owned = False  # True when this object started the process (and will stop it)
        self._process: Optional[subprocess.Popen] = None
        self._cancelled = threading.Event()
        self._log_offset = 0  # where this start's lines begin in the log (after its marker line)
        # what a running backend must match to be reused: started with other options (threads, another
        # Python), another environment (CUDA_VISIBLE_DEVICES: another GPU) or from weights since
        # overwritten in place (size and modification time of each checkpoint named), it is another
        models = ([self.model] if self.model else []) + extra_models
        self._identity_fields = {"model": self.model, "device": self.device, "python": self.python,
                                 "args": self.extra_args, "env": [[k, v] for k, v in sorted(self.env.items())],
                                 "model_files": [[m, _file_stamp(m)] for m in models]}  # fmt: skip
        self._identity = json.dumps(self._identity_fields, sort_keys=True)
        self._state_file = self.state_dir / f"backend-{hashlib.sha256(self._identity.encode()).hexdigest()[:12]}.json"
        self.log_file = self._state_file.with_suffix(".log")

    @classmethod
    def shared(cls, model: Optional[os.PathLike] = None, device: str = "cpu", **kwargs: Any) -> LocalBackend:
        """One started backend per (model, device, Python, options, env, state dir) in this process."""
        probe = cls(model, device, **kwargs)
        key = (probe._identity, str(probe.state_dir))
        with cls._shared_lock:
            backend = cls._shared.get(key)
            if backend is None or not backend.running:
                backend = cls._shared[key] = probe.start()
            return backend

    # ---- lifecycle -----------------------------------------------------------------------------
    def start(self) -> LocalBackend:
        if self.running:
            return self
        self._check_cancelled()
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise LocalBackendError(
                f"could not create the local backend's state folder {self.state_dir}: {exc}"
            ) from exc
        if self.reuse and self.attach():
            return self
        self._spawn()
        return self

    @property
    def running(self) -> bool:
        if self.pid is None or not process_alive(self.pid):
            return False
        if self._process is not None:
            return self._process.poll() is None
        # started by another program: its pid may have been reused by now, so the port must answer too
        return self.url is not None and _port_answers(self.url)

    def client(self, **kwargs: Any) -> SegAssistClient:
        if not self.url:
            raise LocalBackendError("the local backend is not started: call start() first")
        return SegAssistClient(self.url, self.token, **kwargs)

    def stop(self, timeout: float = 20.0) -> None:
        """Stop the backend if this object started it (a reused one belongs to its starter)."""
        process, self._process = self._process, None
        if not self.owned or process is None:
            return
        self.owned = False
        if process.poll() is None:
            try:
                if process.stdin:
                    process.stdin.close()  # end of input: the server shuts down gracefully
            except OSError:
                pass
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.terminate()
                try:
                    process.wait(5)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(5)
        self._forget_state()

    def cancel(self) -> None:
        """End a :meth:`start` under way in another thread: a child still loading its model is
        terminated at once and :meth:`start` raises :class:`LocalBackendError` ("stopped while it
        started"); a start not begun yet raises at once. A backend that is up is left to :meth:`stop`."""
        self._cancelled.set()
        process = self._process
        if process is not None and self.url is None and process.poll() is None:
            with contextlib.suppress(OSError):
                process.terminate()

    def _check_cancelled(self, process: Optional[subprocess.Popen] = None) -> None:
        if not self._cancelled.is_set():
            return
        if process is not None and process.poll() is None:
            with contextlib.suppress(OSError):
                process.terminate()
        raise LocalBackendError("the local backend was stopped while it started")

    def __enter__(self) -> LocalBackend:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- internals -------------------------------------------------------------------------------
    def attach(self) -> bool:
        """Use the healthy backend of the state file if it runs the same model, device, Python, options and env."""
        try:
            state = json.loads(self._state_file.read_text())
            url, token, pid = str(state["url"]), str(state["token"]), int(state["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            return False
        if any(state.get(field) != value for field, value in self._identity_fields.items()) or not process_alive(pid):
            return False
        probe = SegAssistClient(url, token, timeout=(1.0, 10.0), retries=0)
        try:
            probe.health()
            info = probe.info()
        except ClientError:
            return False
        finally:
            probe.close()
        if not info.auth_required or info.user != "local":
            # a server that takes any token (or knows it as another user's) is not one a local
            # backend runs: the state file is stale and its port now someone else's
            return False
        self.url, self.token, self.pid, self.owned = url, token, pid, False
        return True

    def _command(self, port_file: Path) -> List[str]:
        cmd = [self.python, "-m", "SegAssistLib.server", "--host", "127.0.0.1", "--port", "0"]
        cmd += ["--port-file", str(port_file), "--exit-with-parent", "--device", self.device]
        if self.model:
            cmd += ["--model", self.model]
        return cmd + self.extra_args

    def _environment(self, token: str) -> Dict[str, str]:
        env = dict(os.environ)
        if not _same_file(self.python, sys.executable):
            for name in _INTERPRETER_VARIABLES:
                env.pop(name, None)
        env.update(self.env)
        env[_TOKEN_ENV] = token
        env.pop("SEGASSIST_TOKEN_USER", None)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_PACKAGE_ROOT), env.get("PYTHONPATH")) if p)
        return env

    def _popen(self, port_file: Path, token: str, log: Any) -> subprocess.Popen:
        try:
            # cwd: `python -m` imports from the working folder first, where an old checkout of
            # SegAssistLib (or a file named torch.py) would shadow the real packages
            return subprocess.Popen(
                self._command(port_file),
                stdin=subprocess.PIPE,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self._environment(token),
                cwd=self.state_dir,
                creationflags=_NO_CONSOLE_WINDOW,
            )
        except OSError as exc:
            raise ServerPythonError(f"could not run {self.python!r}: {exc}") from exc

    def _spawn(self) -> None:
        token = secrets.token_urlsafe(32)
        port_file = self.state_dir / f".port-{secrets.token_hex(6)}"
        try:
            with open(self.log_file, "ab") as log:
                # the log is shared by every start of this backend: this start's lines follow its marker
                log.write(f"==== SegAssist local backend start, {time.strftime('%Y-%m-%d %H:%M:%S')} ====\n".encode())
                log.flush()
                self._log_offset = log.tell()
                process = self._popen(port_file, token, log)
        except ServerPythonError:
            raise
        except OSError as exc:
            raise LocalBackendError(f"could not open the local backend's log {self.log_file}: {exc}") from exc
        self._process, self.pid, self.token, self.owned = process, process.pid, token, True
        _register_exit(self)
        try:
            self.url = self._wait_until_healthy(process, port_file, token)
            state = {"url": self.url, "token": token, "pid": process.pid, **self._identity_fields}
            try:
                _write_private(self._state_file, json.dumps(state))
            except OSError as exc:
                raise LocalBackendError(
                    f"could not write the local backend's state file {self._state_file}: {exc}"
                ) from exc
        except BaseException:
            self.stop(timeout=5)
            raise
        finally:
            if port_file.exists():
                port_file.unlink()

    def _wait_until_healthy(self, process: subprocess.Popen, port_file: Path, token: str) -> str:
        deadline = time.monotonic() + self.startup_timeout
        url: Optional[str] = None
        while time.monotonic() < deadline:
            self._check_cancelled(process)
            if process.poll() is not None:
                raise self._start_failed(f"the local backend exited with code {process.returncode} during startup")
            if url is None and port_file.exists():
                text = port_file.read_text().strip()
                url = f"http://127.0.0.1:{int(text)}" if text.isdigit() else None
            if url is not None:
                probe = SegAssistClient(url, token, timeout=(0.5, 2.0), retries=0)
                try:
                    probe.health()
                    return url
                except ClientError:
                    pass  # listening, but the model is still loading
                finally:
                    probe.close()
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(0.05)  # a pause that ends early if the child exits
        raise self._start_failed(f"the local backend did not become healthy within {self.startup_timeout:.0f} s")

    def _start_failed(self, what: str) -> LocalBackendError:
        """``what`` went wrong, with the last line this start wrote (its cause, as a rule) and the log."""
        lines = self._log_lines()
        cause = next((line.strip() for line in reversed(lines) if line.strip()), "")
        said = f": {cause}" if cause else " (it wrote nothing to its log)"
        return LocalBackendError(f"{what}{said}; details in {self.log_file}", lines, self.log_file)

    def _log_lines(self, lines: int = 20) -> List[str]:
        """The last ``lines`` lines this start wrote to the log (not those of earlier starts)."""
        try:
            with open(self.log_file, "rb") as log:
                size = log.seek(0, os.SEEK_END)
                log.seek(max(self._log_offset, size - 65536))  # the end is enough: its last lines
                text = log.read().decode(errors="replace")
        except OSError:
            return []
        return text.splitlines()[-lines:]

    def _forget_state(self) -> None:
        try:
            state = json.loads(self._state_file.read_text())
            if int(state.get("pid", -1)) == self.pid:
                self._state_file.unlink()
        except (OSError, ValueError, TypeError):
            pass


_running: weakref.WeakSet[LocalBackend] = weakref.WeakSet()
_exit_hook_installed = False


def _register_exit(backend: LocalBackend) -> None:
    global _exit_hook_installed
    _running.add(backend)
    if not _exit_hook_installed:
        atexit.register(_stop_all)
        _exit_hook_installed = True


def _stop_all() -> None:
    for backend in list(_running):
        with contextlib.suppress(Exception):  # at exit, one failure must not keep the others running
            backend.stop(timeout=10)
