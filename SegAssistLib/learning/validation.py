"""Validating a version the way it will be used: interactive sessions with the simulated annotator.

Each held-out case is segmented through a real engine session (the same windows, zoom-out and
refinement a user gets) with clicks from the evaluation's click simulator
(:func:`SegAssistLib.evaluation.simulator.next_click`: the most interior voxel of the largest
error). The score of a case is the mean Dice over its first ``n_clicks`` clicks, so a version
wins both by a better first answer and by answering corrections better, which is what makes a
case cost fewer clicks. A case the simulated annotator finishes early keeps its final Dice for
the remaining clicks. With ``groups`` (each case's subject, the patient) a subject counts once,
however many of its images are held out: the mean over subjects of their cases' mean.

With a ``deadline`` a validation stops before a click that would end past it (judged from the
slowest click so far, or a given estimate): the result then says it is not ``finished`` and scores
only the cases it finished, which a caller must not compare with a finished one.
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


def click_dice_curve(
    engine, case: LabelledCase, n_clicks: int = DEFAULT_VAL_CLICKS, may_click: Optional[Callable[[], bool]] = None
) -> Optional[List[float]]:
    """Dice after each of ``n_clicks`` simulated clicks in one engine session; ``None`` when
    ``may_click()`` (asked before each click) said no before the case was done."""
    session = engine.open_session(case.volume)
    curve: List[float] = []
    try:
        prediction: Optional[np.ndarray] = None
        for _ in range(n_clicks):
            click = next_click(case.target, prediction, case.volume.spacing)
            if click is None:
                break
            if may_click is not None and not may_click():
                return None
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
    clicks: int = 0  # engine answers it asked for (a case the annotator finishes early asks fewer)
    finished: bool = True  # False: the deadline stopped it; the scores cover ``per_case`` only
    cases: int = 0  # the cases it was asked to score

    @property
    def seconds_per_click(self) -> float:
        """Its time per click, each case's session opening and closing included."""
        return self.seconds / max(1, self.clicks)

    def to_dict(self) -> dict:
        return {
            "dice": self.dice,
            "first_click_dice": self.first_click_dice,
            "seconds": self.seconds,
            "clicks": self.clicks,
            "finished": self.finished,
            "per_case": self.per_case,
        }


def validate(
    engine,
    cases: Sequence[LabelledCase],
    n_clicks: int = DEFAULT_VAL_CLICKS,
    should_stop: Optional[Callable[[], bool]] = None,
    groups: Optional[Mapping[str, str]] = None,
    deadline: Optional[float] = None,
    click_estimate: float = 0.0,
) -> Optional[ValidationResult]:
    """Score the engine's current network on the cases; ``None`` if ``should_stop`` interrupted it.
    ``groups``: case id -> subject key; a subject weighs as much as a case of its own (see above).
    ``deadline`` (a ``time.perf_counter()`` time): no click starts that would end past it, judged
    from the slowest click so far and ``click_estimate`` (seconds); a validation stopped so is
    returned with ``finished`` false."""
    t0 = time.perf_counter()
    per_case: Dict[str, List[float]] = {}
    clicks, slowest = 0, float(click_estimate)
    since: Optional[float] = None  # when the click under way began (the first of a case: with its opening)
    first = True

    def click_done(now: float) -> None:
        nonlocal slowest, since
        if since is not None:
            slowest = max(slowest, now - since)
            since = None

    def may_click() -> bool:
        nonlocal clicks, since, first
        now = time.perf_counter()
        if first:  # the session's opening and this click count as one
            first = False
        else:
            click_done(now)
            since = now
        if deadline is not None and now + slowest > deadline:
            return False
        clicks += 1
        return True

    finished = True
    for case in cases:
        if should_stop is not None and should_stop():
            return None
        if deadline is not None and time.perf_counter() + slowest > deadline:
            finished = False
            break
        since, first = time.perf_counter(), True
        curve = click_dice_curve(engine, case, n_clicks, may_click)
        click_done(time.perf_counter())  # its last click, and closing the session
        if curve is None:
            finished = False
            break
        per_case[case.case.id] = curve
    return ValidationResult(
        dice=_mean_by_group({c: float(np.mean(curve)) for c, curve in per_case.items()}, groups),
        per_case=per_case,
        first_click_dice=_mean_by_group({c: curve[0] for c, curve in per_case.items()}, groups),
        seconds=time.perf_counter() - t0,
        clicks=clicks,
        finished=finished,
        cases=len(cases),
    )


def _mean_by_group(scores: Mapping[str, float], groups: Optional[Mapping[str, str]]) -> float:
    """The mean over groups of each group's mean score (a case without a group is its own)."""
    by_group: Dict[str, List[float]] = {}
    for case_id, score in scores.items():
        by_group.setdefault((groups or {}).get(case_id, case_id), []).append(score)
    return float(np.mean([np.mean(v) for v in by_group.values()])) if by_group else 0.0
