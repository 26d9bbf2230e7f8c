"""Measurement: the probes, activation geometry and weight spectra of one model state → metrics.

:class:`Measurer` owns the probe runner, the geometry tracker and the spectra caches. Every rank
calls :meth:`Measurer.run` (the probe rows are split across ranks and their sums all-reduced),
so every rank gets the same metrics. Turning results into the snapshot's keys is
:func:`arena_callbacks.measurements.build_snapshot`; the ``sp/*`` estimate of the trajectory is
:func:`with_sp`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from .capture import GeometryTracker
from .config import MonitorConfig
from .distributed import DistContext
from .measurements import TARGET, Snapshot, build_snapshot, current_records, expected_keys
from .probes import ProbeResult, ProbeRunner, ProbeSet
from .sp import sp_metrics, trajectory

__all__ = ["Measurer", "with_sp"]


class Measurer:
    """Probes (and, when configured, geometry and spectra) on a model, as metrics.

    Args:
        config: The monitor config (its ``probe``, ``geometry``, ``spectra``, ``stability`` and
            ``plasticity`` sections are used).
        probes: Probe sets by name, the target under :data:`~arena_callbacks.measurements.TARGET`.
    """

    def __init__(self, config: MonitorConfig, probes: Mapping[str, ProbeSet]) -> None:
        self.config = config
        self.runner = ProbeRunner(dict(probes), config.probe)
        self.geometry = GeometryTracker(config.geometry, self.runner) if config.geometry.enabled else None
        self.spectra_reference: dict[str, torch.Tensor] | None = None
        self._spectra_names: list[str] | None = None
        self._spectra_cache: dict[str, Any] = {}
        self.baseline_results: dict[str, ProbeResult] | None = None
        #: Keys this measurer writes; geometry and spectra keys are wildcards until :meth:`setup`.
        self.keys = expected_keys(self.runner.probes, TARGET in probes) + _model_key_patterns(config)

    @property
    def probes(self) -> dict[str, ProbeSet]:
        return self.runner.probes

    def setup(self, model: torch.nn.Module) -> list[str]:
        """Resolve the tracked modules and spectra layers on ``model``; returns every key measured."""
        keys = [k for k in self.keys if not k.startswith(("geometry/", "spectral/"))]
        if self.geometry is not None:
            from .geometry import METRICS

            self.geometry.setup(model)
            keys += [f"geometry/{m}/{n}" for m in METRICS for n in [*self.geometry.module_names, "mean", "max", "min"]]
            keys.append("geometry/cache_mb")
        if self.config.spectra.enabled:
            from .spectra import SPECTRAL_METRICS, snapshot_weights, spectra_layer_names

            base = getattr(model, "module", model)
            self._spectra_names = spectra_layer_names(base, self.config.spectra.modules)
            if not _has_adapters(base):
                self.spectra_reference = snapshot_weights(base, self._spectra_names)
            keys += [f"spectral/{m}/{n}" for m in SPECTRAL_METRICS for n in [*self._spectra_names, "mean", "max"]]
        return sorted(keys)

    def run(
        self, model: torch.nn.Module, ctx: DistContext, step: int, desc: str, *, baseline: bool = False,
        spectra: bool = True, clock: Callable[[], float] = time.perf_counter,
    ) -> tuple[dict[str, ProbeResult], float, dict[str, float]]:
        """One pass on every rank: ``(probe results, this rank's seconds, geometry/spectra metrics)``."""
        start = clock()
        extra: dict[str, float] = {}
        if self.geometry is not None:
            with self.geometry.capturing() as capture:
                results = self.runner.run(model, ctx, desc=desc, observer=capture)
            extra.update(self.geometry.measure(model, ctx, baseline=baseline))
        else:
            results = self.runner.run(model, ctx, desc=desc)
        sc = self.config.spectra
        if spectra and sc.enabled and (baseline or step % sc.every_n_steps == 0):
            from .spectra import aggregate_spectra, weight_spectra

            per_layer = weight_spectra(
                getattr(model, "module", model), reference=self.spectra_reference, names=self._spectra_names,
                k=sc.top_k, eps=sc.intruder_threshold, cache=self._spectra_cache, solver=sc.solver(),
                progress=ctx.is_main and self.config.probe.progress_bar is not False,
            )
            extra.update(aggregate_spectra(per_layer))
        return results, clock() - start, extra

    def metrics(self, results: dict[str, ProbeResult], seconds: float) -> dict[str, float]:
        """The snapshot keys of ``results`` against the baseline, with ``probe/seconds``."""
        assert self.baseline_results is not None
        metrics = build_snapshot(results, self.baseline_results, self.runner.probes,
                                 stability=self.config.stability, plasticity=self.config.plasticity)
        metrics["probe/seconds"] = seconds
        return metrics


def with_sp(history: Sequence[Snapshot], step: int, metrics: dict[str, float], config: MonitorConfig,
            trigger: str = "step") -> dict[str, float]:
    """``metrics`` with the ``sp/*`` estimate of the trajectory up to and including them.

    The records a rewind replaced are not part of it (:func:`~arena_callbacks.measurements.current_records`):
    the state they measured is held nowhere any more.
    """
    if "sp/plasticity" not in metrics or "sp/stability" not in metrics:
        return metrics
    points = trajectory(current_records([*history, Snapshot(step, metrics, trigger=trigger)]))
    return {**metrics, **sp_metrics(points, config.operating_point)}


def _model_key_patterns(config: MonitorConfig) -> list[str]:
    """Keys whose module part is known only at train start: wildcards until then."""
    keys: list[str] = []
    if config.geometry.enabled:
        keys.append("geometry/*")
    if config.spectra.enabled:
        keys.append("spectral/*")
    return keys


def _has_adapters(model: torch.nn.Module) -> bool:
    return callable(getattr(model, "get_base_model", None)) and hasattr(model, "peft_config")
