"""What an adapter shows of its engine: the attributes users read on a monitor after a run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .budget import Decision
from .config import MonitorConfig
from .engine import ForgettingEngine
from .history import History
from .probes import ProbeResult

__all__ = ["EngineViews"]


class EngineViews:
    """The engine's public state as attributes of an adapter that holds it as ``self.engine``
    (the Trainer callback, the Lightning callback): what users read after a run."""

    engine: ForgettingEngine

    @property
    def config(self) -> MonitorConfig:
        return self.engine.config

    @property
    def history(self) -> History:
        return self.engine.history

    @property
    def stop_decision(self) -> Decision | None:
        return self.engine.stop_decision

    @property
    def last_decision(self) -> Decision | None:
        return self.engine.last_decision

    @property
    def rewinds(self) -> list[dict[str, Any]]:
        return self.engine.rewinds

    @property
    def runner(self) -> Any:
        return self.engine.measurer.runner

    @property
    def geometry(self) -> Any:
        return self.engine.measurer.geometry

    @property
    def baseline_results(self) -> dict[str, ProbeResult] | None:
        return self.engine.baseline_results

    @property
    def measured_keys(self) -> list[str]:
        return self.engine.measured_keys

    @property
    def output_dir(self) -> Path | None:
        return self.engine.output_dir

    @property
    def overhead(self) -> dict[str, float]:
        return self.engine.schedule.overhead

    @property
    def next_probe_step(self) -> int | None:
        return self.engine.schedule.next_probe_step

    @property
    def resumed_from(self) -> Path | None:
        return self.engine.resumed_from

    @property
    def base_model_path(self) -> str | None:
        return self.engine.base_model_path

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer
