"""``segassist learn ...`` from a terminal: an attached ``learn train`` and how it ends (Ctrl-C, SIGTERM,
SIGHUP, a job that outran the cancel, a second job straight after the first), ``learn import`` (progress,
symbolic-link loops, no empty store for nothing to import) and the messages of the other subcommands.

Real tiny stores and a tiny network (``learning_fixtures``); jobs run in real worker processes. A Ctrl-C
is simulated in-process (a ``KeyboardInterrupt`` from the command's polling sleep, at a chosen moment of
the job); SIGTERM and SIGHUP go to a real ``python -m SegAssistLib.cli`` process."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import types
from pathlib import Path
from typing import Callable, Dict, Optional

import pytest
import SimpleITK as sitk
from learning_fixtures import (
    make_store,
    one_thread,  # noqa: F401  (autouse fixture)
    synthetic_case,
)
from learning_fixtures import tiny_checkpoint as make_checkpoint

from SegAssistLib.cli import main
from SegAssistLib.client.local import process_alive
from SegAssistLib.learning import cli as learn_cli
from SegAssistLib.learning import jobs
from SegAssistLib.learning.datastore import Datastore
from SegAssistLib.learning.sources import find_sources
from SegAssistLib.learning.trainer import AdapterTrainConfig

REPO = Path(__file__).resolve().parents[2]
WAIT_S = 180.0  # the longest any condition is waited for (a loaded 2-core machine): a hang fails, never blocks
# a job that stays in its training phase until it is cancelled
LONG = ("--seconds", "300", "--steps", "100000", "--val-clicks", "1")
# a job that runs to its end: one step, one validation click
SHORT = ("--seconds", "120", "--steps", "1", "--val-clicks", "1")


@pytest.fixture
def store(tmp_path: Path):
    """(store folder, tiny checkpoint): 3 submitted cases (2 to train on, 1 to validate) and 1 new one."""
    ds, _ = make_store(tmp_path / "store", n_labelled=3, n_new=1)
    ds.close()
    return tmp_path / "store", make_checkpoint(tmp_path / "tiny.pt")


def wait_for(condition: Callable[[], object], what: str, timeout: float = WAIT_S) -> object:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f} s waiting for {what}"
        time.sleep(0.05)


def has_line(text: str, start: str) -> bool:
    return any(line.startswith(start) for line in text.splitlines())


def newest_status(store_root: Path) -> Dict:
    folders = jobs._job_dirs_newest_first(jobs.jobs_folder(store_root))
    if not folders:
        return {}
    return jobs._read_json(folders[0] / "status.json") or {}


def train_args(store_root: Path, ckpt: Path, *extra: str):
    return ["learn", "train", "--store", str(store_root), "--checkpoint", str(ckpt), *extra]


def end_worker(pid: Optional[int]) -> None:
    """Clean-up: a worker this test left running is killed (it is a child of this process, reaped by
    start_training's thread, or of a CLI process that has exited)."""
    if pid and process_alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
            os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not process_alive(pid), f"worker {pid} to end", timeout=30)


def interrupt_when(monkeypatch, condition: Callable[[], bool]) -> Dict[str, bool]:
    """Make the attached ``learn train``'s polling sleep raise ``KeyboardInterrupt`` (a Ctrl-C) once
    ``condition`` holds; the sleep waits for it (up to WAIT_S)."""
    fired = {"done": False}
    real_sleep = time.sleep

    def sleep(seconds: float) -> None:
        if fired["done"]:
            return real_sleep(seconds)
        wait_for(condition, "the moment of the simulated Ctrl-C")
        fired["done"] = True
        raise KeyboardInterrupt

    monkeypatch.setattr(learn_cli, "time", types.SimpleNamespace(sleep=sleep, monotonic=time.monotonic))
    return fired


# ---------------------------------------------------------------------------------- train: its end


