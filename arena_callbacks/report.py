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
from .sp import frontier, frontier_area, operating_point, overshoot_step

if TYPE_CHECKING:  # pragma: no cover
    from .config import BudgetConfig, OperatingPointConfig
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
    "trajectory_figure",
    "trajectory_image",
    "recommend_checkpoint",
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
    points: Sequence[SPPoint], config: OperatingPointConfig, title: str, rewound: Sequence[int] = ()
) -> tuple[Any, dict[str, Any]]:
    """The (P, S) figure for ``points`` and the data it shows (see :func:`plot_trajectory`).

    ``rewound``: indices of points that a rewind loaded; the move into each is drawn as a red
    dashed arrow from the point before it (the breach), not as a training segment.
    """
    pts = list(points)
    front = list(frontier(pts))
    op = operating_point(pts, config)
    over = overshoot_step(pts, config)
    data = {
        "steps": [p.step for p in pts],
        "x": [p.plasticity for p in pts],
        "y": [p.stability for p in pts],
        "frontier": front,
        "operating_point": op,
        "overshoot_step": over,
        "rewinds": [(pts[i - 1], pts[i]) for i in rewound if 0 < i < len(pts)],
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
        for p in pts:
            ax.annotate(str(p.step), (p.plasticity, p.stability), textcoords="offset points", xytext=(4, 4), fontsize=7)
    if front:
        ax.step([p.plasticity for p in front], [p.stability for p in front], where="pre", color="tab:green",
                lw=2, alpha=0.8, label="frontier")
    if op is not None:
        ax.plot([op.plasticity], [op.stability], "*", ms=16, color="tab:red", label=f"operating point (step {op.step})")
    if over is not None:
        o = next((p for p in pts if p.step == over), None)
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


def rewound_indices(snapshots: Sequence[Any]) -> list[int]:
    """Indices, among the snapshots with a finite (P, S), of those a rewind loaded."""
    keys = ("sp/plasticity", "sp/stability")
    snaps = [s for s in snapshots if all(k in s.metrics and math.isfinite(s.metrics[k]) for k in keys)]
    return [i for i, s in enumerate(snaps) if s.trigger == "rewind"]


def trajectory_image(points: Sequence[SPPoint], config: OperatingPointConfig, title: str,
                     rewound: Sequence[int] = ()) -> Any:
    """The trajectory figure as an ``H × W × 3`` uint8 array (for TensorBoard's image tab)."""
    import numpy as np

    fig, _ = trajectory_figure(points, config, title, rewound)
    fig.set_dpi(80)
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def plot_trajectory(run: Run, path: str | Path) -> dict[str, Any]:
    """The (P, S) path with step labels, its frontier and the operating point.

    Returns ``{"steps", "x", "y", "frontier": [SPPoint], "operating_point": SPPoint | None,
    "overshoot_step": int | None}``.
    """
    rewound = rewound_indices(run.snapshots)
    fig, data = trajectory_figure(run.points(), run.config.operating_point,
                                  f"{run.name}: stability-plasticity trajectory", rewound)
    _save(fig, Path(path))
    return data


# --------------------------------------------------------------------------- retention
def budget_threshold(budget: BudgetConfig, baseline: float) -> float:
    """The budget's limit in the watched key's own units (:func:`arena_callbacks.budget.threshold`)."""
    return threshold(budget, baseline)


def plot_retention(run: Run, path: str | Path) -> dict[str, Any]:
    """Every ``retention/<probe>`` over steps (and ``delta_nll/<probe>`` in a second panel when a
    budget watches one), budget lines, and the stop step.

    Returns ``{"steps", "retention": {key: values}, "delta_nll": {key: values},
    "budgets": [{"label", "key", "kind", "limit", "baseline", "threshold"}], "stop_step"}``.
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
    data = {"steps": steps, "retention": retention, "delta_nll": delta, "budgets": lines, "stop_step": stop}

    panels = [("retention/", retention, "retention")] + ([("delta_nll/", delta, "ΔNLL (nats)")] if delta else [])
    fig = _figure(figsize=(7.2, 3.6 * len(panels)))
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    for ax, (prefix, ser, ylabel) in zip(axes, panels):
        for k, v in ser.items():
            ax.plot(steps, v, "-o", ms=3, label=k)
        for ln in lines:
            if ln["key"].startswith(prefix) and math.isfinite(ln["threshold"]):
                ax.axhline(ln["threshold"], ls="--", lw=1, color="tab:red", alpha=0.8)
                ax.annotate(f"budget {ln['label']} ({ln['kind']} {ln['limit']:g})", (0.01, ln["threshold"]),
                            xycoords=("axes fraction", "data"), fontsize=7, color="tab:red", va="bottom")
        if stop is not None:
            ax.axvline(stop, color="black", lw=1.2, ls=":", label=f"stop (step {stop})")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ser or stop is not None:
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


_REPORT_PREFIXES = ("sp/", "target/", "retention/", "delta_nll/", "score/", "nll/")


def write_report(run: Run, out_dir: str | Path) -> Path:
    """Write ``trajectory.png``, ``retention.png``, ``geometry.png`` (when measured) and ``report.md``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    traj = plot_trajectory(run, out / "trajectory.png")
    ret = plot_retention(run, out / "retention.png")
    geom = plot_geometry(run, out / "geometry.png")
    if geom is None and (out / "geometry.png").exists():
        (out / "geometry.png").unlink()  # stale from an earlier report

    op: SPPoint | None = traj["operating_point"]
    snaps = run.snapshots
    base = snaps[0] if snaps else None
    final = snaps[-1] if snaps else None
    best = next((s for s in snaps if op is not None and s.step == op.step), None)
    opc = run.config.operating_point
    rule = (f"max of {opc.weight:g}·P + S" if opc.rule == "weighted" else f"best P with S ≥ {opc.min_stability:g}")

    md: list[str] = [f"# Forgetting report: {run.name}", ""]
    md.append(f"- Run folder: `{run.path}`")
    md.append(f"- Probe steps: {len(snaps)}" + (f" (baseline at step {base.step}, last at step {final.step})" if snaps else ""))
    if run.summary.get("probes"):
        md.append("- Probes: " + ", ".join(f"`{n}` ({k})" for n, k in run.summary["probes"].items()))
    md.append(f"- Trainable parameters: {run.trainable_parameters if run.trainable_parameters is not None else 'n/a'}")
    if run.stop_step is not None:
        md.append(f"- **Stopped at step {run.stop_step}**: {run.stop_message or ''}")
    else:
        md.append("- Not stopped by a budget" + ("" if run.summary else " (no summary.json: the run may still be going)"))
    md.append("")

    md += ["## Baseline, final and best point", ""]
    if op is not None:
        md.append(f"Best (operating) point: step {op.step}, P = {_fmt(op.plasticity)}, S = {_fmt(op.stability)} "
                  f"(rule: {rule}).")
    else:
        md.append("No operating point: `sp/plasticity` and `sp/stability` were not both measured (no target probe?).")
    if traj["overshoot_step"] is not None:
        md.append(f"Overshoot from step {traj['overshoot_step']}: past it, stability was traded for target gain faster "
                  f"than the exchange rate {opc.exchange_rate:g}.")
    md.append("")
    if snaps:
        keys = sorted(k for k in {k for s in snaps for k in s.metrics} if k.startswith(_REPORT_PREFIXES))
        keys.sort(key=lambda k: (next(i for i, p in enumerate(_REPORT_PREFIXES) if k.startswith(p)), k))
        head = f"| metric | baseline (step {base.step}) | final (step {final.step}) |"
        sep = "|---|---:|---:|"
        if best is not None:
            head += f" best (step {best.step}) |"
            sep += "---:|"
        md += [head, sep]
        for k in keys:
            row = f"| `{k}` | {_fmt(base.metrics.get(k))} | {_fmt(final.metrics.get(k))} |"
            if best is not None:
                row += f" {_fmt(best.metrics.get(k))} |"
            md.append(row)
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
    if op is None:
        md.append("None: no operating point.")
    else:
        ckpt = recommend_checkpoint(run, op.step)
        saved = run.checkpoints()
        if ckpt is not None:
            md.append(f"Step {op.step} (the operating point); closest saved checkpoint at or before it: "
                      f"`{ckpt.name}` (`{ckpt}`).")
        elif saved:
            md.append(f"Step {op.step} (the operating point); no checkpoint was saved at or before it "
                      f"(earliest saved: `{saved[0][1].name}`).")
        else:
            md.append(f"Step {op.step} (the operating point); no `checkpoint-<step>` folders found"
                      + (f" in `{run.output_dir}`." if run.output_dir else "."))
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
    frontier area and operating point step (NaN/None where not measured)."""
    rows = []
    for name, run in zip(_names(runs), runs):
        pts = run.points()
        op = operating_point(pts, run.config.operating_point) if pts else None
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
            }
        )
    return rows


def plot_compare(runs: Sequence[Run], path: str | Path) -> dict[str, Any]:
    """All runs on one (P, S) plane with their frontiers. Returns ``{name: {"x", "y", "steps", "frontier"}}``."""
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
        md.append(f"| {r['run']} | {_fmt(r['gain_final'])} | {_fmt(r['gain_best'])} | {_fmt(r['retention_final'])} "
                  f"| {tp} | {_fmt(r['frontier_area'])} | {op} |")
    md += [
        "",
        "Target gain is `sp/plasticity`, retention kept `sp/stability`, both at the last probe step; best is the "
        "largest gain seen. Frontier area is the area the run's non-dominated (P, S) points dominate above (0, 0).",
        "",
        "![runs compared](compare.png)",
        "",
    ]
    path = out / COMPARE_FILE
    path.write_text("\n".join(md), encoding="utf-8")
    return path
