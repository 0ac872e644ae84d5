"""Active learning: which case to annotate next, and the adapted model's proposal for it.

Strategies (``next_case(strategy=...)``), over the cases nobody has started (``new``, or
``in_progress`` with an expired lock and no label):

- ``first``: import order.
- ``random``: uniformly at random, reproducible with ``seed``.
- ``uncertainty``: the case where the model disagrees most with itself under perturbation (see
  *Proposal*), plus ``diversity_weight`` times the diversity term, so that the next case is both
  hard for the current model and unlike what is already labelled.
- ``diversity``: the diversity term alone (needs no model).

Diversity: every image gets a small embedding (its intensity histogram after a robust 0.5-99.5
percentile normalisation, as Hellinger coordinates; the mean intensity of a 4x4x4 grid of blocks;
the log field of view in mm); a candidate's diversity is its distance to the nearest case already
taken up (submitted, reviewed or in progress), scaled to [0, 1] over the candidates. With nothing
taken up yet the term is 0.

Proposal (what the annotator starts from). No ground truth exists for a new case, so the prompt
must come from what the labelled cases teach: the *structure prior* is the mean position of the
structure relative to the image extent and its typical volume (from the submitted labels; the
image centre when there are none). The proposal is computed as follows, every step through real
engine sessions:

1. Click (positive) at the prior position, then re-click at the most interior voxel of the answer
   (the simulated annotator's first click is the most interior voxel of the object, which is what
   the network was trained on; this recentring makes the automatic click look like it).
2. Run ``n_perturbations`` perturbed versions: the image flipped left-right and front-back (the
   click mirrored, the answer flipped back), and the click moved by 30 % of the structure's
   radius along two fixed diagonals.
3. The proposal is the voxel-wise majority vote of the answers (test-time augmentation); the
   *agreement* is their mean pairwise Dice, an empty answer counting as full disagreement (the
   model offers nothing there). Uncertainty = 1 - agreement.

The annotator opens a session on the case with the proposal as its initial mask
(``MaskPrompt.from_array(proposal.mask)``) and corrects it. Embeddings and label statistics are
cached per process by the stored file's checksum / label id (both immutable).

Torch-free: the engine is passed in (anything with ``open_session`` and ``version``).
"""

from __future__ import annotations

import logging
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from SegAssistLib.api_learning import MAX_LOCK_TTL_S, MAX_SEED, is_seed
from SegAssistLib.evaluation.simulator import most_interior_voxel
from SegAssistLib.image import Volume
from SegAssistLib.learning.datastore import DEFAULT_LOCK_TTL_S, Datastore
from SegAssistLib.learning.errors import CaseLockedError, CorruptDataError, InvalidStateError
from SegAssistLib.learning.loop_errors import ActiveLearningError, NoCandidateError
from SegAssistLib.learning.records import CaseRecord, CaseStatus
from SegAssistLib.learning.traindata import foreground
from SegAssistLib.prompts import PointPrompt

log = logging.getLogger(__name__)

STRATEGIES = ("first", "random", "uncertainty", "diversity")
NEEDS_ENGINE = ("uncertainty",)
DEFAULT_DIVERSITY_WEIGHT = 0.5
DEFAULT_MAX_CANDIDATES = 16
DEFAULT_PERTURBATIONS = 4
EngineRunner = Callable[[Callable[[Any], Any]], Any]  # runner(job) -> job(engine), wherever the engine runs
HIST_BINS = 32
GRID = 4
SHIFT_FRACTION = 0.3
# proposals a ranking keeps for the cases it may return (the best, and the next should another
# annotator take that one meanwhile); one further down is made again
KEPT_PROPOSALS = 2
RESCORING_PASSES = 2  # a ranking that spans model promotions scores the older-scored cases again, at most this often