def test_train_returns_once_its_worker_is_gone_and_the_next_train_starts_at_once(store, capsys):
    """The worker wrote its final status, then took seconds to exit (torch's teardown) holding the
    training lock; ``learn train`` returned at the final status, and a second one straight after failed
    "a training job is already running"."""
    store_root, ckpt = store
    assert main(train_args(store_root, ckpt, *SHORT)) == 0
    first = newest_status(store_root)
    assert first["state"] == "done", first
    assert not process_alive(first["pid"]), "learn train returned while its worker was still running"
    assert not jobs.training_running(store_root), "the training lock outlived the job's final status"
    assert "job " + first["job_id"] + ": done" in capsys.readouterr().out
    assert main(train_args(store_root, ckpt, *LONG, "--detach")) == 0  # the next job starts at once
    second = wait_for(lambda: newest_status(store_root).get("pid") and newest_status(store_root), "the pid")
    assert second["job_id"] != first["job_id"]
    end_worker(second["pid"])


def test_a_start_waits_for_a_finished_job_to_let_go_of_the_lock(store, capsys):
    """A start gave up after 1 s while the newest job's worker, its final status written, still held the
    lock; it now waits for such a worker. A job still running is busy without that wait."""
    store_root, ckpt = store
    folder = jobs.jobs_folder(store_root) / "20260101-000000-aaaaaa"
    folder.mkdir(parents=True)
    (folder / "job.json").write_text("{}")
    (folder / "status.json").write_text(json.dumps({"state": "running", "phase": "training", "pid": os.getpid()}))
    held = jobs._try_lock(store_root)  # that job's worker
    assert held is not None
    t0 = time.monotonic()
    assert main(train_args(store_root, ckpt, *LONG, "--detach")) == 2  # running: busy
    assert "already running" in capsys.readouterr().err
    assert time.monotonic() - t0 < 10.0  # without waiting for the job to finish
    # its final status written, its worker lets go of the lock 3 s later (as a slow exit did)
    (folder / "status.json").write_text(json.dumps({"state": "done", "phase": "finished", "pid": os.getpid()}))
    release = threading.Timer(3.0, os.close, [held])
    release.start()
    try:
        assert main(train_args(store_root, ckpt, *LONG, "--detach")) == 0, capsys.readouterr().err
    finally:
        release.join()
    started = wait_for(lambda: newest_status(store_root).get("pid") and newest_status(store_root), "the new job")
    assert started["job_id"] != folder.name
    end_worker(started["pid"])


def test_ctrl_c_says_how_the_job_ended_and_exits_130_when_cancelled(store, capsys, monkeypatch):
    """After Ctrl-C the command printed nothing more and exited 0."""
    store_root, ckpt = store
    interrupt_when(monkeypatch, lambda: newest_status(store_root).get("phase") == "training")
    assert main(train_args(store_root, ckpt, *LONG)) == 130
    out, err = capsys.readouterr()
    final = newest_status(store_root)
    assert final["state"] == "cancelled", final
    assert has_line(out, f"job {final['job_id']}: cancelled"), out
    assert "cancelling" in err
    assert not process_alive(final["pid"]) and not jobs.training_running(store_root)


def test_a_ctrl_c_too_late_to_cancel_says_the_job_finished_and_exits_3(store, capsys, monkeypatch):
    """A Ctrl-C that reached the job after it had registered its version: the command exited 0 saying
    nothing, although a new version may have become the current one."""
    store_root, ckpt = store
    interrupt_when(monkeypatch, lambda: newest_status(store_root).get("state") == "done")
    assert main(train_args(store_root, ckpt, *SHORT)) == 3  # learn_cli.FINISHED_DESPITE_CANCEL
    out, err = capsys.readouterr()
    final = newest_status(store_root)
    assert has_line(out, f"job {final['job_id']}: done"), out
    version = final["result"]["version"]["id"]
    assert f"job {final['job_id']} finished before the cancel reached it: version {version} was" in err, err
    assert ("promoted" if final["result"]["promoted"] else "not promoted") in err


