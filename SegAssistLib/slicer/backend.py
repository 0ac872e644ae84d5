"""Which backend the Slicer module talks to: settings, a local backend started for the user, a remote one.

Qt-free. The Slicer module keeps :class:`BackendSettings` in ``qt.QSettings`` (never in the scene:
a saved scene must not carry a token), except the token, which goes to a file only the user can
read (:mod:`.tokens`); anything with ``value(key, default)`` and ``setValue(key, value)`` works as
a store, so batch scripts and tests use :class:`MemorySettings`.

Privacy rule: a remote server is contacted only after the user opted in
(``remote_opt_in``): until then :meth:`BackendManager.client` refuses, even if a URL is set.

Every :class:`BackendManager` method that talks to a server blocks (a local start loads the model,
up to minutes): the GUI calls them on its worker thread, batch scripts call them directly.

A token belongs to one server: the panel's form goes through :func:`settings_from_form`, so a new
address never takes the token of the previous one. A token file that cannot be read or written
leaves the settings usable without it and says why (:meth:`BackendSettings.read`, :meth:`~BackendSettings.save`).
"""

from __future__ import annotations

import os
import shutil
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Protocol, Tuple
from urllib.parse import urlsplit

from SegAssistLib.client import BackendUnavailableError, LocalBackend, LocalBackendError, SegAssistClient
from SegAssistLib.client.http import is_loopback_host
from SegAssistLib.client.local import ServerPythonError
from SegAssistLib.errors import SegAssistError
from SegAssistLib.slicer.tokens import TokenFile, TokenFileError

LOCAL = "local"
REMOTE = "remote"
MODES: Tuple[str, ...] = (LOCAL, REMOTE)
SETTINGS_PREFIX = "SegAssist/Backend/"
#: The shipped weights, where the local server looks for them when no checkpoint is chosen.
RETIRE_JOIN_S = 35.0  # LocalBackend.stop waits at most 20 + 5 + 5 s
SHIPPED_MODEL = Path(__file__).resolve().parents[2] / "Resources" / "Models" / "segassist_unet.pt"
#: Why a request fails when the local backend was stopped while it started.
STOPPED_WHILE_STARTING = "the local backend was stopped while it started"


class BackendConfigError(SegAssistError):
    """The backend settings cannot be used as they are (the message says what to change)."""

    code = "backend_config"


class SettingsStore(Protocol):
    """What :class:`BackendSettings` needs from a store: ``qt.QSettings`` has exactly this."""

    def value(self, key: str, defaultValue: Any = None) -> Any: ...

    def setValue(self, key: str, value: Any) -> None: ...


class MemorySettings:
    """A settings store in a dict (batch scripts, tests). It is in memory only, so it keeps the
    token too (``keeps_secrets``); any other store gets the token saved in a :class:`TokenFile`."""

    keeps_secrets = True

    def __init__(self, values: Optional[Dict[str, Any]] = None) -> None:
        self.values: Dict[str, Any] = dict(values or {})

    def value(self, key: str, defaultValue: Any = None) -> Any:
        return self.values.get(key, defaultValue)

    def setValue(self, key: str, value: Any) -> None:
        self.values[key] = value


def _keeps_secrets(store: SettingsStore) -> bool:
    return bool(getattr(store, "keeps_secrets", False))


def _as_bool(value: Any) -> bool:
    """QSettings hands back ``"true"``/``"false"`` strings on some platforms (INI files)."""
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


def _as_int(value: Any, default: int) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


