"""The study's measurements, computed from the cached run records alone (benchmarks/study.py).

Every number here is a function of the per-row probe results a run recorded:

* the *full* value of a key at a step is ``build_snapshot`` over every row of the set;
* a *probe* value is ``build_snapshot`` over the rows a monitor with ``probe.max_examples = 24`` and
  ``probe.seed = r`` would have drawn (``ProbeSet.build``'s ``random.Random(r).sample``), for
  ``r = 0 .. realizations-1``: one training run gives several honest probe readings;
* budgets are evaluated with the pure ``evaluate_budgets`` over those snapshots.
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

from arena_callbacks.budget import check_limit, evaluate_budgets, in_budget
from arena_callbacks.config import BudgetConfig, OperatingPointConfig
from arena_callbacks.measurements import Snapshot, build_snapshot
from arena_callbacks.probes.scoring import ProbeSums, probe_result
from arena_callbacks.sp import choose

TARGET = "target"
OPERATING_POINT = OperatingPointConfig(rule="weighted", weight=1.0)
GEOMETRY = {"procrustes": "geometry/procrustes", "cka": "geometry/cka", "gram": "geometry/gram",
            "cosine": "geometry/cosine"}
#: The paper's cross-sectional figures (Pearson, Spearman) quoted in issue 20.
PAPER = {"procrustes": (0.711, 0.568), "cka": (-0.761, -0.711), "gram": (0.485, 0.361)}


# ------------------------------------------------------------------ budgets


#: Confidence levels each budget is evaluated at (None: the plain budget).
LEVELS = (None, 0.8, 0.95)
#: The false-alarm rate per probe step a recommended default may have (section "Defaults").
FALSE_ALARM_TOLERANCE = 0.01


def budgets(grid) -> list[tuple[str, BudgetConfig]]:
    """The budgets evaluated offline: each plain and at every confidence of :data:`LEVELS`."""
    text, score = grid.text_set, grid.score_set
    score_key = f"retention/{score}"
    specs = [
        {"key": f"delta_nll/{text}", "max_rise": 0.5},
        {"key": f"delta_nll/{text}", "max_rise": 0.2},
        {"key": score_key, "max_relative_drop": 0.10},
        {"key": score_key, "max_relative_drop": 0.25},
    ]
    out = []
    for spec in specs:
        for conf in LEVELS:
            b = BudgetConfig(**spec, confidence=conf, action="stop")
            out.append((budget_label(b), b))
    return out


def budget_label(b: BudgetConfig) -> str:
    return _plain_label(b) + (f" @{b.confidence:.0%}" if b.confidence else "")


def _plain_label(b: BudgetConfig) -> str:
    """The label of the budget without its confidence level (what its levels are grouped by)."""
    return f"{b.key} {b.limit[0]} {b.limit[1]:g}"


def sample_sizes(grid, records: dict[str, dict]) -> list[dict[str, Any]]:
    """Per plain budget and confidence level, the rows ``arena_callbacks.advice`` would advise from each
    run's baseline (every row of the set), as the monitor logs at train start: median and range over runs."""
    from arena_callbacks.advice import sample_size_advice

    out = []
    for label, b in budgets(grid):
        if b.confidence is None:
            continue
        needed, rows = [], 0
        for record in records.values():
            base = record["steps"][0]["rows"]
            results = {n: _result(n, info["kind"], base[n]) for n, info in record["sets"].items()}
            probes = {n: SimpleNamespace(name=n, kind=info["kind"], signal="nll" if info["kind"] == "text" else "score")
                      for n, info in record["sets"].items()}
            metrics = build_snapshot(results, results, probes)
            advice = sample_size_advice([b], results, probes, metrics)
            if advice:
                needed.append(advice[0].needed)
                rows = len(base[b.key.split("/")[-1]])
        if needed:
            out.append({"budget": label, "base": _plain_label(b), "confidence": b.confidence,
                        "median": statistics.median(needed),
                        "min": min(needed), "max": max(needed), "runs": len(needed), "set_rows": rows,
                        "probe_rows": grid.probe_rows})
    return out


