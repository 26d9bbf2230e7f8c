"""The stability-plasticity estimator on hand-made trajectories with known answers."""

import itertools
import math
import random

import pytest

from arena_callbacks.config import OperatingPointConfig
from arena_callbacks.measurements import Snapshot
from arena_callbacks.sp import (
    SPPoint,
    frontier,
    frontier_area,
    marginal_rates,
    operating_point,
    overshoot,
    overshoot_step,
    smooth,
    sp_metrics,
    trajectory,
)


def pts(*triples):
    return [SPPoint(s, p, q) for s, p, q in triples]


def brute_frontier(points):
    def dominated(a):
        return any(
            b.plasticity >= a.plasticity and b.stability >= a.stability
            and (b.plasticity > a.plasticity or b.stability > a.stability)
            for b in points
        )

    keep, seen = [], set()
    for p in sorted(points, key=lambda p: p.step):
        if not dominated(p) and (p.plasticity, p.stability) not in seen:
            keep.append(p)
            seen.add((p.plasticity, p.stability))
    return sorted(keep, key=lambda p: p.plasticity)


def test_trajectory_skips_missing_and_non_finite():
    snaps = [
        Snapshot(0, {"sp/plasticity": 0.0, "sp/stability": 1.0}),
        Snapshot(5, {"sp/stability": 0.9}),  # no target probe measured
        Snapshot(10, {"sp/plasticity": math.nan, "sp/stability": 0.9}),
        Snapshot(15, {"sp/plasticity": 0.3, "sp/stability": 0.8}),
    ]
    assert trajectory(snaps) == pts((0, 0.0, 1.0), (15, 0.3, 0.8))


def test_frontier_known_case():
    p = pts((0, 0.0, 1.0), (2, 0.2, 0.98), (4, 0.5, 0.95), (6, 0.6, 0.85), (8, 0.55, 0.70), (10, 0.6, 0.80))
    # step 8 is dominated by 6; step 10 has the same P as 6 and lower S.
    assert [q.step for q in frontier(p)] == [0, 2, 4, 6]


def test_frontier_duplicates_keep_earliest():
    p = pts((0, 0.0, 1.0), (3, 0.5, 0.9), (6, 0.5, 0.9))
    assert [q.step for q in frontier(p)] == [0, 3]


def test_frontier_matches_brute_force_on_random_sets():
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(1, 12)
        p = [SPPoint(i, rng.choice([0.0, 0.1, 0.2, 0.5, 0.7]), rng.choice([0.5, 0.8, 0.9, 1.0])) for i in range(n)]
        assert frontier(p) == brute_frontier(p)


def test_frontier_area_is_union_of_rectangles():
    # Staircase: [0,0.2]x[0,1] ∪ [0,0.5]x[0,0.9] ∪ [0,1]x[0,0.5] = 0.2*1 + 0.3*0.9 + 0.5*0.5
    p = pts((0, 0.2, 1.0), (1, 0.5, 0.9), (2, 1.0, 0.5), (3, 0.4, 0.4))
    assert frontier_area(p) == pytest.approx(0.2 + 0.27 + 0.25, abs=1e-12)
    # Negative plasticity adds nothing; a single point is its rectangle.
    assert frontier_area(pts((0, -0.3, 1.0))) == 0.0
    assert frontier_area(pts((0, 0.4, 0.5))) == pytest.approx(0.2)
    assert frontier_area([]) == 0.0


def test_frontier_area_matches_grid_count():
    rng = random.Random(1)
    for _ in range(20):
        p = [SPPoint(i, rng.randint(0, 10) / 10, rng.randint(0, 10) / 10) for i in range(rng.randint(1, 6))]
        # Count 0.05-centred cells of a 0.1 grid covered by some rectangle.
        cells = sum(
            1
            for i, j in itertools.product(range(10), range(10))
            if any(q.plasticity > (i + 0.5) / 10 and q.stability > (j + 0.5) / 10 for q in p)
        )
        assert frontier_area(p) == pytest.approx(cells / 100, abs=1e-9)


def test_operating_point_weighted_and_constrained():
    p = pts((0, 0.0, 1.0), (10, 0.5, 0.97), (20, 0.6, 0.80), (30, 0.62, 0.60))
    # w·P + S with w = 2: 1.0, 1.97, 2.0, 1.84 → step 20; w = 1: 1.0, 1.47, 1.4, 1.22 → step 10.
    assert operating_point(p, OperatingPointConfig(rule="weighted", weight=2.0)).step == 20
    assert operating_point(p, OperatingPointConfig(rule="weighted", weight=1.0)).step == 10
    assert operating_point(p, OperatingPointConfig(rule="weighted", weight=0.0)).step == 0
    # Best P with S >= 0.8 is step 20 (S exactly at the bound counts); with 0.9 it is step 10.
    assert operating_point(p, OperatingPointConfig(rule="constrained", min_stability=0.8)).step == 20
    assert operating_point(p, OperatingPointConfig(rule="constrained", min_stability=0.9)).step == 10
    # No point qualifies: the most stable one.
    q = pts((5, 0.1, 0.7), (10, 0.5, 0.75), (15, 0.6, 0.5))
    assert operating_point(q, OperatingPointConfig(rule="constrained", min_stability=0.9)).step == 10
    assert operating_point([], OperatingPointConfig()) is None


