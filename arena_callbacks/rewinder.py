"""The rewinder: the states kept for rewinds, and the rewind itself.

It keeps the best in-budget trainable state seen so far and, for path rewinds, the step-0 state
(:class:`~arena_callbacks.rewind.Slot`: CPU memory or a file). A rewind loads the best kept
state (``checkpoint``), or probes points ``α`` on the path from the pretrained weights
(``path``; ``layerwise``: deeper layers kept longer) and loads the one the operating-point rule
picks among those within budget. Measuring a candidate is the caller's job (a ``measure``
function), so the rewinder knows neither the probes nor the training loop; continuing after a
rewind takes the loop's optimizer and learning-rate scheduler as arguments.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .budget import Decision, in_budget
from .config import MonitorConfig
from .distributed import DistContext
from .layout import CheckpointFiles
from .measurements import Snapshot
from .probes import ProbeFailure
from .resources import ranks_per_node, rewind_plan
from .rewind import (
    Slot,
    alphas_for,
    capture_state,
    check_state,
    interpolate,
    is_finite_state,
    load_state,
    lora_b_names,
    next_alpha,
    path_rules,
    trainable_parameters,
)
from .shards import check_writable, local_bytes, local_shapes
from .sp import better_point, choose

__all__ = ["Rewinder", "rewind_message", "sp_pair"]

logger = logging.getLogger("arena_callbacks")

#: Measures the model as loaded now: ``desc`` → metrics (the snapshot keys, ``sp/*`` apart).
Measure = Callable[[str], dict[str, float]]


class Rewinder:
    """Kept states and rewinds (see the module docstring).

    Args:
        config: The monitor config (``budgets``, ``rewind`` and ``operating_point`` are used).
        ctx: The process group's context: every rank keeps its own shard of each state.
        folder: Where kept states go when they are not held in memory.
    """

    def __init__(self, config: MonitorConfig, ctx: DistContext, folder: Path) -> None:
        self.config = config
        self.ctx = ctx
        self.folder = folder
        self.best: Slot | None = None
        self.theta0: Slot | None = None
        self.best_metrics: dict[str, float] = {}
        self.rewinds: list[dict[str, Any]] = []
        self.shapes: dict[str, tuple[int, ...]] = {}  # this rank's part of each trainable parameter

    def setup(self, model: torch.nn.Module) -> None:
        """Refuse what cannot be rewound, and decide where kept states live (at train start).

        Raises:
            ValueError: no trainable parameters, parts that cannot be written in place, or a rank
                (any rank: all raise together) without the host memory or disk its kept states
                and a rewind's working copies need (:func:`~arena_callbacks.resources.rewind_plan`).
        """
        params = trainable_parameters(model)
        if not params:
            raise ValueError("budgets: action 'rewind' needs trainable parameters, and the model has none")
        check_writable(params)
        self.shapes = local_shapes(params)
        cfg = self.config.rewind
        plan = rewind_plan(local_bytes(params), cfg, self.folder, ranks_per_node(self.ctx.world_size))
        if self.ctx.any(plan.problem is not None):
            raise ValueError(plan.problem or "budgets: action 'rewind': another rank lacks the host memory or disk "
                             "its rewind needs (its error has the numbers)")
        rank = self.ctx.rank
        self.best = Slot(self.folder / f"best-rank{rank}.safetensors", plan.in_memory)
        self.theta0 = (
            Slot(self.folder / f"theta0-rank{rank}.safetensors", plan.in_memory) if cfg.mode in ("path", "layerwise")
            else None
        )
        logger.info("arena-callbacks: rewind keeps %.1f MB of trainable state per kept point on this rank %s",
                    plan.state_bytes / 2**20, "in CPU memory" if plan.in_memory else f"in {self.folder}")

    def _rules(self, theta0: dict[str, torch.Tensor]) -> dict[str, Any]:
        """:func:`~arena_callbacks.rewind.path_rules`, agreed on by every rank (each holds a part of each ``B``)."""
        names = lora_b_names(list(theta0))
        if not names or not self.ctx.active:
            return path_rules(theta0)
        flags = self.ctx.all_reduce_sum(torch.tensor([float(bool(theta0[n].any())) for n in names]))
        return path_rules(theta0, nonzero={n: bool(f > 0) for n, f in zip(names, flags.tolist())})

    # ------------------------------------------------------------------ kept states
    def keep_start(self, model: torch.nn.Module, step: int) -> None:
        """Keep the step-0 state, the pretrained end of the path (path rewinds only)."""
        if self.theta0 is None:
            return
        theta0 = capture_state(model)
        if self.ctx.any(not is_finite_state(theta0)):
            raise ValueError("rewind: the model's trainable parameters hold NaN or infinite values at train start")
        self.theta0.put(theta0, step)

    def offer(self, model: torch.nn.Module, snapshot: Snapshot, baseline: dict[str, float]) -> None:
        """Keep the trainable state of ``snapshot`` when it is the best in-budget point so far."""
        if self.best is None:
            return
        if snapshot.trigger != "baseline" and not in_budget(self.config.budgets, snapshot.metrics, baseline):
            return
        if self.best.filled and not self._better_than_best(snapshot):
            return
        kept = capture_state(model)
        if self.ctx.any(not is_finite_state(kept)):
            logger.warning("arena-callbacks: not keeping the state of step %d for rewinds: non-finite weights",
                           snapshot.step)
            return
        try:
            self.best.put(kept, snapshot.step)
        except OSError as e:
            logger.warning("arena-callbacks: could not keep the state of step %d for rewinds (%s)", snapshot.step, e)
            return
        self.best_metrics = dict(snapshot.metrics)

    def _better_than_best(self, snapshot: Snapshot) -> bool:
        assert self.best is not None
        old = Snapshot(self.best.step or 0, self.best_metrics) if self.best_metrics else None
        return better_point(snapshot, old, self.config.operating_point)

    # ------------------------------------------------------------------ the rewind
    def rewind(
        self, model: torch.nn.Module, step: int, decision: Decision, breach: Snapshot, baseline: dict[str, float],
        measure: Measure,
    ) -> tuple[dict[str, Any], dict[str, float]]:
        """Load the state a ``rewind`` decision asks for on every rank; returns ``(info, metrics)``
        where ``metrics`` measured what was loaded (``sp/*`` apart) and ``info`` says what it was."""
        assert self.best is not None
        mode = self.config.rewind.mode
        info: dict[str, Any] = {"number": len(self.rewinds) + 1, "at_step": step, "mode": mode,
                                "reason": decision.message}
        theta1 = capture_state(model) if mode != "checkpoint" else None
        if theta1 is not None and self.ctx.any(not is_finite_state(theta1)):
            logger.warning("arena-callbacks: the weights at step %d are not finite; rewinding to the best kept state "
                           "instead of along the path", step)
            mode, theta1 = "checkpoint", None
            info.update(mode=mode, fallback="non-finite weights: checkpoint rewind")
        try:
            if mode == "checkpoint":
                load_state(model, self.best.get())
                metrics = measure("arena rewind check")
                info["restored_step"] = self.best.step
            else:
                assert theta1 is not None
                metrics, alpha, candidates = self._path_search(model, theta1, breach, baseline, measure,
                                                               layerwise=mode == "layerwise")
                info["alpha"] = alpha
                info["candidates"] = candidates
        except ProbeFailure as e:
            # The model may hold a candidate state now: put the best kept state back and stop.
            logger.warning("arena-callbacks: rewind probing failed (%s); restoring the best kept state and stopping", e)
            load_state(model, self.best.get())
            metrics = dict(self.best_metrics)
            info.update(mode="checkpoint", restored_step=self.best.step, fallback=f"probe failure: {e}")
        return info, metrics

    def then(self, number: int) -> str:
        """What follows rewind ``number``: ``stop``, or ``continue`` while rewinds are left."""
        cfg = self.config.rewind
        return "stop" if cfg.then == "stop" or number >= cfg.max_rewinds else "continue"

    def _path_search(
        self, model: torch.nn.Module, theta1: dict[str, torch.Tensor], breach: Snapshot, baseline: dict[str, float],
        measure: Measure, layerwise: bool,
    ) -> tuple[dict[str, float], float, list[dict[str, Any]]]:
        """Probe ``α`` values on the path from the pretrained weights; load and return the one the rule picks.

        Candidates, in path order: the pretrained model (uniform ``α = 0``, its metrics are the
        baseline's), each configured ``α`` (layer-wise also ``α = 0``: shallow layers fully back,
        the last block kept), and the current model (``α = 1``, the breach's metrics); then up to
        ``rewind.refine`` midpoints next to the chosen ``α`` (:func:`~arena_callbacks.rewind.next_alpha`).
        """
        assert self.theta0 is not None
        theta0 = self.theta0.get()
        rules = self._rules(theta0)
        names = list(theta1)
        probed = sorted({*self.config.rewind.alphas, *([0.0] if layerwise else [])})
        # (alpha, layer-wise?, metrics); the pretrained end is uniform whatever the mode.
        measured: list[tuple[float, bool, dict[str, float]]] = [(0.0, False, dict(baseline))]
        for a in probed:
            load_state(model, interpolate(theta0, theta1, alphas_for(names, a, layerwise), rules))
            measured.append((a, layerwise, measure(f"arena rewind α={a:g}")))
        measured.append((1.0, False, dict(breach.metrics)))
        budgets = self.config.budgets

        def pick() -> tuple[list[bool], tuple[float, bool, dict[str, float]]]:
            measured.sort(key=lambda c: c[0])  # path order (stable: α = 0 uniform before layer-wise)
            flags = [(a == 0.0 and not w) or in_budget(budgets, m, baseline) for a, w, m in measured]
            ok = [c for c, flag in zip(measured, flags) if flag]
            # No plasticity measured: the furthest point along the path that is still in budget.
            return flags, ok[choose([m for _, _, m in ok], self.config.operating_point)]

        ok_flags, (alpha, lw, metrics) = pick()
        for _ in range(self.config.rewind.refine):  # look closer around the choice (docs/budgets.md)
            a = next_alpha([c[0] for c in measured], alpha)
            if a is None:
                break
            load_state(model, interpolate(theta0, theta1, alphas_for(names, a, layerwise), rules))
            measured.append((a, layerwise, measure(f"arena rewind α={a:g} (refining)")))
            ok_flags, (alpha, lw, metrics) = pick()
        load_state(model, interpolate(theta0, theta1, alphas_for(names, alpha, lw), rules))
        candidates = [
            {"alpha": a, "layerwise": w, "plasticity": m.get("sp/plasticity"), "stability": m.get("sp/stability"),
             "in_budget": flag, "chosen": (a, w) == (alpha, lw)}
            for (a, w, m), flag in zip(measured, ok_flags)
        ]
        return metrics, alpha, candidates

    def continue_training(self, optimizer: Any, lr_scheduler: Any) -> None:
        """Lower the learning rate and drop the optimizer's moments (they belong to the abandoned path)."""
        factor = self.config.rewind.lr_factor
        if optimizer is None:
            logger.warning("arena-callbacks: no optimizer given; learning rate and optimizer state unchanged")
            return
        inner = optimizer
        while hasattr(inner, "optimizer") and inner.optimizer is not inner:
            inner = inner.optimizer
        for group in inner.param_groups:
            group["lr"] = group["lr"] * factor
        inner.state.clear()
        # accelerate's AcceleratedScheduler keeps the real one in ``.scheduler``: without this, the
        # next scheduler step would put the old rate back.
        while lr_scheduler is not None and not hasattr(lr_scheduler, "base_lrs") and hasattr(lr_scheduler, "scheduler"):
            lr_scheduler = lr_scheduler.scheduler
        if lr_scheduler is not None and hasattr(lr_scheduler, "base_lrs"):
            lr_scheduler.base_lrs = [lr * factor for lr in lr_scheduler.base_lrs]

    # ------------------------------------------------------------------ saved state
    def export(self, folder: Path) -> None:
        """This rank's kept states into a checkpoint folder."""
        rank = self.ctx.rank
        for slot, name in ((self.best, "best"), (self.theta0, "theta0")):
            if slot is not None and slot.filled:
                slot.export(CheckpointFiles(folder).kept(name, rank))

    def state_dict(self) -> dict[str, Any]:
        return {
            "rewinds": self.rewinds,
            "best": {"step": self.best.step, "metrics": self.best_metrics}
            if self.best is not None and self.best.filled else None,
            "theta0_step": self.theta0.step if self.theta0 is not None else None,
        }

    def restore(self, folder: Path, data: dict[str, Any]) -> None:
        """Take the kept states back from a checkpoint folder and :meth:`state_dict`'s data."""
        self.rewinds = list(data.get("rewinds", []))
        rank = self.ctx.rank
        best = data.get("best")
        if self.best is not None and best is not None:
            self.best.restore(CheckpointFiles(folder).kept("best", rank), int(best["step"]),
                              check=lambda s: check_state(s, self.shapes, f"resume from {folder}: the kept best state"))
            self.best_metrics = {k: float(v) for k, v in best["metrics"].items()}
        if self.theta0 is not None:
            path = CheckpointFiles(folder).kept("theta0", rank)
            if not path.is_file():
                raise ValueError(f"resume from {folder}: rewind.mode {self.config.rewind.mode!r} needs the step-0 "
                                 f"state {path.name}, which the checkpoint does not hold (was the mode changed?)")
            self.theta0.restore(path, int(data.get("theta0_step") or 0),
                                check=lambda s: check_state(s, self.shapes,
                                                            f"resume from {folder}: the kept step-0 state"))


def sp_pair(metrics: dict[str, float]) -> dict[str, float | None]:
    return {"plasticity": metrics.get("sp/plasticity"), "stability": metrics.get("sp/stability")}


def _fmt_pair(pair: dict[str, Any]) -> str:
    p, q = pair.get("plasticity"), pair.get("stability")
    return f"P={p:.3f}, S={q:.3f}" if p is not None and q is not None else (f"S={q:.3f}" if q is not None else "-")


def rewind_message(info: dict[str, Any], lr_factor: float) -> str:
    if "alpha" in info:
        what = f"rewound along the path ({info['mode']}) to α={info['alpha']:g}"
    else:
        what = f"rewound to the state of step {info.get('restored_step')}"
    then = "stopping" if info["then"] == "stop" else f"continuing with the learning rate ×{lr_factor:g}"
    return (f"rewind {info['number']} at step {info['at_step']}: {what} "
            f"({_fmt_pair(info['before'])} → {_fmt_pair(info['after'])}); {then}")
