"""Undo and redo over a list of whole states, for the comparison engines of the evaluation.

The built-in engine keeps compact per-prompt diffs; the baselines and the no-history ablation are
simpler: each keeps a list of states (the prompts so far, or a packed mask) and an index into it,
and recomputes or unpacks a state when it is visited. This mixin holds the shared part.
"""

from __future__ import annotations

from typing import Any, List

from SegAssistLib.engine.base import MaskUpdate
from SegAssistLib.errors import SessionError


class StateListHistory:
    """Undo/redo over ``self._states`` at ``self._current``; the session defines ``_go_to(index)``."""

    _states: List[Any]
    _current: int
    _closed: bool

    def _go_to(self, state: int) -> MaskUpdate:  # pragma: no cover - defined by the session
        raise NotImplementedError

    def _ensure_open(self) -> None:
        if self._closed:
            raise SessionError("the session is closed")

    def _push(self, state: Any) -> MaskUpdate:
        """Make ``state`` the next one (dropping the redo branch) and go to it."""
        self._states = self._states[: self._current + 1] + [state]
        return self._go_to(self._current + 1)

    def undo(self) -> MaskUpdate:
        self._ensure_open()
        if not self.can_undo:
            raise SessionError("nothing to undo")
        return self._go_to(self._current - 1)

    def redo(self) -> MaskUpdate:
        self._ensure_open()
        if not self.can_redo:
            raise SessionError("nothing to redo")
        return self._go_to(self._current + 1)

    @property
    def can_undo(self) -> bool:
        return self._current > 0

    @property
    def can_redo(self) -> bool:
        return self._current < len(self._states) - 1
