"""One inference worker thread per device, fed by a queue that is fair across sessions.

The engine is not thread-safe, so exactly one thread (the worker) ever touches it, and every
engine call (open a session, add a prompt, undo, ..., close) travels as a *job* to that thread.
Everything else (reading and decompressing uploads, hashing, validating, compressing replies)
happens in the web server's thread pool, off the worker.

Fairness: jobs wait in one FIFO per session, and the worker takes one job from each waiting
session in turn (round robin). A session that sends ten prompts at once does not delay a session
that sends one by more than one job. A session's *queue position* is the number of other
sessions' jobs that run before its next job.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Deque, Dict, List, Optional, Tuple

from SegAssistLib.engine.base import Capabilities, Engine

log = logging.getLogger("segassist.server")

Job = Callable[[Engine], Any]


class QueueFull(RuntimeError):
    pass


class WorkerStopped(RuntimeError):
    pass


@dataclass
class _Item:
    fn: Job
    future: concurrent.futures.Future
    enqueued: float = field(default_factory=time.perf_counter)


class FairQueue:
    """Round robin over keys (sessions), FIFO within a key. Thread-safe; items are opaque."""

    def __init__(self, max_items: int = 256, max_per_key: Optional[int] = None) -> None:
        """``max_per_key``: items one key may have waiting, so that one session cannot fill the
        queue and have every other user's click refused (default: no limit but ``max_items``)."""
        self._queues: Dict[str, Deque[Any]] = {}
        self._order: Deque[str] = deque()  # keys with waiting items, in serving order
        self._cond = threading.Condition()
        self._max = max_items
        self._max_per_key = max_per_key or max_items
        self._count = 0
        self._closed = False

    def put(self, key: str, item: Any, force: bool = False) -> None:
        """Queue an item; ``force`` skips the length limit (for jobs that free memory: close)."""
        with self._cond:
            if self._closed:
                raise WorkerStopped("the server is shutting down")
            if self._count >= self._max and not force:
                raise QueueFull(f"{self._count} jobs are waiting (limit {self._max})")
            q = self._queues.get(key)
            if q is not None and len(q) >= self._max_per_key and not force:
                raise QueueFull(
                    f"this session already has {len(q)} requests waiting (limit {self._max_per_key}): "
                    "wait for their answers"
                )
            if q is None:
                q = self._queues[key] = deque()
                self._order.append(key)
            q.append(item)
            self._count += 1
            self._cond.notify()

    def get(self) -> Optional[Tuple[str, Any]]:
        """The next item in round-robin order; blocks; None once closed and drained."""
        with self._cond:
            while not self._order:
                if self._closed:
                    return None
                self._cond.wait()
            key = self._order.popleft()
            q = self._queues[key]
            item = q.popleft()
            self._count -= 1
            if q:
                self._order.append(key)  # back of the line: one job per turn
            else:
                del self._queues[key]
            return key, item

    def position(self, key: str) -> Optional[int]:
        """How many other keys' items run before ``key``'s next one; None when it has none waiting."""
        with self._cond:
            try:
                return self._order.index(key)
            except ValueError:
                return None

    def waiting(self, key: str) -> int:
        """How many of ``key``'s items wait (not counting one being run)."""
        with self._cond:
            return len(self._queues.get(key, ()))

    def __len__(self) -> int:
        with self._cond:
            return self._count

    def close(self) -> List[Any]:
        """Stop accepting; returns the items still waiting (their futures are the caller's)."""
        with self._cond:
            self._closed = True
            left = [item for q in self._queues.values() for item in q]
            self._queues.clear()
            self._order.clear()
            self._count = 0
            self._cond.notify_all()
            return left