@dataclass(frozen=True)
class BackendSettings:
    """Where the segmentation runs. The defaults: a local backend on the CPU with the shipped model."""

    mode: str = LOCAL
    remote_url: str = ""
    remote_token: str = field(default="", repr=False)  # never in a log line or a traceback
    #: The user's explicit consent to send images to ``remote_url``; nothing is sent without it.
    remote_opt_in: bool = False
    #: Send the token over plain http to a non-loopback host (a trusted network only).
    allow_insecure_http: bool = False
    #: A PEM file of the certificates to trust for an https server (its own self-signed certificate, or
    #: the authority that signed it); "" = the system's, or REQUESTS_CA_BUNDLE's.
    remote_ca_bundle: str = ""
    local_model: str = ""  # checkpoint file; "" = the shipped model
    local_device: str = "cpu"
    local_python: str = ""  # the Python that runs the server; "" = SEGASSIST_SERVER_PYTHON or this one
    local_threads: int = 0  # torch CPU threads of the local server; 0 = torch's choice

    @classmethod
    def read(cls, store: SettingsStore, tokens: Optional[TokenFile] = None) -> LoadedSettings:
        """The settings in ``store``; the token from ``tokens`` (default: the user's :class:`TokenFile`)
        unless the store keeps secrets itself. A token an earlier version left in the store is used
        until the next :meth:`save` moves it to the token file.

        Never fails for the token file: one that cannot be read (damaged, unreadable) gives no token,
        and :attr:`LoadedSettings.problem` says why (for the status line) and what to do."""
        defaults = cls()
        values: Dict[str, Any] = {}
        for f in fields(cls):
            raw = store.value(SETTINGS_PREFIX + f.name, getattr(defaults, f.name))
            default = getattr(defaults, f.name)
            if isinstance(default, bool):
                values[f.name] = _as_bool(raw)
            elif isinstance(default, int):
                values[f.name] = _as_int(raw, default)
            else:
                values[f.name] = "" if raw is None else str(raw)
        if values["mode"] not in MODES:
            values["mode"] = LOCAL
        problem = ""
        if not _keeps_secrets(store) and values["remote_url"].strip():
            try:
                saved = (tokens or TokenFile()).get(values["remote_url"])
            except TokenFileError as exc:
                saved, problem = "", _token_file_problem(bool(values["remote_token"].strip()), exc)
            values["remote_token"] = saved or values["remote_token"]
        return LoadedSettings(cls(**values), problem)

    @classmethod
    def load(cls, store: SettingsStore, tokens: Optional[TokenFile] = None) -> BackendSettings:
        """The settings as :meth:`read` finds them (without a token the token file could not give)."""
        return cls.read(store, tokens).settings

    def save(self, store: SettingsStore, tokens: Optional[TokenFile] = None) -> str:
        """Write the settings to ``store``; the token goes to ``tokens`` (default: the user's
        :class:`TokenFile`), never into a store other users may read, unless it keeps secrets.

        Returns "" or, when the token file cannot take the token (damaged, not writable), why: the
        other settings are saved all the same and the token file is left as it is (the other
        servers' tokens in it are not overwritten)."""
        secret_elsewhere = not _keeps_secrets(store)
        token_key = SETTINGS_PREFIX + "remote_token"
        legacy = (str(store.value(SETTINGS_PREFIX + "remote_url", "") or ""), str(store.value(token_key, "") or ""))
        for f in fields(self):
            if f.name != "remote_token" or not secret_elsewhere:
                store.setValue(SETTINGS_PREFIX + f.name, getattr(self, f.name))
        if secret_elsewhere and self.remote_url.strip():
            try:
                (tokens or TokenFile()).set(self.remote_url, self.remote_token)
            except TokenFileError as exc:
                # a token an earlier version kept in the store stays there while the file cannot take
                # it (else it would be lost everywhere), as long as it is the one in use for its server
                if self.remote_token and legacy == (self.remote_url, self.remote_token):
                    return _token_file_problem(True, exc)
                store.setValue(token_key, "")
                return f"The remote server's token was not saved (it is used until Slicer exits): {exc}"
        if secret_elsewhere:
            store.setValue(token_key, "")  # the token file holds it (also one an earlier version kept here)
        return ""

    def with_changes(self, **changes: Any) -> BackendSettings:
        return replace(self, **changes)

    def validate(self) -> None:
        """Raise :class:`BackendConfigError` naming the setting to change."""
        if self.mode not in MODES:
            raise BackendConfigError(f"unknown backend mode {self.mode!r}: use {' or '.join(MODES)}")
        if self.mode == REMOTE:
            url = self.remote_url.strip()
            if not url:
                raise BackendConfigError("remote backend: enter the server URL (for example https://host:8470)")
            if not url.startswith(("http://", "https://")):
                raise BackendConfigError(f"remote backend URL must start with https:// or http://, got {url!r}")
            host = _checked_host(url)
            clear_text = url.startswith("http://") and not is_loopback_host(host) and not self.allow_insecure_http
            if clear_text and self.remote_token.strip():
                raise BackendConfigError(
                    f"remote backend: the token would cross the network in clear text to {host} (http://): "
                    "use https://, or tick 'Allow the token over plain http' on a network you trust"
                )
            bundle = self.remote_ca_bundle.strip()
            if bundle and not url.lower().startswith("https://"):
                raise BackendConfigError(
                    "remote backend: a trusted certificate verifies an https:// server; plain http has none "
                    "(use https://, or clear the certificate)"
                )
            if bundle and not Path(bundle).exists():
                raise BackendConfigError(f"remote backend: the trusted certificate file {bundle!r} does not exist")
            if not self.remote_opt_in:
                raise BackendConfigError(
                    "remote backend: images are sent to another computer only after you agree; tick "
                    "'Send images to this server' (or use the local backend)"
                )
        elif self.local_model and not Path(self.local_model).is_file():
            raise BackendConfigError(f"local backend: the model file {self.local_model!r} does not exist")
        elif not self.local_model and not SHIPPED_MODEL.is_file():
            raise BackendConfigError(
                f"local backend: the shipped model is missing ({SHIPPED_MODEL}); choose a checkpoint file"
            )

    def server_python(self) -> str:
        """The interpreter for the local server.

        Inside Slicer ``sys.executable`` is the application itself, not a Python; its interpreter
        ``PythonSlicer`` sits beside it.
        """
        if self.local_python:
            return self.local_python
        if os.environ.get("SEGASSIST_SERVER_PYTHON"):
            return os.environ["SEGASSIST_SERVER_PYTHON"]
        exe = Path(sys.executable)
        if exe.stem.lower().startswith(("python", "pythonslicer")):
            return str(exe)
        beside = shutil.which("PythonSlicer", path=str(exe.parent))
        return beside or shutil.which("PythonSlicer") or str(exe)


