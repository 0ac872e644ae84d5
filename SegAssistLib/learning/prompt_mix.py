"""Which prompts the annotators use, read from the prompt logs of the labels an adapter learns from.

An adapter is trained on simulated sessions in a few hundred steps. Drawing their prompts in the
proportions of the team's own sessions spends those steps on the interaction the adapter will
answer (a team that clicks gets an adapter trained on clicks, one that starts from boxes one
trained on boxes); a share of the default mix (``DEFAULT_SHARE``) keeps every kind in training,
so an adapter never forgets how to answer a prompt the team rarely gives.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any, Dict, Iterable, Optional

from SegAssistLib.prompt_log import PromptLog
from SegAssistLib.prompts import BoxPrompt, LassoPrompt, PointPrompt, Prompt, ScribblePrompt
from SegAssistLib.training.simulation import (
    CORRECTION_LASSO_SHARE,
    CORRECTION_SCRIBBLE_SHARE,
    FIRST_KIND_WEIGHTS,
    FIRST_KINDS,
)

DEFAULT_SHARE = 0.2  # of the default mix kept beside the observed one


@dataclass(frozen=True)
class PromptMix:
    """Weights of the simulated first prompt (kind -> weight over ``FIRST_KINDS``) and the shares of
    corrections drawn as scribbles and as lassos (the rest are clicks); ``sessions``: the prompt
    logs measured (0: the defaults)."""

    first_kind_weights: Dict[str, float]
    correction_scribble_share: float
    sessions: int = 0
    correction_lasso_share: float = CORRECTION_LASSO_SHARE

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


DEFAULT_MIX = PromptMix(
    dict(zip(FIRST_KINDS, FIRST_KIND_WEIGHTS)), CORRECTION_SCRIBBLE_SHARE, 0, CORRECTION_LASSO_SHARE
)


def simulated_kind(prompt: Prompt) -> Optional[str]:
    """The simulator's name for ``prompt``'s kind (a box flat on one axis is a 2D box); ``None`` for
    an initial mask, which the simulator does not draw."""
    if isinstance(prompt, PointPrompt):
        return "point"
    if isinstance(prompt, BoxPrompt):
        return "box2d" if prompt.is_2d else "box3d"
    if isinstance(prompt, ScribblePrompt):
        return "scribble"
    if isinstance(prompt, LassoPrompt):
        return "lasso"
    return None


def mix_from_logs(logs: Iterable[Optional[PromptLog]], default_share: float = DEFAULT_SHARE) -> PromptMix:
    """The prompt mix of ``logs`` (``None`` entries: labels saved without a log, skipped), blended
    with ``default_share`` of :data:`DEFAULT_MIX`; the defaults alone when no log holds a prompt.

    The first prompt of each log that the simulator can draw counts as its first kind; clicks,
    scribbles and lassos after it count as corrections (a later lasso outlines a part to add or,
    negative, to erase, as the simulated correction lasso does; later boxes are new parts, which
    the correction rule does not draw).
    """
    if not 0.0 <= default_share <= 1.0:
        raise ValueError(f"default_share must be in [0, 1], got {default_share}")
    firsts: Counter = Counter()
    corrections: Counter = Counter()
    sessions = 0
    for log in logs:
        if log is None:
            continue
        kinds = [k for k in (simulated_kind(p) for p in log.prompts) if k is not None]
        if not kinds:
            continue
        sessions += 1
        firsts[kinds[0]] += 1
        corrections.update(k for k in kinds[1:] if k in ("point", "scribble", "lasso"))
    if not sessions:
        return DEFAULT_MIX
    keep = 1.0 - default_share
    weights = {
        kind: keep * firsts[kind] / sessions + default_share * DEFAULT_MIX.first_kind_weights[kind]
        for kind in FIRST_KINDS
    }
    n_corrections = sum(corrections.values())
    observed = corrections["scribble"] / n_corrections if n_corrections else CORRECTION_SCRIBBLE_SHARE
    share = keep * observed + default_share * CORRECTION_SCRIBBLE_SHARE
    lassos = corrections["lasso"] / n_corrections if n_corrections else CORRECTION_LASSO_SHARE
    return PromptMix(weights, share, sessions, keep * lassos + default_share * CORRECTION_LASSO_SHARE)
