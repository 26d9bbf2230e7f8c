"""When the monitor probes, and what its probes cost the run.

Two cadences (:class:`~arena_callbacks.config.CadenceConfig`): a fixed ``every_n_steps``, or a
cost budget ``b``. Under the budget the next probe comes ``ceil(cost / (b · step_time))`` steps
after the last one, where ``cost`` is the last probe step's measured cost (the pass and the
bookkeeping around it) and ``step_time`` the mean training step since then (the slowest
rank's). The probes then add at most ``b`` to the training time, while a probe step costs what
the last one did, and their share of the monitored run stays below ``b / (1 + b)``.

Every timing goes through ``clock`` (``time.perf_counter`` unless a test gives another), so the
schedule can be driven by a fake clock.

Example:
    >>> from arena_callbacks.config import CadenceConfig
    >>> now = [0.0]
    >>> s = ProbeSchedule(CadenceConfig(overhead_budget=0.5, calibration_steps=1), clock=lambda: now[0])
    >>> s.probe_cost = 1.0
    >>> s.start()
    >>> now[0] = 1.0                      # one training step of 1 s
    >>> s.step_ended(1, last_step=0)      # calibrated: next probe after ceil(1 / (0.5 · 1)) = 2 steps
    False
    >>> s.next_probe_step
    2
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from .config import CadenceConfig
from .distributed import DistContext

__all__ = ["ProbeSchedule", "ProbeTiming"]


@dataclass
class ProbeTiming:
    """One probe step's accounting: a rewind's path search is counted as the monitor's time but
    not taken as the cost of the next, ordinary probe step."""

    rewinding: bool = False


class ProbeSchedule:
    """The cadence and the overhead accounts.

    Attributes:
        next_probe_step: The next budget-scheduled probe step (``None`` until calibrated, and
            always under a fixed cadence).
        probe_cost: Seconds the last probe step cost: its pass plus the bookkeeping measured at
            the probe step before it.
        bookkeeping: The monitor's own time at the last ordinary probe step beyond its timed
            pass (metrics, budgets, history, TensorBoard, keeping the best state).
        overhead: ``baseline_seconds``, ``monitor_seconds`` and ``train_seconds`` so far.
    """

    def __init__(self, cadence: CadenceConfig, ctx: DistContext | None = None,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.cadence = cadence
        self.ctx = ctx or DistContext()
        self.clock = clock
        self.next_probe_step: int | None = None
        self.probe_cost = 0.0
        self.bookkeeping = 0.0
        self.overhead = {"baseline_seconds": 0.0, "monitor_seconds": 0.0, "train_seconds": 0.0}
        self._mark: float | None = None
        self._train_since = 0.0
        self._steps_since = 0

    # ------------------------------------------------------------------ training time
    def start(self) -> None:
        """Training time counts from now (after the baseline, and after each probe step)."""
        self._mark = self.clock()

    def step_ended(self, step: int, last_step: int) -> bool:
        """Account for the training step that just ended; is a probe due at ``step``?

        ``last_step``: the step of the last measurement (the baseline included).
        """
        if self._mark is not None:
            self._train_since += self.clock() - self._mark
        self._steps_since += 1
        c = self.cadence
        if c.every_n_steps is not None:
            return step % c.every_n_steps == 0
        if not c.budgeted:
            return False
        if self.next_probe_step is None and self._steps_since >= c.calibration_steps:
            self.reschedule(step, last_step)  # the first timing of a training step
        return self.next_probe_step is not None and step >= self.next_probe_step

    # ------------------------------------------------------------------ probe time
    @contextmanager
    def probe_step(self) -> Iterator[ProbeTiming]:
        """Count everything the monitor does inside as its time; what the timed passes did not
        count already is the bookkeeping of this step (unless it rewound)."""
        start, counted = self.clock(), self.overhead["monitor_seconds"]
        timing = ProbeTiming()
        try:
            yield timing
        finally:
            rest = max(self.clock() - start - (self.overhead["monitor_seconds"] - counted), 0.0)
            self.overhead["monitor_seconds"] += rest
            if not timing.rewinding:
                self.bookkeeping = rest

    def share_pass(self, seconds: float) -> float:
        """The slowest rank's pass time (every rank then holds the same snapshot); the last
        bookkeeping rides on the same collective, so the schedules stay equal too."""
        seconds, self.bookkeeping = self.ctx.max_floats([seconds, self.bookkeeping])
        return seconds

    def baseline_done(self, seconds: float) -> None:
        self.overhead["baseline_seconds"] = seconds
        self.probe_cost = seconds
        self.next_probe_step = None

    def probed(self, step: int, seconds: float) -> dict[str, float]:
        """A probe pass of ``seconds`` ran at ``step``; returns the scalars to log (empty under a
        fixed cadence). The next interval counts from this step."""
        self.probe_cost = seconds + self.bookkeeping
        self.overhead["monitor_seconds"] += seconds
        return self.reschedule(step, last_step=step, probed=True)

    def reschedule(self, step: int, last_step: int, probed: bool = False) -> dict[str, float]:
        """Set the next budget-scheduled probe step from the measured probe cost and step time.

        One collective (the slowest rank's step time), at a step every rank reaches, so all
        ranks keep the same schedule without talking between probes.
        """
        c = self.cadence
        step_time = self.ctx.max_floats([self._train_since / max(self._steps_since, 1)])[0]
        if probed:
            self.overhead["train_seconds"] += step_time * self._steps_since
            self._train_since, self._steps_since = 0.0, 0
        if not c.budgeted:
            return {}
        b = c.overhead_budget
        assert b is not None
        # The probes may add b to the wall time of the same run without them: cost <= b·interval·step_time.
        wanted = self.probe_cost / (b * max(step_time, 1e-9))
        interval = max(c.min_interval, math.ceil(wanted - 1e-9))
        if c.max_interval is not None:
            interval = min(interval, c.max_interval)
        self.next_probe_step = max(step + 1 if probed else step, last_step + interval)
        return {"arena/probe_interval": float(interval), "arena/step_seconds": step_time}

    # ------------------------------------------------------------------ accounts
    def summary(self) -> dict[str, float | None]:
        """Seconds of training and of the monitor's own work (the baseline pass apart); training
        since the last probe step counts too, measured the same way (step end to step end)."""
        o = {**self.overhead, "train_seconds": self.overhead["train_seconds"] + self._train_since}
        return {**o, "fraction": overhead_fraction(o)}

    def state_dict(self) -> dict[str, Any]:
        return {"next_probe_step": self.next_probe_step, "probe_cost": self.probe_cost,
                "overhead": dict(self.overhead)}

    def load_state_dict(self, data: dict[str, Any]) -> None:
        self.next_probe_step = data.get("next_probe_step")
        self.probe_cost = float(data.get("probe_cost", 0.0))
        self.overhead.update(data.get("overhead") or {})


def overhead_fraction(o: dict[str, float]) -> float | None:
    """The monitor's share of monitored time (``None`` before anything was timed)."""
    total = o["monitor_seconds"] + o["train_seconds"]
    return o["monitor_seconds"] / total if total > 0 else None