class _LRU:
    """A bounded cache shared by the rankings a server runs at once (each on its own thread). A value
    is made outside the lock: two threads may make the same one, never corrupt the cache."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._items: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def get_or(self, key, make):
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        value = make()
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return value

    def __len__(self) -> int:
        return len(self._items)


# sized for every case of a large store: a diversity score visits every case taken up, and a scan
# through more cases than an LRU holds never hits (an embedding is 99 floats, a label's stats less)
_EMBEDDINGS = _LRU(100_000)
_LABEL_STATS = _LRU(100_000)


# ---------------------------------------------------------------------------------------- prior


@dataclass(frozen=True)
class StructurePrior:
    """Where the structure usually is (relative to the image extent) and how big, from the labels."""

    rel_centroid: Tuple[float, float, float] = (0.5, 0.5, 0.5)  # array order, fractions of the extent
    volume_mm3: Optional[float] = None  # median over the labelled cases
    n_cases: int = 0

    def click_kji(self, shape: Sequence[int]) -> np.ndarray:
        pos = np.asarray(self.rel_centroid) * np.asarray(shape, float) - 0.5
        return np.clip(np.round(pos), 0, np.asarray(shape) - 1).astype(int)

    def radius_mm(self) -> Optional[float]:
        if self.volume_mm3 is None:
            return None
        return float((3.0 * self.volume_mm3 / (4.0 * math.pi)) ** (1.0 / 3.0))


def _label_stats(store: Datastore, case: CaseRecord, label_id: str, label_value: Optional[int]):
    def make():
        mask = foreground(store.load_label(label_id), label_value)
        n = int(mask.sum())
        if n == 0:
            return None
        centroid = np.argwhere(mask).mean(0)
        rel = (centroid + 0.5) / np.asarray(mask.shape, float)
        return rel, n * float(np.prod(case.spacing))

    return _LABEL_STATS.get_or((label_id, label_value), make)


def structure_prior(store: Datastore, label_value: Optional[int] = None) -> StructurePrior:
    """The prior from every submitted or reviewed case's latest submitted label. A label whose file is
    damaged or missing is left out (logged): it must not stop the team's next case."""
    stats = []
    for case, label in store.training_cases():
        try:
            s = _label_stats(store, case, label.id, label_value)
        except CorruptDataError as exc:
            log.warning("label of case %s (%s) left out of the structure prior: %s", case.id, case.name, exc)
            continue
        if s:
            stats.append(s)
    if not stats:
        return StructurePrior()
    rel = np.mean([s[0] for s in stats], axis=0)
    return StructurePrior(
        rel_centroid=tuple(float(x) for x in rel),
        volume_mm3=float(np.median([s[1] for s in stats])),
        n_cases=len(stats),
    )


# ---------------------------------------------------------------------------------------- diversity


def _block_means(array: np.ndarray, grid: int) -> np.ndarray:
    out = np.zeros((grid,) * 3)
    for a, ka in enumerate(np.array_split(np.arange(array.shape[0]), grid)):
        for b, jb in enumerate(np.array_split(np.arange(array.shape[1]), grid)):
            for c, ic in enumerate(np.array_split(np.arange(array.shape[2]), grid)):
                if len(ka) and len(jb) and len(ic):
                    out[a, b, c] = array[ka[0] : ka[-1] + 1, jb[0] : jb[-1] + 1, ic[0] : ic[-1] + 1].mean()
    return out.ravel()


def image_embedding(volume: Volume) -> np.ndarray:
    """A small descriptor of an image's appearance and extent (see the module docstring)."""
    arr = volume.array
    step = max(1, int(round((arr.size / 200_000) ** (1.0 / 3.0))))
    sample = np.asarray(arr[::step, ::step, ::step], np.float32)
    lo, hi = np.percentile(sample, [0.5, 99.5])
    norm = np.clip((sample - lo) / (hi - lo if hi > lo else 1.0), 0.0, 1.0)
    hist = np.histogram(norm, bins=HIST_BINS, range=(0.0, 1.0))[0].astype(float)
    hellinger = np.sqrt(hist / max(hist.sum(), 1.0))
    layout = _block_means(norm, GRID)
    layout = (layout - layout.mean()) / math.sqrt(layout.size)
    extent_mm = np.asarray(arr.shape, float) * np.asarray(volume.spacing[::-1], float)
    extent = 0.25 * np.log(np.maximum(extent_mm, 1e-3))
    return np.concatenate([hellinger, layout, extent])


