"""From probe results to a snapshot of namespaced metrics (docs/design.md §3).

Keys for each capability probe ``p``:

* ``nll/p``: mean token NLL; ``delta_nll/p``: its rise since the baseline;
  ``retention_nll/p``: ``exp(-delta_nll/p)``.
* scored kinds also ``score/p`` (accuracy or exact match) and ``retention_score/p``
  (``score / baseline score``, when the baseline score is positive).
* ``retention/p``: the probe's chosen signal (``retention_score`` or ``retention_nll``).

Stability-plasticity: ``sp/stability`` (mean or min of ``retention/*``) and, with a target probe,
``target/nll``, ``target/delta_nll``, ``target/score`` and ``sp/plasticity``.

Where the probe results keep their rows, ``stderr/<key>`` is the standard error of each of these
keys' change since the baseline, from row-wise paired differences (:mod:`arena_callbacks.stats`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from . import stats
from .probes import ProbeResult, ProbeSet
from .sp import SP_KEYS

__all__ = ["TARGET", "Snapshot", "build_snapshot", "current_records", "expected_keys", "superseded"]

#: Name under which the target probe is registered.
TARGET = "target"


@dataclass(frozen=True)
class Snapshot:
    """All metrics measured at one probe step."""

    step: int
    metrics: dict[str, float]
    epoch: float | None = None
    trigger: str = "step"
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "epoch": self.epoch,
            "trigger": self.trigger,
            "metrics": {k: _json_float(v) for k, v in self.metrics.items()},
            **self.extra,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Snapshot:
        known = {"step", "epoch", "trigger", "metrics"}
        return cls(
            step=int(data["step"]),
            metrics={k: float(v) if v is not None else math.nan for k, v in data["metrics"].items()},
            epoch=data.get("epoch"),
            trigger=data.get("trigger", "step"),
            extra={k: v for k, v in data.items() if k not in known},
        )


def superseded(snapshots: Sequence[Snapshot]) -> list[int]:
    """Indices of the records a rewind replaced: the state they measured is held nowhere any more.

    A rewind writes two records at one step: the ordinary one (the breach) and, right after it,
    one with ``trigger == "rewind"`` measuring what the rewind loaded. From then on the model,
    and any checkpoint saved at that step, hold the loaded weights, so the records directly
    before a ``rewind`` record at its own step are superseded: they stay in the history (the
    trajectory draws the breach and the move back, the breaches table lists it) but are never
    the operating, best or final point, nor "the record of that step". Every other record is
    current (see :func:`current_records`). Only the run of same-step records just before the
    rewind record counts, so an earlier record at a repeated step (a resume without the
    monitor's state measures steps again) is left alone.

    Example:
        >>> snaps = [Snapshot(0, {}, trigger="baseline"), Snapshot(10, {}), Snapshot(10, {}, trigger="rewind")]
        >>> superseded(snaps)
        [1]
    """
    out: list[int] = []
    for i, s in enumerate(snapshots):
        if s.trigger != "rewind":
            continue
        j = i - 1
        while j >= 0 and snapshots[j].step == s.step and j not in out:
            out.append(j)
            j -= 1
    return sorted(out)


def current_records(snapshots: Sequence[Snapshot]) -> list[Snapshot]:
    """The snapshots, in order, less those a rewind superseded (:func:`superseded`); the same objects."""
    gone = set(superseded(snapshots))
    return [s for i, s in enumerate(snapshots) if i not in gone]


def _json_float(v: float) -> float | str:
    # JSON has no NaN/inf; keep them readable and round-trippable.
    return v if math.isfinite(v) else str(v)


def score_signal(probe: ProbeSet, base: ProbeResult) -> bool:
    """Does ``retention/<probe>`` follow the score (``signal: score`` and a positive baseline score)?
    Else it follows the NLL. The one rule for the value, its error and the sample-size advice."""
    return probe.signal == "score" and base.score is not None and base.score > 0


def _target_value(r: ProbeResult) -> float:
    """What 'higher is better' means for a target: score if scored, else -NLL."""
    return r.score if r.score is not None else -r.nll


def expected_keys(probes: Mapping[str, ProbeSet], has_target: bool) -> list[str]:
    """Every key a snapshot will hold for these probes (checked against budgets up front)."""
    keys = ["probe/seconds"]
    capabilities = [p for n, p in probes.items() if n != TARGET]
    for p in capabilities:
        if p.kind == "generate":  # no NLL: the answers are the model's own
            keys += [f"score/{p.name}", f"retention_score/{p.name}", f"retention/{p.name}",
                     f"gen/length/{p.name}", f"gen/stopped/{p.name}"]
            continue
        keys += [f"nll/{p.name}", f"delta_nll/{p.name}", f"retention_nll/{p.name}", f"retention/{p.name}"]
        if p.scored:
            keys += [f"score/{p.name}", f"retention_score/{p.name}"]
    if capabilities:
        keys.append("sp/stability")
    if has_target:
        keys += ["target/score", "sp/plasticity"] if probes[TARGET].kind == "generate" else \
            ["target/nll", "target/delta_nll", "sp/plasticity"]
        if probes[TARGET].scored and probes[TARGET].kind != "generate":
            keys.append("target/score")
        if capabilities:
            keys += list(SP_KEYS)
    return sorted(keys)


def build_snapshot(
    results: Mapping[str, ProbeResult],
    baseline: Mapping[str, ProbeResult],
    probes: Mapping[str, ProbeSet],
    *,
    stability: str = "mean",
    plasticity: str = "difference",
) -> dict[str, float]:
    """Metrics of one probe step relative to the baseline results (pure).

    At the baseline itself (``results is baseline``) retentions are 1 and deltas 0.
    """
    m: dict[str, float] = {}
    retentions: list[float] = []
    for name, r in results.items():
        if name == TARGET:
            continue
        b = baseline[name]
        if r.kind == "generate":
            ret = _generative(m, name, r, b)
            if math.isfinite(ret):  # no baseline score: nothing to retain, and no NLL to fall back on
                retentions.append(ret)
            continue
        d = r.nll - b.nll
        m[f"nll/{name}"] = r.nll
        m[f"delta_nll/{name}"] = d
        m[f"retention_nll/{name}"] = math.exp(-d) if math.isfinite(d) else math.nan
        ret = m[f"retention_nll/{name}"]
        if r.score is not None:
            m[f"score/{name}"] = r.score
            if b.score is not None and b.score > 0:
                m[f"retention_score/{name}"] = r.score / b.score
                if score_signal(probes[name], b):
                    ret = m[f"retention_score/{name}"]
            else:
                # Undefined ratio: fall back to NLL retention rather than invent a number.
                m[f"retention_score/{name}"] = math.nan
        m[f"retention/{name}"] = ret
        retentions.append(ret)
    if retentions:
        agg = min if stability == "min" else (lambda xs: sum(xs) / len(xs))
        m["sp/stability"] = agg(retentions)
    if TARGET in results and results[TARGET].kind == "generate":
        r, b = results[TARGET], baseline[TARGET]
        m["target/score"] = r.score if r.score is not None else math.nan
        t, t0 = m["target/score"], b.score if b.score is not None else math.nan
        m["sp/plasticity"] = (t / t0 if t0 > 0 else math.nan) if plasticity == "ratio" else t - t0
    elif TARGET in results:
        r, b = results[TARGET], baseline[TARGET]
        m["target/nll"] = r.nll
        m["target/delta_nll"] = r.nll - b.nll
        if r.score is not None:
            m["target/score"] = r.score
        t, t0 = _target_value(r), _target_value(b)
        if plasticity == "nll_reduction":
            m["sp/plasticity"] = 1.0 - r.nll / b.nll if b.nll > 0 else math.nan
        elif plasticity == "ratio":
            if r.score is None:
                m["sp/plasticity"] = math.exp(t - t0)  # exp(-ΔNLL): the text form of a ratio
            else:
                m["sp/plasticity"] = t / t0 if t0 > 0 else math.nan
        else:
            m["sp/plasticity"] = t - t0
    m.update(standard_errors(m, results, baseline, probes, stability=stability, plasticity=plasticity))
    return m


def _generative(m: dict[str, float], name: str, r: ProbeResult, b: ProbeResult) -> float:
    """A generative probe's keys into ``m``; returns its retention (score over the baseline's)."""
    score = r.score if r.score is not None else math.nan
    m[f"score/{name}"] = score
    m[f"gen/length/{name}"] = r.gen_length if r.gen_length is not None else math.nan
    m[f"gen/stopped/{name}"] = r.stopped if r.stopped is not None else math.nan
    ret = score / b.score if b.score is not None and b.score > 0 else math.nan
    m[f"retention_score/{name}"] = m[f"retention/{name}"] = ret
    return ret


def standard_errors(
    m: Mapping[str, float],
    results: Mapping[str, ProbeResult],
    baseline: Mapping[str, ProbeResult],
    probes: Mapping[str, ProbeSet],
    *,
    stability: str = "mean",
    plasticity: str = "difference",
) -> dict[str, float]:
    """``stderr/<key>`` for the keys of :func:`build_snapshot` (``m``), where both the results and
    the baseline kept their rows (see :mod:`arena_callbacks.stats`)."""
    se: dict[str, float] = {}
    parts: dict[str, float] = {}
    for name, r in results.items():
        b = baseline.get(name)
        if b is None or not r.rows or len(r.rows) != len(b.rows):
            continue
        d_nll = stats.nll_change_se(r.rows, b.rows)
        se[stats.rows_key(name)[len(stats.STDERR_PREFIX):]] = float(len(r.rows))
        if r.kind == "generate":  # the score alone (per-row scores may be fractions: same formulas)
            score_se, ratio_se = stats.score_change_se(r.rows, b.rows), stats.ratio_se(r.rows, b.rows)
            if name == TARGET:
                se["target/score"] = score_se
                se["sp/plasticity"] = ratio_se if plasticity == "ratio" else score_se
            else:
                se[f"score/{name}"] = score_se
                se[f"retention_score/{name}"] = se[f"retention/{name}"] = ratio_se
                if math.isfinite(m.get(f"retention/{name}", math.nan)):
                    parts[name] = ratio_se
            continue
        if name == TARGET:
            se["target/nll"] = se["target/delta_nll"] = d_nll
            if r.score is not None:
                se["target/score"] = stats.score_change_se(r.rows, b.rows)
            if "sp/plasticity" in m:
                if plasticity == "nll_reduction":  # 1 - ΣNLL_i(t) / ΣNLL_i(0) over the same tokens
                    se["sp/plasticity"] = stats.ratio_se(r.rows, b.rows, column=0)
                elif r.score is None:  # difference: -ΔNLL; ratio: exp(-ΔNLL)
                    factor = m["sp/plasticity"] if plasticity == "ratio" else 1.0
                    se["sp/plasticity"] = abs(factor) * d_nll
                elif plasticity == "ratio":
                    se["sp/plasticity"] = stats.ratio_se(r.rows, b.rows)
                else:
                    se["sp/plasticity"] = se["target/score"]
            continue
        se[f"nll/{name}"] = se[f"delta_nll/{name}"] = d_nll
        se[f"retention_nll/{name}"] = m[f"retention_nll/{name}"] * d_nll
        ret_se = se[f"retention_nll/{name}"]
        if r.score is not None:
            se[f"score/{name}"] = stats.score_change_se(r.rows, b.rows)
            se[f"retention_score/{name}"] = stats.ratio_se(r.rows, b.rows)
            if score_signal(probes[name], b):
                ret_se = se[f"retention_score/{name}"]  # the signal build_snapshot chose
        se[f"retention/{name}"] = parts[name] = ret_se
    # (A generative probe without a baseline score is left out of the stability, as above.)
    capabilities = [n for n, r in results.items() if n != TARGET
                    and (r.kind != "generate" or math.isfinite(m.get(f"retention/{n}", math.nan)))]
    if stability == "mean" and capabilities and set(parts) == set(capabilities):
        se["sp/stability"] = stats.mean_se(parts)
    # No key where no error can be estimated (fewer than two rows): a budget then compares plainly.
    return {stats.stderr_key(k): v for k, v in se.items() if (k in m or k.startswith("rows/")) and math.isfinite(v)}
