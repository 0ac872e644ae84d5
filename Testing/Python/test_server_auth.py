"""Tokens (hashed, compared against every entry), exposure rules, and the serve command line."""

from __future__ import annotations

import argparse
import os
import re
import stat

import pytest

from SegAssistLib.server import register, run_serve
from SegAssistLib.server.auth import (
    TokenVerifier,
    env_token_entry,
    hash_token,
    issue_token,
    new_token,
    parse_token_file,
)
from SegAssistLib.server.cli import settings_from_args
from SegAssistLib.server.settings import ServerSettings, check_exposure, is_loopback

pytest_plugins = ["test_server_fixtures"]


def serve_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="segassist")
    register(parser.add_subparsers(dest="command"))
    return parser.parse_args(["serve", *argv])


def test_issued_tokens_are_stored_hashed(tmp_path):
    path = tmp_path / "tokens.txt"
    alice = issue_token(path, "alice")
    bob = issue_token(path, "bob")
    text = path.read_text()
    assert alice not in text and bob not in text
    assert f"alice:sha256:{hash_token(alice)}" in text
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert parse_token_file(path) == [("alice", hash_token(alice)), ("bob", hash_token(bob))]
    with pytest.raises(ValueError, match="already has a token"):
        issue_token(path, "alice")
    for bad in ("eve/../x", "_svc", "-x", "carol\n", "carol\nmallory:sha256:" + "0" * 64):
        with pytest.raises(ValueError, match="not valid: 1-64 characters"):
            issue_token(path, bad)  # a name the datastore could not record, or a forged line
    assert parse_token_file(path) == [("alice", hash_token(alice)), ("bob", hash_token(bob))]


def test_every_token_user_can_be_recorded_by_the_datastore(tmp_path):
    from SegAssistLib.learning.records import check_user

    path = tmp_path / "tokens.txt"
    for user in ("alice", "r.smith@example.org", "7", "a" * 64):
        issue_token(path, user)
        assert check_user(user) == user
    path.write_text("_svc:sha256:" + "a" * 64 + "\n")
    with pytest.raises(ValueError, match="tokens.txt:1: user name '_svc' is not valid"):
        parse_token_file(path)


def test_token_file_lines_are_checked(tmp_path):
    path = tmp_path / "tokens.txt"
    path.write_text("# team\n\nalice:sha256:" + "a" * 64 + "\n")
    assert parse_token_file(path) == [("alice", "a" * 64)]
    path.write_text("alice:plain-token-in-the-clear\n")
    with pytest.raises(ValueError, match=r"tokens.txt:1: expected"):
        parse_token_file(path)
    path.write_text("a b:sha256:" + "a" * 64 + "\n")
    with pytest.raises(ValueError, match="user name"):
        parse_token_file(path)


def test_verifier_finds_the_user_of_a_token():
    alice, bob = new_token(), new_token()
    assert len(alice) >= 40 and alice != bob
    verifier = TokenVerifier([("alice", hash_token(alice)), ("bob", hash_token(bob))])
    assert verifier.enabled
    assert verifier.user_for(alice) == "alice" and verifier.user_for(bob) == "bob"
    assert verifier.user_for(alice[:-1]) is None and verifier.user_for("") is None
    assert verifier.user_for(None) is None and verifier.user_for("\udcff") is None
    assert not TokenVerifier([]).enabled


def test_issued_tokens_never_start_with_a_dash_so_that_token_TOKEN_is_one_argument(tmp_path):
    """One token in 64 started with '-' (``-umASnB5...``): ``segassist segment --token TOKEN`` then read it
    as an option. 2,000 draws hold one starting with '-' but with a chance of 1 in 10^13."""
    tokens = [new_token() for _ in range(2000)]
    assert not [t for t in tokens if t.startswith("-")]
    assert len(set(tokens)) == len(tokens) and {len(t) for t in tokens} == {43}  # still 256 random bits
    assert any("-" in t for t in tokens)  # the alphabet is unchanged: a dash elsewhere is fine
    path = tmp_path / "tokens.txt"
    issued = [issue_token(path, f"user{n}") for n in range(200)]
    assert not [t for t in issued if t.startswith("-")]
    assert [h for _, h in parse_token_file(path)] == [hash_token(t) for t in issued]


def test_token_from_the_environment():
    assert env_token_entry({}) is None
    assert env_token_entry({"SEGASSIST_TOKEN": "x" * 20}) == ("local", hash_token("x" * 20))
    assert env_token_entry({"SEGASSIST_TOKEN": "x" * 20, "SEGASSIST_TOKEN_USER": "ann"})[0] == "ann"
    with pytest.raises(ValueError, match="shorter"):
        env_token_entry({"SEGASSIST_TOKEN": "short"})


def test_no_token_means_loopback_only():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost") and is_loopback("[::1]")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3") and not is_loopback("example.org")
    check_exposure(ServerSettings(host="127.0.0.1"))
    with pytest.raises(ValueError, match="refusing to listen"):
        check_exposure(ServerSettings(host="0.0.0.0"))
    check_exposure(ServerSettings(host="0.0.0.0", token_hashes=[("alice", "a" * 64)]))
    with pytest.raises(ValueError, match="TLS needs both"):
        check_exposure(ServerSettings(tls_certfile="cert.pem"))