def case_embedding(store: Datastore, case: CaseRecord) -> np.ndarray:
    return _EMBEDDINGS.get_or(case.image_sha256, lambda: image_embedding(store.load_image(case.id)))


def diversity_scores(
    store: Datastore, candidates: Sequence[CaseRecord], unreadable: Optional[Dict[str, CorruptDataError]] = None
) -> Dict[str, float]:
    """Distance of each candidate to the nearest case already taken up (labelled, or being worked
    on), scaled to [0, 1]. A case still open to annotation is not taken up, sampled or not.

    One damaged or missing image must not fail the ranking for everyone: a taken-up case whose image
    cannot be read is left out of the comparison (logged); a candidate whose image cannot be read gets
    no score (it is missing from the result) and is added to ``unreadable`` (case id -> the error),
    when given."""
    still_open = {c.id for c in candidate_cases(store)} | {c.id for c in candidates}
    taken = [c for c in store.list_cases() if c.id not in still_open]
    references = []
    for c in taken:
        try:
            references.append(case_embedding(store, c))
        except CorruptDataError as exc:
            log.warning("case %s (%s) left out of the diversity measure: %s", c.id, c.name, exc)
    if not references or not candidates:
        return {c.id: 0.0 for c in candidates}
    reference = np.stack(references)
    raw = {}
    for c in candidates:
        try:
            e = case_embedding(store, c)
        except CorruptDataError as exc:
            if unreadable is not None:
                unreadable[c.id] = exc
            continue
        raw[c.id] = float(np.sqrt(((reference - e) ** 2).sum(1)).min())
    if not raw:
        return {}
    top = max(raw.values())
    return {k: (v / top if top > 0 else 0.0) for k, v in raw.items()}


# ---------------------------------------------------------------------------------------- proposal


@dataclass
class Proposal:
    """The model's initial mask for a case and how sure the model is of it."""

    mask: np.ndarray  # uint8, array order, the case's shape
    prompts: List[PointPrompt]  # the automatic click (after recentring) that produced the main answer
    agreement: float  # mean pairwise Dice of the perturbed answers (1: all identical)
    members: int
    engine_version: str
    method: str = "prior click, recentred; majority vote over flips and shifted clicks"

    @property
    def uncertainty(self) -> float:
        return 1.0 - self.agreement

    def to_dict(self) -> Dict[str, Any]:
        return {
            "prompts": [p.model_dump(mode="json") for p in self.prompts],
            "agreement": self.agreement,
            "uncertainty": self.uncertainty,
            "members": self.members,
            "engine_version": self.engine_version,
            "method": self.method,
            "foreground_voxels": int(np.count_nonzero(self.mask)),
        }


def _ijk(kji: Sequence[float]) -> Tuple[float, float, float]:
    return (float(kji[2]), float(kji[1]), float(kji[0]))


def _answer(engine, volume: Volume, click_kji: np.ndarray, flip_axis: Optional[int] = None) -> np.ndarray:
    """The engine's answer to one positive click, optionally on the image flipped along an axis."""
    shape = np.asarray(volume.array.shape)
    click = np.clip(np.round(np.asarray(click_kji, float)), 0, shape - 1)
    if flip_axis is not None:
        click = click.copy()
        click[flip_axis] = shape[flip_axis] - 1 - click[flip_axis]
        volume = Volume(np.ascontiguousarray(np.flip(volume.array, flip_axis)), volume.spacing, volume.origin,
                        volume.direction, volume.modality)
    session = engine.open_session(volume)
    try:
        session.add_prompt(PointPrompt(position=_ijk(click), positive=True))
        mask = session.result()
    finally:
        session.close()
    if flip_axis is not None:
        mask = np.ascontiguousarray(np.flip(mask, flip_axis))
    return mask > 0


