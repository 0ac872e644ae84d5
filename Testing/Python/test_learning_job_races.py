"""Races of the background training jobs, each hit deterministically with a real worker process on a real
(tiny) datastore:

* the worker's watchdog against its main thread: a job once read "failed" (overran its budget) while the
  registry named the version it had just promoted;
* a job whose worker was killed, seen from another process after its pid was reused (certain after a
  container restart): it read "running", and a cancel "asked it to stop";
* an interruption (Ctrl-C, or SIGTERM raised by the CLI's handler) of ``start_training`` after the
  worker started but before it returned: the job trained on, never cancelled.

The watchdog tests run the real worker through a small wrapper given as ``start_training(python=...)``:
it imports the worker and patches it in its own process (see ``INJECTOR``), nothing in the library.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from learning_fixtures import adapter_settings, make_store, one_thread, tiny_checkpoint  # noqa: F401  (autouse fixture)

from SegAssistLib.learning import jobs
from SegAssistLib.learning.jobs import get_job, list_jobs, start_training
from SegAssistLib.learning.registry import AdapterRegistry
from SegAssistLib.learning.trainer import AdapterTrainConfig

pytestmark = pytest.mark.skipif(jobs.fcntl is None, reason="job liveness and the training lock need flock (POSIX)")


@pytest.fixture
def setup(tmp_path: Path):
    store, _ = make_store(tmp_path / "store", n_labelled=5, n_new=0)
    store.close()
    return tmp_path / "store", tiny_checkpoint(tmp_path / "tiny.pt")


def quick(**kw) -> dict:
    """A few steps on the tiny network, one click per validation case; promoted whatever it scores."""
    defaults = dict(kind="lora", rank=2, lora_rank=2, max_steps=3, time_budget_s=600.0, val_clicks=1, seed=0,
                    nice=0, min_improvement=-1.0)
    base = adapter_settings(defaults, kw)
    return AdapterTrainConfig(**base).to_dict()


def wait_for(job, predicate, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    status = job.status()
    while not predicate(status):
        assert time.monotonic() < deadline, status
        time.sleep(0.05)
        status = job.status()
    return status


# ------------------------------------------------------------------------------------ the watchdog

INJECTOR = r'''
"""The real training worker (python -m SegAssistLib.learning.jobs <folder> <fds>), with its watchdog fired
at a chosen moment instead of after the time budget (SEGASSIST_TEST_WATCHDOG names the moment)."""
import json, os, sys, threading, time
from pathlib import Path

args = sys.argv[1:]
if args[:1] == ["-m"]:
    args = args[2:]
from SegAssistLib.learning import jobs, registry, trainer

scenario = os.environ["SEGASSIST_TEST_WATCHDOG"]
folder = Path(args[0])
registry_file = Path(json.loads((folder / "job.json").read_text())["store_root"]) / "adapters" / "registry.json"
jobs.WATCHDOG_GRACE_S = 0.2  # an older watchdog re-armed itself by this while a job registered (5 turns)
jobs.COMMIT_GRACE_S = 5.0 if scenario == "registering" else 1.0  # how long a registration may take

captured = {}
RealTimer = threading.Timer


class Timer:  # the watchdog's timer: its first arming is captured (fired below); a re-arming fires soon
    def __init__(self, delay, fn, *a, **kw):
        self.fn, self.first, self.daemon = fn, "fn" not in captured, True
        captured.setdefault("fn", fn)

    def start(self):
        if not self.first:
            timer = RealTimer(0.2, self.fn)
            timer.daemon = True
            timer.start()

    def cancel(self):
        pass


jobs.threading.Timer = Timer


def fire():
    print(f"[test] watchdog fired ({scenario})", flush=True)
    threading.Thread(target=captured["fn"], name="watchdog", daemon=True).start()


if scenario == "validating":
    # the budget runs out during the final validation; the watchdog, having read the status, is
    # descheduled until the registry changes (at most 3 s), and the job's final write is slow
    read = jobs._read_json
    watchdog_read = threading.Event()

    def read_json(path):
        data = read(path)
        if threading.current_thread().name == "watchdog" and path.name == "status.json":
            watchdog_read.set()
            t0 = time.monotonic()
            while not registry_file.exists() and time.monotonic() - t0 < 3.0:
                time.sleep(0.001)
        return data

    jobs._read_json = read_json
    validate = trainer.validate

    def validating(engine, *a, **kw):
        status = json.loads((folder / "status.json").read_text())
        if engine.version == "candidate" and status.get("phase") == "validating" and "fired" not in captured:
            captured["fired"] = True
            fire()
            watchdog_read.wait(10.0)  # the watchdog has read the status ("validating")
        return validate(engine, *a, **kw)

    trainer.validate = validating
    finish = trainer._finish

    def slow_finish(*a, **kw):
        time.sleep(1.0)
        return finish(*a, **kw)

    trainer._finish = slow_finish
else:
    add_version = registry.AdapterRegistry.add_version

    def adding(self, *a, **kw):
        if scenario == "registering":  # the watchdog fires while the version is being recorded
            fire()
            time.sleep(0.3)
            return add_version(self, *a, **kw)
        if scenario == "stuck-before":  # the registration hangs before it records anything
            fire()
            time.sleep(3600)
        record = add_version(self, *a, **kw)  # "stuck-after": recorded (promoted), then it hangs
        fire()
        time.sleep(3600)
        return record

    registry.AdapterRegistry.add_version = adding

jobs._exit_now(jobs.main(args))
'''


def python_running(tmp_path: Path, name: str, script: str) -> Path:
    """A stand-in for the worker's python: runs ``script`` (saved as ``name``) with the worker's arguments."""
    injector = tmp_path / name
    injector.write_text(script)
    wrapper = tmp_path / "python"
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{injector}" "$@"\n')
    wrapper.chmod(0o755)
    return wrapper


def run_with_watchdog(tmp_path: Path, setup, monkeypatch, scenario: str):
    store_root, ckpt = setup
    wrapper = python_running(tmp_path, "worker_inject.py", INJECTOR)
    monkeypatch.setenv("SEGASSIST_TEST_WATCHDOG", scenario)
    job = start_training(store_root, ckpt, quick(), python=str(wrapper))
    try:
        final = job.wait(timeout=60)
        assert job.process.wait(timeout=30) is not None
    finally:
        job.kill()
    log = (job.folder / "worker.log").read_text()
    assert f"watchdog fired ({scenario})" in log, log
    mine = [v for v in AdapterRegistry(store_root).read().versions if v.job_id == job.job_id]
    seen_elsewhere = get_job(store_root, job.job_id).status()  # another process's view: the same
    assert seen_elsewhere["state"] == final["state"], (seen_elsewhere, final)
    return job, final, mine, log


def assert_agrees_with_registry(final: dict, mine: list) -> None:
    """The job's final status and the registry tell the same story."""
    if mine:
        result = final.get("result") or {}
        assert final["state"] == "done", (final, mine)
        assert (result.get("version") or {}).get("id") == mine[0].id
        assert result.get("promoted") == (mine[0].status == "promoted")
    else:
        assert final["state"] in ("failed", "cancelled") or not (final.get("result") or {}).get("version"), final


