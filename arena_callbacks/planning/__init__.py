"""``arena-callbacks plan``: what a monitor config will cost on a model and a training setup, before the run.

From a model's config (built on the meta device; nothing downloaded but a config file), the
monitor file, the tokens per optimizer step and the accelerators, a plan gives: the probe
pass's forwards, positions and FLOPs from the real planner on the real rows; the geometry
cache per rank; the kept rewind states (LoRA or full, sharded or not); the spectra's cost; the
probe interval the overhead budget will give (the schedule's own rule) and the probes' share of
the training time. The formulas are in docs/plan.md.

Modules, one per concern: :mod:`.model` (config, meta model, counts), :mod:`.probes` (the probe
pass), :mod:`.hardware` (accelerators, efficiencies), :mod:`.calibrate` (timing on this CPU),
:mod:`.costs` (memory, spectra, cadence), :mod:`.build` (the plan itself) and :mod:`.report`
(its table).

Example:
    >>> plan = make_plan(PlanInputs(model="config.json", monitor="monitor.yaml",
    ...                             tokens_per_step=65536, accelerator="h100", num_accelerators=8))  # doctest: +SKIP
    >>> print(format_plan(plan))                                                                      # doctest: +SKIP
"""

from __future__ import annotations

from .build import PlanInputs, make_plan
from .costs import geometry_cache_bytes, probe_interval, rewind_bytes, spectra_layer_cost, training_share
from .hardware import ACCELERATORS, EFFICIENCY, Accelerator
from .model import PlanError
from .report import format_plan

__all__ = [
    "ACCELERATORS",
    "EFFICIENCY",
    "Accelerator",
    "PlanError",
    "PlanInputs",
    "format_plan",
    "geometry_cache_bytes",
    "make_plan",
    "probe_interval",
    "rewind_bytes",
    "spectra_layer_cost",
    "training_share",
]
