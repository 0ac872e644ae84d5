"""Training jobs in a separate process: start, progress, cancel, time budget, one job at a time.

:func:`start_training` launches ``python -m SegAssistLib.learning.jobs <job folder>`` and returns a
:class:`TrainingJob`. Everything between the two processes goes through files in the job folder
(``<store>/adapters/jobs/<job id>/``), so any process (the server, ``segassist learn status`` in
another terminal) can follow or cancel a job, and a restarted server finds it again:

    job.json      what to run (store, checkpoint, settings), written before the start
    status.json   progress (state, phase, step, loss, validation Dice, result) and the worker's pid
                  (recorded by the parent as soon as it started), replaced whole
    cancel        created to ask the job to stop; it stops between steps or validation cases
    alive         locked (``flock``) for the worker's whole life: the job's liveness for any process
    worker.log    the process's output (tracebacks, with the paths of files)

A status names no file by its path on this machine (a server serves it as it is, and its replies
never show where its files are): a failure's text names a datastore file from the store
(``adapters/v1-lora.pt``) and any other by its last part; worker.log keeps the full text.

Why a process and not a thread: training and inference would share the interpreter lock and torch's
thread pool. The worker runs with ``threads`` torch threads (1 by default) and a lower CPU priority
(``nice``), so interactive inference keeps a core and wins the CPU when both want it.

One job per datastore: the parent takes an exclusive ``flock`` on ``adapters/.train.lock`` and hands
the locked descriptor to the worker, which holds it until it has written its final status (the kernel
releases it even when the worker is killed), then ends at once (``os._exit``: the interpreter's
teardown, torch's above all, took seconds with the lock held, and a start right after a job failed).
A second start finds the lock taken and raises :class:`TrainingBusyError`; while the newest job's
status is already final (its worker on its way out) a start waits a little longer for the lock.

Whether a job whose status is not final still runs: the process that started it polls its worker;
any other process probes the job's ``alive`` file, which the parent creates locked and hands to
the worker, which keeps it until it ends (the kernel releases the lock with the process, however it
ends). A recorded pid says less: after a restart (a container's above all) another process, even
the next job's worker, may have it. Job folders without that file (written before it existed) are
judged by their recorded pid and the training lock.

The worker also arms a watchdog that ends it if it overruns its time budget by a wide margin. The
watchdog and the worker's main thread share a lock: the main thread holds it for each status write
and from the start of its registration until its final status is written, so the watchdog never
stops a job that is recording its version; a registration stuck for ``COMMIT_GRACE_S`` more is
stopped all the same, with a final status that agrees with the registry (``done`` with the version
when the registry names one made by this job, else ``failed``). A worker that fails in any other way
ends with a status that agrees with the registry in the same way (a failure after its version was
recorded, such as a final status write on a full disk, is ``done`` with that version).
(``flock`` is POSIX: on Windows jobs run, but one-at-a-time is not enforced across processes and a
worker that died silently is not detected by processes other than the one that started it.)
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import traceback
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, NoReturn, Optional, Tuple, Union

from SegAssistLib.client.local import process_alive
from SegAssistLib.file_locks import LockUnsupportedError, exclusive_lock
from SegAssistLib.learning.loop_errors import JobNotFoundError, TrainingBusyError, TrainingError
from SegAssistLib.learning.registry import FOLDER

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: one job per process only
    fcntl = None  # type: ignore[assignment]

FINAL_STATES = ("done", "cancelled", "failed")
LOCK_NAME = ".train.lock"
LOCK_PATIENCE_S = 1.0
FINISHING_PATIENCE_S = 30.0  # for the lock of a job whose final status is written (its worker is ending)
WATCHDOG_GRACE_S = 60.0
COMMIT_GRACE_S = 300.0  # how much longer the watchdog waits for a job that is recording its version
REGISTRY_LOCK_WAIT_S = 10.0  # for the registry's lock, before a stopped job's status is decided
ALIVE_NAME = "alive"
REPO_ROOT = Path(__file__).resolve().parents[2]


def jobs_folder(store_root: Union[str, Path]) -> Path:
    return Path(store_root) / FOLDER / "jobs"


def _lock_path(store_root: Union[str, Path]) -> Path:
    return Path(store_root) / FOLDER / LOCK_NAME


def _try_lock(store_root: Union[str, Path]) -> Optional[int]:
    """An fd holding the training lock, or ``None`` if another process holds it."""
    return exclusive_lock(_lock_path(store_root))


def _take_lock(store_root: Union[str, Path], patience_s: float = LOCK_PATIENCE_S) -> Optional[int]:
    """:func:`_try_lock`, retried for ``patience_s``: :func:`training_running` holds the lock for an
    instant to probe it, and a start at that instant is not a busy datastore."""
    return exclusive_lock(_lock_path(store_root), patience_s)


def _newest_job_final(store_root: Union[str, Path]) -> bool:
    """Whether the newest job's status file says it has ended (read as it is: no liveness probe)."""
    newest = _job_dirs_newest_first(jobs_folder(store_root))[:1]
    return bool(newest) and (_read_json(newest[0] / "status.json") or {}).get("state") in FINAL_STATES


