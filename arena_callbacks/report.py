"""Plots and a Markdown report of a saved run, and a comparison of several runs.

Every ``plot_*`` function writes one PNG and returns the data it drew, so the numbers behind a
picture can be checked. Figures are drawn with matplotlib's object API on the Agg canvas; no
global backend or ``pyplot`` state is touched.

Example:
    >>> from arena_callbacks.runs import load_run
    >>> write_report(load_run("out"), "out/report")   # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .budget import threshold
from .measurements import superseded as _superseded
from .runs import ADAPTER_FILES
from .sp import frontier, frontier_area, operating_point, overshoot_step, trajectory

if TYPE_CHECKING:  # pragma: no cover
    from .config import BudgetConfig, OperatingPointConfig
    from .measurements import Snapshot
    from .runs import Run
    from .sp import SPPoint

__all__ = [
    "budget_threshold",
    "compare_runs",
    "compare_table",
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


def _figure(**kw: Any):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(**kw)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")


def _fmt(v: float | None, digits: int = 4) -> str:
    if v is None:
        return "n/a"
    v = float(v)
    if not math.isfinite(v):
        return str(v)
    s = f"{v:.{digits}f}"
    return s[1:] if s.startswith("-") and float(s) == 0 else s  # no "-0.0000"


# --------------------------------------------------------------------------- trajectory
def trajectory_figure(
    points: Sequence[SPPoint], config: OperatingPointConfig, title: str, rewound: Sequence[int] = (),
    superseded: Sequence[int] = (),
) -> tuple[Any, dict[str, Any]]:
    """The (P, S) figure for ``points`` and the data it shows (see :func:`plot_trajectory`).

    ``rewound``: indices of points that a rewind loaded; the move into each is drawn as a red
    dashed arrow from the point before it (the breach), not as a training segment.
    ``superseded``: indices of points a rewind replaced (:func:`superseded_indices`): drawn,
    marked with a red ×, but left out of the frontier, the operating point and the overshoot,
    since no model holds that state any more.
    """
    pts = list(points)
    gone = set(superseded)
    held = [p for i, p in enumerate(pts) if i not in gone]
    front = list(frontier(held))
    op = operating_point(held, config)
    over = overshoot_step(held, config)
    data = {
        "steps": [p.step for p in pts],
        "x": [p.plasticity for p in pts],
        "y": [p.stability for p in pts],
        "frontier": front,
        "operating_point": op,
        "overshoot_step": over,
        "rewinds": [(pts[i - 1], pts[i]) for i in rewound if 0 < i < len(pts)],
        "superseded": [p for i, p in enumerate(pts) if i in gone],
    }
    fig = _figure(figsize=(6.4, 4.8))
    ax = fig.add_subplot()
    if pts:
        cuts = [0, *sorted(i for i in rewound if 0 < i < len(pts)), len(pts)]
        for n, (a, b) in enumerate(zip(cuts, cuts[1:])):
            seg = pts[a:b]
            ax.plot([p.plasticity for p in seg], [p.stability for p in seg], "-o", color="tab:blue", alpha=0.7,
                    label="trajectory" if n == 0 else None)
        for k, (src, dst) in enumerate(data["rewinds"]):
            ax.annotate("", xy=(dst.plasticity, dst.stability), xytext=(src.plasticity, src.stability),
                        arrowprops={"arrowstyle": "->", "color": "tab:red", "ls": "--", "lw": 1.5})
            ax.plot([], [], "--", color="tab:red", label="rewind" if k == 0 else None)
        if data["superseded"]:
            ax.plot([p.plasticity for p in data["superseded"]], [p.stability for p in data["superseded"]], "x",
                    ms=9, color="tab:red", label="breach (replaced by the rewind)")
        for p in pts:
            ax.annotate(str(p.step), (p.plasticity, p.stability), textcoords="offset points", xytext=(4, 4), fontsize=7)
    if front:
        ax.step([p.plasticity for p in front], [p.stability for p in front], where="pre", color="tab:green",
                lw=2, alpha=0.8, label="frontier")
    if op is not None:
        after = ", after rewind" if any(pts[i] is op for i in rewound if 0 <= i < len(pts)) else ""
        ax.plot([op.plasticity], [op.stability], "*", ms=16, color="tab:red",
                label=f"operating point (step {op.step}{after})")
    if over is not None:
        o = next((p for p in held if p.step == over), None)
        if o is not None:
            ax.plot([o.plasticity], [o.stability], "x", ms=10, color="black", label=f"overshoot after step {over}")
    if not pts:
        ax.text(0.5, 0.5, "no sp/plasticity and sp/stability measured", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("plasticity P (target gain)")
    ax.set_ylabel("stability S (retention)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if pts:
        ax.legend(fontsize=8)
    return fig, data


def _on_plane(snapshots: Sequence[Snapshot]) -> list[int]:
    """Indices of the snapshots with a finite (P, S): the ones :func:`~arena_callbacks.sp.trajectory` keeps."""
    return [i for i, s in enumerate(snapshots) if trajectory([s])]


def rewound_indices(snapshots: Sequence[Snapshot]) -> list[int]:
    """Indices, among the snapshots with a finite (P, S), of those a rewind loaded."""
    return [n for n, i in enumerate(_on_plane(snapshots)) if snapshots[i].trigger == "rewind"]


def superseded_indices(snapshots: Sequence[Snapshot]) -> list[int]:
    """Indices, among the snapshots with a finite (P, S), of those a rewind superseded
    (:func:`arena_callbacks.measurements.superseded`): the ``superseded`` of :func:`trajectory_figure`."""
    gone = set(_superseded(snapshots))
    return [n for n, i in enumerate(_on_plane(snapshots)) if i in gone]


def trajectory_image(points: Sequence[SPPoint], config: OperatingPointConfig, title: str,
                     rewound: Sequence[int] = (), superseded: Sequence[int] = ()) -> Any:
    """The trajectory figure as an ``H × W × 3`` uint8 array (for TensorBoard's image tab)."""
    import numpy as np

    fig, _ = trajectory_figure(points, config, title, rewound, superseded)
    fig.set_dpi(80)
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def plot_trajectory(run: Run, path: str | Path) -> dict[str, Any]:
    """The (P, S) path with step labels, its frontier and the operating point.

    Every record is drawn, a breach a rewind replaced too (marked, with the rewind's arrow out of
    it); the frontier, operating point and overshoot count only the current records.

    Returns ``{"steps", "x", "y", "frontier": [SPPoint], "operating_point": SPPoint | None,
    "overshoot_step": int | None, "rewinds": [(breach, loaded)], "superseded": [SPPoint]}``.
    """
    fig, data = trajectory_figure(run.points(include_superseded=True), run.config.operating_point,
                                  f"{run.name}: stability-plasticity trajectory", rewound_indices(run.snapshots),
                                  superseded_indices(run.snapshots))
    _save(fig, Path(path))
    return data


# --------------------------------------------------------------------------- retention
def budget_threshold(budget: BudgetConfig, baseline: float) -> float:
    """The budget's limit in the watched key's own units (:func:`arena_callbacks.budget.threshold`)."""
    return threshold(budget, baseline)


def _rewind_target(info: dict[str, Any]) -> str:
    """What a rewind loaded, in words: ``α = 0.5`` (``layer-wise`` noted) or ``step 5``."""
    if info.get("alpha") is not None:
        return f"α = {float(info['alpha']):g}" + (" (layer-wise)" if info.get("mode") == "layerwise" else "")
    return f"step {info.get('restored_step')}"


def plot_retention(run: Run, path: str | Path) -> dict[str, Any]:
    """Every ``retention/<probe>`` over steps (and ``delta_nll/<probe>`` in a second panel when a
    budget watches one), budget lines, the stop step and the rewinds.

    The series hold every record in order, so at a rewind step they go through the breach and
    then the value of the state the rewind loaded: a vertical jump at that step, which is what
    happened to the model (its forgetting was undone there). The loaded point is circled in
    red, and the step gets a red dash-dot line labelled with what was loaded (``rewind 1 → α =
    0.5``, ``rewind 1 → step 5``; ``, then stop`` when training stopped there), distinct from
    the black dotted line of a plain ``stop``, which is drawn only where no rewind stopped.

    Returns ``{"steps", "retention": {key: values}, "delta_nll": {key: values},
    "budgets": [{"label", "key", "kind", "limit", "baseline", "threshold"}], "stop_step",
    "rewinds": [{"step", "index", "number", "mode", "alpha", "restored_step", "then", "label"}]}``,
    where ``index`` is the position of the loaded state's record in ``steps`` and the series
    (the breach is at ``index - 1``), and ``alpha``/``restored_step`` is ``None`` when not that mode.
    """
    steps = [s.step for s in run.snapshots]
    keys = sorted({k for s in run.snapshots for k in s.metrics})

    def series(prefix: str) -> dict[str, list[float]]:
        return {k: [s.metrics.get(k, math.nan) for s in run.snapshots] for k in keys if k.startswith(prefix)}

    retention = series("retention/")
    base = run.baseline.metrics if run.baseline else {}
    lines = []
    for b in run.config.budgets:
        if not (b.key.startswith("retention/") or b.key.startswith("delta_nll/")):
            continue
        kind, x = b.limit
        bl = base.get(b.key, math.nan)
        lines.append({"label": b.label, "key": b.key, "kind": kind, "limit": x, "baseline": bl,
                      "threshold": budget_threshold(b, bl)})
    nll_keys = {ln["key"] for ln in lines if ln["key"].startswith("delta_nll/")}
    delta = {k: v for k, v in series("delta_nll/").items() if k in nll_keys}
    stop = run.stop_step
    rewinds = []
    for i, s in enumerate(run.snapshots):
        if s.trigger != "rewind":
            continue
        info = s.extra.get("rewind", {})
        number = info.get("number", len(rewinds) + 1)
        label = f"rewind {number} → {_rewind_target(info)}" + (", then stop" if info.get("then") == "stop" else "")
        rewinds.append({"step": s.step, "index": i, "number": number, "mode": info.get("mode"),
                        "alpha": info.get("alpha"), "restored_step": info.get("restored_step"),
                        "then": info.get("then"), "label": label})
    stopped_by_rewind = any(r["step"] == stop and r["then"] == "stop" for r in rewinds)
    plain_stop = None if stopped_by_rewind else stop
    data = {"steps": steps, "retention": retention, "delta_nll": delta, "budgets": lines, "stop_step": stop,
            "rewinds": rewinds}

    panels = [("retention/", retention, "retention")] + ([("delta_nll/", delta, "ΔNLL (nats)")] if delta else [])
    fig = _figure(figsize=(7.2, 3.6 * len(panels)))
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    for ax, (prefix, ser, ylabel) in zip(axes, panels):
        for k, v in ser.items():
            ax.plot(steps, v, "-o", ms=3, label=k)
            for r in rewinds:
                ax.plot([r["step"]], [v[r["index"]]], "o", ms=8, mfc="none", mec="tab:red", mew=1.5)
        for ln in lines:
            if ln["key"].startswith(prefix) and math.isfinite(ln["threshold"]):
                ax.axhline(ln["threshold"], ls="--", lw=1, color="tab:red", alpha=0.8)
                ax.annotate(f"budget {ln['label']} ({ln['kind']} {ln['limit']:g})", (0.01, ln["threshold"]),
                            xycoords=("axes fraction", "data"), fontsize=7, color="tab:red", va="bottom")
        for r in rewinds:
            ax.axvline(r["step"], color="tab:red", lw=1.2, ls="-.", label=f"{r['label']} (step {r['step']})")
        if plain_stop is not None:
            ax.axvline(plain_stop, color="black", lw=1.2, ls=":", label=f"stop (step {plain_stop})")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ser or stop is not None or rewinds:
            ax.legend(fontsize=7)
    if not retention:
        axes[0].text(0.5, 0.5, "no retention/* keys", ha="center", va="center", transform=axes[0].transAxes)
    axes[-1].set_xlabel("step")
    axes[0].set_title(f"{run.name}: retention per capability")
    _save(fig, Path(path))
    return data


# --------------------------------------------------------------------------- geometry
def plot_geometry(run: Run, path: str | Path) -> dict[str, Any] | None:
    """Heatmap module × step of ``geometry/procrustes/<module>``; ``None`` (no file) when absent.

    Returns ``{"modules", "steps", "matrix"}`` with ``matrix[i][j]`` the value of module ``i`` at
    ``steps[j]`` (NaN where not measured).
    """
    modules = sorted({k[len(PROCRUSTES):] for s in run.snapshots for k in s.metrics if k.startswith(PROCRUSTES)})
    if not modules:
        return None
    snaps = [s for s in run.snapshots if any(k.startswith(PROCRUSTES) for k in s.metrics)]
    steps = [s.step for s in snaps]
    matrix = [[s.metrics.get(PROCRUSTES + m, math.nan) for s in snaps] for m in modules]
    import numpy as np

    fig = _figure(figsize=(max(5.0, 0.5 * len(steps) + 3), max(2.5, 0.4 * len(modules) + 1.5)))
    ax = fig.add_subplot()
    im = ax.imshow(np.ma.masked_invalid(np.array(matrix, dtype=float)), aspect="auto", cmap="viridis",
                   interpolation="nearest")
    ax.set_xticks(range(len(steps)), [str(s) for s in steps], fontsize=7, rotation=90 if len(steps) > 12 else 0)
    ax.set_yticks(range(len(modules)), modules, fontsize=7)
    ax.set_xlabel("step")
    ax.set_title(f"{run.name}: Procrustes distance from the pretrained activations")
    fig.colorbar(im, ax=ax, label="procrustes")
    _save(fig, Path(path))
    return {"modules": modules, "steps": steps, "matrix": matrix}


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
    return ", ".join(f"{name} = {_fmt(snap.metrics[key])}" for name, key in
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

    snaps = run.snapshots
    current = run.current_snapshots()
    gone = set(_superseded(snaps))
    base = run.baseline
    final = run.final
    best = run.operating_record()  # the same point as traj["operating_point"], with its record
    op: SPPoint | None = trajectory([best])[0] if best is not None else None
    opc = run.config.operating_point
    rule = (f"max of {opc.weight:g}·P + S" if opc.rule == "weighted" else f"best P with S ≥ {opc.min_stability:g}")

    md: list[str] = [f"# Forgetting report: {run.name}", ""]
    md.append(f"- Run folder: `{run.path}`")
    md.append(f"- Probe steps: {len(current)}"
              + (f" (baseline at step {base.step}, last at step {final.step})" if base and final else "")
              + (f"; {len(gone)} more record{'s' * (len(gone) != 1)} replaced by a rewind" if gone else ""))
    if run.summary.get("probes"):
        md.append("- Probes: " + ", ".join(f"`{n}` ({k})" for n, k in run.summary["probes"].items()))
    md.append(f"- Trainable parameters: {run.trainable_parameters if run.trainable_parameters is not None else 'n/a'}")
    if run.stop_step is not None:
        md.append(f"- **Stopped at step {run.stop_step}**: {run.stop_message or ''}")
    else:
        md.append("- Not stopped by a budget" + ("" if run.summary else " (no summary.json: the run may still be going)"))
    for r in ret["rewinds"]:
        info = snaps[r["index"]].extra.get("rewind", {})
        pairs = [(info.get(w) or {}) for w in ("before", "after")]
        moved = "; ".join(f"{name} {_fmt(pairs[0].get(key), 3)} → {_fmt(pairs[1].get(key), 3)}"
                          for name, key in (("P", "plasticity"), ("S", "stability")))
        md.append(f"- Rewind {r['number']} at step {r['step']} ({r['mode']}): loaded {_rewind_target(info)} ({moved}); "
                  f"then {r['then']}.")
    md.append("")

    md += ["## Baseline, final and best point", ""]
    if op is not None and best is not None:
        info = best.extra.get("rewind", {})
        where = f"step {op.step}" + (f" after rewind {info.get('number', '?')} (the state it loaded, "
                                     f"{_rewind_target(info)})" if best.trigger == "rewind" else "")
        md.append(f"Best (operating) point: {where}, P = {_fmt(op.plasticity)}, S = {_fmt(op.stability)} "
                  f"(rule: {rule}).")
    else:
        md.append("No operating point: `sp/plasticity` and `sp/stability` were not both measured (no target probe?).")
    if traj["overshoot_step"] is not None:
        md.append(f"Overshoot from step {traj['overshoot_step']}: past it, stability was traded for target gain faster "
                  f"than the exchange rate {opc.exchange_rate:g}.")
    md.append("")
    if base is not None and final is not None:
        keys = sorted(k for k in {k for s in snaps for k in s.metrics} if k.startswith(_REPORT_PREFIXES))
        keys.sort(key=lambda k: (next(i for i, p in enumerate(_REPORT_PREFIXES) if k.startswith(p)), k))
        head = f"| metric | baseline (step {base.step}) | final (step {final.step}{_after_rewind(final)}) |"
        sep = "|---|---:|---:|"
        if best is not None:
            head += f" best (step {best.step}{_after_rewind(best)}) |"
            sep += "---:|"
        md += [head, sep]
        for k in keys:
            row = f"| `{k}` | {_fmt(base.metrics.get(k))} | {_fmt(final.metrics.get(k))} |"
            if best is not None:
                row += f" {_fmt(best.metrics.get(k))} |"
            md.append(row)
        md.append("")
        for r in ret["rewinds"]:
            loaded, i = snaps[r["index"]], r["index"] - 1
            breach = f" ({_sp_text(snaps[i])})" if i in gone and _sp_text(snaps[i]) else ""
            what = _sp_text(loaded) or _rewind_target(loaded.extra.get("rewind", {}))
            md.append(f"At step {r['step']} rewind {r['number']} replaced the breach measured there{breach}: the "
                      f"record of that step is the state it loaded ({what}): the weights the model went on from, and "
                      "what a checkpoint saved at that step holds. The breach is in the breaches table and the plots "
                      "only.")
        if ret["rewinds"]:
            md.append("")

    md += ["## Breaches and actions", ""]
    breaches = run.breaches()
    if not run.config.budgets and not breaches:
        md.append("No budgets were configured.")
    elif not breaches:
        md.append("No budget was breached.")
    else:
        md += ["| step | budget | key | value | baseline | reason | action |", "|---:|---|---|---:|---:|---|---|"]
        for b in breaches:
            md.append(f"| {b['step']} | {b.get('budget')} | `{b.get('key')}` | {_fmt(b['value'])} | "
                      f"{_fmt(b['baseline'])} | {b.get('reason')} | {b.get('action') or '—'} |")
        md.append("")
        fired = run.fired()
        if fired:
            md.append("Actions taken:")
            md.append("")
            for r in fired:
                md.append(f"- step {r['step']}: **{r['action']}** — {r['message']}")
    md.append("")

    md += ["## Recommended checkpoint", ""]
    if best is None:
        md.append("None: no operating point.")
    else:
        md += _recommendation(run, best)
    md.append("")

    md += ["## Plots", "", "- [Stability-plasticity trajectory](trajectory.png)", "- [Retention](retention.png)"]
    if geom is not None:
        md.append("- [Activation geometry (Procrustes)](geometry.png)")
    md += ["", "![trajectory](trajectory.png)", "", "![retention](retention.png)", ""]
    if geom is not None:
        md += ["![geometry](geometry.png)", ""]
    path = out / REPORT_FILE
    path.write_text("\n".join(md), encoding="utf-8")
    return path


# --------------------------------------------------------------------------- comparison
def _names(runs: Sequence[Run]) -> list[str]:
    names = [r.name for r in runs]
    return [n if names.count(n) == 1 else f"{n} ({i + 1})" for i, n in enumerate(names)]


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


def plot_compare(runs: Sequence[Run], path: str | Path) -> dict[str, Any]:
    """All runs on one (P, S) plane with their frontiers, over their current records (after a rewind
    the state it loaded, not the breach). Returns ``{name: {"x", "y", "steps", "frontier"}}``."""
    fig = _figure(figsize=(7.2, 5.4))
    ax = fig.add_subplot()
    data: dict[str, Any] = {}
    colors = [f"C{i % 10}" for i in range(len(runs))]
    for name, run, c in zip(_names(runs), runs, colors):
        pts = run.points()
        front = list(frontier(pts))
        data[name] = {"steps": [p.step for p in pts], "x": [p.plasticity for p in pts],
                      "y": [p.stability for p in pts], "frontier": front}
        if pts:
            ax.plot(data[name]["x"], data[name]["y"], "o-", ms=3, lw=0.8, alpha=0.5, color=c, label=name)
        if front:
            ax.step([p.plasticity for p in front], [p.stability for p in front], where="pre", lw=2, color=c)
    ax.set_xlabel("plasticity P (target gain)")
    ax.set_ylabel("stability S (retention)")
    ax.set_title("stability-plasticity: runs compared (thick: frontiers)")
    ax.grid(alpha=0.3)
    if any(d["x"] for d in data.values()):
        ax.legend(fontsize=8)
    _save(fig, Path(path))
    return data


def compare_runs(runs: Sequence[Run], out_dir: str | Path) -> Path:
    """Write ``compare.png`` and ``compare.md``; returns the Markdown path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plot_compare(runs, out / "compare.png")
    rows = compare_table(runs)
    md = [
        "# Runs compared",
        "",
        "| run | target gain (final) | target gain (best) | retention kept (final) | trainable parameters "
        "| frontier area | operating point step |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        tp = f"{r['trainable_parameters']:,}" if r["trainable_parameters"] is not None else "n/a"
        op = str(r["operating_step"]) if r["operating_step"] is not None else "n/a"
        if r["operating_rewind"] is not None:
            op += f" (after rewind {r['operating_rewind']})"
        md.append(f"| {r['run']} | {_fmt(r['gain_final'])} | {_fmt(r['gain_best'])} | {_fmt(r['retention_final'])} "
                  f"| {tp} | {_fmt(r['frontier_area'])} | {op} |")
    md += [
        "",
        "Target gain is `sp/plasticity`, retention kept `sp/stability`, both at the last probe step; best is the "
        "largest gain seen. Frontier area is the area the run's non-dominated (P, S) points dominate above (0, 0).",
        *(["", ("After a rewind the state it loaded counts for its step (*after rewind n*), not the breach "
                "measured before it there.")] if any(r["rewinds"] for r in rows) else []),
        "",
        "![runs compared](compare.png)",
        "",
    ]
    path = out / COMPARE_FILE
    path.write_text("\n".join(md), encoding="utf-8")
    return path
