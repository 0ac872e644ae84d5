"""A dependency-free progress bar for long runs (tqdm is not a dependency).

On a terminal it redraws one line in place; elsewhere (a log file, CI) it prints a full line at most
every ``log_every_s`` seconds and at the end, so logs stay short.
"""

from __future__ import annotations

import sys
import time
from typing import Optional, TextIO


def _clock(seconds: float) -> str:
    seconds = int(max(0, round(seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class ProgressBar:
    def __init__(self, total: int, stream: Optional[TextIO] = None, width: int = 24, log_every_s: float = 15.0,
                 interactive: Optional[bool] = None):
        self.total = max(0, int(total))
        self.done = 0
        self.stream = stream if stream is not None else sys.stderr
        self.width = width
        self.log_every_s = log_every_s
        isatty = getattr(self.stream, "isatty", lambda: False)
        self.interactive = bool(isatty()) if interactive is None else interactive
        self.started = time.perf_counter()
        self._last_log = -float("inf")
        self.label = ""

    def line(self) -> str:
        elapsed = time.perf_counter() - self.started
        fraction = self.done / self.total if self.total else 1.0
        filled = int(round(self.width * fraction))
        bar = "#" * filled + "-" * (self.width - filled)
        eta = elapsed / self.done * (self.total - self.done) if self.done else float("nan")
        eta_text = _clock(eta) if eta == eta else "--:--"
        return (f"[{bar}] {self.done}/{self.total} {fraction:4.0%} elapsed {_clock(elapsed)} "
                f"eta {eta_text} {self.label}")

    def update(self, advance: int = 1, label: Optional[str] = None) -> None:
        self.done = min(self.total, self.done + advance)
        if label is not None:
            self.label = label
        now = time.perf_counter()
        if self.interactive:
            columns = 120
            self.stream.write("\r" + self.line()[:columns].ljust(columns))
            self.stream.flush()
        elif now - self._last_log >= self.log_every_s or self.done == self.total:
            self._last_log = now
            self.stream.write(self.line() + "\n")
            self.stream.flush()

    def message(self, text: str) -> None:
        """Print a line above the bar."""
        if self.interactive:
            self.stream.write("\r" + " " * 120 + "\r")
        self.stream.write(text + "\n")
        self.stream.flush()
        if self.interactive:
            self.update(0)

    def close(self) -> None:
        if self.interactive:
            self.stream.write("\n")
            self.stream.flush()
