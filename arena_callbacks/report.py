"""The Markdown report of a saved run, and a comparison of several runs.

The figures they embed are drawn by :mod:`arena_callbacks.plots` (its ``plot_*`` functions are
importable from here too, as before).

Example:
    >>> from arena_callbacks.runs import load_run
    >>> write_report(load_run("out"), "out/report")   # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .measurements import superseded as _superseded
from .plots import (
    _names,
    _rewind_target,
    budget_threshold,
    plot_compare,
    plot_geometry,
    plot_retention,
    plot_trajectory,
    rewound_indices,
    superseded_indices,
    trajectory_figure,
    trajectory_image,
)
from .runs import ADAPTER_FILES
from .sp import frontier_area, operating_point, trajectory

if TYPE_CHECKING:  # pragma: no cover
    from .measurements import Snapshot
    from .runs import Run
    from .sp import SPPoint

__all__ = [
    "budget_threshold",
    "compare_runs",
    "compare_table",
    "format_value",
    "plot_compare",
    "plot_geometry",
    "plot_retention",
    "plot_trajectory",
    "recommend_checkpoint",
    "rewound_indices",
    "superseded_indices",
    "trajectory_figure",
    "trajectory_image",
    "write_report",
]

REPORT_FILE = "report.md"
COMPARE_FILE = "compare.md"
PROCRUSTES = "geometry/procrustes/"


def format_value(v: float | None, digits: int = 4) -> str:
    if v is None:
        return "n/a"
    v = float(v)
    if not math.isfinite(v):
        return str(v)
    s = f"{v:.{digits}f}"
    return s[1:] if s.startswith("-") and float(s) == 0 else s  # no "-0.0000"


def _cell(snap: Snapshot, key: str) -> str:
    """A table cell: the value, with ``± stderr`` where the record has a positive one."""
    text = format_value(snap.metrics.get(key))
    se = snap.metrics.get(f"stderr/{key}")
    return f"{text} ± {format_value(se)}" if se is not None and math.isfinite(se) and se > 0 else text


# --------------------------------------------------------------------------- report
def recommend_checkpoint(run: Run, step: int) -> Path | None:
    """The saved ``checkpoint-<n>`` with the largest ``n <= step``, if any."""
    best = None
    for n, p in run.checkpoints():
        if n <= step:
            best = p
    return best


def _load_hint(run: Run, folder: Path) -> str:
    """How to load the adapter or model saved in ``folder``."""
    if any((folder / f).is_file() for f in ADAPTER_FILES):
        base = run.base_model(folder) or "<base model>"
        return f"`PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained('{base}'), '{folder}')`"
    return f"`AutoModelForCausalLM.from_pretrained('{folder}')`"


def _sp_text(snap: Snapshot) -> str:
    """``P = 0.8000, S = 0.3290`` for the keys the record holds (``""`` for none)."""
    return ", ".join(f"{name} = {format_value(snap.metrics[key])}" for name, key in
                     (("P", "sp/plasticity"), ("S", "sp/stability")) if key in snap.metrics)


def _after_rewind(snap: Snapshot) -> str:
    """``", after rewind 1"`` for a record a rewind loaded, else ``""``."""
    return f", after rewind {snap.extra.get('rewind', {}).get('number', '?')}" if snap.trigger == "rewind" else ""


def _recommendation(run: Run, rec: Snapshot) -> list[str]:
    """The "Recommended checkpoint" lines for the operating record ``rec``.

    The model saved in the output folder counts when the run ended (``summary.json``) at the
    last current record: it is that state. After a rewind, ``checkpoint-<its step>`` holds what
    it loaded (the monitor asks for a save at a rewind), and a checkpoint rewind's restored
    step's checkpoint holds the same weights.
    """
    md: list[str] = []
    final = run.final
    ended = bool(run.summary) and final is not None and run.summary.get("final_step") == final.step
    model = run.saved_model() if ended else None
    saved = run.checkpoints()
    at = dict(saved)
    if rec.trigger == "rewind":
        info = rec.extra.get("rewind", {})
        number, target = info.get("number", "?"), _rewind_target(info)
        md.append(f"Step {rec.step} after rewind {number} (the operating point: the state the rewind loaded, "
                  f"{target}).")
        held = False
        if model is not None and rec is final:
            md.append(f"The model saved in `{model}` is this rewound state (rewind {number} at step {rec.step}, "
                      f"{target}): load it with {_load_hint(run, model)}.")
            held = True
        elif model is not None and final is not None:
            md.append(f"The model saved in `{model}` is the final state (step {final.step}), not this one: "
                      f"training went on after the rewind.")
        if rec.step in at:
            md.append(f"`checkpoint-{rec.step}` (`{at[rec.step]}`) holds this rewound state: the trainer saved it "
                      f"right after the rewind.")
            held = True
        restored = info.get("restored_step")
        if info.get("alpha") is None and restored is not None and int(restored) in at and int(restored) != rec.step:
            md.append(f"`checkpoint-{restored}` (`{at[int(restored)]}`) holds the same weights: the rewind restored "
                      f"the state of step {restored}.")
            held = True
        if not held:
            before = recommend_checkpoint(run, rec.step - 1)
            md.append("No saved folder holds this rewound state"
                      + (f"; the closest checkpoint before it, `{before.name}` (`{before}`), holds the state of "
                         f"that step, before the breach." if before is not None else
                         (f" (no `checkpoint-<step>` folders in `{run.output_dir}`)." if not saved else ".")))
        return md
    ckpt = recommend_checkpoint(run, rec.step)
    if ckpt is not None:
        md.append(f"Step {rec.step} (the operating point); closest saved checkpoint at or before it: "
                  f"`{ckpt.name}` (`{ckpt}`).")
    elif saved:
        md.append(f"Step {rec.step} (the operating point); no checkpoint was saved at or before it "
                  f"(earliest saved: `{saved[0][1].name}`).")
    else:
        md.append(f"Step {rec.step} (the operating point); no `checkpoint-<step>` folders found"
                  + (f" in `{run.output_dir}`." if run.output_dir else "."))
    if model is not None and rec is final:
        md.append(f"The model saved in `{model}` is this state (the final one): load it with {_load_hint(run, model)}.")
    return md


_REPORT_PREFIXES = ("sp/", "target/", "retention/", "delta_nll/", "score/", "nll/")


def write_report(run: Run, out_dir: str | Path) -> Path:
    """Write ``trajectory.png``, ``retention.png``, ``geometry.png`` (when measured) and ``report.md``.

    After a rewind the record of its step is the state it loaded: the final and best columns and
    the recommended checkpoint use it (their headers say ``after rewind n``); the breach recorded
    before it at that step is in the breaches table and the plots only.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    traj = plot_trajectory(run, out / "trajectory.png")
    ret = plot_retention(run, out / "retention.png")
    geom = plot_geometry(run, out / "geometry.png")
    if geom is None and (out / "geometry.png").exists():
        (out / "geometry.png").unlink()  # stale from an earlier report

    gone = set(_superseded(run.snapshots))
    best = run.operating_record()  # the same point as traj["operating_point"], with its record
    md = [
        *_header_section(run, ret["rewinds"], gone),
        *_points_section(run, best, traj["overshoot_step"]),
        *_metrics_table(run, best, ret["rewinds"], gone),
        *_breaches_section(run),
        *_recommendation_section(run, best),
        *_plots_section(geom is not None),
    ]
    path = out / REPORT_FILE
    path.write_text("\n".join(md), encoding="utf-8")
    return path


