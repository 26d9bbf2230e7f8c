"""The monitor's persisted state: one versioned object with a JSON form.

Saved into every trainer checkpoint (``arena_state.json``, beside the tensors it refers to:
kept rewind states per rank, the geometry and spectra references) and read back on resume, so a
resumed run measures no new baseline and its history, patience counters, schedule and best
point go on as if it had not stopped.

Example:
    >>> s = MonitorState(baseline_results={}, history=[], config={})
    >>> MonitorState.from_json(s.to_json()) == s
    True
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .layout import STATE_FILE
from .probes import ProbeResult

__all__ = ["STATE_FILE", "STATE_VERSION", "MonitorState"]

STATE_VERSION = 1


@dataclass
class MonitorState:
    """Everything a resumed monitor needs but its tensors.

    Attributes:
        baseline_results: Each probe's result at the baseline.
        history: Every record so far (snapshot JSON, with its ``decision`` where one was taken).
        rewinds: What each rewind did.
        last_probe_step: The last step probed (one probe per step, whichever events fire).
        best: The best in-budget point kept for rewinds (``step``, ``metrics``), or ``None``.
        theta0_step: The step of the kept pretrained end of the path, for path rewinds.
        schedule: The cadence's state (:meth:`arena_callbacks.schedule.ProbeSchedule.state_dict`).
        overhead: The overhead accounts with their ``fraction`` (for readers of the file).
        config: The monitor config that wrote it (for readers; a resume uses its own).
        version: :data:`STATE_VERSION`; another version is refused on read.
    """

    baseline_results: dict[str, ProbeResult]
    history: list[dict[str, Any]]
    config: dict[str, Any]
    rewinds: list[dict[str, Any]] = field(default_factory=list)
    last_probe_step: int = -1
    best: dict[str, Any] | None = None
    theta0_step: int | None = None
    schedule: dict[str, Any] = field(default_factory=dict)
    overhead: dict[str, Any] = field(default_factory=dict)
    version: int = STATE_VERSION

    def to_json(self) -> dict[str, Any]:
        best = None
        if self.best is not None:
            best = {"step": self.best["step"], "metrics": {k: _finite_or_str(float(v))
                                                           for k, v in self.best["metrics"].items()}}
        return {
            "version": self.version,
            "baseline_results": {n: dataclasses.asdict(r) for n, r in self.baseline_results.items()},
            "history": self.history,
            "rewinds": self.rewinds,
            "overhead": self.overhead,
            "last_probe_step": self.last_probe_step,
            "best": best,
            "theta0_step": self.theta0_step,
            "schedule": self.schedule,
            "config": self.config,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], source: str = "monitor state") -> MonitorState:
        if data.get("version") != STATE_VERSION:
            raise ValueError(f"{source}: monitor state version {data.get('version')} is not {STATE_VERSION}; "
                             "resume without it by removing the file")
        best = data.get("best")
        return cls(
            baseline_results={n: ProbeResult(**r) for n, r in data["baseline_results"].items()},
            history=list(data.get("history", [])),
            config=dict(data.get("config") or {}),
            rewinds=list(data.get("rewinds", [])),
            last_probe_step=int(data.get("last_probe_step", -1)),
            best={"step": int(best["step"]), "metrics": {k: float(v) for k, v in best["metrics"].items()}}
            if best is not None else None,
            theta0_step=data.get("theta0_step"),
            schedule=dict(data.get("schedule") or {}),
            overhead=dict(data.get("overhead") or {}),
        )

    def write(self, folder: Path) -> None:
        """Write ``arena_state.json`` into ``folder`` atomically (a temporary file, then a rename)."""
        tmp = folder / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(self.to_json(), ensure_ascii=False, allow_nan=False), encoding="utf-8")
        tmp.replace(folder / STATE_FILE)

    @classmethod
    def read(cls, folder: Path) -> MonitorState:
        path = folder / STATE_FILE
        return cls.from_json(json.loads(path.read_text(encoding="utf-8")), source=str(path))


def _finite_or_str(v: float) -> float | str:
    return v if math.isfinite(v) else str(v)
