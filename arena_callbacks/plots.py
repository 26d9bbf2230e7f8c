"""Every figure of a run: the stability-plasticity trajectory, retention, geometry, runs compared.

Each ``plot_*`` function writes one PNG and returns the data it drew, so the numbers behind a
picture can be checked. Figures are drawn with matplotlib's object API on the Agg canvas; no
global backend or ``pyplot`` state is touched. The live monitor draws its TensorBoard image
with :func:`trajectory_image` from here too, so it needs nothing of the report.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .budget import threshold
from .measurements import superseded as _superseded
from .sp import frontier, operating_point, overshoot_step, trajectory

if TYPE_CHECKING:  # pragma: no cover
    from .config import BudgetConfig, OperatingPointConfig
    from .measurements import Snapshot
    from .runs import Run
    from .sp import SPPoint

__all__ = [
    "budget_threshold",
    "new_figure",
    "plot_compare",
    "plot_geometry",
    "plot_retention",
    "plot_trajectory",
    "rewound_indices",
    "save_figure",
    "superseded_indices",
    "trajectory_figure",
    "trajectory_image",
]

PROCRUSTES = "geometry/procrustes/"


def new_figure(**kw: Any):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(**kw)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")


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
    data = _trajectory_data(pts, held, config, rewound, gone)
    fig = new_figure(figsize=(6.4, 4.8))
    ax = fig.add_subplot()
    if pts:
        _draw_path(ax, pts, rewound, data)
    _draw_choices(ax, pts, held, rewound, data)
    if not pts:
        ax.text(0.5, 0.5, "no sp/plasticity and sp/stability measured", ha="center", va="center",
                transform=ax.transAxes)
    ax.set_xlabel("plasticity P (target gain)")
    ax.set_ylabel("stability S (retention)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if pts:
        ax.legend(fontsize=8)
    return fig, data


def _trajectory_data(
    pts: list[SPPoint], held: list[SPPoint], config: OperatingPointConfig, rewound: Sequence[int], gone: set[int]
) -> dict[str, Any]:
    """What :func:`trajectory_figure` draws: every point; frontier, operating point and overshoot of ``held``."""
    return {
        "steps": [p.step for p in pts],
        "x": [p.plasticity for p in pts],
        "y": [p.stability for p in pts],
        "frontier": list(frontier(held)),
        "operating_point": operating_point(held, config),
        "overshoot_step": overshoot_step(held, config),
        "rewinds": [(pts[i - 1], pts[i]) for i in rewound if 0 < i < len(pts)],
        "superseded": [p for i, p in enumerate(pts) if i in gone],
    }


def _draw_path(ax: Any, pts: list[SPPoint], rewound: Sequence[int], data: dict[str, Any]) -> None:
    """The training segments (cut at each rewind), the rewinds' arrows, the replaced breaches, step labels."""
    cuts = [0, *sorted(i for i in rewound if 0 < i < len(pts)), len(pts)]
    for n, (a, b) in enumerate(itertools.pairwise(cuts)):
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


