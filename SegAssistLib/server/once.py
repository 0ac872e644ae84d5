"""Requests that must take effect once: a repeat under the same request id gets the first answer.

Label saves and next-case requests change the datastore (a new label version, a lock); a client
whose reply was lost (a dropped connection, a read timeout) sends the request again under the same
``X-SegAssist-Request-Id``. The repeat then waits for the first if it still runs, and is answered
with its result instead of saving a second version or locking a second case. A request that failed
is forgotten, so a repeat of it runs for real.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from typing import Awaitable, Callable, Optional, Tuple, TypeVar

T = TypeVar("T")
DEFAULT_CAPACITY = 1024  # answers kept, oldest forgotten first (a repeat comes within seconds)


class OnceReplies:
    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        self.capacity = capacity
        self._answers: OrderedDict[Tuple[str, str, str], asyncio.Future] = OrderedDict()

    async def run(self, user: str, what: str, request_id: Optional[str], make: Callable[[], Awaitable[T]]) -> T:
        """``await make()`` once per (user, what, request id); without a request id, every time."""
        if request_id is None:
            return await make()
        key = (user, what, request_id)
        earlier = self._answers.get(key)
        if earlier is not None:
            return await asyncio.shield(earlier)
        answer: asyncio.Future = asyncio.get_running_loop().create_future()
        self._answers[key] = answer
        while len(self._answers) > self.capacity:
            self._answers.popitem(last=False)
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
