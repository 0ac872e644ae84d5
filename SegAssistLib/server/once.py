"""Requests that must take effect once: a repeat under the same request id gets the first answer.

Label saves and next-case requests change the datastore (a new label version, a lock); a client
whose reply was lost (a dropped connection, a read timeout) sends the request again under the same
``X-SegAssist-Request-Id``. The repeat then waits for the first if it still runs, and is answered
with its result instead of saving a second version or locking a second case. A request that failed
is forgotten, so a repeat of it runs for real.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from typing import Awaitable, Callable, Optional, Tuple, TypeVar

T = TypeVar("T")
DEFAULT_CAPACITY = 256  # answers kept at most, oldest forgotten first
DEFAULT_KEEP_S = 600.0  # and for this long: a repeat comes within a read timeout or two
Key = Tuple[str, str, str]


class OnceReplies:
    """Answers by (user, what, request id), kept for ``keep_s`` seconds; a next-case answer holds
    a compressed proposal mask, hence the bounds on count and age. Requests still running are
    kept beyond both bounds."""

    def __init__(
        self, capacity: int = DEFAULT_CAPACITY, keep_s: float = DEFAULT_KEEP_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:  # fmt: skip
        self.capacity = capacity
        self.keep_s = keep_s
        self._clock = clock
        self._answers: OrderedDict[Key, Tuple[float, asyncio.Future]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._answers)

    def _forget_old(self) -> None:
        """Drops answers past ``keep_s`` or over ``capacity``, oldest first, but never one whose
        request still runs: its repeat must wait for it rather than save a second time."""
        limit = self._clock() - self.keep_s
        for key, (started, answer) in list(self._answers.items()):
            if len(self._answers) <= self.capacity and started >= limit:
                break
            if answer.done():
                del self._answers[key]

    async def run(self, user: str, what: str, request_id: Optional[str], make: Callable[[], Awaitable[T]]) -> T:
        """``await make()`` once per (user, what, request id); without a request id, every time."""
        if request_id is None:
            return await make()
        self._forget_old()
        key = (user, what, request_id)
        earlier = self._answers.get(key)
        if earlier is not None:
            return await asyncio.shield(earlier[1])
        answer: asyncio.Future = asyncio.get_running_loop().create_future()
        self._answers[key] = (self._clock(), answer)
        self._forget_old()
        try:
            result = await make()
        except BaseException as exc:
            self._answers.pop(key, None)
            if isinstance(exc, asyncio.CancelledError):
                answer.cancel()
            else:
                answer.set_exception(exc)
                answer.exception()  # retrieved here: no "never retrieved" warning when nobody waited
            raise
        answer.set_result(result)
        return result