def _take_lock_to_start(store_root: Union[str, Path]) -> Optional[int]:
    """The training lock for a new job: :func:`_take_lock`, and while the newest job has written its
    final status (its worker releases the lock right after, and is gone a moment later) up to
    ``FINISHING_PATIENCE_S`` more. A job that started meanwhile (not final) ends the wait: busy."""
    fd = _take_lock(store_root)
    deadline = time.monotonic() + FINISHING_PATIENCE_S
    while fd is None and time.monotonic() < deadline and _newest_job_final(store_root):
        time.sleep(0.05)
        fd = _try_lock(store_root)
    return fd


def _release_lock(fd: Optional[int]) -> None:
    """Let go of the training lock held by ``fd`` (unlocked for every copy of the descriptor, then closed)."""
    if fd is None:
        return
    if fcntl is not None:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
    with contextlib.suppress(OSError):
        os.close(fd)


def _death_note(code: Optional[int]) -> str:
    """What is known of a worker that ended without writing its final status."""
    if code is None:  # seen from another process: no exit status to read
        return ("the training process ended unexpectedly: it stopped without writing its final status "
                "(killed, or it crashed; see worker.log)")
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"the training process ended unexpectedly: it was killed ({name})"
    return f"the training process ended unexpectedly (exit code {code})"


def _worker_gone(pid: Any) -> bool:
    """Whether the worker of this recorded pid has certainly ended (an unknown pid says nothing)."""
    known = isinstance(pid, int) and not isinstance(pid, bool) and pid > 0
    return known and not process_alive(pid)


def _hold_alive(folder: Path) -> Optional[int]:
    """A descriptor holding an exclusive ``flock`` on the job's ``alive`` file, for its worker to
    inherit (``None`` without ``flock``). Locked under a temporary name, then renamed: no reader
    ever finds the file unlocked while the job lives, nor takes the lock before its owner."""
    if fcntl is None:  # pragma: no cover - Windows: the recorded pid only
        return None
    tmp = folder / f".{ALIVE_NAME}.{uuid.uuid4().hex[:8]}"
    fd = os.open(str(tmp), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.replace(tmp, folder / ALIVE_NAME)
    except BaseException as exc:
        os.close(fd)
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(exc, OSError):  # a file system without flock: the job is judged by its pid
            return None
        raise
    return fd


def _job_alive(folder: Path) -> Optional[bool]:
    """Whether the job's worker still runs, from its ``alive`` file's lock (held by the worker for its
    whole life, whatever its pid has become since); ``None`` when that cannot tell: a job folder from
    before the file existed, or no ``flock``."""
    if fcntl is None:  # pragma: no cover - Windows
        return None
    try:
        fd = os.open(str(folder / ALIVE_NAME), os.O_RDONLY)
    except OSError:  # missing (an older job), or unreadable
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as exc:
        # the worker holds it; any other error (a file system without flock) tells nothing
        return True if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES) else None
    finally:
        os.close(fd)  # closing releases a lock this probe took
    return False


def _close_all(fds: List[int]) -> None:
    """Close each descriptor once: taken off the list before it is closed (an interruption between the
    two leaves it open, never closes a number another open has been given since)."""
    while fds:
        with contextlib.suppress(OSError):
            os.close(fds.pop())