def _header_section(run: Run, rewinds: list[dict[str, Any]], gone: set[int]) -> list[str]:
    """The title and the run's facts: folder, probe steps, probes, parameters, stop, rewinds."""
    base, final = run.baseline, run.final
    md: list[str] = [f"# Forgetting report: {run.name}", ""]
    md.append(f"- Run folder: `{run.path}`")
    md.append(f"- Probe steps: {len(run.current_snapshots())}"
              + (f" (baseline at step {base.step}, last at step {final.step})" if base and final else "")
              + (f"; {len(gone)} more record{'s' * (len(gone) != 1)} replaced by a rewind" if gone else ""))
    if run.summary.get("probes"):
        md.append("- Probes: " + ", ".join(f"`{n}` ({k})" for n, k in run.summary["probes"].items()))
    md.append(f"- Trainable parameters: {run.trainable_parameters if run.trainable_parameters is not None else 'n/a'}")
    if run.stop_step is not None:
        md.append(f"- **Stopped at step {run.stop_step}**: {run.stop_message or ''}")
    else:
        md.append("- Not stopped by a budget"
                  + ("" if run.summary else " (no summary.json: the run may still be going)"))
    for r in rewinds:
        info = run.snapshots[r["index"]].extra.get("rewind", {})
        pairs = [(info.get(w) or {}) for w in ("before", "after")]
        moved = "; ".join(f"{name} {format_value(pairs[0].get(key), 3)} → {format_value(pairs[1].get(key), 3)}"
                          for name, key in (("P", "plasticity"), ("S", "stability")))
        md.append(f"- Rewind {r['number']} at step {r['step']} ({r['mode']}): loaded {_rewind_target(info)} ({moved}); "
                  f"then {r['then']}.")
    md.append("")
    return md


