"""``segassist serve`` refuses what it cannot start with in one line and exit 2, in a real process:
a model file that is not a checkpoint (it was an 88-line traceback of the failed start and exit 3),
a port in use (a line without the command's prefix), and a core install (it named one extra, then
the next after that was installed)."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytest_plugins = ["test_server_fixtures"]

REPO = Path(__file__).resolve().parents[2]


def _serve(*argv: str, prefix=("-m", "SegAssistLib.cli")) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *prefix, "serve", "--log-level", "warning", *argv], capture_output=True,
                          text=True, timeout=120)  # fmt: skip


def _one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    err = result.stderr
    assert err.startswith("segassist serve: error: ") and err.count("\n") == 1, err[-2000:]
    assert "Traceback" not in err and "SegAssist backend on" not in err
    return err


@pytest.mark.parametrize("name, message", [
    ("Samples/README.md", "not a torch file"),
    ("Models/training_state.pt", "is not a SegAssist checkpoint"),
])  # fmt: skip
def test_a_model_that_is_not_a_checkpoint_is_one_line_before_the_port_is_bound(tmp_path, name, message):
    port_file = tmp_path / "port.txt"
    result = _serve("--port", "0", "--port-file", str(port_file), "--model", str(REPO / "Resources" / name))
    err = _one_line_error(result)
    assert message in err and name.split("/")[-1] in err, err
    assert not port_file.exists()  # never listened


def test_a_port_in_use_is_named_with_the_commands_prefix(server_checkpoint):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = _serve("--port", str(port), "--model", str(server_checkpoint))
    assert f"cannot listen on 127.0.0.1:{port}" in _one_line_error(result)


def test_a_core_install_names_every_extra_serve_needs_at_once():
    """Without torch and FastAPI: one install command that brings both, not [engine] and then [server]."""
    from test_packaging import BLOCKER

    err = _one_line_error(_serve("--port", "0", prefix=("-c", BLOCKER)))
    assert "pip install 'segassist[engine,server]'" in err and "torch" in err and "fastapi" in err, err
