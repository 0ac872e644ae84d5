"""Which prompts the annotators use, read from the prompt logs of the labels an adapter learns from.

An adapter is trained on simulated sessions in a few hundred steps. Drawing their prompts in the
proportions of the team's own sessions spends those steps on the interaction the adapter will
answer (a team that clicks gets an adapter trained on clicks, one that starts from boxes one
trained on boxes); a share of the default mix (``DEFAULT_SHARE``) keeps every kind in training,
so an adapter never forgets how to answer a prompt the team rarely gives.

A session that opens on a mask (a ``/next`` proposal, an existing segment) has no first prompt on
an empty mask: every prompt in it corrects that mask. It shapes the correction shares only; the
first-kind weights come from the sessions that began from nothing (the simulator draws its own
starts from an imperfect mask, ``corrupt_share``, apart from the mix).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any, Dict, Iterable, Optional, Sequence

from SegAssistLib.prompt_log import PromptLog
from SegAssistLib.prompts import BoxPrompt, LassoPrompt, MaskPrompt, PointPrompt, Prompt, ScribblePrompt
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
    logs measured (0: the defaults); ``first_prompt_sessions``: those of them that began from
    nothing, the only ones that shape the first-kind weights (the others opened on a mask)."""

    first_kind_weights: Dict[str, float]
    correction_scribble_share: float
    sessions: int = 0
    correction_lasso_share: float = CORRECTION_LASSO_SHARE
    first_prompt_sessions: int = 0

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


def opens_on_a_mask(prompts: Sequence[Prompt]) -> bool:
    """Whether a session began from a mask with a voxel set (a ``/next`` proposal, an existing
    segment): its prompts all correct that mask. An empty initial mask (a 1-voxel box, decoded
    only then) is a start from nothing."""
    if not prompts or not isinstance(prompts[0], MaskPrompt):
        return False
    first = prompts[0]
    return tuple(int(n) for n in first.shape) != (1, 1, 1) or bool(first.to_box().any())


def mix_from_logs(logs: Iterable[Optional[PromptLog]], default_share: float = DEFAULT_SHARE) -> PromptMix:
    """The prompt mix of ``logs`` (``None`` entries: labels saved without a log, skipped), blended
    with ``default_share`` of :data:`DEFAULT_MIX`; the defaults alone for a part no log measures
    (the first-kind weights when every session opened on a mask, the correction shares when no
    session corrected).

    In a session that began from nothing, the first prompt the simulator can draw counts as its
    first kind; in one that opened on a mask (:func:`opens_on_a_mask`) there is none. Clicks,
    scribbles and lassos after the start count as corrections (a later lasso outlines a part to
    add or, negative, to erase, as the simulated correction lasso does; later boxes are new parts,
    which the correction rule does not draw).
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
        if not opens_on_a_mask(log.prompts):
            firsts[kinds[0]] += 1
            kinds = kinds[1:]
        corrections.update(k for k in kinds if k in ("point", "scribble", "lasso"))
    if not sessions:
        return DEFAULT_MIX
    return PromptMix(
        _first_kind_weights(firsts, default_share),
        _blend(corrections, "scribble", CORRECTION_SCRIBBLE_SHARE, default_share),
        sessions,
        _blend(corrections, "lasso", CORRECTION_LASSO_SHARE, default_share),
        sum(firsts.values()),
    )


def _first_kind_weights(firsts: Counter, default_share: float) -> Dict[str, float]:
    """The observed first kinds blended with the defaults; the defaults when none was observed."""
    starts = sum(firsts.values())
    default = DEFAULT_MIX.first_kind_weights
    if not starts:
        return dict(default)
    keep = 1.0 - default_share
    return {kind: keep * firsts[kind] / starts + default_share * default[kind] for kind in FIRST_KINDS}


def _blend(corrections: Counter, kind: str, default: float, default_share: float) -> float:
    """The observed share of ``kind`` among corrections blended with ``default``; ``default`` when
    no correction was observed."""
    total = sum(corrections.values())
    observed = corrections[kind] / total if total else default
    return (1.0 - default_share) * observed + default_share * default
