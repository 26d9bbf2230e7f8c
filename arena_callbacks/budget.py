"""Budget evaluation: a pure function of the current snapshot and the history before it.

Example:
    >>> from arena_callbacks.config import BudgetConfig
    >>> from arena_callbacks.measurements import Snapshot
    >>> b = BudgetConfig(key="retention/facts", max_drop=0.10)
    >>> base = Snapshot(0, {"retention/facts": 0.93})
    >>> d = evaluate_budgets([b], Snapshot(120, {"retention/facts": 0.71}), [base])
    >>> d.message
    'retention/facts fell to 0.71 (baseline 0.93, budget: drop ≤ 0.10) at step 120: stopping'
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum

from .config import Action, BudgetConfig
from .measurements import Snapshot
from .stats import degrees_of_freedom, stderr_key, t_quantile

__all__ = [
    "BudgetOutcome", "Decision", "Reason", "check_budget_keys", "check_limit", "evaluate_budgets", "in_budget",
    "margin", "threshold",
]


class Reason(str, Enum):
    """Why a budget is or is not acting at this step."""

    WITHIN_BUDGET = "within_budget"
    BEFORE_MIN_STEP = "before_min_step"
    BREACH_PENDING = "breach_pending"  # in breach, patience not yet exhausted
    PATIENCE_EXHAUSTED = "patience_exhausted"
    NOT_FINITE = "not_finite"  # NaN or infinite value: a breach at once, never a crash
    NOT_MEASURED = "not_measured"  # the key is not measured at this step (own cadence, e.g. spectra)


_ACTION_WORDS = {Action.LOG: "logging", Action.STOP: "stopping", Action.REWIND: "rewinding"}


@dataclass(frozen=True)
class BudgetOutcome:
    """One budget's verdict at one step."""

    budget: str
    key: str
    value: float
    baseline: float
    in_breach: bool
    reason: Reason
    action: Action | None  # the action that fires now, if any
    message: str

    def to_json(self) -> dict[str, object]:
        return {
            "budget": self.budget,
            "key": self.key,
            "value": self.value if math.isfinite(self.value) else str(self.value),
            "baseline": self.baseline if math.isfinite(self.baseline) else str(self.baseline),
            "in_breach": self.in_breach,
            "reason": self.reason.value,
            "action": self.action.value if self.action else None,
            "message": self.message,
        }


@dataclass(frozen=True)
class Decision:
    """What all budgets together say at one step: the most severe firing action wins."""

    step: int
    action: Action | None = None
    outcomes: tuple[BudgetOutcome, ...] = field(default_factory=tuple)

    @property
    def should_stop(self) -> bool:
        return self.action is not None and self.action.severity >= Action.STOP.severity

    @property
    def fired(self) -> tuple[BudgetOutcome, ...]:
        return tuple(o for o in self.outcomes if o.action is not None)

    @property
    def reason(self) -> Reason:
        fired = self.fired
        if fired:
            return max(fired, key=lambda o: o.action.severity if o.action else -1).reason
        if any(o.reason is Reason.BREACH_PENDING for o in self.outcomes):
            return Reason.BREACH_PENDING
        return Reason.WITHIN_BUDGET

    @property
    def message(self) -> str:
        return "; ".join(o.message for o in self.fired)

    def to_json(self) -> dict[str, object]:
        return {
            "action": self.action.value if self.action else None,
            "reason": self.reason.value,
            "message": self.message,
            "outcomes": [o.to_json() for o in self.outcomes],
        }


def margin(budget: BudgetConfig, stderr: float | None, df: float | None = None) -> float:
    """How far past its limit the key must be for a breach, in the key's units: ``t·stderr`` for a
    budget with ``confidence`` (t the one-sided quantile of Student's t with ``df`` degrees of
    freedom; the normal one where ``df`` is not known), else 0. Where there is no finite error
    (fewer than two probe rows) the plain comparison applies."""
    if budget.confidence is None or stderr is None or not math.isfinite(stderr):
        return 0.0
    return t_quantile(budget.confidence, df) * stderr


def _error(budget: BudgetConfig, metrics: Mapping[str, float]) -> tuple[float | None, float | None]:
    """The standard error of a budget's key in a record, and its degrees of freedom."""
    return metrics.get(stderr_key(budget.key)), degrees_of_freedom(budget.key, metrics)


def check_limit(
    budget: BudgetConfig, value: float, baseline: float, stderr: float | None = None, df: float | None = None
) -> bool:
    """True when ``value`` breaks the budget's limit (NaN/inf always do); with ``confidence``, when
    it breaks it by more than :func:`margin` (``stderr``: the standard error of the key's change
    since the baseline, ``stderr/<key>`` of the same record)."""
    if not math.isfinite(value):
        return True
    kind, limit = budget.limit
    m = margin(budget, stderr, df)
    if kind == "max_drop":
        return baseline - value - limit > m
    if kind == "max_relative_drop":
        if baseline == 0:
            return value < -m
        return (baseline - value - m) / abs(baseline) > limit
    if kind == "max_rise":
        return value - baseline - limit > m
    if kind == "min_value":
        return limit - value > m
    return value - limit > m  # max_value


def in_budget(budgets: Iterable[BudgetConfig], metrics: Mapping[str, float], baseline: Mapping[str, float]) -> bool:
    """No ``stop`` or ``rewind`` budget is in breach at ``metrics`` (``log`` budgets do not count).

    The one test of "within budget" for a state: the best state kept for rewinds, the points of
    a path rewind, the candidates of a post-hoc rewind. Patience does not enter: it is about
    when to act, not about whether a state is acceptable.
    """
    for b in budgets:
        if b.action.severity < Action.STOP.severity or b.key not in metrics:
            continue
        if check_limit(b, metrics[b.key], baseline.get(b.key, math.nan), *_error(b, metrics)):
            return False
    return True