def _checked_host(url: str) -> str:
    """The URL's host; :class:`BackendConfigError` when it has none, or a port that is no port."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        valid = bool(host) and parts.port != -1 and not any(ch.isspace() for ch in parts.netloc)
    except ValueError:  # .port for "84a0" or 99999
        valid = False
    if not valid:
        raise BackendConfigError(
            f"remote backend URL {url!r} is not https://host:port (for example https://seg.example.org:8470)"
        )
    return host


def _token_file_problem(legacy_token: bool, error: TokenFileError) -> str:
    """Why the token file gave no token, for the status line; ``legacy_token``: a token an earlier
    version kept in Slicer's settings is used instead (it stays there until the file takes it)."""
    if legacy_token:
        return (
            "The remote server's token is used from Slicer's settings (where an earlier version kept it); "
            f"it cannot move to the token file: {error}"
        )
    return f"The remote server's token was not loaded: {error}"


@dataclass(frozen=True)
class LoadedSettings:
    """:meth:`BackendSettings.read`'s answer: the settings, and why their token is missing ("" when
    nothing went wrong), for the panel's or the effect's status line."""

    settings: BackendSettings
    problem: str = ""


def settings_from_form(
    previous: BackendSettings, form: BackendSettings, tokens: Optional[TokenFile] = None
) -> BackendSettings:
    """The settings to save after an edit of the module panel's form.

    ``previous``: the settings saved before the edit; ``form``: what the form's fields hold now. The
    token field was filled for the server saved then; when the edit gives another server address, the
    field still holds that server's token. Saved as it is, it would replace the new server's own token
    in the token file and, once the user agrees to send images there, be sent to that server. So a new
    address takes the token saved for it (none when there is none; also none when the token file
    cannot be read), never the one the field holds; and it needs the user's consent again (``remote_opt_in``
    off). The panel shows both in its form. Only a first address (none saved before) keeps the token
    typed in: it was entered for no other server.
    """
    if form.remote_url.strip() == previous.remote_url.strip():
        return form
    if not previous.remote_url.strip() and form.remote_token.strip():
        return form.with_changes(remote_opt_in=False)  # typed before the address, for it
    token = ""
    if form.remote_url.strip():
        try:
            token = (tokens or TokenFile()).get(form.remote_url)
        except TokenFileError:
            token = ""  # the status line says why when the settings are saved
    return form.with_changes(remote_token=token, remote_opt_in=False)


