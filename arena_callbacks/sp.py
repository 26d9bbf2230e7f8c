"""The stability-plasticity estimate (docs/design.md §3): trajectory, frontier, operating point, overshoot.

Pure functions of a run's snapshots, used live by the monitor (keys ``sp/*``) and after the fact
by reports. A point is ``(P, S)`` = (``sp/plasticity``, ``sp/stability``); both are "higher is
better".

* **Frontier**: the non-dominated points (no other point has ``P`` and ``S`` both at least as
  high and one of them higher), by increasing ``P``.
* **Operating point**: ``weighted`` rule, the maximum of ``w·P + S``; ``constrained`` rule, the
  best ``P`` with ``S >= S_min`` (when no point qualifies: the most stable point). Ties go to
  the earliest step.
* **Marginal rate** at a point: ``-ΔS/ΔP`` between consecutive points of the causally smoothed
  trajectory (a moving average over the last ``smoothing`` points, so a live decision never
  looks ahead). Stability lost with no target gain (``ΔP <= 0 < -ΔS``) is an infinite rate; no
  stability lost is rate 0 (no trade made).
* **Overshoot**: the marginal rate stays above ``exchange_rate`` for ``overshoot_patience``
  consecutive probe points, counted only once the smoothed plasticity has risen above its start
  (a run that has learned nothing yet has no best point to go past). The overshoot step is the
  point *after which* that run of rates starts: the last point before the trajectory started
  paying too much stability per unit of target gain.

Example:
    >>> from arena_callbacks.config import OperatingPointConfig
    >>> pts = [SPPoint(0, 0.0, 1.0), SPPoint(10, 0.5, 0.97), SPPoint(20, 0.6, 0.80), SPPoint(30, 0.62, 0.6)]
    >>> [p.step for p in frontier(pts)]
    [0, 10, 20, 30]
    >>> operating_point(pts, OperatingPointConfig(weight=1.0)).step
    10
    >>> overshoot_step(pts, OperatingPointConfig(smoothing=1, overshoot_patience=2))
    10
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .config import OperatingPointConfig

__all__ = [
    "SP_KEYS",
    "SPPoint",
    "better_point",
    "choose",
    "frontier",
    "frontier_area",
    "marginal_rates",
    "operating_point",
    "overshoot",
    "overshoot_step",
    "smooth",
    "sp_metrics",
    "trajectory",
]

PLASTICITY = "sp/plasticity"
STABILITY = "sp/stability"

#: Keys :func:`sp_metrics` may write (``sp/marginal_rate`` and ``sp/overshoot_step`` only where defined).
SP_KEYS = (
    "sp/operating_step",
    "sp/operating_plasticity",
    "sp/operating_stability",
    "sp/frontier_size",
    "sp/frontier_area",
    "sp/marginal_rate",
    "sp/overshoot",
    "sp/overshoot_step",
)

_EPS = 1e-12


@dataclass(frozen=True)
class SPPoint:
    """One probe step in the stability-plasticity plane."""

    step: int
    plasticity: float
    stability: float

    def score(self, weight: float) -> float:
        """``w·P + S``, the weighted rule's objective."""
        return weight * self.plasticity + self.stability


def trajectory(snapshots: Iterable[Any]) -> list[SPPoint]:
    """The (P, S) points of snapshots (anything with ``.step`` and ``.metrics``) where both are finite."""
    pts = []
    for s in snapshots:
        p, q = s.metrics.get(PLASTICITY), s.metrics.get(STABILITY)
        if p is None or q is None or not (math.isfinite(p) and math.isfinite(q)):
            continue
        pts.append(SPPoint(int(s.step), float(p), float(q)))
    return pts


def frontier(points: Sequence[SPPoint]) -> list[SPPoint]:
    """Non-dominated points by increasing plasticity (decreasing stability); duplicates keep the earliest."""
    # Best stability first within a plasticity value, earliest first among equals; then sweep
    # from high P to low P keeping points that beat every stability seen so far.
    order = sorted(points, key=lambda p: (-p.plasticity, -p.stability, p.step))
    kept: list[SPPoint] = []
    best_s = -math.inf
    for p in order:
        if p.stability > best_s:
            kept.append(p)
            best_s = p.stability
    return kept[::-1]


def frontier_area(points: Sequence[SPPoint], reference: tuple[float, float] = (0.0, 0.0)) -> float:
    """Area of the region above ``reference`` dominated by the points (the hypervolume indicator).

    The union of the rectangles ``[P0, P] × [S0, S]`` over every point; points at or below the
    reference on either axis add nothing.
    """
    p0, s0 = reference
    area, prev_p = 0.0, p0
    for p in frontier(points):  # increasing P, decreasing S
        if p.plasticity <= prev_p or p.stability <= s0:
            continue
        area += (p.plasticity - prev_p) * (p.stability - s0)
        prev_p = p.plasticity
    # Points of the frontier with P <= P0 are dominated by nothing on the right but add no area.
    return area


def operating_point(points: Sequence[SPPoint], config: OperatingPointConfig | None = None) -> SPPoint | None:
    """The point the configured rule picks (``None`` for no points)."""
    if not points:
        return None
    cfg = config or OperatingPointConfig()
    if cfg.rule == "weighted":
        return min(points, key=lambda p: (-p.score(cfg.weight), p.step))
    ok = [p for p in points if p.stability >= cfg.min_stability]
    if ok:
        return min(ok, key=lambda p: (-p.plasticity, -p.stability, p.step))
    return min(points, key=lambda p: (-p.stability, -p.plasticity, p.step))


