"""Validating a version the way it will be used: interactive sessions with the simulated annotator.

Each held-out case is segmented through a real engine session (the same windows, zoom-out and
refinement a user gets) with clicks from the evaluation's click simulator
(:func:`SegAssistLib.evaluation.simulator.next_click`: the most interior voxel of the largest
error). The score of a case is the mean Dice over its first ``n_clicks`` clicks, so a version
wins both by a better first answer and by answering corrections better, which is what makes a
case cost fewer clicks. A case the simulated annotator finishes early keeps its final Dice for
the remaining clicks. With ``groups`` (each case's subject, the patient) a subject counts once,
however many of its images are held out: the mean over subjects of their cases' mean.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Optional, Sequence

import numpy as np

from SegAssistLib.evaluation.simulator import next_click
from SegAssistLib.learning.traindata import LabelledCase

DEFAULT_VAL_CLICKS = 3


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a) > 0, np.asarray(b) > 0
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def click_dice_curve(engine, case: LabelledCase, n_clicks: int = DEFAULT_VAL_CLICKS) -> List[float]:
    """Dice after each of ``n_clicks`` simulated clicks in one engine session."""
    session = engine.open_session(case.volume)
    curve: List[float] = []
    try:
        prediction: Optional[np.ndarray] = None
        for _ in range(n_clicks):
            click = next_click(case.target, prediction, case.volume.spacing)
            if click is None:
                break
            session.add_prompt(click)
            prediction = session.result()
            curve.append(dice(prediction, case.target))
    finally:
        session.close()
    last = curve[-1] if curve else 1.0
    return curve + [last] * (n_clicks - len(curve))


@dataclass
class ValidationResult:
    dice: float  # mean over cases (over subjects, given groups) of the mean Dice over clicks
    per_case: Dict[str, List[float]] = field(default_factory=dict)
    first_click_dice: float = 0.0
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {
            "dice": self.dice,
            "first_click_dice": self.first_click_dice,
            "seconds": self.seconds,
            "per_case": self.per_case,
        }


def validate(
    engine,
    cases: Sequence[LabelledCase],
    n_clicks: int = DEFAULT_VAL_CLICKS,
    should_stop: Optional[Callable[[], bool]] = None,
    groups: Optional[Mapping[str, str]] = None,
) -> Optional[ValidationResult]:
    """Score the engine's current network on the cases; ``None`` if ``should_stop`` interrupted it.
    ``groups``: case id -> subject key; a subject weighs as much as a case of its own (see above)."""
    t0 = time.perf_counter()
    per_case: Dict[str, List[float]] = {}
    for case in cases:
        if should_stop is not None and should_stop():
            return None
        per_case[case.case.id] = click_dice_curve(engine, case, n_clicks)
    return ValidationResult(
        dice=_mean_by_group({c: float(np.mean(curve)) for c, curve in per_case.items()}, groups),
        per_case=per_case,
        first_click_dice=_mean_by_group({c: curve[0] for c, curve in per_case.items()}, groups),
        seconds=time.perf_counter() - t0,
    )


def _mean_by_group(scores: Mapping[str, float], groups: Optional[Mapping[str, str]]) -> float:
    """The mean over groups of each group's mean score (a case without a group is its own)."""
    by_group: Dict[str, List[float]] = {}
    for case_id, score in scores.items():
        by_group.setdefault((groups or {}).get(case_id, case_id), []).append(score)
    return float(np.mean([np.mean(v) for v in by_group.values()])) if by_group else 0.0
