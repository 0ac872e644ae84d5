"""The local backend: started in a child process for the user, reused, and stopped with its parent."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from test_server_fixtures import make_volume

from SegAssistLib.client import AuthenticationError, LocalBackend, LocalBackendError, SegAssistClient
from SegAssistLib.client.local import ServerPythonError, process_alive
from SegAssistLib.prompts import PointPrompt

pytest_plugins = ["test_server_fixtures"]
REPO = Path(__file__).resolve().parents[2]


def wait_until(condition, seconds: float, poll) -> bool:
    """Poll ``condition`` until it holds or the deadline passes; ``poll()`` paces the loop."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        poll()
    return True


def test_local_backend_starts_serves_is_reused_and_stops(server_checkpoint, tmp_path):
    backend = LocalBackend(model=server_checkpoint, state_dir=tmp_path, startup_timeout=120).start()
    try:
        assert backend.owned and backend.running and backend.url.startswith("http://127.0.0.1:")
        state_file = next(tmp_path.glob("backend-*.json"))
        assert oct(state_file.stat().st_mode & 0o777) == "0o600"
        assert json.loads(state_file.read_text())["pid"] == backend.pid
        client = backend.client()
        info = client.info()
        assert info.auth_required and info.user == "local" and info.model.name == "test"
        with pytest.raises(AuthenticationError):  # a fresh token guards even the local backend
            SegAssistClient(backend.url).info()
        with client.open_session(make_volume(seed=41)) as session:
            session.add_prompt(PointPrompt(position=(24.0, 20.0, 12.0)))
            assert np.array_equal(session.result(), session.fetch_result())

        second = LocalBackend(model=server_checkpoint, state_dir=tmp_path).start()
        assert not second.owned and second.url == backend.url and second.pid == backend.pid
        second.stop()  # not its process: nothing happens
        assert backend.running and second.client().health().status == "ok"
        assert LocalBackend.shared(model=server_checkpoint, state_dir=tmp_path).url == backend.url
        # asked with other options (Slicer's thread setting): not the running one, which ignores them
        other = LocalBackend(model=server_checkpoint, state_dir=tmp_path, extra_args=["--threads", "1"])
        assert not other.attach() and other._state_file != state_file
    finally:
        backend.stop()
    assert not process_alive(backend.pid)
    assert not list(tmp_path.glob("backend-*.json"))


def test_a_stale_state_file_never_attaches_to_a_foreign_server_or_a_reused_pid(server_checkpoint, tmp_path):
    """The state file of a backend killed with its launcher: its pid now another program's, its port
    another user's server run without a token (which accepts any token, so the old check that the
    token is accepted passed): images went to a server the user never chose. And a backend started
    by another Slicer counted as running while its pid lived, so a reused pid kept the dead URL."""
    env = {k: v for k, v in os.environ.items() if k != "SEGASSIST_TOKEN"}
    port_file = tmp_path / "foreign.port"
    foreign = subprocess.Popen(
        [sys.executable, "-m", "SegAssistLib.server", "--host", "127.0.0.1", "--port", "0",
         "--port-file", str(port_file), "--model", str(server_checkpoint)],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    unrelated = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        assert wait_until(lambda: port_file.is_file() and port_file.read_text().strip(), 60, lambda: time.sleep(0.2))
        url = f"http://127.0.0.1:{int(port_file.read_text())}"
        assert wait_until(lambda: _answers(url), 60, lambda: time.sleep(0.2))
        backend = LocalBackend(model=server_checkpoint, state_dir=tmp_path)
        stale = {"url": url, "token": "x" * 43, "pid": unrelated.pid, **backend._identity_fields}
        backend.state_dir.mkdir(parents=True, exist_ok=True)
        backend._state_file.write_text(json.dumps(stale))
        assert not backend.attach() and backend.url is None

        foreign.terminate()
        foreign.wait(30)
        backend.url, backend.pid = url, unrelated.pid  # attached once; its backend died, the pid lives on
        assert process_alive(unrelated.pid) and not backend.running
    finally:
        for process in (foreign, unrelated):
            process.kill()
            process.wait(30)


def _answers(url: str) -> bool:
    try:
        return SegAssistClient(url, retries=0).health().status == "ok"
    except Exception:
        return False


def test_local_backend_stops_when_its_parent_dies(server_checkpoint, tmp_path):
    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                """
                import sys
                from SegAssistLib.client import LocalBackend
                backend = LocalBackend(model=sys.argv[1], state_dir=sys.argv[2], startup_timeout=120).start()
                print(backend.pid, flush=True)
                sys.stdin.read()  # until killed
                """
            ),
            str(server_checkpoint),
            str(tmp_path),
        ],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        line = parent.stdout.readline()  # the child prints once its backend is healthy
        assert line.strip().isdigit(), f"the launcher failed (exit {parent.poll()})"
        server_pid = int(line)
        assert process_alive(server_pid)
    finally:
        parent.kill()  # no atexit, no cleanup: only the closed pipe tells the server
        parent.wait(30)
    assert wait_until(lambda: not process_alive(server_pid), 60, lambda: parent.wait(0.05))
    stale = LocalBackend(model=server_checkpoint, state_dir=tmp_path)
    assert not stale.attach()  # the state file names a dead process: not reused