def test_a_job_that_registers_nothing_exits_5_with_its_reason(store, capsys):
    """A job whose incumbent's validation did not fit its budget "finished" having trained nothing, and
    ``learn train`` exited 0 as if a version had been made: a script could not tell."""
    store_root, ckpt = store
    assert main(train_args(store_root, ckpt, "--seconds", "1", "--val-clicks", "1")) == 5  # NOTHING_REGISTERED
    out, err = capsys.readouterr()
    final = newest_status(store_root)
    assert final["state"] == "done" and final["result"]["version"] is None, final
    assert has_line(out, f"job {final['job_id']}: done"), out
    line = f"learn train: job {final['job_id']} ended without registering a version: "
    assert line in err and "nothing" in err.split(line)[1], err
    assert not (store_root / "adapters" / "registry.json").exists()
    with pytest.raises(SystemExit):
        main(["learn", "train", "--help"])
    assert "5 when it ended without one" in " ".join(capsys.readouterr().out.split())  # the help says so


def test_a_job_cancelled_from_another_terminal_exits_5(store, capsys):
    """``learn cancel`` from another terminal stopped the job, and the attached ``learn train`` exited 0."""
    store_root, ckpt = store

    def cancel_once_training() -> None:
        wait_for(lambda: newest_status(store_root).get("phase") == "training", "the job's training phase")
        jobs.cancel_job(store_root, None)  # what `segassist learn cancel --store` does

    canceller = threading.Thread(target=cancel_once_training, daemon=True)
    canceller.start()
    code = main(train_args(store_root, ckpt, *LONG))
    canceller.join(timeout=WAIT_S)
    out, err = capsys.readouterr()
    final = newest_status(store_root)
    assert final["state"] == "cancelled", final
    assert code == 5, (code, out, err)
    assert f"learn train: job {final['job_id']} was cancelled" in err and "nothing registered" in err, err
    assert not process_alive(final["pid"])


def test_a_cancel_that_outlasts_the_wait_says_the_job_is_still_stopping(store, capsys, monkeypatch):
    """A worker that does not stop within the wait (here: stopped with SIGSTOP) ended the command with
    exit 1 and only "cancelling ..."."""
    store_root, ckpt = store
    monkeypatch.setattr(learn_cli, "CANCEL_WAIT_S", 1.0, raising=False)
    pid = None

    def training_then_frozen() -> bool:
        nonlocal pid
        status = newest_status(store_root)
        if status.get("phase") != "training":
            return False
        pid = status["pid"]
        os.kill(pid, signal.SIGSTOP)
        return True

    interrupt_when(monkeypatch, training_then_frozen)
    try:
        code = main(train_args(store_root, ckpt, *LONG))
        out, err = capsys.readouterr()
        assert code == 1
        assert "is still stopping; see `segassist learn status" in err, err
        os.kill(pid, signal.SIGCONT)
        wait_for(lambda: newest_status(store_root).get("state") == "cancelled", "the cancel, once it runs again")
    finally:
        end_worker(pid)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_or_sighup_cancel_an_attached_train_as_ctrl_c_does(store, sig):
    """Only Ctrl-C was handled: SIGTERM (``timeout``, ``kill``) or SIGHUP (the terminal closed) ended the
    command and left the job, in its own session, running with nobody watching."""
    store_root, ckpt = store
    cli = subprocess.Popen([sys.executable, "-m", "SegAssistLib.cli", *train_args(store_root, ckpt, *LONG)],
                           cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           start_new_session=True)
    pid = None
    try:
        training = wait_for(lambda: newest_status(store_root).get("phase") == "training" and newest_status(store_root),
                            "the job's training phase")
        pid = training["pid"]
        cli.send_signal(sig)
        out, err = cli.communicate(timeout=WAIT_S)
        assert cli.returncode == 128 + sig, (cli.returncode, out, err)
        final = newest_status(store_root)
        assert final["state"] == "cancelled", final
        assert f"({sig.name})" in err and has_line(out, f"job {final['job_id']}: cancelled"), (out, err)
        wait_for(lambda: not process_alive(pid), "the worker to end", timeout=30)
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.communicate()
        end_worker(pid)


# a `segassist learn train` that signals itself at one chosen moment: argv[1] the signal's number, argv[2] where
# ("reaper": as start_training starts its reaper thread, after the worker started, before it returns;
# "follow": as _follow is entered, before its own try), the rest the command line
SIGNAL_AT = """
import os, signal, sys, threading
# Ctrl-C raises KeyboardInterrupt as in a terminal: a shell's background job (a CI runner's, say) starts
# with SIGINT ignored, and Python then installs no handler for it
signal.signal(signal.SIGINT, signal.default_int_handler)
signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM, signal.SIGHUP})  # nor blocked
sig, point = int(sys.argv[1]), sys.argv[2]
if point == "reaper":
    real_start = threading.Thread.start
    def start(self):
        if self.name.startswith("segassist-reap-"):
            os.kill(os.getpid(), sig)  # its handler runs as this call returns: inside start_training
        return real_start(self)
    threading.Thread.start = start
else:
    from SegAssistLib.learning import cli as learn_cli
    real_follow = learn_cli._follow
    def follow(args, job):
        os.kill(os.getpid(), sig)  # its handler runs here, before _follow's own try
        return real_follow(args, job)
    learn_cli._follow = follow
from SegAssistLib.cli import main
sys.exit(main(sys.argv[3:]))
"""


@pytest.mark.parametrize(
    "point, sig",
    [("reaper", signal.SIGTERM), ("reaper", signal.SIGINT), ("follow", signal.SIGTERM), ("follow", signal.SIGHUP)],
    ids=lambda value: value.name if isinstance(value, signal.Signals) else value,
)
def test_a_signal_as_the_job_starts_cancels_it_and_waits_for_it_to_stop(store, tmp_path, point, sig):
    """A signal once the worker had started but before ``start_training`` returned ended the command at once
    ("stopped by SIGTERM", exit 143) with nobody waiting for the job; one as ``_follow`` was entered, before
    its ``try``, ended it as "interrupted" (exit 130 whatever the signal) without even cancelling the job,
    which trained on unwatched and could promote a version. Now the job is cancelled, waited for, and its end
    reported, as for a signal while it trains."""
    store_root, ckpt = store
    script = tmp_path / "signal_at.py"
    script.write_text(SIGNAL_AT)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, (str(REPO), os.environ.get("PYTHONPATH")))))
    cli = subprocess.Popen([sys.executable, str(script), str(int(sig)), point, *train_args(store_root, ckpt, *LONG)],
                           cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           start_new_session=True)
    try:
        out, err = cli.communicate(timeout=WAIT_S)
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.communicate()
    final = newest_status(store_root)
    try:
        assert cli.returncode == 128 + sig, (cli.returncode, out, err)
        job_id = final["job_id"]
        assert (jobs.jobs_folder(store_root) / job_id / "cancel").exists()  # the flag was written
        assert final["state"] == "cancelled", final  # already when the command ended: it waited for the job
        assert f"cancelling job {job_id} ({sig.name}) ..." in err, err
        assert has_line(out, f"job {job_id}: cancelled"), (out, err)
        assert not process_alive(final["pid"]) and not jobs.training_running(store_root)
        assert not (store_root / "adapters" / "registry.json").exists()  # nothing registered
    finally:
        end_worker(final.get("pid"))


# ---------------------------------------------------------------------------------- train: messages


def test_a_label_value_no_case_holds_is_named_before_a_job_starts(store, capsys):
    """It started a job whose worker failed "the datastore has 0 submitted cases" (it has 3)."""
    store_root, ckpt = store
    assert main(train_args(store_root, ckpt, *SHORT, "--label-value", "7")) == 2
    err = capsys.readouterr().err
    assert "training on label value 7 (--label-value)" in err and "of the datastore's 3 submitted case(s)" in err
    assert jobs.list_jobs(store_root) == []