def training_running(store_root: Union[str, Path]) -> bool:
    """Whether some process holds this datastore's training lock right now; True also where the file
    system cannot tell (no working ``flock``): a job is then judged by its worker's pid alone."""
    try:
        fd = _try_lock(store_root)
    except LockUnsupportedError:
        return True
    if fd is None:
        return True
    os.close(fd)
    return False


def _read_json(path: Path) -> Optional[Dict[str, Any]]:
    """The JSON object in ``path``; None when it is missing, unreadable or not an object (a damaged
    status file reads as no status, as a half-written one does)."""
    try:
        data = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _log_tail(folder: Path, lines: int = 8) -> str:
    try:
        return "\n".join((folder / "worker.log").read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return ""


# an absolute path of two parts or more: POSIX (not after a word, a dot, ~, : or another path's parts) or Windows
_ABSOLUTE_PATH = re.compile(r"""(?<![\w.~/:\\-])/(?:[^\s/'"]+/)+[^\s/'"]*|\b[A-Za-z]:\\(?:[^\s\\'"]+\\)+[^\s\\'"]*""")


def public_text(
    text: str, store_root: Union[str, Path, None] = None, checkpoint: Union[str, Path, None] = None
) -> str:
    """``text`` without the server's file paths, as a job's status must be (a server serves it, and its
    replies never show where its files are): a file of the datastore named from it (``adapters/v1-lora.pt``,
    as the registry names them), the checkpoint as such, any other absolute path by its last part
    (``…/name``). The full text stays in the job's worker.log."""
    if checkpoint is not None:
        for shown in _spellings(checkpoint):
            text = text.replace(shown, "the base model's checkpoint")
    if store_root is not None:
        for shown in _spellings(store_root):
            text = text.replace(shown + os.sep, "").replace(shown, "the datastore")
    return _ABSOLUTE_PATH.sub(_last_part, text)


def _spellings(path: Union[str, Path]) -> List[str]:
    """A path as given and resolved (a link in it), the longer first."""
    return sorted({str(Path(path)), str(Path(path).resolve())}, key=len, reverse=True)


def _last_part(match: re.Match) -> str:
    path = match.group(0)
    return "\u2026" + ("/" if path.startswith("/") else "\\") + re.split(r"[/\\]", path)[-1]


def _public_status(data: Dict[str, Any], store_root: Path) -> Dict[str, Any]:
    """The status with its free texts (error, message, log tail) made :func:`public_text`: a job folder
    of an older release, or a worker that died mid-traceback, may have left paths in them."""
    for key in ("error", "message", "log_tail"):
        if isinstance(data.get(key), str):
            data[key] = public_text(data[key], store_root)
    return data


@dataclass
class TrainingJob:
    """A handle on a job (the process, when this process started it)."""

    job_id: str
    folder: Path
    store_root: Path
    process: Optional[subprocess.Popen] = None

    def status(self) -> Dict[str, Any]:
        """The job's latest status; a worker that died without saying so shows as ``failed``. Its texts
        name no file by its path on this machine (:func:`public_text`): worker.log has the details."""
        return _public_status(self._status(), self.store_root)

    def _status(self) -> Dict[str, Any]:
        # the exit is seen before the file is read: a worker that writes its final status and exits
        # between the two would otherwise read as unfinished, then dead ("failed" with exit code 0)
        code = self.process.poll() if self.process is not None else None
        data = _read_json(self.folder / "status.json") or {"state": "starting"}
        data["job_id"] = self.job_id
        if data.get("state") in FINAL_STATES:
            return data
        if self.process is not None:
            dead = code is not None
        else:  # started by another process: the lock its worker holds on the job's alive file
            alive = _job_alive(self.folder)
            if alive is None:  # an older job folder: its worker's pid, then the datastore's training lock
                alive = not _worker_gone(data.get("pid")) and training_running(self.store_root)
            dead, code = not alive, None
            if dead:  # it may have finished between the two reads
                data = _read_json(self.folder / "status.json") or data
                data["job_id"] = self.job_id
                if data.get("state") in FINAL_STATES:
                    return data
        if dead:
            data.update(
                state="failed",
                error=_death_note(code),
                log_tail=_log_tail(self.folder),
            )
        return data

    @property
    def finished(self) -> bool:
        return self.status().get("state") in FINAL_STATES

    def cancel(self) -> None:
        """Ask the job to stop (it does between steps); ``wait`` for it to end."""
        (self.folder / "cancel").touch()

    def wait(self, timeout: Optional[float] = None, poll_s: float = 0.2) -> Dict[str, Any]:
        """Block until the job ends (or ``timeout``); returns its status."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            data = self.status()
            if data.get("state") in FINAL_STATES:
                if self.process is not None:  # its final status is written: the exit follows (torch's teardown)
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        self.process.wait(timeout=30)
                return data
            if deadline is not None and time.monotonic() >= deadline:
                return data
            time.sleep(poll_s)

    def kill(self) -> None:
        """End the worker at once (last resort: cancel is the clean way; nothing half-written stays)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def _check_enough_labels(store_root: Path, label_value: Optional[int] = None) -> None:
    """Refuse at once what the worker would refuse after starting. With a label value, labels are read
    until two cases hold enough of it (usually the first two): the worker's refusal named no value."""
    from SegAssistLib.learning.datastore import Datastore
    from SegAssistLib.learning.traindata import (
        check_enough_cases,
        check_enough_subjects,
        foreground,
        usable_and_too_small,
    )
    from SegAssistLib.training.data import MIN_TARGET_VOXELS

    with Datastore(store_root) as store:
        pairs, too_small = usable_and_too_small(store)
        check_enough_cases(len(pairs), [case.name for case in too_small])
        ids = [case.id for case, _ in pairs]
        check_enough_subjects(ids, store.subjects(ids))
        if label_value is None:
            return
        holding = 0
        for _, label in pairs:
            holding += int(foreground(store.load_label(label.id), label_value).sum()) >= MIN_TARGET_VOXELS
            if holding >= 2:
                return
    raise TrainingError(
        f"training on label value {label_value} (--label-value) needs at least 2 submitted cases whose label "
        f"has at least {MIN_TARGET_VOXELS} voxels of that value; only {holding} of the datastore's {len(pairs)} "
        f"submitted case(s) with a label hold it: choose another label value, or none to learn every labelled voxel"
    )


def _record_pid(status_path: Path, pid: int) -> None:
    """Add the worker's pid to the status written before its start, so that any process can tell a
    worker that died before its own first status write (killed while importing torch) from a live one.
    A status the worker wrote already carries its pid: it is left as it is."""
    from SegAssistLib.learning.trainer import write_json_replace

    data = _read_json(status_path) or {}
    if data.get("pid") is not None:
        return
    data["pid"] = pid
    with contextlib.suppress(OSError):  # the job runs: its own first write records the pid too
        write_json_replace(status_path, data)


class TrainingSetupError(TrainingError):
    """A training job cannot start because a file it needs is missing. The message names the file's
    path (for the CLI); ``public`` says the same without it, as a server's reply must (it never shows
    where the server's files are)."""

    def __init__(self, message: str, public: str) -> None:
        super().__init__(message)
        self.public = public


def start_training(
    store_root: Union[str, Path],
    checkpoint: Union[str, Path],
    config: Optional[Any] = None,
    python: Optional[str] = None,
) -> TrainingJob:
    """Start a training job in a new process; raises :class:`TrainingBusyError` if one is running.

    ``config`` is an ``AdapterTrainConfig`` or a dict of its fields (checked here, so a bad setting
    fails at once, not in the worker). An exception that interrupts the start once the worker has
    started (Ctrl-C, or SIGTERM turned into an exception by the caller's handler) writes the job's
    cancel flag before it leaves, and carries the job as its ``training_job`` attribute, to wait for.
    """
    from SegAssistLib.learning.trainer import AdapterTrainConfig  # torch: only when training

    if config is None:
        cfg = AdapterTrainConfig().check()
    elif isinstance(config, dict):
        cfg = AdapterTrainConfig.from_dict(config)
    else:
        cfg = config.check()
    store_root = Path(store_root).resolve()
    if not (store_root / "segassist.sqlite").is_file():
        raise TrainingSetupError(f"no SegAssist datastore at {store_root}", "the learning datastore is missing")
    checkpoint = Path(checkpoint).resolve()
    if not checkpoint.is_file():
        raise TrainingSetupError(
            f"model checkpoint not found: {checkpoint}", "the base model's checkpoint file is missing on the server"
        )
    _check_enough_labels(store_root, cfg.label_value)
    try:
        fd = _take_lock_to_start(store_root)
    except LockUnsupportedError as exc:  # not a busy datastore: one job at a time cannot be enforced there
        raise TrainingSetupError(
            f"cannot start a training job: {exc.strerror}: {exc.filename}",
            "the learning datastore's file system does not support file locks",
        ) from None
    if fd is None:
        running = [j for j in list_jobs(store_root) if j.get("state") not in FINAL_STATES]
        which = f" (job {running[0]['job_id']})" if running else ""
        raise TrainingBusyError(
            f"a training job is already running on this datastore{which}: wait for it or cancel it"
        )
    held = [fd]  # descriptors to close here: the worker holds its own copies
    process: Optional[subprocess.Popen] = None
    launching = False
    try:
        job_id = time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:6]
        folder = jobs_folder(store_root) / job_id
        folder.mkdir(parents=True)
        alive_fd = _hold_alive(folder)
        if alive_fd is not None:
            held.append(alive_fd)
        spec = {"store_root": str(store_root), "checkpoint": str(checkpoint), "config": cfg.to_dict(), "job_id": job_id}
        (folder / "job.json").write_text(json.dumps(spec, indent=1))
        from SegAssistLib.learning.trainer import write_json_replace

        write_json_replace(folder / "status.json", {"state": "starting", "job_id": job_id, "started_at": time.time(),
                                                    "kind": cfg.kind, "time_budget_s": cfg.time_budget_s})
        env = dict(os.environ)
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env[var] = str(cfg.threads)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
        with open(folder / "worker.log", "ab") as log:
            launching = True  # from here on the worker may run (the interruption may come before process is set)
            process = subprocess.Popen(
                [python or sys.executable, "-m", "SegAssistLib.learning.jobs", str(folder), str(fd),
                 str(alive_fd if alive_fd is not None else "-")],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                pass_fds=tuple(held) if fcntl is not None else (),
                start_new_session=True,  # Ctrl-C in a terminal goes to the CLI, which cancels cleanly
            )
        # the worker runs: up to the return, whatever interrupts this start cancels it (below)
        _record_pid(folder / "status.json", process.pid)
        _close_all(held)
        job = TrainingJob(job_id, folder, store_root, process)
        # collect its exit status as soon as it ends, whoever started it (else a zombie until we exit)
        threading.Thread(target=process.wait, name=f"segassist-reap-{job_id}", daemon=True).start()
        return job
    except BaseException as exc:  # Ctrl-C, or SIGTERM raised by the caller's handler: a started worker stops
        if launching:
            with contextlib.suppress(OSError):
                (folder / "cancel").touch()
            with contextlib.suppress(Exception):  # for the caller to wait for it to stop
                exc.training_job = TrainingJob(job_id, folder, store_root, process)  # type: ignore[attr-defined]
        _close_all(held)
        raise


