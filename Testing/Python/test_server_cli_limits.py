"""``segassist serve`` refuses settings it cannot serve with, in one line and exit code 2, before it
loads a model: a limit that is not a finite number, a device list that names no device."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError
from test_server_fixtures import TOKENS, make_volume

from SegAssistLib.client import SegAssistClient
from SegAssistLib.server.settings import Limits, ServerSettings

pytest_plugins = ["test_server_fixtures"]

REPO = Path(__file__).resolve().parents[2]
FLOAT_LIMITS = [name for name, field in Limits.model_fields.items() if field.annotation in (float, "float")]


def _serve(*args: str) -> subprocess.CompletedProcess:
    """``python -m SegAssistLib.server`` with ``args``; a server that starts instead of refusing them
    runs until the timeout, which fails the test."""
    return subprocess.run(
        [sys.executable, "-m", "SegAssistLib.server", "--port", "0", *args],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_the_float_limits_are_the_timeouts():
    assert sorted(FLOAT_LIMITS) == ["idle_timeout_s", "upload_slot_wait_s", "upload_timeout_s"]


@pytest.mark.parametrize("name", FLOAT_LIMITS)
@pytest.mark.parametrize("value", ["inf", "nan"])
def test_a_limit_that_is_not_finite_is_one_line_at_the_cli(name, value):
    flag = "--" + name.replace("_", "-")
    done = _serve(flag, value)
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert done.stderr.startswith(f"segassist serve: error: {flag}: ") and "finite" in done.stderr
    with pytest.raises(ValidationError):
        Limits(**{name: float(value)})


@pytest.mark.parametrize("device", ["", ",", " , "])
def test_a_device_list_that_names_no_device_is_one_line_at_the_cli(device):
    done = _serve("--device", device)
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert done.stderr.startswith(f"segassist serve: error: --device {device!r} names no device")
    with pytest.raises(ValidationError):
        ServerSettings(devices=())


def test_long_finite_timeouts_serve(server_factory):
    """"Practically never" is a large finite number: the server runs with it and clients read its info."""
    server = server_factory.start(idle_timeout_s=1e12, upload_timeout_s=1e12, upload_slot_wait_s=1e12)
    client = SegAssistClient(server.url, TOKENS["alice"])
    assert client.info().limits.idle_timeout_s == 1e12
    with client.open_session(make_volume(shape=(8, 9, 10), seed=91)) as session:
        assert session.status().expires_in_s > 1e11