def test_operating_point_ties_go_to_earliest():
    p = pts((0, 0.0, 1.0), (4, 0.25, 0.5), (8, 0.0, 1.0))
    assert operating_point(p, OperatingPointConfig(weight=2.0)).step == 0


def test_smooth_is_causal_moving_average():
    assert smooth([1, 2, 3, 4, 5], 3) == [1, 1.5, 2, 3, 4]
    assert smooth([1, 2, 3], 1) == [1, 2, 3]
    # Causal: changing a later value never changes an earlier smoothed one.
    assert smooth([1, 2, 3, 100], 3)[:3] == smooth([1, 2, 3], 3)
    with pytest.raises(ValueError, match="window"):
        smooth([1.0], 0)


def test_marginal_rates_known_values():
    p = pts((0, 0.0, 1.0), (10, 0.5, 0.97), (20, 0.6, 0.80), (30, 0.6, 0.60), (40, 0.7, 0.65))
    r = marginal_rates(p, smoothing=1)
    assert r[0] is None
    assert r[1] == pytest.approx(0.03 / 0.5)
    assert r[2] == pytest.approx(0.17 / 0.1)
    assert r[3] == math.inf  # stability lost for no gain
    assert r[4] == 0.0  # stability gained: no trade
    # With smoothing 2 the rate is taken between moving averages.
    r2 = marginal_rates(p, smoothing=2)
    ps, ss = smooth([q.plasticity for q in p], 2), smooth([q.stability for q in p], 2)
    assert r2[2] == pytest.approx(-(ss[2] - ss[1]) / (ps[2] - ps[1]))


def test_overshoot_needs_patience_and_names_the_point_before():
    # Rates into each point: -, 0.06, 1.7, 10, 0 (stability recovers), 2, 2
    p = pts((0, 0.0, 1.0), (10, 0.5, 0.97), (20, 0.6, 0.80), (30, 0.62, 0.60), (40, 0.7, 0.65),
            (50, 0.8, 0.45), (60, 0.9, 0.25))
    k2 = OperatingPointConfig(smoothing=1, overshoot_patience=2, exchange_rate=1.0)
    assert overshoot_step(p[:3], k2) is None  # one rate above: patience not reached
    assert overshoot(p[:4], k2) == (10, True)
    assert overshoot(p[:5], k2) == (10, False)  # the rate fell back: not overshooting now
    assert overshoot(p, k2) == (10, True)  # first overshoot kept, overshooting again now
    k3 = OperatingPointConfig(smoothing=1, overshoot_patience=3, exchange_rate=1.0)
    assert overshoot(p[:5], k3) == (None, False)
    # A higher exchange rate tolerates the steeper trade.
    assert overshoot(p, OperatingPointConfig(smoothing=1, overshoot_patience=2, exchange_rate=5.0)) == (None, False)


def test_overshoot_ignores_noise_when_smoothed():
    # A steady 0.1 P / 0.02 S per probe (rate 0.2) with one noisy dip in S at step 40.
    base = [SPPoint(10 * i, 0.1 * i, 1.0 - 0.02 * i) for i in range(8)]
    noisy = [SPPoint(q.step, q.plasticity, q.stability - (0.1 if q.step == 40 else 0.0)) for q in base]
    raw = OperatingPointConfig(smoothing=1, overshoot_patience=1, exchange_rate=1.0)
    assert overshoot_step(noisy, raw) == 30  # one sharp drop into step 40
    smoothed = OperatingPointConfig(smoothing=3, overshoot_patience=2, exchange_rate=1.0)
    assert overshoot(noisy, smoothed) == (None, False)


def test_sp_metrics_keys_and_values():
    cfg = OperatingPointConfig(smoothing=1, overshoot_patience=2, exchange_rate=1.0, weight=1.0)
    p = pts((0, 0.0, 1.0), (10, 0.5, 0.97), (20, 0.6, 0.80), (30, 0.62, 0.60))
    m = sp_metrics(p, cfg)
    assert m["sp/operating_step"] == 10
    assert m["sp/operating_plasticity"] == 0.5 and m["sp/operating_stability"] == 0.97
    assert m["sp/frontier_size"] == 4
    assert m["sp/frontier_area"] == pytest.approx(frontier_area(p))
    assert m["sp/marginal_rate"] == pytest.approx(0.2 / 0.02)
    assert m["sp/overshoot"] == 1.0 and m["sp/overshoot_step"] == 10
    # At the first point: no rate, no overshoot step.
    m0 = sp_metrics(p[:1], cfg)
    assert "sp/marginal_rate" not in m0 and "sp/overshoot_step" not in m0
    assert m0["sp/overshoot"] == 0.0 and m0["sp/operating_step"] == 0
    assert sp_metrics([], cfg) == {}


def test_no_overshoot_before_any_target_gain():
    # Stability falls while the (discrete) target score has not moved yet: no best point to pass.
    p = pts((0, 0.0, 1.0), (2, 0.0, 0.9), (4, 0.0, 0.8), (6, 1.0, 0.75), (8, 1.0, 0.7), (10, 1.0, 0.6))
    cfg = OperatingPointConfig(smoothing=1, overshoot_patience=2, exchange_rate=1.0)
    assert marginal_rates(p, 1)[1:3] == [math.inf, math.inf]
    assert overshoot(p[:4], cfg) == (None, False)
    assert overshoot(p, cfg) == (6, True)  # after the gain, stability lost for nothing