def test_a_killed_worker_is_said_to_be_killed(tmp_path: Path, capsys):
    """Seen from another process (``learn status``), a killed worker "ended unexpectedly (exit code
    None)"; with a handle, "(exit code -9)"."""
    Datastore(tmp_path / "store").close()
    tmp_path = tmp_path / "store"
    folder = jobs.jobs_folder(tmp_path) / "20260101-000000-abcdef"
    folder.mkdir(parents=True)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    sleeper.kill()
    sleeper.wait()
    (folder / "status.json").write_text(json.dumps({"state": "running", "phase": "training", "pid": sleeper.pid}))
    error = jobs.get_job(tmp_path).status()["error"]
    assert "without writing its final status" in error and "killed" in error and "None" not in error, error
    assert jobs.TrainingJob(folder.name, folder, tmp_path, sleeper).status()["error"].endswith("killed (SIGKILL)")
    assert main(["learn", "status", "--store", str(tmp_path)]) == 0
    assert "without writing its final status" in capsys.readouterr().out


def test_a_status_file_that_is_not_an_object_reads_as_no_status(store, capsys):
    """A damaged job status (JSON, but a list) made ``learn status`` and ``learn cancel`` end in a traceback."""
    from SegAssistLib.learning import jobs

    store_root, _ = store
    folder = jobs.jobs_folder(store_root) / "20260101-000000-abcdef"
    folder.mkdir(parents=True)
    (folder / "job.json").write_text("{}")
    (folder / "status.json").write_text("[1, 2]")
    assert main(["learn", "status", "--store", str(store_root)]) == 0
    assert "failed" in capsys.readouterr().out  # no live worker, no final status: it died
    assert main(["learn", "cancel", "--store", str(store_root)]) == 1
    assert "had already ended (failed): nothing to stop" in capsys.readouterr().out