def _pairwise_agreement(masks: Sequence[np.ndarray]) -> float:
    scores = []
    for a in range(len(masks)):
        for b in range(a + 1, len(masks)):
            total = int(masks[a].sum()) + int(masks[b].sum())
            both_empty = total == 0
            scores.append(0.0 if both_empty else 2.0 * int((masks[a] & masks[b]).sum()) / total)
    return float(np.mean(scores)) if scores else 0.0


def propose(
    engine, volume: Volume, prior: Optional[StructurePrior] = None, n_perturbations: int = DEFAULT_PERTURBATIONS
) -> Proposal:
    """The model's proposal for an unlabelled image and its agreement (see the module docstring)."""
    prior = prior or StructurePrior()
    shape = volume.array.shape
    spacing_kji = np.asarray(volume.spacing[::-1], float)
    click = prior.click_kji(shape)
    main = _answer(engine, volume, click)
    if main.any():
        centre = np.asarray(most_interior_voxel(main, volume.spacing))
        if not np.array_equal(centre, click):
            click = centre
            main = _answer(engine, volume, click)
    radius = prior.radius_mm()
    if radius is None:
        radius = (3.0 * main.sum() * np.prod(spacing_kji) / (4.0 * math.pi)) ** (1.0 / 3.0) if main.any() else 3.0
    shift = SHIFT_FRACTION * radius / spacing_kji  # voxels per axis
    perturbations = [
        ("flip", 2, None),
        ("flip", 1, None),
        ("shift", None, np.array([1.0, 1.0, 1.0]) / math.sqrt(3.0)),
        ("shift", None, np.array([-1.0, 1.0, -1.0]) / math.sqrt(3.0)),
    ][: max(0, int(n_perturbations))]
    masks = [main]
    for kind, axis, direction in perturbations:
        if kind == "flip":
            masks.append(_answer(engine, volume, click, flip_axis=axis))
        else:
            masks.append(_answer(engine, volume, click + direction * shift))
    votes = np.sum(masks, axis=0)
    consensus = votes * 2 > len(masks)
    if not consensus.any() and main.any():
        consensus = main
    return Proposal(
        mask=consensus.astype(np.uint8),
        prompts=[PointPrompt(position=_ijk(click), positive=True)],
        agreement=_pairwise_agreement(masks) if len(masks) > 1 else float(main.any()),
        members=len(masks),
        engine_version=str(getattr(engine, "version", "")),
    )


# ---------------------------------------------------------------------------------------- ranking


@dataclass
class CaseScore:
    case_id: str
    name: str
    score: float
    uncertainty: Optional[float] = None
    diversity: Optional[float] = None
    engine_version: Optional[str] = None  # the model version that scored the case (None: no model)

    def to_dict(self) -> Dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class NextCase:
    case: CaseRecord
    strategy: str
    score: CaseScore
    proposal: Optional[Proposal]
    ranking: List[CaseScore] = field(default_factory=list)
    prior: Optional[StructurePrior] = None
    prepared: Any = None  # what next_case's ``prepare`` returned for the case
    #: cases passed over because their stored files are damaged (case id -> the error), to repair
    skipped: Dict[str, str] = field(default_factory=dict)
    #: the user's own locked, unlabelled case handed back (``next_case(resume=True)``), not a ranked one
    resumed: bool = False
    #: the time the user's own lock of the case had left before this call renewed it (a resumed case);
    #: None when this call took the lock. :func:`release_next_case` reads it.
    held_lock_s: Optional[float] = None

    def to_dict(self) -> Dict[str, Any]:
        return {
            "case": self.case.to_dict(),
            "resumed": self.resumed,
            "skipped": dict(self.skipped),
            "strategy": self.strategy,
            "score": self.score.to_dict(),
            "proposal": self.proposal.to_dict() if self.proposal is not None else None,
            "ranking": [s.to_dict() for s in self.ranking],
        }