def recommend(alarm_rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per budget, the least conservative confidence level whose probe readings raised no more than
    :data:`FALSE_ALARM_TOLERANCE` false alarms per step and never fired on a quiet run; None when no level
    qualifies. Among levels that qualify the plain budget is preferred, then the lower confidence: each
    step up costs delay and misses (the table beside it shows how much)."""
    by_budget: dict[str, list[dict[str, Any]]] = {}
    for r in alarm_rows:
        by_budget.setdefault(r["base"], []).append(r)
    out = []
    for base, rows in by_budget.items():
        ok = [r for r in rows if r["false_alarm_per_step"] <= FALSE_ALARM_TOLERANCE and r["quiet_fired"] == 0]
        out.append({"budget": base, "levels": rows, "choice": ok[0] if ok else None})
    return out


def rewind_budgets(grid) -> list[BudgetConfig]:
    """What a rewind must satisfy: text NLL rise ≤ 0.2 and score retention drop ≤ 10% (plain)."""
    return [b for label, b in budgets(grid) if b.confidence is None and (b.limit[1] in (0.2, 0.10))]


# ------------------------------------------------------------------ metrics from rows


def probe_ids(n: int, k: int, realization: int) -> list[int]:
    """The rows ``ProbeSet.build`` keeps with ``max_examples=k, seed=realization``."""
    ids = list(range(n))
    return sorted(random.Random(realization).sample(ids, k)) if n > k else ids


def _result(name: str, kind: str, rows: Sequence[Sequence[float]]):
    sums = ProbeSums(math.fsum(r[0] for r in rows), math.fsum(r[1] for r in rows), math.fsum(r[2] for r in rows),
                     float(len(rows)))
    return probe_result(name, kind, sums, tuple(tuple(r) for r in rows))


def snapshot_metrics(record: dict, now_rows: dict, k: int | None, realization: int = 0) -> dict[str, float]:
    """The monitor's keys at one state (``now_rows``) against the run's baseline, on every row
    (``k=None``) or on the ``k``-row probe sample ``realization``; ``sp/plasticity`` is the graded
    target gain ``1 - NLL_t / NLL_0`` of the answers."""
    base_rows = record["steps"][0]["rows"]
    results, baseline, probes = {}, {}, {}
    for name, info in record["sets"].items():
        rows_now, rows_base = now_rows[name], base_rows[name]
        if name != TARGET and k is not None:
            ids = probe_ids(len(rows_now), k, realization)
            rows_now, rows_base = [rows_now[i] for i in ids], [rows_base[i] for i in ids]
        results[name] = _result(name, info["kind"], rows_now)
        baseline[name] = _result(name, info["kind"], rows_base)
        probes[name] = SimpleNamespace(kind=info["kind"], signal="nll" if info["kind"] == "text" else "score")
    m = build_snapshot(results, baseline, probes)
    m["sp/plasticity"] = 1.0 - results[TARGET].nll / baseline[TARGET].nll
    return m


def series(record: dict, k: int | None, realization: int = 0) -> list[Snapshot]:
    return [Snapshot(s["step"], {**snapshot_metrics(record, s["rows"], k, realization), **s["geometry"]})
            for s in record["steps"]]


def first_fire(budget: BudgetConfig, snaps: Sequence[Snapshot]) -> int | None:
    for i in range(1, len(snaps)):
        if evaluate_budgets([budget], snaps[i], snaps[:i]).action is not None:
            return snaps[i].step
    return None


def truth_breach(budget: BudgetConfig, snaps: Sequence[Snapshot]) -> list[bool]:
    plain = budget.model_copy(update={"confidence": None})
    base = snaps[0].metrics
    return [i > 0 and check_limit(plain, s.metrics[plain.key], base[plain.key]) for i, s in enumerate(snaps)]


# ------------------------------------------------------------------ statistics


def _ranks(xs: Sequence[float]) -> list[float]:
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    ranks = [0.0] * len(xs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for t in range(i, j + 1):
            ranks[order[t]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def pearson(xs: Sequence[float], ys: Sequence[float]) -> float:
    pairs = [(x, y) for x, y in zip(xs, ys) if math.isfinite(x) and math.isfinite(y)]
    if len(pairs) < 3:
        return math.nan
    mx, my = statistics.fmean(p[0] for p in pairs), statistics.fmean(p[1] for p in pairs)
    sxy = math.fsum((x - mx) * (y - my) for x, y in pairs)
    sxx, syy = math.fsum((x - mx) ** 2 for x, _ in pairs), math.fsum((y - my) ** 2 for _, y in pairs)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else math.nan


def spearman(xs: Sequence[float], ys: Sequence[float]) -> float:
    pairs = [(x, y) for x, y in zip(xs, ys) if math.isfinite(x) and math.isfinite(y)]
    if len(pairs) < 3:
        return math.nan
    return pearson(_ranks([p[0] for p in pairs]), _ranks([p[1] for p in pairs]))


def mean_sd(xs: Sequence[float]) -> tuple[float, float, int]:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    if not xs:
        return math.nan, math.nan, 0
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else math.nan), len(xs)


# ------------------------------------------------------------------ (a) false alarms and delay


def alarms(grid, records: dict[str, dict]) -> list[dict[str, Any]]:
    rows = []
    truth = {name: series(r, None) for name, r in records.items()}
    probes = {name: [series(r, grid.probe_rows, q) for q in range(grid.realizations)] for name, r in records.items()}
    for label, b in budgets(grid):
        fa_steps = within_steps = 0
        quiet_runs = quiet_fired = 0
        delays, missed, breached = [], 0, 0
        for name in records:
            t_flags = truth_breach(b, truth[name])
            t_first = next((truth[name][i].step for i, f in enumerate(t_flags) if f), None)
            for snaps in probes[name]:
                fired = first_fire(b, snaps)
                for i in range(1, len(snaps)):
                    if not t_flags[i]:
                        within_steps += 1
                        o = evaluate_budgets([b], snaps[i], snaps[:i]).outcomes[0]
                        fa_steps += bool(o.in_breach)
                if t_first is None:
                    quiet_runs += 1
                    quiet_fired += fired is not None
                else:
                    breached += 1
                    if fired is None:
                        missed += 1
                    else:
                        delays.append(fired - t_first)
        rows.append({
            "budget": label, "base": _plain_label(b), "confidence": b.confidence,
            "false_alarm_per_step": fa_steps / within_steps if within_steps else math.nan, "within_steps": within_steps,
            "quiet_runs": quiet_runs, "quiet_fired": quiet_fired,
            "breached_runs": breached, "missed": missed,
            "delay_median": statistics.median(delays) if delays else math.nan,
            "delay_mean": statistics.fmean(delays) if delays else math.nan,
            "early": sum(d < 0 for d in delays),
        })
    return rows


# ------------------------------------------------------------------ (b) probe vs full set


def probe_vs_full(grid, records: dict[str, dict]) -> list[dict[str, Any]]:
    out = []
    sets = sorted({n for r in records.values() for n in r["sets"] if n != TARGET})
    for s in sets:
        xs, ys, hits, hits_fpc, n_full = [], [], 0, 0, 0
        for r in records.values():
            full = series(r, None)
            n_full = r["sets"][s]["rows"]
            k = min(grid.probe_rows, n_full)
            fpc = math.sqrt(max(0.0, 1 - k / n_full)) if n_full else 1.0
            for q in range(grid.realizations):
                for snap, tru in zip(series(r, grid.probe_rows, q)[1:], full[1:]):
                    x, y = snap.metrics[f"retention/{s}"], tru.metrics[f"retention/{s}"]
                    se = snap.metrics.get(f"stderr/retention/{s}", math.nan)
                    xs.append(x)
                    ys.append(y)
                    hits += abs(x - y) <= 1.96 * se
                    hits_fpc += abs(x - y) <= 1.96 * se * fpc
        n = len(xs)
        out.append({"set": s, "rows_full": n_full, "rows_probe": min(grid.probe_rows, n_full), "points": n,
                    "spearman": spearman(xs, ys), "pearson": pearson(xs, ys),
                    "mae": statistics.fmean(abs(x - y) for x, y in zip(xs, ys)) if n else math.nan,
                    "coverage": hits / n if n else math.nan, "coverage_fpc": hits_fpc / n if n else math.nan})
    return out


# ------------------------------------------------------------------ (c) geometry


def _geo(snap: Snapshot, metric: str, module: str = "mean") -> float:
    return snap.metrics.get(f"{GEOMETRY[metric]}/{module}", math.nan)


def geometry(grid, records: dict[str, dict]) -> dict[str, Any]:
    loss_key = f"delta_nll/{grid.text_set}"
    truth = {n: series(r, None) for n, r in records.items()}
    out: dict[str, Any] = {"loss_key": loss_key, "metrics": []}
    steps = sorted({s.step for ss in truth.values() for s in ss if s.step > 0})
    for metric in GEOMETRY:
        within: dict[str, list[float]] = {}
        px, py = [], []
        for name, snaps in truth.items():
            g = [_geo(s, metric) for s in snaps]
            loss = [s.metrics[loss_key] for s in snaps]
            within.setdefault(records[name]["method"], []).append(spearman(g, loss))
            px += g[1:]
            py += loss[1:]
        cross = []
        for step in steps:
            at = [(_geo(s, metric), s.metrics[loss_key]) for ss in truth.values() for s in ss if s.step == step]
            if len(at) >= 4:
                cross.append(spearman([a for a, _ in at], [b for _, b in at]))
        finals = [(_geo(ss[-1], metric), ss[-1].metrics[loss_key]) for ss in truth.values()]
        fx, fy = [a for a, _ in finals], [b for _, b in finals]
        out["metrics"].append({
            "metric": metric,
            "within": {m: mean_sd(v) for m, v in sorted(within.items())},
            "pooled_spearman": spearman(px, py), "pooled_pearson": pearson(px, py),
            "cross_step_spearman": mean_sd(cross),
            "final_pearson": pearson(fx, fy), "final_spearman": spearman(fx, fy), "final_n": len(finals),
            "lead": lead_time(grid, records, truth, metric),
        })
    return out


def per_module(grid, records: dict[str, dict]) -> list[dict[str, Any]]:
    """Pooled (every run, step > 0) and final-checkpoint Spearman of each tracked module's metric
    against the full set's text NLL rise."""
    loss_key = f"delta_nll/{grid.text_set}"
    truth = {n: series(r, None) for n, r in records.items()}
    modules = sorted({k.split("/", 2)[2] for ss in truth.values() for s in ss for k in s.metrics
                      if k.startswith("geometry/procrustes/")} - {"mean", "max", "min"})
    out = []
    for module in modules:
        row: dict[str, Any] = {"module": module}
        for metric in GEOMETRY:
            px = [_geo(s, metric, module) for ss in truth.values() for s in ss[1:]]
            py = [s.metrics[loss_key] for ss in truth.values() for s in ss[1:]]
            fx = [_geo(ss[-1], metric, module) for ss in truth.values()]
            fy = [ss[-1].metrics[loss_key] for ss in truth.values()]
            row[metric] = (spearman(px, py), spearman(fx, fy))
        out.append(row)
    return out


def lead_time(grid, records, truth, metric: str) -> dict[str, Any]:
    """A geometry threshold fixed before the run (leave-one-out: the median value other runs had at
    their true breach of the arena's budget) against that budget's alarm on the seed-0 probe."""
    b = budgets(grid)[0][1]
    at_breach: dict[str, float] = {}
    for name, snaps in truth.items():
        flags = truth_breach(b, snaps)
        if any(flags):
            at_breach[name] = _geo(snaps[flags.index(True)], metric)
    sign = -1 if metric == "cka" else 1
    leads_truth, leads_alarm, never = [], [], 0
    for name in at_breach:
        others = [v for n, v in at_breach.items() if n != name and math.isfinite(v)]
        if not others:
            continue
        tau = statistics.median(others)
        snaps = truth[name]
        g_step = next((s.step for s in snaps[1:] if sign * _geo(s, metric) >= sign * tau), None)
        t_step = snaps[truth_breach(b, snaps).index(True)].step
        alarm = first_fire(b, series(records[name], grid.probe_rows, 0))
        if g_step is None:
            never += 1
            continue
        leads_truth.append(t_step - g_step)
        if alarm is not None:
            leads_alarm.append(alarm - g_step)
    return {"budget": budgets(grid)[0][0], "runs": len(at_breach), "never": never,
            "vs_truth": mean_sd(leads_truth), "vs_alarm": mean_sd(leads_alarm)}


# ------------------------------------------------------------------ (d) rewinds


def _pick(grid, cands: list[tuple[Any, dict[str, float]]], base: dict[str, float]) -> int:
    """Index of the candidate the monitor's rule picks: in budget (the first one, the pretrained
    state, always counts), then max of P + S."""
    bs = rewind_budgets(grid)
    ok = [i for i, (_, m) in enumerate(cands) if i == 0 or in_budget(bs, m, base)]
    return ok[choose([cands[i][1] for i in ok], OPERATING_POINT)]


def path_choice(grid, record: dict, points: list[dict], *, refine: bool, layerwise: bool = False,
                realization: int = 0) -> float:
    """The α a path search picks on the probe sample ``realization`` (points: the run's rewind states)."""
    return _path(grid, record, points, refine, layerwise, realization)[0]


def _path(grid, record, points, refine, layerwise, realization):
    k = grid.probe_rows
    base = snapshot_metrics(record, record["steps"][0]["rows"], k, realization)
    last = record["steps"][-1]["rows"]
    use = [p for p in points if p["layerwise"] == layerwise and (refine or p["why"] == "grid")]
    cands = [((0.0, None), base)] + sorted(
        [((p["alpha"], p["rows"]), snapshot_metrics(record, p["rows"], k, realization)) for p in use],
        key=lambda c: c[0][0]) + [((1.0, last), snapshot_metrics(record, last, k, realization))]
    (alpha, rows), _ = cands[_pick(grid, cands, base)]
    return alpha, rows


def rewinds(grid, records: dict[str, dict]) -> list[dict[str, Any]]:
    """Per run with rewind states: final, checkpoint, path (grid), path (refined), layer-wise; each
    chosen on the seed-0 probe, reported on the full sets."""
    out = []
    for name, r in sorted(records.items()):
        if "rewind" not in r:
            continue
        pts = r["rewind"]["points"]
        steps = r["steps"]
        base_full = snapshot_metrics(r, steps[0]["rows"], None)
        k = grid.probe_rows
        base = snapshot_metrics(r, steps[0]["rows"], k, 0)
        ck = [((s["step"], s["rows"]), snapshot_metrics(r, s["rows"], k, 0)) for s in steps]
        (ck_step, ck_rows), _ = ck[_pick(grid, ck, base)]
        choices = {"final": (1.0, steps[-1]["rows"]), "checkpoint": (ck_step, ck_rows),
                   "path": _path(grid, r, pts, False, False, 0), "path+refine": _path(grid, r, pts, True, False, 0),
                   "layerwise": _path(grid, r, pts, False, True, 0)}
        row = {"run": name, "method": r["method"], "regime": r["regime"], "seed": r["seed"],
               "refine_passes": sum(p["why"] == "refine" for p in pts)}
        for label, (where, rows) in choices.items():
            m = base_full if rows is None else snapshot_metrics(r, rows, None)
            row[label] = {"at": where, "S": m["sp/stability"], "P": m["sp/plasticity"],
                          "in_budget": in_budget(rewind_budgets(grid), m, base_full)}
        out.append(row)
    return out


# ------------------------------------------------------------------ (e) frontiers


def _first_step(snaps: Sequence[Snapshot], level: float) -> float:
    """The first probe step where the graded target gain reaches ``level`` (NaN: never)."""
    return next((float(s.step) for s in snaps if s.metrics["sp/plasticity"] >= level), math.nan)


def frontiers(grid, records: dict[str, dict]) -> list[dict[str, Any]]:
    """Per regime and method: the final (P, S) and, per plain budget, the best P + S among the steps
    the full sets say are in budget (the operating point at that budget), over seeds."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in records.values():
        if r["regime"] != "control":
            groups.setdefault((r["regime"], r["method"]), []).append(r)
    plain = [(label, b) for label, b in budgets(grid) if b.confidence is None]
    out = []
    for (regime, method), rs in sorted(groups.items()):
        row: dict[str, Any] = {"regime": regime, "method": method, "seeds": sorted(r["seed"] for r in rs),
                               "final_P": mean_sd([series(r, None)[-1].metrics["sp/plasticity"] for r in rs]),
                               "final_S": mean_sd([series(r, None)[-1].metrics["sp/stability"] for r in rs]),
                               "p90_step": mean_sd([_first_step(series(r, None), 0.9) for r in rs]),
                               "budgets": {}}
        for label, b in plain:
            ps, ss = [], []
            for r in rs:
                snaps = series(r, None)
                flags = truth_breach(b, snaps)
                ok = [s.metrics for s, f in zip(snaps, flags) if not f]
                best = ok[choose(ok, OPERATING_POINT)]
                ps.append(best["sp/plasticity"])
                ss.append(best["sp/stability"])
            row["budgets"][label] = {"P": mean_sd(ps), "S": mean_sd(ss)}
        out.append(row)
    return out
