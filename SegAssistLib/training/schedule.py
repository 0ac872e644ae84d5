"""The learning-rate schedule of both trainers: a cosine over the run, by steps or by time.

A run ends at ``max_steps`` or when its time runs out, whichever comes first. While it is on course
to reach ``max_steps`` in its time, the cosine follows ``step / max_steps`` alone, so the rates, and
with the same seed the weights, do not depend on how fast the machine is. Once the measured pace
says the time will run out first (judged from the median of the recent steps, after the first
``JUDGE_AFTER`` steps, which include warm-up), the cosine follows the larger of ``step / max_steps``
and the share of the time spent, so a run cut short by its budget still ends at a low rate. That
judgement is never taken back (the rate would jump up again).
"""

from __future__ import annotations

import math
from collections import deque
from typing import Deque

import numpy as np

JUDGE_AFTER = 3  # steps measured before the pace is trusted
RECENT_STEPS = 50  # the pace is the median of this many last step times


class CosineSchedule:
    def __init__(self, learning_rate: float, max_steps: int, floor: float, step: int = 0, time_limited: bool = False):
        self.learning_rate, self.max_steps, self.floor = learning_rate, max_steps, floor
        self.step = step  # steps done
        self.time_limited = time_limited  # the time will end the run before max_steps
        self._recent: Deque[float] = deque(maxlen=RECENT_STEPS)

    def done(self, seconds: float) -> None:
        """A step ended, after ``seconds``."""
        self.step += 1
        self._recent.append(float(seconds))

    def pace(self) -> float:
        """Seconds per step: the median of the recent steps (0 before the first)."""
        return float(np.median(self._recent)) if self._recent else 0.0

    def progress(self, spent: float, available: float) -> float:
        """Where the run is, 0 to 1, after ``spent`` of its ``available`` seconds of training."""
        by_steps = min(1.0, self.step / self.max_steps)
        if not self.time_limited and len(self._recent) >= JUDGE_AFTER:
            self.time_limited = spent + (self.max_steps - self.step) * self.pace() > available
        if not self.time_limited:
            return by_steps
        return min(1.0, max(by_steps, spent / available if available > 0 else 1.0))

    def rate(self, spent: float, available: float) -> float:
        progress = self.progress(spent, available)
        return self.learning_rate * max(self.floor, 0.5 * (1.0 + math.cos(math.pi * progress)))