def choose(candidates: Sequence[Mapping[str, float]], config: OperatingPointConfig | None = None) -> int:
    """Index of the candidate state (its metrics) the operating-point rule picks.

    The one choice among alternative states: the points of a path rewind, the candidates of a
    post-hoc rewind. When any candidate lacks a finite (P, S) (no target probe), the last one:
    the furthest along the path, or the latest saved state.
    """
    points = []
    for i, m in enumerate(candidates):
        p, q = m.get(PLASTICITY), m.get(STABILITY)
        if p is None or q is None or not (math.isfinite(p) and math.isfinite(q)):
            return len(candidates) - 1
        points.append(SPPoint(i, float(p), float(q)))
    best = operating_point(points, config)
    assert best is not None, "no candidates"
    return best.step


def better_point(new: Any, old: Any | None, config: OperatingPointConfig | None = None) -> bool:
    """Does the rule prefer snapshot ``new`` to snapshot ``old`` (anything with ``.step`` and
    ``.metrics``)? Without a (P, S) on either side, the newer state wins."""
    a = trajectory([new])
    b = trajectory([old]) if old is not None else []
    if not a or not b:
        return True
    return operating_point([b[0], a[0]], config) == a[0] and a[0] != b[0]


def smooth(values: Sequence[float], window: int) -> list[float]:
    """Causal moving average: element ``i`` is the mean of ``values[max(0, i-window+1) : i+1]``."""
    if window < 1:
        raise ValueError(f"window: must be >= 1, got {window}")
    out = []
    for i in range(len(values)):
        chunk = values[max(0, i - window + 1) : i + 1]
        out.append(sum(chunk) / len(chunk))
    return out


def marginal_rates(points: Sequence[SPPoint], smoothing: int = 1) -> list[float | None]:
    """``-ΔS/ΔP`` into each point along the smoothed trajectory; ``None`` for the first point.

    ``ΔP <= 0`` with stability lost gives ``inf``; no stability lost gives ``0.0``.
    """
    ps = smooth([p.plasticity for p in points], smoothing)
    ss = smooth([p.stability for p in points], smoothing)
    rates: list[float | None] = [None] if points else []
    for i in range(1, len(points)):
        dp, ds = ps[i] - ps[i - 1], ss[i] - ss[i - 1]
        if ds >= -_EPS:
            rates.append(0.0)
        elif dp <= _EPS:
            rates.append(math.inf)
        else:
            rates.append(-ds / dp)
    return rates


def overshoot(points: Sequence[SPPoint], config: OperatingPointConfig | None = None) -> tuple[int | None, bool]:
    """``(overshoot step, overshooting now)``.

    The overshoot step is the point after which the first run of ``overshoot_patience`` rates
    above ``exchange_rate`` starts (``None`` when there is none yet); ``overshooting now`` is
    true when the last ``overshoot_patience`` rates are all above it.
    """
    cfg = config or OperatingPointConfig()
    rates = marginal_rates(points, cfg.smoothing)
    k = cfg.overshoot_patience
    # Nothing learned yet, nothing to overshoot: rates count only once the smoothed target
    # has risen above where it started (an early stability dip before any gain is not one).
    ps = smooth([p.plasticity for p in points], cfg.smoothing)
    gained = [any(x > ps[0] + _EPS for x in ps[: i + 1]) for i in range(len(ps))]
    above = [r is not None and r > cfg.exchange_rate and g for r, g in zip(rates, gained)]
    first: int | None = None
    streak = 0
    for i, a in enumerate(above):
        streak = streak + 1 if a else 0
        if streak >= k and first is None:
            first = points[i - k].step  # the point before the run of k rates
    now = len(above) >= k and all(above[-k:])
    return first, now


def overshoot_step(points: Sequence[SPPoint], config: OperatingPointConfig | None = None) -> int | None:
    """The step after which the run overshoots (see :func:`overshoot`), or ``None``."""
    return overshoot(points, config)[0]


def sp_metrics(points: Sequence[SPPoint], config: OperatingPointConfig | None = None) -> dict[str, float]:
    """The ``sp/*`` keys for the last point of ``points`` (the trajectory up to now).

    ``sp/overshoot`` is 1.0 while the run overshoots (the last ``overshoot_patience`` marginal
    rates above the exchange rate) and 0.0 otherwise: a budget ``{"key": "sp/overshoot",
    "max_value": 0}`` acts on it. ``sp/marginal_rate`` is absent at the first point and
    ``sp/overshoot_step`` until an overshoot has been seen.
    """
    if not points:
        return {}
    cfg = config or OperatingPointConfig()
    op = operating_point(points, cfg)
    assert op is not None
    front = frontier(points)
    first, now = overshoot(points, cfg)
    m: dict[str, float] = {
        "sp/operating_step": float(op.step),
        "sp/operating_plasticity": op.plasticity,
        "sp/operating_stability": op.stability,
        "sp/frontier_size": float(len(front)),
        "sp/frontier_area": frontier_area(points),
        "sp/overshoot": 1.0 if now else 0.0,
    }
    rate = marginal_rates(points, cfg.smoothing)[-1]
    if rate is not None:
        m["sp/marginal_rate"] = rate
    if first is not None:
        m["sp/overshoot_step"] = float(first)
    return m
