"""Summary statistics of the benchmark: means with seeded bootstrap intervals, latency percentiles.

The bootstrap is the percentile bootstrap of the mean. When ``groups`` are given it resamples
groups rather than single values: the benchmark's groups are patients
(:func:`SegAssistLib.evaluation.aggregate.cluster`), since structures of one case share the image,
its noise and its anatomy, and cases of one patient (ACDC's two frames, Sunnybrook's two phases) the
anatomy, so they are not independent draws; resampling patients keeps that dependence (a cluster
bootstrap). The statistic of one resample is the pooled mean of every value of the drawn
groups, so the point estimate is the plain mean of all values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Hashable, Optional, Sequence

import numpy as np

N_RESAMPLES = 2000
CONFIDENCE = 0.95
SEED = 0


@dataclass(frozen=True)
class Estimate:
    mean: float
    low: float
    high: float
    n: int

    def to_dict(self) -> Dict[str, float]:
        return {"mean": self.mean, "low": self.low, "high": self.high, "n": self.n}

    def format(self, digits: int = 3) -> str:
        if self.n == 0 or not np.isfinite(self.mean):
            return "–"
        if self.n == 1 or self.low == self.high:
            return f"{self.mean:.{digits}f}"
        return f"{self.mean:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}]"


def bootstrap_mean(
    values: Sequence[float],
    groups: Optional[Sequence[Hashable]] = None,
    n_resamples: int = N_RESAMPLES,
    confidence: float = CONFIDENCE,
    seed: int = SEED,
) -> Estimate:
    """Mean of the finite ``values`` with a percentile bootstrap interval (seeded, numpy only).

    Non-finite values (an HD95 of an empty prediction) are left out; ``n`` counts those kept.
    """
    v = np.asarray(list(values), float)
    g = None if groups is None else np.asarray([str(x) for x in groups])
    if g is not None and len(g) != len(v):
        raise ValueError(f"bootstrap_mean: {len(v)} values but {len(g)} groups")
    keep = np.isfinite(v)
    v = v[keep]
    if g is not None:
        g = g[keep]
    if v.size == 0:
        return Estimate(float("nan"), float("nan"), float("nan"), 0)
    mean = float(v.mean())
    if not 0.0 < confidence < 1.0:
        raise ValueError("confidence must lie between 0 and 1")
    rng = np.random.default_rng(seed)
    if g is None:
        sums, counts = v, np.ones_like(v)
    else:
        _, inverse = np.unique(g, return_inverse=True)
        sums = np.bincount(inverse, weights=v)
        counts = np.bincount(inverse).astype(float)
    if len(sums) == 1:
        return Estimate(mean, mean, mean, int(v.size))
    draws = rng.integers(0, len(sums), size=(int(n_resamples), len(sums)))
    stats = sums[draws].sum(1) / counts[draws].sum(1)
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(stats, [alpha, 1.0 - alpha])
    return Estimate(mean, float(low), float(high), int(v.size))


def latency_summary(latencies_s: Sequence[float]) -> Dict[str, Optional[float]]:
    """Median and 95th percentile (numpy's linear interpolation) in seconds; ``None`` when empty."""
    x = np.asarray(list(latencies_s), float)
    if x.size == 0:
        return {"median_s": None, "p95_s": None, "n": 0}
    return {"median_s": float(np.median(x)), "p95_s": float(np.percentile(x, 95)), "n": int(x.size)}