def test_a_watchdog_firing_as_the_final_validation_ends_never_fails_a_job_that_promoted(tmp_path, setup, monkeypatch):
    """It read the status ("validating"), was descheduled while the job registered and promoted v1, then
    wrote "failed" and ended the worker: the registry served v1, the job, its API and the CLI said failed.
    Now it judges and stops the job holding the lock the job takes to register: it stops it before."""
    job, final, mine, _ = run_with_watchdog(tmp_path, setup, monkeypatch, "validating")
    assert_agrees_with_registry(final, mine)
    assert job.process.returncode == 3 and final["state"] == "failed" and "overran" in final["error"]
    assert AdapterRegistry(setup[0]).read().current is None


def test_the_watchdog_waits_for_a_job_that_is_recording_its_version(tmp_path, setup, monkeypatch):
    job, final, mine, _ = run_with_watchdog(tmp_path, setup, monkeypatch, "registering")
    assert job.process.returncode == 0, final
    assert final["state"] == "done" and final["result"]["promoted"] and [v.id for v in mine] == ["v1"]
    assert_agrees_with_registry(final, mine)


def test_a_registration_stuck_after_recording_its_version_is_stopped_as_done_with_it(tmp_path, setup, monkeypatch):
    """Past the grace the watchdog stops the job all the same; the registry names the job's version: the
    status says done with it (promoted, current), not failed."""
    job, final, mine, _ = run_with_watchdog(tmp_path, setup, monkeypatch, "stuck-after")
    assert job.process.returncode == 3
    assert [v.id for v in mine] == ["v1"] and AdapterRegistry(setup[0]).read().current == "v1"
    assert final["state"] == "done" and final["result"]["version"]["id"] == "v1", final
    assert final["result"]["promoted"] and final["result"]["current"] == "v1"
    assert "overran" in final["message"] and "v1 was registered and promoted" in final["message"]
    assert_agrees_with_registry(final, mine)