class InferenceWorker:
    """The thread that owns one device's engine; builds the engine on that thread at start."""

    def __init__(
        self,
        device: str,
        engine_factory: Callable[[str], Engine],
        max_queued: int = 256,
        max_queued_per_session: Optional[int] = None,
    ) -> None:
        self.device = device
        self._factory = engine_factory
        self._queue = FairQueue(max_queued, max_queued_per_session)
        self._thread = threading.Thread(target=self._run, name=f"segassist-infer-{device}", daemon=True)
        self._ready: concurrent.futures.Future = concurrent.futures.Future()
        self._running_key: Optional[str] = None
        self.engine: Optional[Engine] = None
        self.capabilities: Optional[Capabilities] = None  # read once, on the worker thread
        self.n_sessions = 0  # sessions placed on this worker (the pool balances on it)
        #: called on the worker thread before each job (the learning loop's version hot swap);
        #: returns whether it changed the engine, and then the capabilities are read again
        self.before_job: Optional[Callable[[Engine], bool]] = None

    def start(self, timeout: Optional[float] = None) -> Engine:
        """Start the thread and wait until the engine is built; raises what building raised."""
        self._thread.start()
        return self._ready.result(timeout)

    def _run(self) -> None:
        try:
            self.engine = self._factory(self.device)
            self.capabilities = self.engine.capabilities()
        except BaseException as exc:  # report to start(), then end the thread
            self._ready.set_exception(exc)
            return
        self._ready.set_result(self.engine)
        while True:
            got = self._queue.get()
            if got is None:
                return
            key, item = got
            if not item.future.set_running_or_notify_cancel():
                continue  # the request went away while queued
            self._running_key = key
            try:
                self._prepare()
                value = item.fn(self.engine)
            except BaseException as exc:
                self._running_key = None
                item.future.set_exception(exc)
            else:
                self._running_key = None  # before the result: a caller woken by it sees "idle"
                item.future.set_result(value)

    def _prepare(self) -> None:
        hook = self.before_job
        if hook is None or self.engine is None:
            return
        try:
            changed = hook(self.engine)
        except Exception:  # a broken hook must not take the worker down; the job runs as before
            log.exception("the before-job hook failed")
            return
        if changed:
            self.capabilities = self.engine.capabilities()

    def submit(self, key: str, fn: Job, force: bool = False) -> concurrent.futures.Future:
        """Queue ``fn(engine)`` behind ``key``'s earlier jobs; the future's result is fn's return.

        The future carries ``queue_wait_s`` once the job starts (time spent waiting).
        """
        item = _Item(fn, concurrent.futures.Future())
        enqueued = item.enqueued

        def timed(engine: Engine) -> Any:
            item.future.queue_wait_s = time.perf_counter() - enqueued  # type: ignore[attr-defined]
            return fn(engine)

        item.fn = timed
        self._queue.put(key, item, force)
        return item.future

    def state(self, key: str) -> Tuple[str, Optional[int], int]:
        """``(state, queue_position, queue_length)`` of a session on this worker."""
        position = self._queue.position(key)
        length = len(self._queue)
        if position is not None:
            return "queued", position + (1 if self._running_key not in (None, key) else 0), length
        if self._running_key == key:
            return "running", None, length
        return "idle", None, length

    def waiting(self, key: str) -> int:
        """Jobs of session ``key`` waiting on this worker (the queue length counts every session's)."""
        return self._queue.waiting(key)

    def drain(self) -> None:
        """Take no more jobs and fail the queued ones (503 ``shutting_down``); the running one finishes."""
        for item in self._queue.close():
            if item.future.set_running_or_notify_cancel():
                item.future.set_exception(WorkerStopped("the server is shutting down"))

    def stop(self, timeout: float = 30.0) -> None:
        self.drain()
        if self._thread.is_alive():
            self._thread.join(timeout)


class WorkerPool:
    """One worker per device; a new session goes to the worker holding the fewest sessions."""

    def __init__(
        self,
        devices: Tuple[str, ...],
        engine_factory: Callable[[str], Engine],
        max_queued: int,
        max_queued_per_session: Optional[int] = None,
    ) -> None:
        self.workers = [InferenceWorker(d, engine_factory, max_queued, max_queued_per_session) for d in devices]

    def start(self) -> None:
        for w in self.workers:
            w.start()

    def drain(self) -> None:
        for w in self.workers:
            w.drain()

    def stop(self) -> None:
        for w in self.workers:
            w.stop()

    def pick(self) -> InferenceWorker:
        return min(self.workers, key=lambda w: w.n_sessions)

    @property
    def capabilities(self) -> Capabilities:
        caps = self.workers[0].capabilities
        if caps is None:
            raise WorkerStopped("the inference worker has not started")
        return caps
