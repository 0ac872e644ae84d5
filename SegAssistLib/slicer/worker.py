"""One worker thread for the backend conversation, polled from the GUI thread. Qt-free.

Slicer's rule: MRML and Qt only on the main thread. So the GUI submits blocking backend calls
here, a short ``qt.QTimer`` calls :meth:`BackgroundWorker.poll` on the main thread, and only the
main thread touches nodes with the results. One thread (``max_workers=1``) keeps the calls in the
order they were made, which an interactive session needs (prompt, then undo, then redo...).
"""

from __future__ import annotations

import contextlib
import threading
from collections import deque
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeoutError
from dataclasses import dataclass
from typing import Any, Callable, Deque, Generic, List, Optional, Tuple, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Finished(Generic[T]):
    """A finished call: the tag it was submitted with, and its value or the exception it raised."""

    tag: T
    value: Any = None
    error: Optional[BaseException] = None

    @property
    def ok(self) -> bool:
        return self.error is None


class ProgressNote:
    """A line of text the worker thread updates and the GUI thread reads (upload progress, queue)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._text = ""

    def set(self, text: str) -> None:
        with self._lock:
            self._text = text

    def get(self) -> str:
        with self._lock:
            return self._text


def progress_status(
    message: str,
    cancelling: bool,
    cancelling_text: str = "Cancelling after the current step...",
    suffix: str = " (cancelling)",
) -> str:
    """The status line of a cancellable run: its progress ``message``, and while a cancel is pending
    (``cancelling``) that it is (``suffix``; with no progress yet, ``cancelling_text``), so that the
    progress shown meanwhile does not hide the cancel the user asked for. The texts are parameters:
    the module passes them translated."""
    if not cancelling:
        return message
    return f"{message}{suffix}" if message else cancelling_text


class BackgroundWorker(Generic[T]):
    """A single worker thread; results come back in submission order through :meth:`poll`."""

    def __init__(self, name: str = "segassist-backend") -> None:
        self._executor: Optional[ThreadPoolExecutor] = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._in_flight: Deque[Tuple[T, Future]] = deque()
        self.note = ProgressNote()

    def submit(self, tag: T, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Future:
        if self._executor is None:
            raise RuntimeError("the worker has been shut down")
        future = self._executor.submit(fn, *args, **kwargs)
        self._in_flight.append((tag, future))
        return future

    @property
    def busy(self) -> bool:
        return bool(self._in_flight)

    @property
    def pending_tags(self) -> List[T]:
        return [tag for tag, _ in self._in_flight]

    def poll(self) -> List[Finished[T]]:
        """The calls finished since the last poll, oldest first; stops at the first unfinished one."""
        done: List[Finished[T]] = []
        while self._in_flight and self._in_flight[0][1].done():
            tag, future = self._in_flight.popleft()
            if future.cancelled():
                continue
            error = future.exception()
            done.append(Finished(tag, None if error is not None else future.result(), error))
        return done

    def wait(self, timeout: Optional[float] = None) -> List[Finished[T]]:
        """Block until every submitted call has finished (tests, batch use); then :meth:`poll`."""
        for _, future in list(self._in_flight):
            # a call still running after the timeout stays in flight
            with contextlib.suppress(CancelledError, FutureTimeoutError):
                future.exception(timeout=timeout)
        return self.poll()

    def shutdown(self, wait: bool = False, cancel_queued: bool = True) -> None:
        """Stop the thread once a running call has finished; calls not started yet are cancelled, or
        with ``cancel_queued=False`` still run (a session's close queued on the way out)."""
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=wait, cancel_futures=cancel_queued)
        self._in_flight.clear()