def test_local_backend_reports_a_failed_start(tmp_path):
    backend = LocalBackend(model=tmp_path / "missing.pt", state_dir=tmp_path, startup_timeout=60)
    with pytest.raises(LocalBackendError) as e:
        backend.start()
    assert "missing.pt" in str(e.value) and "exited with code 2" in str(e.value)
    assert not backend.running


def test_local_backend_passes_the_token_in_the_environment_only(tmp_path):
    backend = LocalBackend(model=tmp_path / "m.pt", state_dir=tmp_path)
    command = backend._command(tmp_path / "port")
    assert "--exit-with-parent" in command and "127.0.0.1" in command
    assert not any("token" in part.lower() for part in command)


@pytest.mark.skipif(sys.platform == "win32", reason="the stand-in interpreter is a shell script")
def test_another_server_python_starts_clean_of_slicers_environment_and_working_folder(
    server_checkpoint, tmp_path, monkeypatch
):
    """Inside Slicer, PYTHONHOME and PYTHONPATH point at Slicer's Python, and the working folder may
    hold an old checkout: the server run by another interpreter must see neither."""
    wrapper = tmp_path / "other-python"  # another interpreter, as the 'Server Python' setting names one
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.setenv("PYTHONHOME", str(tmp_path / "slicer" / "lib" / "Python"))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "slicer" / "lib" / "site-packages"))
    shadow = tmp_path / "cwd" / "SegAssistLib" / "server"
    shadow.mkdir(parents=True)
    for folder in (shadow.parent, shadow):
        (folder / "__init__.py").write_text("")
    (shadow / "__main__.py").write_text("print('an old checkout answered')\n")
    monkeypatch.chdir(tmp_path / "cwd")
    backend = LocalBackend(
        model=server_checkpoint, state_dir=tmp_path / "state", python=str(wrapper), startup_timeout=120
    )
    try:
        backend.start()
        assert backend.client().info().model.name == "test"
    finally:
        backend.stop()
    # this interpreter itself keeps the environment it was given
    same = LocalBackend(model=server_checkpoint, state_dir=tmp_path / "state")
    assert same._environment("t")["PYTHONHOME"] == str(tmp_path / "slicer" / "lib" / "Python")


def test_a_state_file_that_cannot_be_written_stops_the_started_server(server_checkpoint, tmp_path, monkeypatch):
    def disk_full(path, text):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("SegAssistLib.client.local._write_private", disk_full)
    backend = LocalBackend(model=server_checkpoint, state_dir=tmp_path, startup_timeout=120)
    with pytest.raises(LocalBackendError, match="state file .*No space left"):
        backend.start()
    assert backend.pid is not None and not process_alive(backend.pid) and not backend.running