def _job_dirs_newest_first(folder: Path) -> List[Path]:
    """Job folders by when they were started (their ``job.json`` is written once, at the start), not
    by name: ids of older versions carry local time, which a clock change or time zone reorders."""

    def started(job_dir: Path) -> Tuple[float, str]:
        spec = job_dir / "job.json"
        return ((spec if spec.exists() else job_dir).stat().st_mtime, job_dir.name)

    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if p.is_dir()), key=started, reverse=True)


def list_jobs(store_root: Union[str, Path]) -> List[Dict[str, Any]]:
    """Status of every job of the datastore, newest first."""
    return [TrainingJob(d.name, d, Path(store_root)).status() for d in _job_dirs_newest_first(jobs_folder(store_root))]


def get_job(store_root: Union[str, Path], job_id: Optional[str] = None) -> TrainingJob:
    """A job by id, or the newest one."""
    folder = jobs_folder(store_root)
    if job_id is None:
        jobs = _job_dirs_newest_first(folder)
        if not jobs:
            raise JobNotFoundError("no training job has run on this datastore yet")
        return TrainingJob(jobs[0].name, jobs[0], Path(store_root))
    if not job_id or "/" in job_id or job_id.startswith(".") or not (folder / job_id).is_dir():
        raise JobNotFoundError(f"no training job {job_id!r}")
    return TrainingJob(job_id, folder / job_id, Path(store_root))