def _propose_case(
    store: Datastore, case_id: str, engine, runner: Optional[EngineRunner], prior, n_perturbations: int
) -> Proposal:
    image = store.load_image(case_id)  # read here, not in the engine's job

    def job(eng) -> Proposal:
        return propose(eng, image, prior, n_perturbations)

    return runner(job) if runner is not None else job(engine)


def _engine_version(engine, runner: Optional[EngineRunner]) -> str:
    """The version answering now (where the engine lives: on a server, the job lets it take up a
    version promoted meanwhile first)."""

    def job(eng) -> str:
        return str(getattr(eng, "version", ""))

    return runner(job) if runner is not None else job(engine)


def is_candidate(case: CaseRecord) -> bool:
    """Nobody is working on it: ``new`` (an unlabelled case whose lock lapsed is read as new), or
    ``in_progress``, unlocked, with no label yet or rejected in review with nothing saved since (a case to
    rework: ``CaseRecord.needs_rework``). A case holding a draft nobody submitted is someone's work in
    progress: not handed to another annotator (``learn cases --status in_progress`` lists it)."""
    return case.status is CaseStatus.NEW or (
        case.status is CaseStatus.IN_PROGRESS and case.locked_by is None and (case.n_labels == 0 or case.needs_rework)
    )


NO_CASE_LEFT = (
    "no case left to annotate: every case is submitted, reviewed, locked by an annotator, or holds a draft "
    "nobody submitted yet (`learn cases --status in_progress` lists those; lock one to go on with it)"
)


def candidate_cases(store: Datastore) -> List[CaseRecord]:
    """Cases nobody is working on (:func:`is_candidate`): new ones, and ones rejected in review."""
    return [case for case in store.list_cases(status=[CaseStatus.NEW, CaseStatus.IN_PROGRESS]) if is_candidate(case)]