def _draw_choices(
    ax: Any, pts: list[SPPoint], held: list[SPPoint], rewound: Sequence[int], data: dict[str, Any]
) -> None:
    """The frontier, the operating point and the overshoot step."""
    front, op, over = data["frontier"], data["operating_point"], data["overshoot_step"]
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
    save_figure(fig, Path(path))
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

    Error bars are ±1.96 standard errors (``stderr/<key>``, the paired errors of
    :mod:`arena_callbacks.stats`: 95% two-sided), where the history has them.

    Returns ``{"steps", "retention": {key: values}, "delta_nll": {key: values}, "stderr": {key: values},
    "budgets": [{"label", "key", "kind", "limit", "baseline", "threshold"}], "stop_step",
    "rewinds": [{"step", "index", "number", "mode", "alpha", "restored_step", "then", "label"}]}``,
    where ``index`` is the position of the loaded state's record in ``steps`` and the series
    (the breach is at ``index - 1``), and ``alpha``/``restored_step`` is ``None`` when not that mode.
    """
    steps = [s.step for s in run.snapshots]
    retention = _series(run.snapshots, "retention/")
    lines = _budget_lines(run)
    nll_keys = {ln["key"] for ln in lines if ln["key"].startswith("delta_nll/")}
    delta = {k: v for k, v in _series(run.snapshots, "delta_nll/").items() if k in nll_keys}
    errors = {k[len("stderr/"):]: v for k, v in _series(run.snapshots, "stderr/").items()
              if k[len("stderr/"):] in retention or k[len("stderr/"):] in delta}
    data = {"steps": steps, "retention": retention, "delta_nll": delta, "stderr": errors, "budgets": lines,
            "stop_step": run.stop_step, "rewinds": _rewind_marks(run.snapshots)}
    save_figure(_retention_figure(run.name, data), Path(path))
    return data


def _series(snapshots: Sequence[Snapshot], prefix: str) -> dict[str, list[float]]:
    """``{key: values over the snapshots}`` for every key with ``prefix``, sorted; NaN where absent."""
    keys = sorted({k for s in snapshots for k in s.metrics})
    return {k: [s.metrics.get(k, math.nan) for s in snapshots] for k in keys if k.startswith(prefix)}


def _budget_lines(run: Run) -> list[dict[str, Any]]:
    """The ``budgets`` of :func:`plot_retention`: each budget on a ``retention/`` or ``delta_nll/`` key."""
    base = run.baseline.metrics if run.baseline else {}
    lines = []
    for b in run.config.budgets:
        if not (b.key.startswith("retention/") or b.key.startswith("delta_nll/")):
            continue
        kind, x = b.limit
        bl = base.get(b.key, math.nan)
        lines.append({"label": b.label, "key": b.key, "kind": kind, "limit": x, "baseline": bl,
                      "threshold": budget_threshold(b, bl)})
    return lines


def _rewind_marks(snapshots: Sequence[Snapshot]) -> list[dict[str, Any]]:
    """The ``rewinds`` of :func:`plot_retention`: one per record a rewind loaded."""
    rewinds: list[dict[str, Any]] = []
    for i, s in enumerate(snapshots):
        if s.trigger != "rewind":
            continue
        info = s.extra.get("rewind", {})
        number = info.get("number", len(rewinds) + 1)
        label = f"rewind {number} → {_rewind_target(info)}" + (", then stop" if info.get("then") == "stop" else "")
        rewinds.append({"step": s.step, "index": i, "number": number, "mode": info.get("mode"),
                        "alpha": info.get("alpha"), "restored_step": info.get("restored_step"),
                        "then": info.get("then"), "label": label})
    return rewinds


def _retention_figure(name: str, data: dict[str, Any]) -> Any:
    """The retention panel, and the ΔNLL panel when a budget watches a ``delta_nll/`` key."""
    retention, delta = data["retention"], data["delta_nll"]
    stop, rewinds = data["stop_step"], data["rewinds"]
    stopped_by_rewind = any(r["step"] == stop and r["then"] == "stop" for r in rewinds)
    plain_stop = None if stopped_by_rewind else stop
    panels = [("retention/", retention, "retention")] + ([("delta_nll/", delta, "ΔNLL (nats)")] if delta else [])
    fig = new_figure(figsize=(7.2, 3.6 * len(panels)))
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    for ax, (prefix, ser, ylabel) in zip(axes, panels):
        _draw_panel(ax, prefix, ser, data, plain_stop)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ser or stop is not None or rewinds:
            ax.legend(fontsize=7)
    if not retention:
        axes[0].text(0.5, 0.5, "no retention/* keys", ha="center", va="center", transform=axes[0].transAxes)
    axes[-1].set_xlabel("step")
    axes[0].set_title(f"{name}: retention per capability")
    return fig


def _draw_panel(
    ax: Any, prefix: str, ser: dict[str, list[float]], data: dict[str, Any], plain_stop: int | None
) -> None:
    """One panel's series (loaded points circled), its budgets' thresholds, the rewinds and a plain stop."""
    steps, rewinds = data["steps"], data["rewinds"]
    for k, v in ser.items():
        se = data.get("stderr", {}).get(k)
        if se is not None and any(math.isfinite(e) and e > 0 for e in se):
            ax.errorbar(steps, v, yerr=[1.96 * e if math.isfinite(e) else 0.0 for e in se], fmt="-o", ms=3,
                        capsize=2, elinewidth=0.8, label=f"{k} (±1.96 se)")
        else:
            ax.plot(steps, v, "-o", ms=3, label=k)
        for r in rewinds:
            ax.plot([r["step"]], [v[r["index"]]], "o", ms=8, mfc="none", mec="tab:red", mew=1.5)
    for ln in data["budgets"]:
        if ln["key"].startswith(prefix) and math.isfinite(ln["threshold"]):
            ax.axhline(ln["threshold"], ls="--", lw=1, color="tab:red", alpha=0.8)
            ax.annotate(f"budget {ln['label']} ({ln['kind']} {ln['limit']:g})", (0.01, ln["threshold"]),
                        xycoords=("axes fraction", "data"), fontsize=7, color="tab:red", va="bottom")
    for r in rewinds:
        ax.axvline(r["step"], color="tab:red", lw=1.2, ls="-.", label=f"{r['label']} (step {r['step']})")
    if plain_stop is not None:
        ax.axvline(plain_stop, color="black", lw=1.2, ls=":", label=f"stop (step {plain_stop})")


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

    fig = new_figure(figsize=(max(5.0, 0.5 * len(steps) + 3), max(2.5, 0.4 * len(modules) + 1.5)))
    ax = fig.add_subplot()
    im = ax.imshow(np.ma.masked_invalid(np.array(matrix, dtype=float)), aspect="auto", cmap="viridis",
                   interpolation="nearest")
    ax.set_xticks(range(len(steps)), [str(s) for s in steps], fontsize=7, rotation=90 if len(steps) > 12 else 0)
    ax.set_yticks(range(len(modules)), modules, fontsize=7)
    ax.set_xlabel("step")
    ax.set_title(f"{run.name}: Procrustes distance from the pretrained activations")
    fig.colorbar(im, ax=ax, label="procrustes")
    save_figure(fig, Path(path))
    return {"modules": modules, "steps": steps, "matrix": matrix}


# --------------------------------------------------------------------------- comparison
def _names(runs: Sequence[Run]) -> list[str]:
    names = [r.name for r in runs]
    return [n if names.count(n) == 1 else f"{n} ({i + 1})" for i, n in enumerate(names)]


def plot_compare(runs: Sequence[Run], path: str | Path) -> dict[str, Any]:
    """All runs on one (P, S) plane with their frontiers, over their current records (after a rewind
    the state it loaded, not the breach). Returns ``{name: {"x", "y", "steps", "frontier"}}``."""
    fig = new_figure(figsize=(7.2, 5.4))
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
    save_figure(fig, Path(path))
    return data