def test_a_registration_stuck_before_recording_anything_is_stopped_as_failed(tmp_path, setup, monkeypatch):
    job, final, mine, _ = run_with_watchdog(tmp_path, setup, monkeypatch, "stuck-before")
    assert job.process.returncode == 3 and final["state"] == "failed" and "overran" in final["error"]
    assert mine == [] and AdapterRegistry(setup[0]).read().versions == []


FAILING_FINISH = r'''
"""The real training worker, whose final status write fails once its version is recorded (a full disk)."""
import sys

args = sys.argv[1:]
if args[:1] == ["-m"]:
    args = args[2:]
from SegAssistLib.learning import jobs, trainer

finish = trainer._finish


def failing_finish(status, result, t_start, reason):
    if result.version is not None:
        raise OSError(28, "No space left on device")
    return finish(status, result, t_start, reason)


trainer._finish = failing_finish
jobs._exit_now(jobs.main(args))
'''


def test_a_job_that_fails_after_recording_its_version_is_done_with_it(tmp_path, setup):
    """The worker's failure handler wrote "failed" whatever the registry held: a job whose last status
    write failed after it registered and promoted v1 read "failed" while v1 served. Like the watchdog,
    it now ends "done" with its version, and says what failed after."""
    store_root, ckpt = setup
    wrapper = python_running(tmp_path, "worker_fail.py", FAILING_FINISH)
    job = start_training(store_root, ckpt, quick(), python=str(wrapper))
    try:
        final = job.wait(timeout=120)
    finally:
        job.kill()
    mine = [v for v in AdapterRegistry(store_root).read().versions if v.job_id == job.job_id]
    assert len(mine) == 1 and mine[0].status == "promoted", mine
    assert_agrees_with_registry(final, mine)
    assert "No space left on device" in final["message"] and "was registered and promoted, then" in final["message"]
    assert "No space left on device" in (job.folder / "worker.log").read_text()
    assert get_job(store_root, job.job_id).status()["state"] == "done"


# ------------------------------------------------------------------------------------ pid reuse