def _points_section(run: Run, best: Snapshot | None, overshoot: int | None) -> list[str]:
    """"Baseline, final and best point": the operating point, its rule, and the overshoot step."""
    op: SPPoint | None = trajectory([best])[0] if best is not None else None
    opc = run.config.operating_point
    rule = (f"max of {opc.weight:g}·P + S" if opc.rule == "weighted" else f"best P with S ≥ {opc.min_stability:g}")
    md = ["## Baseline, final and best point", ""]
    if op is not None and best is not None:
        info = best.extra.get("rewind", {})
        where = f"step {op.step}" + (f" after rewind {info.get('number', '?')} (the state it loaded, "
                                     f"{_rewind_target(info)})" if best.trigger == "rewind" else "")
        md.append(f"Best (operating) point: {where}, P = {format_value(op.plasticity)}, "
                  f"S = {format_value(op.stability)} (rule: {rule}).")
    else:
        md.append("No operating point: `sp/plasticity` and `sp/stability` were not both measured (no target probe?).")
    if overshoot is not None:
        md.append(f"Overshoot from step {overshoot}: past it, stability was traded for target gain faster "
                  f"than the exchange rate {opc.exchange_rate:g}.")
    md.append("")
    return md


def _metrics_table(run: Run, best: Snapshot | None, rewinds: list[dict[str, Any]], gone: set[int]) -> list[str]:
    """The baseline / final / best table of the reported keys, then a note per rewind."""
    base, final, snaps = run.baseline, run.final, run.snapshots
    if base is None or final is None:
        return []
    keys = sorted(k for k in {k for s in snaps for k in s.metrics} if k.startswith(_REPORT_PREFIXES))
    keys.sort(key=lambda k: (next(i for i, p in enumerate(_REPORT_PREFIXES) if k.startswith(p)), k))
    head = f"| metric | baseline (step {base.step}) | final (step {final.step}{_after_rewind(final)}) |"
    sep = "|---|---:|---:|"
    if best is not None:
        head += f" best (step {best.step}{_after_rewind(best)}) |"
        sep += "---:|"
    md = [head, sep]
    for k in keys:
        row = f"| `{k}` | {_cell(base, k)} | {_cell(final, k)} |"
        if best is not None:
            row += f" {_cell(best, k)} |"
        md.append(row)
    md.append("")
    if any(k.startswith("stderr/") for k in final.metrics):
        md += ["± is one standard error of the change since the baseline, from the same rows scored at both "
               "steps (paired; `stderr/<key>` in the history).", ""]
    for r in rewinds:
        loaded, i = snaps[r["index"]], r["index"] - 1
        breach = f" ({_sp_text(snaps[i])})" if i in gone and _sp_text(snaps[i]) else ""
        what = _sp_text(loaded) or _rewind_target(loaded.extra.get("rewind", {}))
        held = ("the weights training went on from" if loaded.extra.get("rewind", {}).get("then") == "continue"
                else "the weights the run ended with")
        md.append(f"At step {r['step']} rewind {r['number']} replaced the breach measured there{breach}: the "
                  f"record of that step is the state it loaded ({what}): {held}, and what a checkpoint saved at "
                  "that step holds. The breach is in the breaches table and the plots only.")
    if rewinds:
        md.append("")
    return md


