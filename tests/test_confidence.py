"""Budgets with a confidence level (issue 20, part 2) and sample-size advice (part 3), on
synthetic probe rows where the truth is known, through the same pure functions the monitor
uses: ``build_snapshot`` (with its paired errors) and ``evaluate_budgets``."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
from pydantic import ValidationError

from arena_callbacks import stats
from arena_callbacks.advice import log_advice, sample_size_advice
from arena_callbacks.budget import check_limit, evaluate_budgets, in_budget, margin
from arena_callbacks.config import BudgetConfig, MonitorConfig, ProbeSettings
from arena_callbacks.measurements import Snapshot, build_snapshot
from arena_callbacks.probes import ProbeSet
from arena_callbacks.probes.scoring import ProbeSums, probe_result

N = 24
LIMIT = 0.2  # nats per token
PER_ROW_SD = 0.3  # sd of a row's per-token change


def result(name: str, kind: str, nll: np.ndarray, tokens: np.ndarray, correct: np.ndarray):
    rows = tuple((float(a), float(b), float(c)) for a, b, c in zip(nll, tokens, correct))
    sums = ProbeSums(float(nll.sum()), float(tokens.sum()), float(correct.sum()), float(len(nll)))
    return probe_result(name, kind, sums, rows)


@pytest.fixture(scope="module")
def probes():
    return {"general": ProbeSet.build("general", [{"text": f"row {i}"} for i in range(N)], ProbeSettings())}


def fire_rate(probes, budget: BudgetConfig, shift: float, draws: int = 2000, seed: int = 0) -> float:
    """How often ``budget`` fires at one probe step when the true per-token NLL change is ``shift``."""
    rng = np.random.default_rng(seed)
    fired = 0
    for _ in range(draws):
        tokens = rng.integers(10, 40, N).astype(float)
        base_nll = tokens * rng.gamma(4.0, 1.0, N)  # rows differ much in difficulty
        now_nll = base_nll + tokens * rng.normal(shift, PER_ROW_SD, N)
        zeros = np.zeros(N)
        base = {"general": result("general", "text", base_nll, tokens, zeros)}
        now = {"general": result("general", "text", now_nll, tokens, zeros)}
        first = Snapshot(0, build_snapshot(base, base, probes), trigger="baseline")
        snap = Snapshot(10, build_snapshot(now, base, probes))
        fired += evaluate_budgets([budget], snap, [first]).action is not None
    return fired / draws


def test_a_confidence_budget_keeps_its_false_alarm_rate_and_detects_twice_the_limit(probes):
    plain = BudgetConfig(key="delta_nll/general", max_rise=LIMIT)
    confident = BudgetConfig(key="delta_nll/general", max_rise=LIMIT, confidence=0.95)
    # The truth sits exactly at the limit (the hardest case not to fire on): the plain budget
    # fires about half the time, the confident one at most 5% (+ 3 binomial sds over 2000 draws).
    sd = 3 * math.sqrt(0.05 * 0.95 / 2000)
    assert fire_rate(probes, confident, LIMIT) <= 0.05 + sd
    assert 0.4 < fire_rate(probes, plain, LIMIT) < 0.6
    # Well inside the budget it never fires by noise; half the limit: plain fires sometimes.
    assert fire_rate(probes, confident, 0.0, draws=500) == 0.0
    # Twice the limit: found at least as often as the sample-size rule promises (80%); here
    # 24 rows are more than the rows it asks for, so more often still.
    per_token_sd = PER_ROW_SD  # the change's spread per token; rows_needed counts in these units
    assert stats.rows_needed(per_token_sd, LIMIT, 0.95) <= N
    assert fire_rate(probes, confident, 2 * LIMIT, draws=500) >= 0.8


def test_a_confidence_budget_on_score_retention(probes):
    """Binary rows: a retention_score budget at 0.9 confidence on a true relative drop at the limit."""
    mc = {"facts": ProbeSet.build("facts", [{"question": "q", "choices": ["a", "b"], "answer": 0}] * 200,
                                  ProbeSettings(max_examples=None))}
    rng = np.random.default_rng(1)
    budget = BudgetConfig(key="retention/facts", max_drop=0.1, confidence=0.9)
    fired = 0
    for _ in range(1000):
        base_c = (rng.random(200) < 0.8).astype(float)
        now_c = base_c * (rng.random(200) >= 0.1)  # each correct row lost with p 0.1: retention 0.9 on average
        ones = np.ones(200)
        base = {"facts": result("facts", "multiple_choice", ones, ones, base_c)}
        now = {"facts": result("facts", "multiple_choice", ones, ones, now_c)}
        first = Snapshot(0, build_snapshot(base, base, mc), trigger="baseline")
        fired += evaluate_budgets([budget], Snapshot(5, build_snapshot(now, base, mc)), [first]).action is not None
    assert fired / 1000 <= 0.1 + 3 * math.sqrt(0.1 * 0.9 / 1000)


def test_the_margin_and_each_limit_kind():
    b = BudgetConfig(key="retention/general", max_drop=0.1, confidence=0.95)
    assert margin(b, 0.02) == pytest.approx(1.6448536 * 0.02)
    assert margin(BudgetConfig(key="retention/general", max_drop=0.1), 0.02) == 0.0
    assert margin(b, math.nan) == margin(b, None) == 0.0  # no error (one row): the plain comparison
    # drop 0.15 = limit + 0.05: a breach unless the margin is larger than 0.05
    assert check_limit(b, 0.85, 1.0, 0.02) and not check_limit(b, 0.85, 1.0, 0.04)
    rise = BudgetConfig(key="delta_nll/general", max_rise=0.3, confidence=0.95)
    assert check_limit(rise, 0.4, 0.0, 0.05) and not check_limit(rise, 0.4, 0.0, 0.07)
    rel = BudgetConfig(key="score/facts", max_relative_drop=0.2, confidence=0.95)
    assert check_limit(rel, 0.5, 0.8, 0.05) and not check_limit(rel, 0.5, 0.8, 0.1)  # excess 0.175·0.8 vs z·se
    floor = BudgetConfig(key="retention/general", min_value=0.8, confidence=0.95)
    assert check_limit(floor, 0.7, 1.0, 0.05) and not check_limit(floor, 0.75, 1.0, 0.05)
    assert check_limit(b, math.nan, 1.0, 0.01)  # NaN still breaches at once
    # Student's t with the rows' degrees of freedom: 5 rows (df 4) need 2.132 se, not 1.645.
    assert margin(b, 0.02, df=4) == pytest.approx(2.1318 * 0.02, rel=1e-3)
    assert check_limit(b, 0.85, 1.0, 0.025, df=None) and not check_limit(b, 0.85, 1.0, 0.025, df=4)
    assert stats.degrees_of_freedom("retention/general", {"stderr/rows/general": 24.0}) == 23
    assert stats.degrees_of_freedom("sp/plasticity", {"stderr/rows/target": 8.0, "stderr/rows/a": 3.0}) == 7
    assert stats.degrees_of_freedom("sp/stability", {"stderr/rows/target": 2.0, "stderr/rows/a": 5.0,
                                                     "stderr/rows/b": 9.0}) == 4
    # A state is within budget unless it breaks it at the confidence: the same test as the alarm.
    assert in_budget([b], {"retention/general": 0.85, "stderr/retention/general": 0.04}, {"retention/general": 1})
    assert not in_budget([b], {"retention/general": 0.85, "stderr/retention/general": 0.02}, {"retention/general": 1})
    assert not in_budget([b], {"retention/general": 0.85}, {"retention/general": 1.0})


def test_the_breach_message_gives_the_error_and_the_level(probes):
    b = BudgetConfig(key="retention/general", max_drop=0.1, confidence=0.95)
    first = Snapshot(0, {"retention/general": 1.0, "stderr/retention/general": 0.0}, trigger="baseline")
    d = evaluate_budgets([b], Snapshot(4, {"retention/general": 0.7, "stderr/retention/general": 0.05}), [first])
    assert d.message == ("retention/general fell to 0.70 ± 0.05 (baseline 1.00, budget: drop ≤ 0.10, at 95% "
                         "confidence) at step 4: stopping")


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"key": "geometry/procrustes/layer0", "max_value": 0.1, "confidence": 0.95},
         "confidence: 'geometry/procrustes/layer0' has no standard error"),
        ({"key": "retention/general", "max_drop": 0.1, "confidence": 0.4}, "greater than 0.5"),
        ({"key": "retention/general", "max_drop": 0.1, "confidence": 1.0}, "less than 1"),
    ],
)
def test_confidence_errors_at_construction(fields, message):
    with pytest.raises(ValidationError, match=message):
        BudgetConfig(**fields)


def test_sp_stability_as_a_minimum_refuses_a_confidence():
    budget = {"key": "sp/stability", "max_drop": 0.1, "confidence": 0.95}
    with pytest.raises(ValidationError, match=r"budgets\[0\].confidence: sp/stability with stability='min'"):
        MonitorConfig(stability="min", budgets=[budget])
    assert MonitorConfig(stability="mean", budgets=[budget]).budgets[0].confidence == 0.95


def test_sample_size_advice_from_the_baseline_spread(probes, caplog):
    rng = np.random.default_rng(3)
    tokens = np.full(N, 20.0)
    nll = tokens * rng.normal(3.0, 0.5, N)
    base = {"general": result("general", "text", nll, tokens, np.zeros(N))}
    metrics = build_snapshot(base, base, probes)
    budgets = [BudgetConfig(key="delta_nll/general", max_rise=0.5, name="loose"),
               BudgetConfig(key="retention/general", max_drop=0.02, confidence=0.99, name="tight"),
               BudgetConfig(key="sp/stability", max_drop=0.1)]
    advice = {a.budget: a for a in sample_size_advice(budgets, base, probes, metrics)}
    assert set(advice) == {"loose", "tight"}  # sp/stability is no one probe's key
    sd = float(np.std(nll / 20.0, ddof=1))
    assert advice["loose"].per_row_sd == pytest.approx(sd, rel=1e-9)
    assert advice["loose"].needed == stats.rows_needed(sd, 0.5, 0.95) and advice["loose"].enough
    assert advice["tight"].needed == stats.rows_needed(sd, 0.02, 0.99) > N and not advice["tight"].enough
    with caplog.at_level(logging.INFO, logger="arena_callbacks"):
        log_advice(list(advice.values()), logging.getLogger("arena_callbacks"))
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "'tight'" in warned[0] and "Too few rows to fire reliably" in warned[0]