def test_local_file_problems_are_named_as_such(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(LocalBackendError, match="state folder") as e:
        LocalBackend(model=tmp_path / "m.pt", state_dir=blocker / "state").start()
    assert not isinstance(e.value, ServerPythonError)
    with pytest.raises(ServerPythonError, match="could not run"):
        LocalBackend(model=tmp_path / "m.pt", state_dir=tmp_path, python=str(tmp_path / "no-python")).start()


def test_relative_paths_are_taken_from_the_callers_folder(tmp_path, monkeypatch):
    """The server runs in the state folder: a relative state folder or Server Python given from
    another folder named files that do not exist there (the port file was never seen)."""
    monkeypatch.chdir(tmp_path)
    backend = LocalBackend(model=tmp_path / "m.pt", state_dir="state", python=".venv/bin/python")
    assert backend.state_dir == tmp_path / "state"
    assert backend.python == str(tmp_path / ".venv" / "bin" / "python")
    assert LocalBackend(model=tmp_path / "m.pt", state_dir="state", python="python3").python == "python3"
    # a virtual environment's python stays the link it is: its target would not see the environment
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "python").symlink_to(sys.executable)
    assert LocalBackend(model=tmp_path / "m.pt", python="bin/python").python == str(tmp_path / "bin" / "python")


def test_relative_paths_in_the_server_options_are_the_callers_and_part_of_the_identity(tmp_path, monkeypatch):
    """The server runs in the state folder: ``--learn-store store`` given by two projects named one
    store there (and the same relative string in both identities: one backend for both)."""
    model = tmp_path / "m.pt"
    model.write_bytes(b"weights")
    args = ["--learn-store", "store", "--data-dir=images", "--token", "tokens.txt", "--threads", "1",
            "--tls-cert", "/etc/cert.pem", "--model", "other.pt"]  # fmt: skip
    state_files = []
    for project in ("a", "b"):
        here = tmp_path / project
        here.mkdir()
        monkeypatch.chdir(here)
        backend = LocalBackend(model=model, state_dir=tmp_path / "state", extra_args=args)
        assert backend.extra_args == [
            "--learn-store", str(here / "store"), f"--data-dir={here / 'images'}", "--token", str(here / "tokens.txt"),
            "--threads", "1", "--tls-cert", "/etc/cert.pem", "--model", str(here / "other.pt"),
        ]  # fmt: skip
        assert backend._command(tmp_path / "port")[-len(args) :] == backend.extra_args
        state_files.append(backend._state_file)
    assert state_files[0] != state_files[1]


def test_another_environment_or_rewritten_weights_are_another_backend(tmp_path):
    """``env={"CUDA_VISIBLE_DEVICES": "1"}`` attached to the backend running on GPU 0, and weights
    overwritten in place (same path) kept the backend that had loaded the old ones."""
    model = tmp_path / "m.pt"
    model.write_bytes(b"weights v1")

    def state_file(env=None, extra_args=()):
        return LocalBackend(model=model, state_dir=tmp_path, env=env, extra_args=extra_args)._state_file

    gpu0 = state_file({"CUDA_VISIBLE_DEVICES": "0"})
    assert state_file({"CUDA_VISIBLE_DEVICES": "0"}) == gpu0
    assert state_file({"CUDA_VISIBLE_DEVICES": "1"}) != gpu0 and state_file() != gpu0
    on_options = state_file(extra_args=["--model", str(model)])
    stat = model.stat()
    os.utime(model, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # new weights, same path
    assert state_file({"CUDA_VISIBLE_DEVICES": "0"}) != gpu0
    assert state_file(extra_args=["--model", str(model)]) != on_options


def test_a_started_backend_keeps_relative_paths_in_the_callers_folder_and_serves_only_its_own_env(
    server_checkpoint, tmp_path, monkeypatch
):
    model = tmp_path / "m.pt"
    shutil.copyfile(server_checkpoint, model)
    (tmp_path / "project").mkdir()
    monkeypatch.chdir(tmp_path / "project")
    options = {"model": model, "state_dir": tmp_path / "state", "extra_args": ["--data-dir", "images"]}
    backend = LocalBackend(env={"SEGASSIST_TEST_MARK": "A"}, startup_timeout=120, **options).start()
    try:
        backend.client().upload_image(make_volume(seed=47))
        assert any((tmp_path / "project" / "images").rglob("*")), "the image was not kept where the caller meant"
        assert not (tmp_path / "state" / "images").exists()
        assert LocalBackend(env={"SEGASSIST_TEST_MARK": "A"}, **options).attach()
        assert not LocalBackend(env={"SEGASSIST_TEST_MARK": "B"}, **options).attach()  # another GPU, say
        stat = model.stat()
        os.utime(model, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # weights replaced in place
        assert not LocalBackend(env={"SEGASSIST_TEST_MARK": "A"}, **options).attach()
    finally:
        backend.stop()