def rank_cases(
    store: Datastore,
    engine=None,
    strategy: str = "uncertainty",
    *,
    seed: int = 0,
    diversity_weight: float = DEFAULT_DIVERSITY_WEIGHT,
    max_candidates: int = DEFAULT_MAX_CANDIDATES,
    n_perturbations: int = DEFAULT_PERTURBATIONS,
    label_value: Optional[int] = None,
    candidates: Optional[List[CaseRecord]] = None,
    proposals: Optional[Dict[str, Proposal]] = None,
    prior: Optional[StructurePrior] = None,
    on_progress: Optional[Callable[[int, int], None]] = None,
    runner: Optional[EngineRunner] = None,
    unreadable: Optional[Dict[str, str]] = None,
) -> List[CaseScore]:
    """Candidates best first under ``strategy``. Deterministic for a given store, model and seed.

    ``uncertainty`` and ``diversity`` score at most ``max_candidates`` cases, drawn with ``seed``
    (so a large pool is explored across calls with different seeds). ``proposals``, when given, is
    filled with the proposals of the best-scored cases (at most ``KEPT_PROPOSALS``: each is a
    full-size mask). ``on_progress(done, total)`` is
    called after each case scored with the model (about ``n_perturbations + 2`` clicks each).
    ``runner(job)``, when given, runs ``job(engine)`` where the engine lives (a server queues one job
    per case, so that prompts of open sessions are answered between them); ``engine`` may then be None.
    A case whose image is damaged or missing is left out of the ranking (and added to ``unreadable``,
    case id -> error, when given) rather than failing it for every case; only when no case can be
    read does the error reach the caller.
    """
    if strategy not in STRATEGIES:
        raise ActiveLearningError(f"unknown strategy {strategy!r} (known: {', '.join(STRATEGIES)})")
    if strategy in NEEDS_ENGINE and engine is None and runner is None:
        raise ActiveLearningError(f"the {strategy!r} strategy needs a model (an engine) to score cases")
    if not math.isfinite(diversity_weight) or diversity_weight < 0:
        raise ActiveLearningError(f"diversity_weight must be a non-negative number, got {diversity_weight!r}")
    if not is_seed(seed):
        raise ActiveLearningError(f"seed must be an integer from 0 to {MAX_SEED}, got {seed!r}")
    pool = candidate_cases(store) if candidates is None else list(candidates)
    if not pool:
        raise NoCandidateError(NO_CASE_LEFT)
    rng = np.random.default_rng(seed)
    if strategy == "first":
        return [CaseScore(c.id, c.name, float(-i)) for i, c in enumerate(pool)]
    if strategy == "random":
        order = rng.permutation(len(pool))
        return [CaseScore(pool[i].id, pool[i].name, float(len(pool) - r)) for r, i in enumerate(order)]
    if len(pool) > max_candidates:
        keep = np.sort(rng.choice(len(pool), size=max(1, int(max_candidates)), replace=False))
        pool = [pool[i] for i in keep]
    unread: Dict[str, CorruptDataError] = {}
    div = diversity_scores(store, pool, unread)
    if unread:  # one damaged case must not stop the team's next case
        for c in pool:
            if c.id in unread:
                log.warning("case %s (%s) left out of the ranking: %s", c.id, c.name, unread[c.id])
        if unreadable is not None:
            unreadable.update({case_id: str(exc) for case_id, exc in unread.items()})
        pool = [c for c in pool if c.id not in unread]
        if not pool:
            raise next(iter(unread.values()))
    scores: List[CaseScore] = []
    if strategy == "diversity":
        scores = [CaseScore(c.id, c.name, div[c.id], diversity=div[c.id]) for c in pool]
    else:
        prior = prior or structure_prior(store, label_value)
        todo, total, done = list(range(len(pool))), len(pool), 0
        scores = [CaseScore(c.id, c.name, -math.inf) for c in pool]
        damaged: Dict[int, CorruptDataError] = {}
        for _ in range(1 + RESCORING_PASSES):
            for index in todo:
                c = pool[index]
                try:
                    proposal = _propose_case(store, c.id, engine, runner, prior, n_perturbations)
                except CorruptDataError as exc:  # one damaged case must not stop the team's next case
                    log.warning("case %s (%s) left out of the ranking: %s", c.id, c.name, exc)
                    damaged[index] = exc
                    proposal = None
                done += 1
                if on_progress is not None:
                    on_progress(done, total)
                if proposal is None:
                    continue
                u = proposal.uncertainty
                scores[index] = CaseScore(c.id, c.name, u + diversity_weight * div[c.id], uncertainty=u,
                                          diversity=div[c.id], engine_version=proposal.engine_version)
                if proposals is not None:
                    _keep_best_proposals(proposals, c.id, proposal, scores)
            # a model promoted while the ranking ran: the cases scored before it are scored again, so
            # that one model's uncertainties are compared (a second promotion meanwhile: once more)
            scored = [i for i in todo if i not in damaged]
            if not scored:
                break
            latest = scores[scored[-1]].engine_version
            todo = [i for i, score in enumerate(scores) if i not in damaged and score.engine_version != latest]
            if not todo:
                break
            total += len(todo)
        if unreadable is not None:
            unreadable.update({pool[i].id: str(exc) for i, exc in damaged.items()})
        if len(damaged) == len(pool):
            raise next(iter(damaged.values()))
        scores = [score for i, score in enumerate(scores) if i not in damaged]
    order = sorted(range(len(scores)), key=lambda i: (-scores[i].score, i))  # ties: import order
    return [scores[i] for i in order]


def _keep_best_proposals(
    proposals: Dict[str, Proposal], case_id: str, proposal: Proposal, scores: List[CaseScore]
) -> None:
    """Add ``proposal`` and drop the worst-ranked one beyond ``KEPT_PROPOSALS`` (ties: later import)."""
    proposals[case_id] = proposal
    if len(proposals) > KEPT_PROPOSALS:
        rank = {s.case_id: (-s.score, i) for i, s in enumerate(scores)}
        del proposals[max(proposals, key=rank.__getitem__)]


