"""Numbers of the benchmark report: records grouped per dataset, structure, case, engine and protocol.

A record is one session: one structure of one case, segmented by one engine under one protocol
(see :func:`SegAssistLib.evaluation.runner.evaluate_target`). Means come with a 95 % bootstrap
interval that resamples patients (:func:`SegAssistLib.evaluation.stats.bootstrap_mean`): every
structure of every case of one patient (:func:`SegAssistLib.datasets.patient_of`: ACDC's two frames,
Sunnybrook's two phases, crops of one scan) is drawn together, since they share the anatomy and
are not independent. A record holds the interactions made; curves of different lengths (a user who
stopped on a perfect mask) carry their last value forward to the number of interactions allowed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from SegAssistLib.datasets import patient_of
from SegAssistLib.evaluation.metrics import carried_forward
from SegAssistLib.evaluation.stats import Estimate, bootstrap_mean, latency_summary

NOC_KEYS = ("80", "85", "90")


def group_by(records: Iterable[Dict], *keys: str) -> Dict[Tuple, List[Dict]]:
    """Records per value of ``keys``, in order of first appearance."""
    out: Dict[Tuple, List[Dict]] = {}
    for r in records:
        out.setdefault(tuple(r.get(k) for k in keys), []).append(r)
    return out


def padded(curves: Sequence[Sequence[Optional[float]]], missing: float = np.inf, length: int = 0) -> np.ndarray:
    """Curves as one array, each carried forward to the longest or to ``length`` where that is longer
    (the interactions allowed: a group whose users all stopped early still has a value after each);
    ``None`` becomes ``missing``."""
    n = max(length, *(len(c) for c in curves))
    return np.asarray([carried_forward([missing if v is None else float(v) for v in c], n) for c in curves], float)


def allowed(records: Sequence[Dict]) -> int:
    """The most interactions any of the records allowed (``interactions_allowed``; results written
    before it was recorded held that many Dice values, carried forward after an early stop)."""
    return max(int(r.get("interactions_allowed", len(r["dice"]))) for r in records)


def cluster(r: Dict) -> str:
    """The bootstrap's resampling unit of a record: its dataset and patient (not its case)."""
    return f"{r.get('dataset')}/{patient_of(str(r.get('case')))}"


@dataclass
class Summary:
    n: int
    patients: int  # distinct resampling units (:func:`cluster`), not cases
    dice_curve: List[Estimate]
    hd95_median_curve: List[float]
    first_dice: Estimate
    final_dice: Estimate
    final_hd95: Estimate
    hd95_empty: int
    auc: Estimate
    auc_norm: Estimate
    noc: Dict[str, Estimate]
    reached: Dict[str, float]
    latency: Dict[str, Optional[float]]
    peak_rss_mb: float
    rss_increase_mb: float
    peak_cuda_mb: Optional[float] = None
    extra: Dict = field(default_factory=dict)


def summarise(records: Sequence[Dict], seed: int = 0) -> Optional[Summary]:
    if not records:
        return None
    groups = [cluster(r) for r in records]

    def est(values: Sequence[float]) -> Estimate:
        return bootstrap_mean(values, groups, seed=seed)

    n = allowed(records)
    dice = padded([r["dice"] for r in records], length=n)
    hd = padded([r.get("hd95_mm") or [None] for r in records], length=n)
    finals_hd = [np.inf if r["final_hd95_mm"] is None else r["final_hd95_mm"] for r in records]
    with np.errstate(invalid="ignore"):
        hd_median = [float(np.median(col)) for col in hd.T]
    cuda = [r["peak_cuda_mb"] for r in records if "peak_cuda_mb" in r]
    return Summary(
        n=len(records),
        patients=len(set(groups)),
        dice_curve=[est(col) for col in dice.T],
        hd95_median_curve=[x if np.isfinite(x) else float("nan") for x in hd_median],
        first_dice=est([r["dice"][0] for r in records]),
        final_dice=est([r["final_dice"] for r in records]),
        final_hd95=est(finals_hd),
        hd95_empty=int(sum(1 for x in finals_hd if not np.isfinite(x))),
        auc=est([r.get("dice_auc", np.nan) for r in records]),
        auc_norm=est([r.get("dice_auc_norm", np.nan) for r in records]),
        noc={k: est([r["noc"][k] for r in records]) for k in NOC_KEYS},
        reached={k: float(np.mean([bool(r["reached"][k]) for r in records])) for k in NOC_KEYS},
        latency=latency_summary([x for r in records for x in r["latency_s"]]),
        peak_rss_mb=float(max(r["peak_rss_mb"] for r in records)),
        rss_increase_mb=float(max(r["peak_rss_mb"] - r.get("rss_before_mb", r["peak_rss_mb"]) for r in records)),
        peak_cuda_mb=max(cuda) if cuda else None,
    )


def ordered(values: Iterable, preferred: Sequence) -> List:
    """Distinct ``values`` in ``preferred`` order first, the rest in order of appearance."""
    seen = list(dict.fromkeys(values))
    return [v for v in preferred if v in seen] + [v for v in seen if v not in preferred]


def table_of(records: Sequence[Dict], keys: Sequence[str], seed: int = 0,
             order: Optional[Callable[[Tuple], Tuple]] = None) -> List[Tuple[Tuple, Summary]]:
    """``[(key values, summary)]`` for every group of ``keys``."""
    rows = [(k, summarise(v, seed)) for k, v in group_by(records, *keys).items()]
    if order is not None:
        rows.sort(key=lambda kv: order(kv[0]))
    return [(k, s) for k, s in rows if s is not None]


def dataset_means(per_dataset: Dict[str, Estimate]) -> float:
    """Each dataset weighted equally (a macro average), so that big datasets do not dominate."""
    values = [e.mean for e in per_dataset.values() if e.n and np.isfinite(e.mean)]
    return float(np.mean(values)) if values else float("nan")