@dataclass(frozen=True)
class BackendStatus:
    """What the module panel shows: where, whether it answers, and which model."""

    mode: str
    connected: bool
    url: str = ""
    model: str = ""
    version: str = ""
    licence: str = ""
    devices: str = ""
    message: str = ""

    @property
    def model_text(self) -> str:
        if not self.model:
            return "(not connected)"
        return f"{self.model} {self.version}".strip()

    def summary(self) -> str:
        where = "local backend" if self.mode == LOCAL else f"remote backend {self.url}"
        if not self.connected:
            return f"{where}: {self.message or 'not connected'}"
        if not self.model:  # running (local_status), not asked which model it serves
            return f"{where}: {self.message or 'running'}"
        return f"{where}: connected, model {self.model_text} ({self.licence}) on {self.devices}"


def model_labels(status: Optional[BackendStatus]) -> Optional[Tuple[str, str]]:
    """The model and licence the module panel shows for ``status``; None: clear them (no status, or
    one that names no model: a remote server not tested, a local backend not asked, a failed test);
    the labels must never keep another backend's model or licence."""
    if status is None or not status.connected or not status.model:
        return None
    return status.model_text, status.licence or "-"


class BackendManager:
    """Owns the backend connection: starts a local server on demand or connects to the remote one.

    Thread-safe: the GUI thread changes settings while the worker thread uses the client. ``_lock``
    guards the fields and is held only for an instant; starting a local backend (up to minutes while
    the model loads) holds ``_start_lock`` instead, so the GUI never waits for a start.
    """

    def __init__(self, settings: Optional[BackendSettings] = None, state_dir: Optional[os.PathLike] = None) -> None:
        self._settings = settings or BackendSettings()
        self._state_dir = state_dir
        self._lock = threading.RLock()
        self._start_lock = threading.Lock()
        self._local: Optional[LocalBackend] = None
        self._starting: Optional[LocalBackend] = None  # a start under way: stop_local ends it at once
        self._start_stops = 0  # _stops when the start under way began
        self._client: Optional[SegAssistClient] = None
        self._generation = 0
        self._stops = 0  # stop_local() calls: a start that a stop overtook is not adopted
        self._retiring: List[threading.Thread] = []  # backends whose settings changed, stopping

    @property
    def generation(self) -> int:
        """A number that changes with the settings: a session opened under other settings (another
        server, consent withdrawn) must not go on sending prompts, or re-upload its image."""
        return self._generation

    @property
    def settings(self) -> BackendSettings:
        return self._settings

    def update_settings(self, settings: BackendSettings) -> None:
        """Use new settings; a connection made under different ones is dropped.

        A local backend stays up unless what it runs changed (model, device, Python, threads).
        """
        if settings == self._settings:  # the usual case (every edit of the module's form): no lock
            return
        retired = None
        with self._lock:
            if settings == self._settings:
                return
            if _local_key(settings) != _local_key(self._settings) and self._local is not None:
                retired, self._local = self._local, None
            if _connection_key(settings) != _connection_key(self._settings):
                self._generation += 1
            self._settings = settings
            self._drop_client()
        if retired is not None:
            # stopping waits for the server to finish (up to 20 s): not on the GUI thread that edits settings
            thread = threading.Thread(target=retired.stop, name="segassist-retire-backend", daemon=True)
            with self._lock:
                self._retiring = [t for t in self._retiring if t.is_alive()] + [thread]
            thread.start()

    # ---- connection --------------------------------------------------------------------------
    def client(self) -> SegAssistClient:
        """The client for the configured backend; a local backend is started if needed (blocks the
        calling thread, not the others: settings can change meanwhile, and the start then counts for
        nothing if they changed what the local backend runs)."""
        while True:
            with self._lock:
                settings = self._settings
                settings.validate()
                if self._client is not None and (settings.mode == REMOTE or self.local_running):
                    return self._client
                self._drop_client()
                if settings.mode == REMOTE:
                    self._client = _remote_client(settings)
                    return self._client
                if self.local_running and self._local is not None:
                    self._client = self._local.client()
                    return self._client
            with self._start_lock:  # one start at a time
                with self._lock:
                    if self._settings != settings or self.local_running:
                        continue  # changed, or started by another thread, while this one waited
                    stops = self._start_stops = self._stops
                self._wait_for_retired()  # never attach to a backend that is shutting down
                backend = self._start_local(settings)
                with self._lock:
                    stopped = self._stops != stops
                    wanted = not stopped and _local_key(self._settings) == _local_key(settings)
                    if wanted and not self.local_running:  # a dead one (crashed, killed) is replaced
                        backend, self._local = self._local, backend
                if backend is not None:  # a dead predecessor, or a start the settings or a stop overtook
                    backend.stop()
                if stopped:
                    raise BackendUnavailableError(STOPPED_WHILE_STARTING)
                if not wanted:
                    continue

    def test_connection(self) -> BackendStatus:
        """Contact the backend (health, then info with the token) and describe it; never raises."""
        settings = self._settings
        try:
            client = self.client()
            client.health(timeout=(3.0, 10.0))
            info = client.info(refresh=True)
        except (SegAssistError, ValueError) as exc:
            return BackendStatus(settings.mode, False, self._url_for(settings), message=str(exc))
        return BackendStatus(
            mode=settings.mode,
            connected=True,
            url=client.url,
            model=info.model.name,
            version=info.model.version,
            licence=info.model.licence,
            devices=", ".join(info.devices),
            message="connected" + (f" as {info.user}" if info.auth_required else ""),
        )

    # ---- the local backend --------------------------------------------------------------------
    @property
    def local_running(self) -> bool:
        return self._local is not None and self._local.running

    def start_local(self) -> BackendStatus:
        """Start (or reuse) the local backend with the current settings and describe it."""
        with self._lock:
            if self._settings.mode != LOCAL:
                self._settings = self._settings.with_changes(mode=LOCAL)
                self._generation += 1
                self._drop_client()
        self.client()
        return self.test_connection()

    def stop_local(self) -> None:
        """Stop the local backend if this manager started it (one started by another process stays).
        A start under way ends at once: its server, still loading the model, is terminated, and the
        request that started it fails saying so."""
        with self._lock:
            self._drop_client()
            local, self._local = self._local, None
            self._stops += 1
            starting = self._starting
        if starting is not None:
            starting.cancel()
        if local is not None:
            local.stop()
        self._wait_for_retired()  # backends retired by a settings change: stopped before this returns

    def _wait_for_retired(self) -> None:
        with self._lock:
            retiring = list(self._retiring)
        for thread in retiring:
            if thread.is_alive():
                thread.join(RETIRE_JOIN_S)
        with self._lock:
            self._retiring = [t for t in self._retiring if t.is_alive()]

    def local_status(self) -> BackendStatus:
        """The local backend's state without contacting it."""
        if self.local_running:
            assert self._local is not None
            owner = "started here" if self._local.owned else "shared with another process"
            return BackendStatus(LOCAL, True, self._local.url or "", message=f"running ({owner})")
        return BackendStatus(LOCAL, False, message="stopped")

    def close(self) -> None:
        """Drop the connection and stop a local backend this manager started."""
        self.stop_local()

    # ---- internals ---------------------------------------------------------------------------
    def _start_local(self, settings: BackendSettings) -> LocalBackend:
        """A started local backend for ``settings`` (called without ``_lock``, under ``_start_lock``);
        a :meth:`stop_local` meanwhile ends it at once (:data:`STOPPED_WHILE_STARTING`)."""
        extra = ["--threads", str(settings.local_threads)] if settings.local_threads > 0 else []
        python = settings.server_python()
        backend = LocalBackend(
            model=settings.local_model or None,
            device=settings.local_device or "cpu",
            state_dir=self._state_dir,
            python=python,
            extra_args=extra,
        )
        with self._lock:
            if self._stops != self._start_stops:  # stopped before the child was even started
                raise BackendUnavailableError(STOPPED_WHILE_STARTING)
            self._starting = backend
        try:
            backend.start()
        except ServerPythonError as exc:  # the interpreter could not be executed at all
            raise BackendConfigError(
                f"could not start the local backend: {exc}. Set 'Server Python' to "
                "a Python with torch, MONAI and FastAPI (see docs/slicer.md)"
            ) from exc
        except LocalBackendError as exc:
            with self._lock:
                stopped = self._stops != self._start_stops
            if stopped:
                raise BackendUnavailableError(STOPPED_WHILE_STARTING) from None
            if exc.missing_modules:  # Slicer's Python (or the one chosen) lacks the server's packages
                raise BackendConfigError(
                    f"the local backend cannot start: its Python ({python}) lacks {', '.join(exc.missing_modules)}. "
                    "Press 'Install backend packages...' in the SegAssist module, or set 'Server Python' to a "
                    f"Python that has them; details in {exc.log_file}"
                ) from exc
            raise
        finally:
            with self._lock:
                if self._starting is backend:
                    self._starting = None
        return backend

    def _drop_client(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.close()

    @staticmethod
    def _url_for(settings: BackendSettings) -> str:
        return settings.remote_url.strip() if settings.mode == REMOTE else ""


def _remote_client(settings: BackendSettings) -> SegAssistClient:
    """The client of the remote server; what the client refuses (validated settings rarely get here)
    is a :class:`BackendConfigError`, not a bare ValueError."""
    try:
        return SegAssistClient(
            settings.remote_url.strip(),
            settings.remote_token.strip() or None,
            allow_insecure_token=settings.allow_insecure_http,
            verify=settings.remote_ca_bundle.strip() or True,
        )
    except ValueError as exc:
        raise BackendConfigError(f"remote backend settings: {exc}") from exc


def _connection_key(settings: BackendSettings) -> Tuple[Any, ...]:
    """What decides where prompts and images go: an edit of anything else (the remote address while
    working locally) leaves open sessions alone."""
    if settings.mode == REMOTE:
        return (
            REMOTE,
            settings.remote_url.strip(),
            settings.remote_token.strip(),
            settings.remote_opt_in,
            settings.allow_insecure_http,
            settings.remote_ca_bundle.strip(),
        )
    return (LOCAL,) + _local_key(settings)


def _local_key(settings: BackendSettings) -> Tuple[str, str, str, int]:
    return (settings.local_model, settings.local_device, settings.local_python, settings.local_threads)


_shared_lock = threading.Lock()
_shared: Optional[BackendManager] = None


def shared_manager(initial_settings: Optional[Callable[[], BackendSettings]] = None) -> BackendManager:
    """The process-wide manager the SegAssist module panel and its segment editor effect share.

    ``initial_settings`` is called once, when the manager is created (in Slicer: the settings
    saved in ``qt.QSettings``); afterwards the module panel updates it as the user edits them.
    """
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = BackendManager(initial_settings() if initial_settings is not None else None)
        return _shared


_by_settings: Dict[BackendSettings, BackendManager] = {}


def manager_for(settings: BackendSettings) -> BackendManager:
    """A manager for these exact settings, kept as long as the process runs (for callers that keep a
    client of it; a local backend it starts runs until the process exits or :meth:`BackendManager.close`).
    A single call uses :func:`engine_for_call` instead, which stops what it started.

    A local backend lives as long as the object that started it (its stdin pipe is the lifeline),
    so a manager made for one call must not be dropped while its client is still in use.
    """
    with _shared_lock:
        shared = _shared
    if shared is not None and shared.settings == settings:
        return shared
    with _shared_lock:
        manager = _by_settings.get(settings)
        if manager is None:
            manager = _by_settings[settings] = BackendManager(settings)
        return manager


@contextmanager
def engine_for_call(
    backend: Any = None,
    shared: Optional[Callable[[], BackendManager]] = None,
    state_dir: Optional[os.PathLike] = None,
) -> Iterator[Any]:
    """The engine one blocking call (``SegAssistLogic.segment``) uses, for as long as it runs.

    ``backend`` None: the shared manager's (``shared()``, default :func:`shared_manager`), left as it
    is. :class:`BackendSettings`: the shared manager's if it has exactly these settings; else a manager
    made for this call, closed when the call ends, also when it fails: a local backend it started is
    stopped rather than left running until Slicer exits. Anything else is an engine (or client), used as
    it is (its owner closes it). ``state_dir``: where a call's own local backend keeps its log.
    """
    if backend is None:
        yield (shared or shared_manager)().client()
        return
    if not isinstance(backend, BackendSettings):
        yield backend
        return
    with _shared_lock:
        current = _shared
    if current is not None and current.settings == backend:
        yield current.client()
        return
    manager = BackendManager(backend, state_dir)
    try:
        yield manager.client()
    finally:
        manager.close()