def own_unlabelled_case(store: Datastore, user: str) -> Optional[CaseRecord]:
    """The case ``user`` holds a live lock of and has saved nothing to yet: no label version, or (a case to
    rework) none since the rejected one (of several, the one whose lock lasts longest: normally the one
    handed out last); None when there is none."""
    held = [c for c in store.list_cases(status=[CaseStatus.IN_PROGRESS], locked_by=user)
            if c.n_labels == 0 or c.needs_rework]  # fmt: skip
    return max(held, key=lambda c: c.lock_expires or 0.0, default=None)


def _held_lock_left(before: CaseRecord, renewed: CaseRecord, user: str, ttl_s: float) -> Optional[float]:
    """The time the user's own lock of a case had left when ``renewed`` (locked for ``ttl_s`` seconds)
    renewed it, on the store's clock; None when the case was not locked to the user before."""
    if before.locked_by != user or before.lock_expires is None or renewed.lock_expires is None:
        return None
    return before.lock_expires - (renewed.lock_expires - ttl_s)


def _give_back_lock(store: Datastore, case_id: str, user: str, held_s: Optional[float]) -> None:
    """Undo the lock a failed hand-out took: a case the user did not hold is unlocked (nobody learns it was
    theirs, and it must not stay locked to them for hours); a lock the user held before the call is kept
    as it was, with the time it had left (they may have the case open: released, another annotator's next
    case would be this one)."""
    if held_s is None:
        store.unlock(case_id, user)
        return
    try:
        store.lock(case_id, user, ttl_s=min(max(held_s, 1.0), MAX_LOCK_TTL_S))
    except Exception as exc:  # the renewed lock stands: still the user's
        log.warning("case %s: the lock of %s was kept but its time not restored: %s", case_id, user, exc)


def release_next_case(store: Datastore, chosen: NextCase, user: str) -> None:
    """After a failure once :func:`next_case` returned (the reply could not be made or sent): a case the
    call locked to ``user`` is unlocked; their own case handed back keeps its lock, as they held it."""
    if chosen.case.locked_by == user:
        _give_back_lock(store, chosen.case.id, user, chosen.held_lock_s)


@dataclass
class _Passes:
    """What ``next_case`` passed over on its way: cases taken meanwhile, and the last damaged one."""

    taken: int = 0
    damage: Optional[CorruptDataError] = None