def cancel_job(store_root: Union[str, Path], job_id: Optional[str] = None) -> Dict[str, Any]:
    """Ask a job (default: the newest) to stop; returns its status at that moment."""
    job = get_job(store_root, job_id)
    status = job.status()
    if status.get("state") not in FINAL_STATES:
        job.cancel()
    return job.status()


# ---------------------------------------------------------------------------------------- worker


def lower_priority(nice: int) -> Dict[str, Any]:
    """Run this process ``nice`` steps below normal CPU priority; returns what took effect.

    On Linux with autogroup scheduling (the default on desktops and most servers), a process
    started in a new session (the job is: Ctrl-C must not reach it) gets its own scheduling group,
    and a plain ``nice`` then only ranks it against its own threads: against the server it would
    still take a full share. Writing the value to ``/proc/self/autogroup`` lowers the whole group.
    """
    applied: Dict[str, Any] = {"nice": None, "autogroup_nice": None}
    if not nice:
        return applied
    if hasattr(os, "nice"):
        with contextlib.suppress(OSError):
            applied["nice"] = os.nice(int(nice))
    autogroup = Path("/proc/self/autogroup")
    if autogroup.is_file():
        with contextlib.suppress(OSError, ValueError):
            autogroup.write_text(str(int(nice)))
            applied["autogroup_nice"] = int(autogroup.read_text().split("nice")[-1])
    return applied