def test_train_help_describes_the_budget_steps_and_kind_with_their_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["learn", "train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    options = {chunk.split(" ", 1)[0]: chunk for chunk in re.split(r" --(?=[a-z])", text)}
    defaults = AdapterTrainConfig()
    assert f"(default {defaults.time_budget_s / 60:g})" in options["minutes"], options["minutes"]
    assert f"(default {defaults.time_budget_s:g})" in options["seconds"], options["seconds"]
    assert f"(default {defaults.max_steps})" in options["steps"], options["steps"]
    assert f"{defaults.kind} (" in options["kind"] and "default" in options["kind"], options["kind"]


def test_the_validation_size_the_trainers_advice_names_can_be_set_from_the_command_line(store, capsys):
    """A validation that could not finish advised "fewer val_clicks or max_val_cases", and no
    command-line flag (nor HTTP field) set max_val_cases."""
    store_root, ckpt = store
    assert main(train_args(store_root, ckpt, *SHORT, "--max-val-cases", "1")) == 0
    folder = jobs._job_dirs_newest_first(jobs.jobs_folder(store_root))[0]
    assert jobs._read_json(folder / "job.json")["config"]["max_val_cases"] == 1
    assert jobs._read_json(folder / "status.json")["state"] == "done"
    capsys.readouterr()
    assert main(train_args(store_root, ckpt, *SHORT, "--max-val-cases", "0")) == 2
    assert "max_val_cases must be a positive integer, got 0" in capsys.readouterr().err
    assert main(train_args(store_root, ckpt, *SHORT, "--max-val-cases", "201")) == 2  # as the HTTP API's bound
    assert "max_val_cases must be an integer from 1 to 200, got 201" in capsys.readouterr().err


def test_next_refuses_a_user_without_lock(store, capsys):
    """``learn next --user alice`` without ``--lock`` locked nothing and said nothing."""
    store_root, _ = store
    argv = ["learn", "next", "--store", str(store_root), "--strategy", "first", "--no-proposal"]
    assert main([*argv, "--user", "alice"]) == 2
    assert "--lock" in capsys.readouterr().err
    assert main([*argv, "--lock"]) == 2
    assert "--user" in capsys.readouterr().err
    with Datastore(store_root) as ds:
        assert all(c.locked_by is None for c in ds.list_cases())
    assert main([*argv, "--user", "alice", "--lock"]) == 0
    with Datastore(store_root) as ds:
        assert [c.locked_by for c in ds.list_cases() if c.locked_by] == ["alice"]


# ---------------------------------------------------------------------------------- import


def write_images(folder: Path, n: int, first: int = 0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(first, first + n):
        volume, _ = synthetic_case(100 + i)
        sitk.WriteImage(sitk.GetImageFromArray(volume.array), str(folder / f"img{i}.nii.gz"))


def test_import_does_not_follow_a_symbolic_link_loop(tmp_path: Path, capsys):
    """A folder link to an ancestor had each image found (and loaded) about 40 times."""
    src = tmp_path / "src"
    write_images(src, 2)
    (src / "sub").mkdir()
    os.symlink("..", src / "sub" / "loop")
    write_images(tmp_path / "elsewhere", 1, first=2)
    os.symlink(tmp_path / "elsewhere", src / "a_link")  # a second way into a folder: scanned once
    os.symlink(tmp_path / "elsewhere", src / "b_link")
    assert sorted(p.name for p, _ in find_sources(src)) == ["img0.nii.gz", "img1.nii.gz", "img2.nii.gz"]
    assert main(["learn", "import", str(src), "--store", str(tmp_path / "store"), "--user", "admin", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert len(report["added"]) == 3 and report["skipped"] == []


def test_import_prints_each_image_as_it_comes_in(tmp_path: Path, capsys, monkeypatch):
    """Nothing was printed until every image was imported (minutes for a folder of CT scans)."""
    src = tmp_path / "src"
    write_images(src, 3)
    (src / "broken.nii.gz").write_bytes(b"not an image")
    printed_before = []
    real_import = Datastore.import_volume

    def import_volume(self, volume, *args, **kwargs):
        captured = capsys.readouterr()
        printed_before.append(captured.out)
        sys.stdout.write(captured.out)  # kept for the final check
        return real_import(self, volume, *args, **kwargs)

    monkeypatch.setattr(Datastore, "import_volume", import_volume)
    assert main(["learn", "import", str(src), "--store", str(tmp_path / "store"), "--user", "admin"]) == 1
    assert len(printed_before) == 3
    # broken.nii.gz (sorted first) is reported before img0 is imported, img0 before img1, img1 before img2
    assert "[1/4]  - " in printed_before[0] and "broken.nii.gz" in printed_before[0]
    assert "[2/4]  + " in printed_before[1] and "img0" in printed_before[1]
    assert "[3/4]  + " in printed_before[2] and "img1" in printed_before[2]
    out = capsys.readouterr().out
    assert "[4/4]  + " in out and out.strip().splitlines()[-1] == "imported 3 case(s), skipped 1"
    # with --json the progress goes to stderr and stdout is the report alone
    monkeypatch.undo()
    assert main(["learn", "import", str(src), "--store", str(tmp_path / "store"), "--user", "admin", "--json"]) == 1
    out, err = capsys.readouterr()
    assert len(json.loads(out)["skipped"]) == 4 and len(re.findall(r"^\[\d/4\]  - ", err, re.M)) == 4, err


def test_import_of_nothing_leaves_no_store_behind(tmp_path: Path, capsys):
    """A missing source, or a folder without images, created an empty datastore all the same."""
    store_root = tmp_path / "store"
    assert main(["learn", "import", str(tmp_path / "missing"), "--store", str(store_root), "--user", "admin"]) == 2
    assert "neither a file nor a folder" in capsys.readouterr().err
    assert not store_root.exists()
    (tmp_path / "empty").mkdir()
    assert main(["learn", "import", str(tmp_path / "empty"), "--store", str(store_root), "--user", "admin"]) == 1
    assert "no image found" in capsys.readouterr().err
    assert not store_root.exists()
    write_images(tmp_path / "one", 1)
    assert main(["learn", "import", str(tmp_path / "one"), "--store", str(store_root), "--user", "admin"]) == 0
    with Datastore(store_root) as ds:
        assert len(ds.list_cases()) == 1


def test_export_prints_each_case_as_it_is_written(store, tmp_path: Path, capsys):
    """An export said nothing until its last case was written (minutes for a store of CT scans)."""
    store_root, _ = store
    out = tmp_path / "export"
    assert main(["learn", "export", str(out), "--store", str(store_root)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    progress = [line for line in lines if line.startswith("[")]
    assert [line.split("]")[0] + "]" for line in progress] == ["[1/3]", "[2/3]", "[3/3]"]
    assert lines[-1] == f"exported 3 case(s) to {out}"
    # with --json the progress goes to stderr, and stdout is the JSON alone
    assert main(["learn", "export", str(tmp_path / "again"), "--store", str(store_root), "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["cases"] == 3 and "[3/3]" in captured.err


def test_next_prints_each_candidate_the_model_scores(store, capsys):
    """Ranking by uncertainty runs the model on every candidate (seconds each): it said nothing meanwhile."""
    store_root, checkpoint = store
    assert main(["learn", "next", "--store", str(store_root), "--strategy", "uncertainty", "--checkpoint",
                 str(checkpoint), "--no-proposal"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert "[1/1] candidate(s) scored with the model" in lines and lines[-1].startswith("next case: ")


def test_an_attached_train_with_json_prints_its_progress_on_stderr(monkeypatch, capsys):
    """With --json an attached ``learn train`` printed no progress at all (the docstring promised stderr);
    stdout stays the final status's JSON alone."""
    statuses = [{"job_id": "j1", "state": "running", "phase": "training", "step": s, "max_steps": 2}
                for s in (1, 2)] + [{"job_id": "j1", "state": "done", "phase": "finished",
                                     "result": {"version": {"id": "v1"}, "promoted": True}}]

    class Job:
        job_id = "j1"

        def status(self):
            return statuses.pop(0) if len(statuses) > 1 else statuses[0]

        def wait(self, timeout=None):
            return statuses[-1]

    monkeypatch.setattr(learn_cli, "time", types.SimpleNamespace(sleep=lambda s: None, monotonic=time.monotonic))
    args = types.SimpleNamespace(json=True, store="store")
    assert learn_cli._follow(args, Job()) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["state"] == "done"
    assert "job j1: running, training, step 1/2" in captured.err and "step 2/2" in captured.err, captured.err
    assert "job j1: done, finished" in captured.err


def test_the_memory_budget_reaches_the_job_from_the_command_line(store, capsys):
    """``--max-case-memory-gib``: the job's bound on the cases it loads, settable where the job starts. A
    budget smaller than the validation cases alone is refused by the job, naming the setting."""
    store_root, ckpt = store
    assert main(train_args(store_root, ckpt, *SHORT, "--max-case-memory-gib", "1e-9")) == 1
    out, err = capsys.readouterr()
    final = newest_status(store_root)
    assert final["state"] == "failed" and "max_case_memory_gib (1e-09 GiB)" in final["error"], final
    assert "max_case_memory_gib" in out + err


def test_a_jobs_status_line_shows_its_loading_progress_and_the_cases_its_memory_left_out():
    status = {"job_id": "j1", "state": "running", "phase": "loading", "progress": "loading case 3 of 40",
              "memory_note": "12 training cases left out beyond max_case_memory_gib (6 GiB)"}
    line = learn_cli._job_line(status)
    assert line.splitlines()[0] == "job j1: running, loading, loading case 3 of 40"
    assert "  12 training cases left out beyond max_case_memory_gib (6 GiB)" in line.splitlines()