def _breaches_section(run: Run) -> list[str]:
    """"Breaches and actions": the table of breaches and the actions that fired."""
    md = ["## Breaches and actions", ""]
    breaches = run.breaches()
    if not run.config.budgets and not breaches:
        md.append("No budgets were configured.")
    elif not breaches:
        md.append("No budget was breached.")
    else:
        md += ["| step | budget | key | value | baseline | reason | action |", "|---:|---|---|---:|---:|---|---|"]
        for b in breaches:
            md.append(f"| {b['step']} | {b.get('budget')} | `{b.get('key')}` | {format_value(b['value'])} | "
                      f"{format_value(b['baseline'])} | {b.get('reason')} | {b.get('action') or '—'} |")
        md.append("")
        fired = run.fired()
        if fired:
            md.append("Actions taken:")
            md.append("")
            for r in fired:
                md.append(f"- step {r['step']}: **{r['action']}** — {r['message']}")
    md.append("")
    return md


def _recommendation_section(run: Run, best: Snapshot | None) -> list[str]:
    """"Recommended checkpoint" (:func:`_recommendation` of the operating record)."""
    lines = _recommendation(run, best) if best is not None else ["None: no operating point."]
    return ["## Recommended checkpoint", "", *lines, ""]


def _plots_section(geometry: bool) -> list[str]:
    """Links to the figures, then the figures."""
    md = ["## Plots", "", "- [Stability-plasticity trajectory](trajectory.png)", "- [Retention](retention.png)"]
    if geometry:
        md.append("- [Activation geometry (Procrustes)](geometry.png)")
    md += ["", "![trajectory](trajectory.png)", "", "![retention](retention.png)", ""]
    if geometry:
        md += ["![geometry](geometry.png)", ""]
    return md


# --------------------------------------------------------------------------- comparison
def compare_table(runs: Sequence[Run]) -> list[dict[str, Any]]:
    """One row per run: final and best target gain, final retention, trainable parameters,
    frontier area and operating point step (NaN/None where not measured).

    Every number comes from the run's current records (:meth:`Run.points`): after a rewind, the
    state it loaded, never the breach before it. ``operating_rewind`` is the number of the rewind
    whose loaded state is the operating point (else ``None``), ``rewinds`` how many rewinds the
    run made.
    """
    rows = []
    for name, run in zip(_names(runs), runs):
        pts = run.points()
        op = operating_point(pts, run.config.operating_point) if pts else None
        rec = run.operating_record()
        rows.append(
            {
                "run": name,
                "final_step": pts[-1].step if pts else None,
                "gain_final": pts[-1].plasticity if pts else math.nan,
                "gain_best": max(p.plasticity for p in pts) if pts else math.nan,
                "gain_operating": op.plasticity if op else math.nan,
                "retention_final": pts[-1].stability if pts else math.nan,
                "trainable_parameters": run.trainable_parameters,
                "frontier_area": frontier_area(pts) if pts else math.nan,
                "operating_step": op.step if op else None,
                "operating_rewind": rec.extra.get("rewind", {}).get("number") if rec and rec.trigger == "rewind"
                else None,
                "rewinds": len(run.rewinds()),
            }
        )
    return rows


def compare_runs(runs: Sequence[Run], out_dir: str | Path) -> Path:
    """Write ``compare.png`` and ``compare.md``; returns the Markdown path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plot_compare(runs, out / "compare.png")
    rows = compare_table(runs)
    md = [
        "# Runs compared",
        "",
        ("| run | target gain (final) | target gain (best) | retention kept (final) | trainable parameters "
         "| frontier area | operating point step |"),
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        tp = f"{r['trainable_parameters']:,}" if r["trainable_parameters"] is not None else "n/a"
        op = str(r["operating_step"]) if r["operating_step"] is not None else "n/a"
        if r["operating_rewind"] is not None:
            op += f" (after rewind {r['operating_rewind']})"
        md.append(f"| {r['run']} | {format_value(r['gain_final'])} | {format_value(r['gain_best'])} "
                  f"| {format_value(r['retention_final'])} | {tp} | {format_value(r['frontier_area'])} | {op} |")
    md += [
        "",
        ("Target gain is `sp/plasticity`, retention kept `sp/stability`, both at the last probe step; best is the "
         "largest gain seen. Frontier area is the area the run's non-dominated (P, S) points dominate above (0, 0)."),
        *(["", ("After a rewind the state it loaded counts for its step (*after rewind n*), not the breach "
                "measured before it there.")] if any(r["rewinds"] for r in rows) else []),
        "",
        "![runs compared](compare.png)",
        "",
    ]
    path = out / COMPARE_FILE
    path.write_text("\n".join(md), encoding="utf-8")
    return path