def test_a_killed_job_whose_pid_another_process_got_is_failed_not_running(setup):
    """After a restart (a container's) the next job's worker can get a killed job's pid: the killed job
    read "running" while that job ran, and ``learn cancel`` "asked it to stop"."""
    store_root, ckpt = setup
    job = start_training(store_root, ckpt, quick(max_steps=1_000_000))
    try:
        wait_for(job, lambda s: s.get("phase") == "training")
        assert get_job(store_root, job.job_id).status()["state"] == "running"  # alive to another process
        job.kill()  # SIGKILL: its status stays "running"
    finally:
        job.kill()
    assert json.loads((job.folder / "status.json").read_text())["state"] == "running"
    # its recorded pid now belongs to a live process (this one), and another job holds the training lock
    status = json.loads((job.folder / "status.json").read_text())
    status["pid"] = os.getpid()
    (job.folder / "status.json").write_text(json.dumps(status))
    held = jobs._try_lock(store_root)
    assert held is not None
    try:
        seen = get_job(store_root, job.job_id).status()
        assert seen["state"] == "failed" and "unexpectedly" in seen["error"], seen
        assert [j["state"] for j in list_jobs(store_root)] == ["failed"]
        assert jobs.cancel_job(store_root, job.job_id)["state"] == "failed"
        assert not (job.folder / "cancel").exists()
    finally:
        os.close(held)


def test_a_job_is_alive_while_its_alive_file_is_locked_whatever_its_recorded_pid(tmp_path: Path):
    folder = jobs.jobs_folder(tmp_path) / "20260101-000000-abcdef"
    folder.mkdir(parents=True)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    training_lock = jobs._try_lock(tmp_path)  # some job holds the datastore's training lock throughout
    try:
        assert jobs._job_alive(folder) is None  # no alive file (a job from before it): judged as before
        alive_fd = jobs._hold_alive(folder)
        assert (folder / jobs.ALIVE_NAME).is_file() and not list(folder.glob(".alive*"))
        for pid in (int(gone.stdout), sleeper.pid):  # a dead pid, or a live one of another process
            (folder / "status.json").write_text(json.dumps({"state": "running", "pid": pid}))
            assert jobs.TrainingJob(folder.name, folder, tmp_path).status()["state"] == "running"
        os.close(alive_fd)  # the worker ended (the kernel lets go of its lock)
        assert jobs.TrainingJob(folder.name, folder, tmp_path).status()["state"] == "failed"  # pid live, all the same
        assert jobs._job_alive(folder) is False  # the probe left it free
    finally:
        os.close(training_lock)
        sleeper.kill()
        sleeper.wait()


def test_the_worker_starts_no_process_that_keeps_its_job_alive(setup, tmp_path: Path):
    """The alive lock is the worker's alone: a process it starts (as torch or a tool might) inherits no copy."""
    store_root, ckpt = setup
    job = start_training(store_root, ckpt, quick(max_steps=1_000_000))
    try:
        wait_for(job, lambda s: s.get("phase") == "training")
        if not Path("/proc/self/fdinfo").is_dir():
            pytest.skip("no /proc to look at the worker's descriptors")
        fds = os.listdir(f"/proc/{job.process.pid}/fd")
        alive = [fd for fd in fds if os.path.realpath(f"/proc/{job.process.pid}/fd/{fd}").endswith("/alive")]
        assert len(alive) == 1, "the worker holds its job's alive file"
        if alive:
            flags = Path(f"/proc/{job.process.pid}/fdinfo/{alive[0]}").read_text().split("flags:")[1].split()[0]
            assert int(flags, 8) & 0o2000000, "the alive descriptor must be close-on-exec in the worker"
    finally:
        job.cancel()
        job.wait(timeout=60)
        job.kill()
    assert jobs._job_alive(job.folder) is False and job.status()["state"] == "cancelled"


# ------------------------------------------------------------------------------------ interrupted start


class Stopped(KeyboardInterrupt):
    """What the CLI's SIGTERM/SIGHUP handler raises."""


@pytest.fixture
def sigterm_raises():
    """SIGTERM raises ``Stopped`` in this (the main) thread, as under ``segassist learn train``."""

    def stop(signum, frame):
        raise Stopped(signum)

    previous = signal.signal(signal.SIGTERM, stop)
    yield
    signal.signal(signal.SIGTERM, previous)