def _worker(folder: Path) -> int:
    spec = json.loads((folder / "job.json").read_text())
    status_path = folder / "status.json"
    # held by the main thread for each status write and from the start of its registration until its
    # final status is written (run_training's status_lock); the watchdog judges the job holding it
    status_lock = threading.RLock()
    timer: Optional[threading.Timer] = None
    try:  # from here on a failure is written to the status (a bad setting, the priority, torch...)
        from SegAssistLib.learning.trainer import AdapterTrainConfig, run_training

        cfg = AdapterTrainConfig.from_dict(spec["config"])
        lower_priority(cfg.nice)
        import torch

        torch.set_num_threads(cfg.threads)
        with contextlib.suppress(RuntimeError):  # already set in this process
            torch.set_num_interop_threads(1)
        timer = _arm_watchdog(folder, spec, cfg.time_budget_s, status_lock)
        run_training(
            spec["store_root"],
            spec["checkpoint"],
            cfg,
            job_id=spec["job_id"],
            status_path=status_path,
            should_stop=(folder / "cancel").exists,
            status_extra={"threads": torch.get_num_threads(), "nice": cfg.nice},
            status_lock=status_lock,
        )
        return 0
    except Exception as exc:
        traceback.print_exc()  # the details, paths included, for worker.log; the status gets a public form
        error = public_text(getattr(exc, "public", None) or str(exc), spec["store_root"], spec["checkpoint"])
        with status_lock:
            _write_final(folder, spec, _read_json(status_path) or {}, error,
                         error_code=getattr(exc, "code", "internal"), then=f"the job ended with an error: {error}")
        return 1
    finally:
        if timer is not None:
            timer.cancel()


def _arm_watchdog(folder: Path, spec: Dict[str, Any], budget_s: float, status_lock: Any) -> threading.Timer:
    """Start the timer that stops the worker once it overran ``budget_s`` by a wide margin (see the
    module docstring); it judges the job holding ``status_lock``."""
    grace = max(WATCHDOG_GRACE_S, 0.25 * budget_s)
    overrun = f"the job overran its time budget of {budget_s:.0f} s by more than {grace:.0f} s and was stopped"
    status_path = folder / "status.json"

    def watchdog() -> None:
        if not status_lock.acquire(timeout=COMMIT_GRACE_S):  # recording its version for minutes: stuck
            _stop_overrun(folder, spec, _read_json(status_path) or {},
                          f"{overrun} (its registration had not ended {COMMIT_GRACE_S:.0f} s later)")
        latest = _read_json(status_path) or {}
        if latest.get("state") in FINAL_STATES:
            status_lock.release()
            return  # finished meanwhile: the worker is on its way out
        _stop_overrun(folder, spec, latest, overrun)  # with the lock: the main thread writes nothing more

    timer = threading.Timer(budget_s + grace, watchdog)
    timer.daemon = True
    timer.start()
    return timer


