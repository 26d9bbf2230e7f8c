import math

import pytest

from arena_callbacks import Action, BudgetConfig, Reason, Snapshot, evaluate_budgets
from arena_callbacks.budget import check_limit

KEY = "retention/facts"


def snaps(values, steps=None):
    steps = steps or [i * 10 for i in range(len(values))]
    return [Snapshot(s, {KEY: v}) for s, v in zip(steps, values)]


@pytest.mark.parametrize(
    "limit, value, baseline, breach",
    [
        ({"max_drop": 0.1}, 0.84, 0.93, False),  # drop 0.09
        ({"max_drop": 0.1}, 0.82, 0.93, True),  # drop 0.11
        ({"max_relative_drop": 0.1}, 0.85, 0.93, False),  # 8.6 %
        ({"max_relative_drop": 0.1}, 0.83, 0.93, True),  # 10.8 %
        ({"max_relative_drop": 0.1}, 0.5, 0.0, False),  # zero baseline: only a negative value breaks
        ({"max_relative_drop": 0.1}, -0.5, 0.0, True),
        ({"max_rise": 0.5}, 3.7, 3.3, False),
        ({"max_rise": 0.5}, 3.9, 3.3, True),
        ({"min_value": 0.8}, 0.8, 0.93, False),
        ({"min_value": 0.8}, 0.79, 0.93, True),
        ({"max_value": 0.2}, 0.2, 0.0, False),
        ({"max_value": 0.2}, 0.21, 0.0, True),
        ({"min_value": 0.8}, math.nan, 0.93, True),
        ({"max_value": 0.2}, math.inf, 0.0, True),
    ],
)
def test_check_limit_table(limit, value, baseline, breach):
    assert check_limit(BudgetConfig(key=KEY, **limit), value, baseline) is breach


def test_message_matches_the_documented_form():
    b = BudgetConfig(key=KEY, max_drop=0.10)
    d = evaluate_budgets([b], Snapshot(120, {KEY: 0.71}), snaps([0.93]))
    assert d.action is Action.STOP and d.should_stop
    assert d.reason is Reason.PATIENCE_EXHAUSTED
    assert d.message == "retention/facts fell to 0.71 (baseline 0.93, budget: drop ≤ 0.10) at step 120: stopping"


@pytest.mark.parametrize(
    "values, patience, expect_action_at",
    [
        # baseline, then probes; the first index at which the budget fires (None: never)
        ([1.0, 0.95, 0.85, 0.95, 0.85, 0.84], 2, 5),  # streak broken by a recovery
        ([1.0, 0.85, 0.84, 0.83], 3, 3),
        ([1.0, 0.85, 0.84, 0.83], 4, None),
        ([1.0, 0.85], 1, 1),
        ([1.0, 0.95, 0.99, 0.91], 1, None),
    ],
)
def test_patience_counts_consecutive_breaches(values, patience, expect_action_at):
    b = BudgetConfig(key=KEY, max_drop=0.1, patience=patience)
    history = snaps(values)
    fired_at = None
    for i in range(1, len(history)):
        d = evaluate_budgets([b], history[i], history[:i])
        if d.action is not None:
            fired_at = i
            break
        in_breach = d.outcomes[0].in_breach
        assert d.reason is (Reason.BREACH_PENDING if in_breach else Reason.WITHIN_BUDGET)
    assert fired_at == expect_action_at


def test_streak_message_counts_probes():
    b = BudgetConfig(key=KEY, max_drop=0.1, patience=2)
    h = snaps([0.93, 0.80, 0.71])
    d = evaluate_budgets([b], h[2], h[:2])
    assert d.message.endswith("at step 20 (2 probes in a row): stopping")


def test_min_step_ignores_early_breaches_and_restarts_the_streak():
    b = BudgetConfig(key=KEY, max_drop=0.1, patience=2, min_step=25)
    h = snaps([1.0, 0.5, 0.5, 0.5, 0.5], steps=[0, 10, 20, 30, 40])
    reasons = [evaluate_budgets([b], h[i], h[:i]).outcomes[0].reason for i in range(1, 5)]
    assert reasons == [Reason.BEFORE_MIN_STEP, Reason.BEFORE_MIN_STEP, Reason.BREACH_PENDING, Reason.PATIENCE_EXHAUSTED]


def test_nan_is_an_immediate_breach_not_a_crash():
    b = BudgetConfig(key=KEY, max_drop=0.1, patience=5)
    d = evaluate_budgets([b], Snapshot(10, {KEY: math.nan}), snaps([0.9]))
    assert d.reason is Reason.NOT_FINITE and d.should_stop
    assert d.message == "retention/facts is nan at step 10 (baseline 0.90): stopping"


def test_log_action_does_not_stop_and_most_severe_wins():
    log_b = BudgetConfig(key=KEY, max_drop=0.05, action="log", name="early-warning")
    stop_b = BudgetConfig(key="sp/stability", min_value=0.5)
    base = Snapshot(0, {KEY: 0.9, "sp/stability": 1.0})
    d1 = evaluate_budgets([log_b, stop_b], Snapshot(10, {KEY: 0.8, "sp/stability": 0.9}), [base])
    assert d1.action is Action.LOG and not d1.should_stop
    assert d1.message.startswith("retention/facts [early-warning] fell to 0.80") and d1.message.endswith(": logging")
    d2 = evaluate_budgets([log_b, stop_b], Snapshot(20, {KEY: 0.8, "sp/stability": 0.4}), [base])
    assert d2.action is Action.STOP and len(d2.fired) == 2


def test_baseline_never_fires_and_unmeasured_steps_are_skipped():
    b = BudgetConfig(key=KEY, min_value=2.0)
    base = Snapshot(0, {KEY: 0.9})
    assert evaluate_budgets([b], base, []).action is None
    d = evaluate_budgets([b], Snapshot(10, {"other/key": 1.0}), [base])
    assert d.action is None and d.outcomes[0].reason is Reason.NOT_MEASURED
    # A key on its own cadence: unmeasured steps neither break nor extend a streak.
    b2 = BudgetConfig(key=KEY, max_drop=0.1, patience=2)
    h = [base, Snapshot(10, {KEY: 0.5}), Snapshot(20, {})]
    d2 = evaluate_budgets([b2], Snapshot(30, {KEY: 0.5}), h)
    assert d2.should_stop and d2.message.endswith("(2 probes in a row): stopping")


def test_decision_json_roundtrips_through_json():
    import json

    b = BudgetConfig(key=KEY, max_drop=0.1)
    d = evaluate_budgets([b], Snapshot(10, {KEY: math.nan}), snaps([0.9]))
    data = json.loads(json.dumps(d.to_json()))
    assert data["action"] == "stop" and data["reason"] == "not_finite"
    assert data["outcomes"][0]["value"] == "nan" and data["outcomes"][0]["baseline"] == 0.9
