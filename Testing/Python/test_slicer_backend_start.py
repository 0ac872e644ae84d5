"""Starting the module's local backend, with real child processes: a Stop pressed during a start ends
it at once, and a start that fails says why in one line a Slicer user can act on, from this start's
own log lines (the log is shared by every start of the same backend).

The server Pythons are real interpreters: this one with a ``sitecustomize`` that hides packages (as
Slicer's Python lacks torch and FastAPI), and a stand-in that never becomes healthy (a model that
takes minutes to load).
"""

from __future__ import annotations

import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from SegAssistLib.client import BackendUnavailableError, LocalBackend, LocalBackendError
from SegAssistLib.client.local import process_alive
from SegAssistLib.slicer.backend import BackendConfigError, BackendManager, BackendSettings

STOPPED_WHILE_STARTING = "the local backend was stopped while it started"

SERVER_PACKAGES = ("torch", "monai", "skimage", "fastapi", "uvicorn", "starlette")


def _hiding(tmp_path: Path, monkeypatch, names) -> None:
    """This interpreter, for its children, without ``names`` (an import of them fails)."""
    folder = tmp_path / "hide"
    folder.mkdir()
    (folder / "sitecustomize.py").write_text(
        textwrap.dedent(
            f"""
            import sys

            class _Hide:
                def find_spec(self, name, path=None, target=None):
                    if name.split(".")[0] in {set(names)!r}:
                        raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
                    return None

            sys.meta_path.insert(0, _Hide())
            """
        )
    )
    monkeypatch.setenv("PYTHONPATH", str(folder))


def _slow_python(tmp_path: Path) -> str:
    """A server Python whose model never finishes loading: it never reports a port."""
    script = tmp_path / "slow-python"
    script.write_text(f'#!/bin/sh\nexec "{sys.executable}" -c "import time; time.sleep(120)"\n')
    script.chmod(0o755)
    return str(script)


@pytest.mark.skipif(sys.platform == "win32", reason="the stand-in interpreter is a shell script")
def test_stop_during_a_start_ends_the_starting_server_at_once(tmp_path):
    """Stop returned at once and the panel said "stopped", but the child went on loading the model
    (holding its memory) until it was healthy or 180 s passed, and a new Start waited behind it."""
    manager = BackendManager(BackendSettings(local_python=_slow_python(tmp_path)), state_dir=tmp_path / "state")
    outcome = {}

    def ask(key):
        try:
            outcome[key] = manager.client()
        except Exception as exc:  # noqa: BLE001 - handed to the test
            outcome[key] = exc

    first = threading.Thread(target=ask, args=("first",), daemon=True)
    first.start()
    deadline = time.monotonic() + 20
    while getattr(getattr(manager, "_starting", None), "pid", None) is None and time.monotonic() < deadline:
        time.sleep(0.02)
    child = manager._starting.pid  # the server process, loading its model
    assert process_alive(child)

    began = time.monotonic()
    manager.stop_local()
    first.join(10)
    assert not first.is_alive() and time.monotonic() - began < 10  # not 180 s
    assert isinstance(outcome["first"], BackendUnavailableError)
    assert STOPPED_WHILE_STARTING in str(outcome["first"])
    assert not process_alive(child)  # its memory is free
    assert manager.local_status().summary() == "local backend: stopped"
    assert not manager._start_lock.locked()  # a new Start does not wait behind the discarded one

    second = threading.Thread(target=ask, args=("second",), daemon=True)  # Start again: a new child loads
    second.start()
    while manager._starting is None and second.is_alive():
        time.sleep(0.02)
    manager.stop_local()
    second.join(10)
    assert isinstance(outcome["second"], BackendUnavailableError)


