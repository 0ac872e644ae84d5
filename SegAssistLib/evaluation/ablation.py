"""Ablation: the model without prompt history (each interaction alone).

What "no prompt history" means here. The built-in engine answers a prompt from three inputs: the
image, the current mask (the previous-mask channel) and *every* earlier prompt of the session drawn
into the prompt channels. The ablation removes only the third: for each interaction it opens a fresh
session on the image, makes the current mask its initial :class:`~SegAssistLib.prompts.MaskPrompt`
(a mask prompt draws nothing into the prompt channels) and sends the newest prompt alone. The
network therefore still sees what the user sees on screen, the mask, but no longer the earlier
clicks, the box or the scribble that produced it: a later click cannot "remember" that a region was
confirmed or rejected before, and after a box the clicks no longer see the box. This is the usual
"mask-only memory" baseline of interactive segmentation (SAM-style tools that feed back only the
previous logits); the gap to the full engine is the value of keeping the history.

Not ablated: the image, the zoom-out/refine logic of the engine and the mask itself. Dropping the
mask as well would make every negative click meaningless (a click alone cannot say what to remove).

Latency includes opening the fresh session and encoding the mask, which the real engine does not
pay; on large masks that overhead shows in the latency table.
"""

from __future__ import annotations

import time
from typing import List, Optional

import numpy as np

from SegAssistLib.engine.base import Capabilities, Engine, EngineSession, MaskUpdate
from SegAssistLib.errors import SegAssistError
from SegAssistLib.evaluation.history import StateListHistory
from SegAssistLib.image import Volume, validate_image
from SegAssistLib.prompt_log import PromptLog
from SegAssistLib.prompts import MaskPrompt, Prompt


class NoHistorySession(StateListHistory, EngineSession):
    """One fresh inner session per interaction; keeps the masks of its own states for undo/redo."""

    def __init__(self, engine: NoHistoryEngine, volume: Volume):
        validate_image(volume)
        self._engine = engine
        self._volume = volume
        empty = np.zeros(volume.array.shape, np.uint8)
        self._states: List[tuple] = [([], np.packbits(empty.ravel()))]  # (prompts, packed mask)
        self._current = 0
        self._mask = empty
        self._closed = False

    def _unpack(self, packed: np.ndarray) -> np.ndarray:
        shape = self._volume.array.shape
        return np.unpackbits(packed, count=int(np.prod(shape))).reshape(shape)

    def _go_to(self, state: int) -> MaskUpdate:
        new = self._unpack(self._states[state][1])
        update = MaskUpdate.between(self._mask, new, latency_s=0.0)
        self._mask, self._current = new, state
        return update

    def add_prompt(self, prompt: Prompt) -> MaskUpdate:
        self._ensure_open()
        if isinstance(prompt, MaskPrompt):  # a mask is state, not an interaction: take it as it is
            new = prompt.to_array(self._mask.shape)
            start = time.perf_counter()
        else:
            start = time.perf_counter()
            inner = self._engine.inner.open_session(self._volume)
            try:
                if self._mask.any():
                    inner.add_prompt(MaskPrompt.from_array(self._mask))
                inner.add_prompt(prompt)
                new = inner.result()
            finally:
                inner.close()
        prompts = self._states[self._current][0] + [prompt]
        update = self._push((prompts, np.packbits(new.ravel())))
        update.latency_s = time.perf_counter() - start
        return update

    def reset(self) -> MaskUpdate:
        self._ensure_open()
        return self._push(([], np.packbits(np.zeros(self._mask.shape, np.uint8).ravel())))

    def result(self) -> np.ndarray:
        self._ensure_open()
        return self._mask.copy()

    def prompt_log(self) -> PromptLog:
        return PromptLog(model=self._engine.capabilities().name, prompts=list(self._states[self._current][0]))

    def close(self) -> None:
        self._closed = True
        self._states = []
        self._mask = np.zeros((0, 0, 0), np.uint8)


class NoHistoryEngine(Engine):
    """Wraps an engine that takes ``mask`` prompts so that each interaction is answered alone."""

    def __init__(self, inner: Engine):
        kinds = inner.capabilities().prompt_kinds
        if "mask" not in kinds:
            raise SegAssistError(
                f"the no-history ablation needs an engine that takes mask prompts; "
                f"{inner.capabilities().name} takes {', '.join(kinds)}"
            )
        self.inner = inner

    def capabilities(self) -> Capabilities:
        c = self.inner.capabilities()
        return Capabilities(
            name=f"{c.name}-nohistory",
            version=c.version,
            licence=c.licence,
            prompt_kinds=c.prompt_kinds,
            patch_size=c.patch_size,
            device=c.device,
            description=f"{c.name} answering each interaction alone (current mask + newest prompt).",
        )

    def open_session(self, volume: Volume, prompts: Optional[List[Prompt]] = None) -> NoHistorySession:
        session = NoHistorySession(self, volume)
        for prompt in prompts or []:
            session.add_prompt(prompt)
        return session