def _interrupted_start(store_root: Path, ckpt: Path):
    before = set(os.listdir(jobs.jobs_folder(store_root))) if jobs.jobs_folder(store_root).is_dir() else set()
    with pytest.raises(KeyboardInterrupt) as caught:
        start_training(store_root, ckpt, quick(max_steps=1_000_000))
    (job_id,) = set(os.listdir(jobs.jobs_folder(store_root))) - before
    return job_id, caught.value


@pytest.mark.parametrize("where", ["starting the reaper thread", "making the job's handle"])
def test_a_signal_just_after_the_worker_started_cancels_the_job(setup, monkeypatch, sigterm_raises, where):
    """SIGTERM reached ``segassist learn train`` after the worker started, before ``start_training``
    returned: the CLI said "stopped by SIGTERM", and the job trained on, unwatched, and promoted."""
    store_root, ckpt = setup
    if where == "starting the reaper thread":  # Thread.start waits for the thread: a signal is handled there
        start = threading.Thread.start

        def start_and_signal(self):
            if self.name.startswith("segassist-reap-"):
                os.kill(os.getpid(), signal.SIGTERM)
            return start(self)

        monkeypatch.setattr(threading.Thread, "start", start_and_signal)
    else:
        make = jobs.TrainingJob

        def make_and_signal(*a, **kw):
            job = make(*a, **kw)
            if job.process is not None and not getattr(make_and_signal, "done", False):
                make_and_signal.done = True
                os.kill(os.getpid(), signal.SIGTERM)
            return job

        monkeypatch.setattr(jobs, "TrainingJob", make_and_signal)
    job_id, exc = _interrupted_start(store_root, ckpt)
    monkeypatch.undo()
    folder = jobs.jobs_folder(store_root) / job_id
    job = getattr(exc, "training_job", None) or get_job(store_root, job_id)
    try:
        assert isinstance(exc, Stopped)
        assert (folder / "cancel").exists(), "a started worker must find its cancel flag"
        assert job.job_id == job_id and job.process is not None
        final = job.wait(timeout=60)
        assert final["state"] == "cancelled", final
    finally:  # never leave a worker training (a failure above, on code without the fix)
        pid = json.loads((folder / "status.json").read_text()).get("pid")
        if job.process is not None:
            job.kill()
        elif pid and jobs.process_alive(pid):
            os.kill(pid, signal.SIGKILL)
    assert AdapterRegistry(store_root).read().versions == []
    assert not jobs.training_running(store_root) and jobs._job_alive(folder) is False


def test_a_stopping_watchdog_keeps_the_registry_from_any_thread_of_its_process(tmp_path: Path):
    """``lock_until_exit``: once the watchdog has read the registry, no version can be recorded before the
    worker ends, neither by its own main thread nor by another process; the exit frees the registry."""
    code = (
        "import sys, threading; from SegAssistLib.learning.registry import AdapterRegistry\n"
        "registry = AdapterRegistry(sys.argv[1])\n"
        "print('taken', registry.lock_until_exit(1.0), flush=True)\n"
        "writer = threading.Thread(target=registry.rollback, kwargs={'to': 'base'}, daemon=True)\n"
        "writer.start(); writer.join(1.0)\n"
        "print('main thread blocked', writer.is_alive(), flush=True)\n"
        "other = __import__('subprocess').run([sys.executable, '-c', 'import sys; "
        "from SegAssistLib.learning.registry import AdapterRegistry; "
        "print(AdapterRegistry(sys.argv[1]).lock_until_exit(0.3))', sys.argv[1]], capture_output=True, text=True)\n"
        "print('another process got it', other.stdout.strip(), flush=True)\n"
        "import os; os._exit(3)\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 3, out.stderr
    assert out.stdout.splitlines() == ["taken True", "main thread blocked True", "another process got it False"]
    AdapterRegistry(tmp_path).rollback(to="base")  # free again: the exit released it
    assert [e["action"] for e in AdapterRegistry(tmp_path).read().events] == ["rollback"]