def test_a_stop_before_the_child_is_started_starts_none(tmp_path, monkeypatch):
    """Stop pressed while the start still waits for a retiring backend: the start begins no child."""
    manager = BackendManager(BackendSettings(local_python=sys.executable), state_dir=tmp_path)
    spawned = []
    monkeypatch.setattr(LocalBackend, "_spawn", lambda self: spawned.append(self))
    stops = []

    def stop_while_waiting():  # the user presses Stop while the start waits for a retiring backend
        if not stops:
            stops.append(1)
            manager.stop_local()

    monkeypatch.setattr(manager, "_wait_for_retired", stop_while_waiting)
    with pytest.raises(BackendUnavailableError, match=STOPPED_WHILE_STARTING):
        manager.client()
    assert spawned == [] and manager._starting is None


@pytest.mark.parametrize(
    "hidden, named",
    [
        (SERVER_PACKAGES, "torch, monai, skimage, fastapi, uvicorn, starlette"),  # serve's own check
        (("numpy",) + SERVER_PACKAGES, "numpy"),  # an import before that check: a traceback in the log
    ],
)
def test_a_python_without_the_server_packages_gets_slicer_advice_in_one_line(tmp_path, monkeypatch, hidden, named):
    """The most common first run: Slicer's Python without torch. The status line held the log's
    last 20 lines (a traceback when numpy was missing) and ended with the server's
    ``pip install 'segassist[engine,server]'``, which is not how a Slicer user installs them."""
    _hiding(tmp_path, monkeypatch, hidden)
    manager = BackendManager(BackendSettings(local_python=sys.executable), state_dir=tmp_path / "state")
    with pytest.raises(BackendConfigError) as caught:
        manager.client()
    message = str(caught.value)
    assert "\n" not in message and "Traceback" not in message
    assert f"lacks {named}." in message
    assert "'Install backend packages...'" in message and "'Server Python'" in message
    assert "pip install" not in message
    log = caught.value.__cause__.log_file
    assert str(log) in message and Path(log).is_file()


def test_each_failed_start_reports_its_own_lines_not_those_of_earlier_starts(tmp_path, monkeypatch):
    """Every start of a backend appends to the same log: the second failure showed the first one's
    line again above its own."""
    _hiding(tmp_path, monkeypatch, SERVER_PACKAGES)
    errors = []
    for _ in range(2):
        with pytest.raises(LocalBackendError) as caught:
            LocalBackend(state_dir=tmp_path / "state", extra_args=["--log-level", "info"], startup_timeout=60).start()
        errors.append(caught.value)
    first, second = errors
    assert first.log_file == second.log_file
    lacking = [line for line in second.log_lines if "which this install lacks" in line]
    assert len(lacking) == 1 and second.missing_modules == list(SERVER_PACKAGES)
    assert str(second).count("which this install lacks") == 1 and "\n" not in str(second)
    assert Path(second.log_file).read_text().count("which this install lacks") == 2  # the log keeps both


def test_missing_modules_are_read_from_either_way_python_or_the_server_says_so():
    from SegAssistLib.client.local import missing_modules

    said = "segassist serve: error: this command needs torch, monai, which this install lacks: pip install x"
    assert missing_modules([said]) == ["torch", "monai"]
    assert missing_modules(["Traceback ...", "ModuleNotFoundError: No module named 'numpy'"]) == ["numpy"]
    assert missing_modules(["ModuleNotFoundError: No module named 'pydantic.v1'"]) == ["pydantic"]
    assert missing_modules(["segassist serve: error: --model /x/missing.pt: no such file"]) == []
    assert missing_modules(["ModuleNotFoundError: No module named 'SegAssistLib.server'"]) == []  # not a package


def test_a_start_that_fails_for_another_reason_keeps_its_own_cause(tmp_path):
    """A missing checkpoint is not blamed on the packages: the cause, in one line, and the log."""
    with pytest.raises(LocalBackendError) as caught:
        LocalBackend(model=tmp_path / "missing.pt", state_dir=tmp_path, startup_timeout=60).start()
    message = str(caught.value)
    assert "missing.pt" in message and "\n" not in message and str(caught.value.log_file) in message
    assert caught.value.missing_modules == []
