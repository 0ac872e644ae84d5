"""The signals a long command treats as Ctrl-C (``timeout``, ``kill``, a batch system ending the job, a
closed terminal or SSH session): ``segassist train`` saves its state on them, ``segassist learn train``
cancels the job it follows. Torch-free."""

from __future__ import annotations

import signal
from typing import Any, Dict

#: SIGTERM and SIGHUP, where the platform has them
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))


class Stopped(KeyboardInterrupt):
    """One of :data:`STOP_SIGNALS` arrived: handled as Ctrl-C is (``signum``: which)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def restore_handlers(previous: Dict[int, Any]) -> None:
    """Put back the handlers ``signal.signal`` returned (None: one set outside Python, the default)."""
    for sig, handler in previous.items():
        signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