def test_serve_refuses_an_open_address_without_tokens(capsys, monkeypatch):
    monkeypatch.delenv("SEGASSIST_TOKEN", raising=False)
    assert run_serve(serve_args("--host", "0.0.0.0")) == 2
    assert "refusing to listen" in capsys.readouterr().err


def test_serve_refuses_bad_settings_in_one_line_before_it_starts(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("SEGASSIST_TOKEN", raising=False)
    a_file = tmp_path / "afile"
    a_file.write_text("x")
    cases = [
        (("--tls-cert", str(tmp_path / "c.pem"), "--tls-key", str(tmp_path / "k.pem")), "--tls-cert .*: no such file"),
        (("--model", str(tmp_path)), "--model .*: no such file"),
        (("--data-dir", str(a_file)), "--data-dir .*afile is a file, not a folder"),
        (("--learn-store", str(a_file / "store")), "--learn-store .*afile is a file, not a folder"),
        (("--port-file", str(a_file / "port.txt")), "--port-file .*afile is a file, not a folder"),
        (("--max-voxels", "-1"), "--max-voxels: Input should be greater than"),
        (("--device", "bogus"), "invalid device 'bogus'"),
        (("--issue-token", "", "--token-file", str(tmp_path / "t.txt")), "needs the user name"),
        (("--issue-token", "ann", "--token-file", str(tmp_path)), "cannot write the token file"),
        (("--tls-cert", str(a_file), "--tls-key", str(a_file)), "not a PEM certificate and its private key"),
    ]
    for argv, message in cases:
        assert run_serve(serve_args(*argv)) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("segassist serve: error: ") and err.count("\n") == 1, err
        assert re.search(message, err), (argv, err)


def test_serve_issues_tokens_and_reads_limits(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("SEGASSIST_TOKEN", raising=False)
    tokens = tmp_path / "tokens.txt"
    assert run_serve(serve_args("--token-file", str(tokens), "--issue-token", "carol")) == 0
    token = capsys.readouterr().out.strip()
    assert parse_token_file(tokens) == [("carol", hash_token(token))]
    args = serve_args(
        "--host", "0.0.0.0", "--token-file", str(tokens), "--max-voxels", "1000",
        "--idle-timeout-s", "5", "--device", "cpu,cuda:1", "--refine-depth", "2", "--edge-band", "0",
    )  # fmt: skip
    settings = settings_from_args(args)
    check_exposure(settings)
    assert settings.limits.max_voxels == 1000 and settings.limits.idle_timeout_s == 5.0
    assert settings.refine_depth == 2 and settings_from_args(serve_args()).refine_depth == 1
    assert settings.edge_band == 0 and settings_from_args(serve_args()).edge_band == 2.0
    assert settings.devices == ("cpu", "cuda:1") and settings.auth_required
    monkeypatch.setenv("SEGASSIST_TOKEN", "env-token-0123456789")
    assert [u for u, _ in settings_from_args(args).token_hashes] == ["carol", "local"]


def test_the_port_file_folder_is_made_when_missing(tmp_path):
    from SegAssistLib.server.runner import write_port_file

    target = tmp_path / "not" / "yet" / "port.txt"
    write_port_file(target, 8471)
    assert target.read_text() == "8471" and [p.name for p in target.parent.iterdir()] == ["port.txt"]


def test_run_serve_gives_the_callers_sigterm_handler_back(tmp_path, server_checkpoint):
    """``run_serve`` is public: a program that calls it keeps its own SIGTERM handler afterwards, and
    a SIGTERM during the run reaches that handler once the server is down and its port file gone."""
    import signal
    import threading
    import time

    from SegAssistLib.cli import build_parser

    received = []

    def mine(signum, frame):
        received.append(signum)

    previous = signal.signal(signal.SIGTERM, mine)
    port_file = tmp_path / "port.txt"
    try:
        args = build_parser().parse_args(["serve", "--port", "0", "--port-file", str(port_file),
                                          "--model", str(server_checkpoint), "--log-level", "warning"])  # fmt: skip

        def stop_when_up():
            deadline = time.monotonic() + 120
            while not port_file.is_file() and time.monotonic() < deadline:
                time.sleep(0.1)
            os.kill(os.getpid(), signal.SIGTERM)

        threading.Thread(target=stop_when_up, daemon=True).start()
        run_serve(args)
        assert received == [signal.SIGTERM] and not port_file.exists()
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_a_server_stopped_by_sigterm_removes_its_port_file(tmp_path, server_checkpoint):
    """systemd and kill send SIGTERM: uvicorn raised it again after shutting down, and the default
    handler ended the process before the port file was removed (Ctrl-C did remove it)."""
    import signal
    import subprocess
    import sys
    import time

    port_file = tmp_path / "port.txt"
    command = [sys.executable, "-m", "SegAssistLib.server", "--port", "0", "--port-file", str(port_file),
               "--model", str(server_checkpoint), "--log-level", "warning"]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not (port_file.is_file() and port_file.read_text().strip()):
            assert process.poll() is None and time.monotonic() < deadline, process.stderr.read().decode()
            time.sleep(0.2)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == -signal.SIGTERM  # ended by the signal: a clean stop for systemd
    finally:
        if process.poll() is None:
            process.kill()
    assert not port_file.exists()