def next_case(
    store: Datastore,
    engine=None,
    strategy: str = "uncertainty",
    *,
    seed: int = 0,
    user: Optional[str] = None,
    lock: bool = False,
    lock_ttl_s: float = DEFAULT_LOCK_TTL_S,
    with_proposal: bool = True,
    diversity_weight: float = DEFAULT_DIVERSITY_WEIGHT,
    max_candidates: int = DEFAULT_MAX_CANDIDATES,
    n_perturbations: int = DEFAULT_PERTURBATIONS,
    label_value: Optional[int] = None,
    on_progress: Optional[Callable[[int, int], None]] = None,
    runner: Optional[EngineRunner] = None,
    prepare: Optional[Callable[[CaseRecord], Any]] = None,
    resume: bool = False,
    before_lock: Optional[Callable[[CaseRecord], None]] = None,
) -> NextCase:
    """The case to annotate next and (with an engine and ``with_proposal``) the model's proposal.

    With ``lock`` the case is locked to ``user`` for ``lock_ttl_s`` seconds; a case another annotator
    locked or labelled while this one ranked passes to the next in the ranking (``NoCandidateError``
    when all were taken); without ``lock`` such a case is passed over just the same. A failure once
    the case is locked (the version check, the proposal, ``prepare``) unlocks it, unless the user held
    its lock before the call (a resumed case): that lock is kept, with the time it had left
    (:func:`release_next_case` does the same for a failure after the call). ``prepare(case)``,
    when given, is called for the chosen case before it is returned (a server puts its image in its
    image store); its result is ``NextCase.prepared``. A case whose stored image is damaged or
    missing (``CorruptDataError`` from ranking, proposal or ``prepare``) is passed over, unlocked
    (unless the user held its lock before), and named in ``NextCase.skipped``; only when every case
    was passed over for it does the error reach the caller.

    ``resume`` (with ``lock``): a case the user already holds locked and has not labelled (see
    :func:`own_unlabelled_case`: one handed out before whose answer never reached them, or one they
    locked by hand) is handed back first, its lock renewed, with a fresh proposal and nothing ranked
    (``NextCase.resumed``); a new case is locked only once it is labelled (a draft counts) or released.
    ``before_lock(case)``, when given, is called just before a case is locked; what it raises ends the
    call with nothing locked (a server checks that its caller is still there).
    """
    if lock and not user:
        raise ActiveLearningError("locking the next case needs the user it is for")
    has_model = engine is not None or runner is not None
    prior = structure_prior(store, label_value) if has_model else None
    skipped: Dict[str, str] = {}
    passes = _Passes()

    def hand_out(ranking: List[CaseScore], proposals: Dict[str, Proposal], resumed: bool) -> Optional[NextCase]:
        """The first case of ``ranking`` still free (locked to the user with ``lock``), with its
        proposal; None when every one was taken or is damaged."""
        for best in ranking:
            case = store.get_case(best.case_id)
            held_s: Optional[float] = None  # the user's own lock before this call: kept whatever fails below
            if lock:
                if before_lock is not None:
                    before_lock(case)
                before = case
                try:
                    case = store.lock(case.id, user, ttl_s=lock_ttl_s, unlabelled_only=True)  # type: ignore[arg-type]
                except (CaseLockedError, InvalidStateError):  # another annotator took or labelled it meanwhile
                    passes.taken += 1
                    continue
                held_s = _held_lock_left(before, case, user, lock_ttl_s)  # type: ignore[arg-type]
            elif not (is_candidate(case) or (case.locked_by == user and (case.n_labels == 0 or case.needs_rework))):
                passes.taken += 1  # as a lock would have found: locked by another annotator meanwhile, or labelled
                continue
            try:  # from here on a failure unlocks a case this call locked: the caller never learns which it was
                proposal = proposals.get(case.id)
                kept = proposal if with_proposal else None  # the version is asked (a worker job) only for one kept
                if kept is not None and kept.engine_version != _engine_version(engine, runner):
                    proposal = None  # made by a model replaced since: the annotator gets the current model's
                if proposal is None and with_proposal and has_model:
                    proposal = _propose_case(store, case.id, engine, runner, prior, n_perturbations)
                prepared = prepare(case) if prepare is not None else None
            except BaseException as exc:
                if lock:
                    _give_back_lock(store, case.id, user, held_s)  # type: ignore[arg-type]
                if not isinstance(exc, CorruptDataError):
                    raise
                log.warning("case %s (%s) passed over: %s", case.id, case.name, exc)
                skipped[case.id], passes.damage = str(exc), exc
                continue
            return NextCase(case, strategy, best, proposal if with_proposal else None, ranking, prior, prepared,
                            skipped, resumed=resumed, held_lock_s=held_s)  # fmt: skip
        return None

    held = own_unlabelled_case(store, user) if resume and lock and user else None
    if held is not None:
        chosen = hand_out([CaseScore(held.id, held.name, 0.0)], {}, resumed=True)
        if chosen is not None:
            return chosen
    proposals: Dict[str, Proposal] = {}
    ranking = rank_cases(
        store, engine, strategy, seed=seed, diversity_weight=diversity_weight, max_candidates=max_candidates,
        n_perturbations=n_perturbations, label_value=label_value, proposals=proposals, prior=prior,
        on_progress=on_progress, runner=runner, unreadable=skipped,
    )
    chosen = hand_out(ranking, proposals, resumed=False)
    if chosen is not None:
        return chosen
    if passes.damage is not None and not passes.taken:  # every case left is damaged: that is the answer
        raise passes.damage
    raise NoCandidateError(
        "every case ranked was taken by other annotators meanwhile"
        + (f" or has a damaged image ({len(skipped)})" if skipped else "") + "; ask again"
    )