def check_budget_keys(budgets: Sequence[BudgetConfig], measured: Sequence[str]) -> None:
    """Refuse a budget whose key no measurement writes (``measured`` may hold ``*`` patterns)."""
    import fnmatch

    from .exceptions import BudgetKeyError

    for i, budget in enumerate(budgets):
        if not any(fnmatch.fnmatchcase(budget.key, k) for k in measured):
            raise BudgetKeyError(
                f"budgets[{i}].key: {budget.key!r} is not measured by this monitor; "
                f"measured keys: {', '.join(measured)}"
            )


def threshold(budget: BudgetConfig, baseline: float) -> float:
    """The budget's limit in the watched key's own units (where a line goes on its curve)."""
    kind, x = budget.limit
    if kind == "max_drop":
        return baseline - x
    if kind == "max_rise":
        return baseline + x
    if kind == "max_relative_drop":
        return baseline - x * abs(baseline)  # baseline·(1−x) for a positive baseline
    return x  # min_value / max_value


def _describe_limit(budget: BudgetConfig) -> str:
    kind, limit = budget.limit
    return {
        "max_drop": f"drop ≤ {limit:.2f}",
        "max_relative_drop": f"relative drop ≤ {limit:.0%}",
        "max_rise": f"rise ≤ {limit:.2f}",
        "min_value": f"≥ {limit:.2f}",
        "max_value": f"≤ {limit:.2f}",
    }[kind]


def _fmt(v: float) -> str:
    return f"{v:.2f}" if math.isfinite(v) else str(v)


def _message(
    budget: BudgetConfig, value: float, baseline: float, step: int, streak: int, stderr: float | None = None
) -> str:
    action_word = _ACTION_WORDS[budget.action]
    if not math.isfinite(value):
        return f"{budget.key} is {value} at step {step} (baseline {_fmt(baseline)}): {action_word}"
    verb = "fell to" if value < baseline else "rose to" if value > baseline else "is at"
    where = f"at step {step}" + (f" ({streak} probes in a row)" if streak > 1 else "")
    name = "" if budget.label == budget.key else f" [{budget.label}]"
    shown = _fmt(value)
    limit = _describe_limit(budget)
    if budget.confidence is not None:
        if stderr is not None and math.isfinite(stderr):
            shown += f" ± {stderr:.2f}"
        limit += f", at {budget.confidence:.0%} confidence"
    return f"{budget.key}{name} {verb} {shown} (baseline {_fmt(baseline)}, budget: {limit}) {where}: {action_word}"


def _evaluate_one(budget: BudgetConfig, snapshot: Snapshot, history: Sequence[Snapshot]) -> BudgetOutcome:
    base_snap = history[0] if history else snapshot
    if budget.key not in snapshot.metrics:
        # Keys are checked against what the monitor measures when it is built and at train
        # start; a key absent here belongs to a measurement with its own cadence.
        return BudgetOutcome(budget.label, budget.key, math.nan, math.nan, False, Reason.NOT_MEASURED, None, "")
    value = snapshot.metrics[budget.key]
    baseline = base_snap.metrics.get(budget.key, math.nan)
    se, df = _error(budget, snapshot.metrics)

    def outcome(in_breach: bool, reason: Reason, action: Action | None, streak: int = 1) -> BudgetOutcome:
        msg = _message(budget, value, baseline, snapshot.step, streak, se) if action else ""
        return BudgetOutcome(budget.label, budget.key, value, baseline, in_breach, reason, action, msg)

    if snapshot is base_snap or not history:
        return outcome(False, Reason.WITHIN_BUDGET, None)  # the baseline never triggers an action
    if snapshot.step < budget.min_step:
        return outcome(check_limit(budget, value, baseline, se, df), Reason.BEFORE_MIN_STEP, None)
    if not math.isfinite(value):
        return outcome(True, Reason.NOT_FINITE, budget.action)
    if not check_limit(budget, value, baseline, se, df):
        return outcome(False, Reason.WITHIN_BUDGET, None)
    # Count the consecutive breaches ending here, over post-baseline snapshots past min_step.
    streak = 1
    for past in reversed(history[1:]):
        if past.step < budget.min_step:
            break
        if budget.key not in past.metrics:
            continue  # not measured at that step: neither breaks nor extends the streak
        if not check_limit(budget, past.metrics[budget.key], baseline, *_error(budget, past.metrics)):
            break
        streak += 1
    if streak >= budget.patience:
        return outcome(True, Reason.PATIENCE_EXHAUSTED, budget.action, streak)
    return outcome(True, Reason.BREACH_PENDING, None, streak)


def evaluate_budgets(
    budgets: Sequence[BudgetConfig], snapshot: Snapshot, history: Sequence[Snapshot]
) -> Decision:
    """Decide what to do at ``snapshot`` given the earlier ``history`` (its first entry is the baseline).

    Pure: the same inputs give the same decision on every rank.
    """
    outcomes = tuple(_evaluate_one(b, snapshot, history) for b in budgets)
    fired = [o.action for o in outcomes if o.action is not None]
    action = max(fired, key=lambda a: a.severity) if fired else None
    return Decision(step=snapshot.step, action=action, outcomes=outcomes)