def _stop_overrun(folder: Path, spec: Dict[str, Any], latest: Dict[str, Any], error: str) -> NoReturn:
    """End a worker that overran its budget (exit code 3), after a final status that agrees with the
    registry (:func:`_write_final`). The registry's lock is taken first and kept until the exit, so that
    no thread of this process records a version after the registry was read (not taken within
    ``REGISTRY_LOCK_WAIT_S``, by a registration stuck while holding it: the registry is read as it is)."""
    from SegAssistLib.learning.registry import AdapterRegistry

    try:
        with contextlib.suppress(Exception):
            AdapterRegistry(spec["store_root"]).lock_until_exit(REGISTRY_LOCK_WAIT_S)
        _write_final(folder, spec, latest, error)
    except Exception:  # a full disk...: the worker ends all the same
        traceback.print_exc()
    finally:
        _exit_now(3)


def _write_final(
    folder: Path, spec: Dict[str, Any], latest: Dict[str, Any], error: str, error_code: Optional[str] = None,
    then: Optional[str] = None,
) -> None:
    """The job's final status, in agreement with the registry: ``done`` with this job's version when the
    registry names one (the job failed or was stopped after recording it: the version serves, so the job
    did not fail; ``then`` or ``error`` says what came after), else ``failed`` with ``error`` (and
    ``error_code``). ``latest``: the status so far, kept."""
    from SegAssistLib.learning.registry import BASE, REJECTED, AdapterRegistry
    from SegAssistLib.learning.trainer import StatusWriter, TrainingResult

    try:
        state = AdapterRegistry(spec["store_root"]).read()
        record = next((v for v in reversed(state.versions) if v.job_id == spec["job_id"]), None)
    except Exception:  # unreadable: nothing known to be recorded
        state, record = None, None
    writer = StatusWriter(folder / "status.json")
    writer.data.update(latest)
    if record is None or state is None:
        codes = {"error_code": error_code} if error_code is not None else {}
        writer.update(force=True, state="failed", phase="finished", error=error, **codes)
        return
    promoted = record.status != REJECTED  # rolled back since: it was promoted first
    what = f"version {record.id} was registered{' and promoted' if promoted else ''}"
    after = then or error
    reason = f"{record.reason}; {what}, then {after}" if record.reason else f"{what}, then {after}"
    result = TrainingResult(
        state="done", version=record, promoted=promoted, current=state.current,
        incumbent=record.incumbent or BASE, incumbent_dice=record.incumbent_dice, val_dice=record.val_dice,
        steps=record.steps, train_seconds=record.train_seconds, reason=reason,
        total_seconds=time.time() - float(latest.get("started_at") or time.time()),
    )  # fmt: skip
    writer.update(force=True, state="done", phase="finished", message=reason, result=result.to_dict())


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        print("usage: python -m SegAssistLib.learning.jobs <job folder> [<locked fd> [<alive fd>]]",
              file=sys.stderr)
        return 2
    # argv[1] is the locked descriptor inherited from the parent: keeping it open holds the lock
    lock_fd = int(argv[1]) if len(argv) > 1 and argv[1].isdigit() else None
    # argv[2], the locked descriptor of the job's alive file: never closed, the exit releases it
    if len(argv) > 2 and argv[2].isdigit():
        with contextlib.suppress(OSError):
            os.set_inheritable(int(argv[2]), False)  # a process this one starts must not keep the job "alive"
    code = _worker(Path(argv[0]))
    # the final status is written (run_training's last write, or the failure above): the datastore is
    # free for the next job now, not after the interpreter's teardown
    _release_lock(lock_fd)
    return code


def _exit_now(code: int) -> NoReturn:
    """End the worker without the interpreter's teardown (torch's takes seconds and does nothing the
    job needs: every file it wrote is complete), its output flushed to worker.log first."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


if __name__ == "__main__":
    _exit_now(main())
