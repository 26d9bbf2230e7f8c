"""Sample-size advice at train start: how many probe rows a budget needs to fire reliably.

From the baseline's per-row spread of the watched measure, each budget on a probe's key gets the
number of rows a one-sided test at the budget's confidence (0.95 for a budget without one) needs
to call a change of **twice its limit** a breach with 80% probability
(:func:`arena_callbacks.stats.rows_needed`). The spread of per-row *changes*, which is what the
paired error uses, is not known before training; the spread of per-row *levels* stands in for it.
That is an upper bound when a row's value now and at the baseline correlate at 0.5 or more (a
hard row stays hard), which holds for NLL by a wide margin, so the advice errs on the side of
more rows. A probe with fewer rows than advised gets a warning: its budget can fire, but a real
breach of that size is missed more often than one time in five.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from .config import BudgetConfig
from .measurements import score_signal
from .probes import ProbeResult, ProbeSet
from .stats import POWER, rows_needed, spread

__all__ = ["Advice", "log_advice", "sample_size_advice"]

#: The confidence the advice assumes for a budget without its own.
DEFAULT_CONFIDENCE = 0.95


@dataclass(frozen=True)
class Advice:
    """One budget's sample-size advice."""

    budget: str
    key: str
    probe: str
    rows: int  # rows the probe has
    needed: int  # rows advised
    confidence: float
    per_row_sd: float
    distance: float  # the limit's distance from the baseline, in the key's units

    @property
    def enough(self) -> bool:
        return self.rows >= self.needed

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "enough": self.enough}


def _family(key: str, probe: ProbeSet, base: ProbeResult) -> str | None:
    """Which spread a key moves with: ``nll``, ``score`` or ``retention_score``."""
    head = key.split("/", 1)[0]
    if head in ("nll", "delta_nll", "retention_nll"):
        return "nll"
    if head == "score":
        return "score"
    if head == "retention_score":
        return "retention_score"
    if head == "retention":
        return "retention_score" if score_signal(probe, base) else "nll"
    return None


def _distance(budget: BudgetConfig, baseline: float) -> float:
    kind, limit = budget.limit
    if kind in ("max_drop", "max_rise"):
        return limit
    if kind == "max_relative_drop":
        return limit * abs(baseline)
    if kind == "min_value":
        return baseline - limit
    return limit - baseline  # max_value


def sample_size_advice(
    budgets: Sequence[BudgetConfig],
    baseline_results: Mapping[str, ProbeResult],
    probes: Mapping[str, ProbeSet],
    baseline_metrics: Mapping[str, float],
) -> list[Advice]:
    """Advice for every budget on one probe's key whose baseline kept its rows."""
    out: list[Advice] = []
    for b in budgets:
        parts = b.key.split("/")
        name = "target" if parts[0] == "target" else parts[-1] if len(parts) == 2 else None
        probe, base = probes.get(name or ""), baseline_results.get(name or "")
        if probe is None or base is None or len(base.rows) < 2:
            continue
        key = b.key if parts[0] != "target" else f"{parts[1]}/target"
        family = _family(key, probe, base)
        if family is None:
            continue
        sd = spread(base.rows, family)
        distance = _distance(b, baseline_metrics.get(b.key, math.nan))
        confidence = b.confidence or DEFAULT_CONFIDENCE
        needed = rows_needed(sd, distance, confidence)
        if not math.isfinite(needed):
            continue
        out.append(Advice(b.label, b.key, probe.name, len(base.rows), int(needed), confidence, sd, distance))
    return out


def log_advice(advice: Sequence[Advice], logger: logging.Logger) -> None:
    """One line per budget; a warning where the probe has fewer rows than advised."""
    for a in advice:
        text = (
            f"arena-callbacks: budget {a.budget!r} on probe {a.probe!r}: {a.rows} rows; to call a change of twice the "
            f"limit ({2 * a.distance:.3g}) a breach at {a.confidence:.0%} confidence with {POWER:.0%} probability it "
            f"needs about {a.needed} (per-row spread {a.per_row_sd:.3g} at the baseline)"
        )
        if a.enough:
            logger.info(text)
        else:
            logger.warning(
                text + ". Too few rows to fire reliably: raise probe.max_examples (or add rows), or loosen the limit"
            )
