"""The trainer callback. The only module that knows the ``transformers`` trainer API.

Flow at each probe step (DESIGN.md §6): cadence guard → probe runner (all ranks) →
snapshot → budget evaluation (pure) → decision agreed by all ranks → log / stop.
"""

from __future__ import annotations

import fnmatch
import inspect
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from .capture import GeometryTracker
from .budget import Decision, check_limit, evaluate_budgets, threshold
from .config import MonitorConfig
from .distributed import DistContext, current_context
from .exceptions import BudgetKeyError, ProbeDataError
from .history import HISTORY_FILE, History
from .measurements import TARGET, Snapshot, build_snapshot, expected_keys
from .probes import ProbeFailure, ProbeResult, ProbeRunner, ProbeSet
from .sp import operating_point, trajectory, sp_metrics
from .tensorboard import ScalarWriter, resolve_tensorboard_dir

__all__ = ["ForgettingMonitor"]

logger = logging.getLogger("arena_callbacks")

SUMMARY_FILE = "summary.json"


class ForgettingMonitor(TrainerCallback):
    """Watches a finetune for forgetting and stops it when a budget is exhausted.

    Args:
        config: A :class:`MonitorConfig`, a dict, a path to a YAML/JSON file, or ``None``.
        probes: Capability probes by name: ``datasets.Dataset``, list of dicts, JSONL path, or
            :class:`~arena_callbacks.Probe`.
        target: Optional probe of the task being learned (gives ``sp/plasticity``).
        tokenizer: Tokenizer for the probes; defaults to the trainer's ``processing_class``.
        **config_fields: Top-level config fields, merged over ``config``.

    Example:
        >>> monitor = ForgettingMonitor(
        ...     {"cadence": {"every_n_steps": 20},
        ...      "budgets": [{"key": "retention/general", "max_drop": 0.1}]},
        ...     probes={"general": [{"text": "The quick brown fox jumps over the lazy dog."}]},
        ... )
        >>> trainer = SFTTrainer(..., callbacks=[monitor])  # doctest: +SKIP
    """

    def __init__(
        self,
        config: MonitorConfig | dict[str, Any] | str | Path | None = None,
        probes: dict[str, Any] | None = None,
        target: Any = None,
        *,
        tokenizer: Any = None,
        **config_fields: Any,
    ) -> None:
        # User-provided settings, all checked here.
        self.config = MonitorConfig.coerce(config, **config_fields)
        if probes is not None and not isinstance(probes, dict):
            raise TypeError(
                f"probes: expected a dict of name -> probe data (e.g. {{'general': dataset}}), got {type(probes).__name__}"
            )
        probes = dict(probes or {})
        if TARGET in probes:
            raise ProbeDataError(f"probes: the name {TARGET!r} is reserved for the target probe; pass it as target=...")
        sets = {name: ProbeSet.build(name, data, self.config.probe) for name, data in probes.items()}
        if target is not None:
            sets[TARGET] = ProbeSet.build(TARGET, target, self.config.probe)
        if not sets:
            raise ProbeDataError("probes: give at least one capability probe (probes={...}) or a target probe (target=...)")
        self.measured_keys = expected_keys(sets, target is not None) + _model_key_patterns(self.config)
        self._check_budget_keys(self.measured_keys)
        self.runner = ProbeRunner(sets, self.config.probe)
        self.geometry = GeometryTracker(self.config.geometry, self.runner) if self.config.geometry.enabled else None
        self._spectra_cache: dict[str, Any] = {}
        self._spectra_reference: dict[str, torch.Tensor] | None = None
        self._spectra_names: list[str] | None = None
        self.tokenizer = tokenizer
        if tokenizer is not None:
            self.runner.prepare(tokenizer)  # report long rows now, not at train start

        # Internal state.
        self.history = History()
        self.baseline_results: dict[str, ProbeResult] | None = None
        self.last_decision: Decision | None = None
        self.stop_decision: Decision | None = None
        self.output_dir: Path | None = None
        self._ctx = DistContext()
        self._trainer: Any = None
        self._writer: ScalarWriter | None = None
        self._last_probe_step = -1
        self._trainable_parameters: int | None = None

    def _check_budget_keys(self, measured: list[str]) -> None:
        for i, budget in enumerate(self.config.budgets):
            if not any(fnmatch.fnmatchcase(budget.key, k) for k in measured):
                raise BudgetKeyError(
                    f"budgets[{i}].key: {budget.key!r} is not measured by this monitor; "
                    f"measured keys: {', '.join(measured)}"
                )

    # ------------------------------------------------------------------ trainer events

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._ctx = current_context()
        tokenizer = self.tokenizer if self.tokenizer is not None else kwargs.get("processing_class")
        if not self.runner.prepared:
            self.runner.prepare(tokenizer)
        self._trainer = _find_trainer()
        model = kwargs["model"]
        self._trainable_parameters = _count_trainable(model)
        if self.geometry is not None or self.config.spectra.enabled:
            self._setup_model_measurements(model)
        self.output_dir = Path(self.config.logging.output_dir or os.path.join(args.output_dir, "arena"))
        self.history = History(self.output_dir / HISTORY_FILE if self._ctx.is_main else None)
        # A resumed run appends to the file it had, never wipes it.
        self.history.start_file(fresh=state.global_step == 0)
        if self._ctx.is_main and self.config.logging.tensorboard:
            tb_dir = resolve_tensorboard_dir(self.config.logging.tensorboard_dir, self._trainer, args.output_dir)
            self._writer = ScalarWriter(tb_dir)
            self._writer.custom_scalars(self._custom_scalars_layout())
        if state.global_step > 0:
            logger.warning(
                "arena-callbacks: training resumes at step %d; the baseline is measured now, not at step 0",
                state.global_step,
            )
        self._measure_baseline(model, state)

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        every = self.config.cadence.every_n_steps
        if every is not None and state.global_step % every == 0:
            self._probe(kwargs["model"], state, control, trigger="step")

    def on_evaluate(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.config.cadence.on_evaluate:
            self._probe(kwargs["model"], state, control, trigger="evaluate")

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.config.cadence.at_train_end and self._last_probe_step != state.global_step:
            self._probe(kwargs["model"], state, control, trigger="train_end")
        self._write_summary()
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    # ------------------------------------------------------------------ internals

    def _measure_baseline(self, model: torch.nn.Module, state: TrainerState) -> None:
        self.baseline_results = None
        results, seconds, extra = self._run_probes(model, state, desc="arena baseline", baseline=True)
        self.baseline_results = results
        metrics = self._with_sp(state.global_step, {**self._metrics(results, seconds), **extra})
        snapshot = Snapshot(state.global_step, metrics, state.epoch, trigger="baseline")
        for budget in self.config.budgets:
            value = metrics[budget.key]
            if check_limit(budget, value, value):
                logger.warning(
                    "arena-callbacks: budget %r is already exceeded at baseline (%s = %.4g); it will count as "
                    "breached from the first probe at or after step %d (patience %d)",
                    budget.label, budget.key, value, budget.min_step, budget.patience,
                )
        self._record(snapshot, None, state)

    def _run_probes(
        self, model: torch.nn.Module, state: TrainerState, desc: str, baseline: bool = False
    ) -> tuple[dict[str, ProbeResult], float, dict[str, float]]:
        start = time.perf_counter()
        extra: dict[str, float] = {}
        if self.geometry is not None:
            with self.geometry.capturing() as capture:
                results = self.runner.run(model, self._ctx, desc=desc, observer=capture)
            extra.update(self.geometry.measure(model, self._ctx, baseline=baseline))
        else:
            results = self.runner.run(model, self._ctx, desc=desc)
        spectra = self.config.spectra
        if spectra.enabled and (baseline or state.global_step % spectra.every_n_steps == 0):
            from .spectra import aggregate_spectra, weight_spectra

            per_layer = weight_spectra(
                getattr(model, "module", model), reference=self._spectra_reference, names=self._spectra_names,
                k=spectra.top_k, eps=spectra.intruder_threshold, cache=self._spectra_cache,
            )
            extra.update(aggregate_spectra(per_layer))
        # Rank 0's wall time, shared so every rank holds the same snapshot.
        elapsed = time.perf_counter() - start if self._ctx.is_main else 0.0
        seconds = float(self._ctx.all_reduce_sum(torch.tensor([elapsed]))[0])
        return results, seconds, extra

    def _setup_model_measurements(self, model: torch.nn.Module) -> None:
        """Geometry modules and spectra layers are known only once the model is: check budgets now."""
        keys = [k for k in self.measured_keys if not k.startswith(("geometry/", "spectral/"))]
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
                self._spectra_reference = snapshot_weights(base, self._spectra_names)
            keys += [f"spectral/{m}/{n}" for m in SPECTRAL_METRICS for n in [*self._spectra_names, "mean", "max"]]
        self._check_budget_keys(sorted(keys))

    def _metrics(self, results: dict[str, ProbeResult], seconds: float) -> dict[str, float]:
        assert self.baseline_results is not None
        metrics = build_snapshot(
            results,
            self.baseline_results,
            self.runner.probes,
            stability=self.config.stability,
            plasticity=self.config.plasticity,
        )
        metrics["probe/seconds"] = seconds
        return metrics

    def _with_sp(self, step: int, metrics: dict[str, float]) -> dict[str, float]:
        """Add the ``sp/*`` estimate of the trajectory up to and including this step."""
        if "sp/plasticity" not in metrics or "sp/stability" not in metrics:
            return metrics
        points = trajectory([*self.history.snapshots, Snapshot(step, metrics)])
        return {**metrics, **sp_metrics(points, self.config.operating_point)}

    def _budget_lines(self, metrics: dict[str, float]) -> dict[str, float]:
        """``budget/<label>``: each budget's limit in its key's units, drawn beside the key's curve."""
        if not self.history.snapshots and not metrics:
            return {}
        base = self.history.snapshots[0].metrics if self.history.snapshots else metrics
        lines = {}
        for b in self.config.budgets:
            if b.key in base:
                lines[f"budget/{b.label}"] = threshold(b, base[b.key])
        return lines

    def _probe(self, model: torch.nn.Module, state: TrainerState, control: TrainerControl, trigger: str) -> None:
        if state.global_step == self._last_probe_step or self.baseline_results is None:
            return  # one probe per step, whichever events fire
        self._last_probe_step = state.global_step
        try:
            results, seconds, extra = self._run_probes(model, state, desc=f"arena probes @ {state.global_step}")
        except ProbeFailure as e:
            # Training and checkpoints go on; the measurement of this step is lost.
            logger.warning("arena-callbacks: skipping the probe at step %d: %s", state.global_step, e)
            return
        metrics = self._with_sp(state.global_step, {**self._metrics(results, seconds), **extra})
        snapshot = Snapshot(state.global_step, metrics, state.epoch, trigger=trigger)
        decision = evaluate_budgets(self.config.budgets, snapshot, self.history.snapshots)
        # Decisions are computed from all-reduced numbers, so they agree; still, stop every
        # rank if any rank says stop (a diverged rank must never keep others training).
        stop = self._ctx.any(decision.should_stop)
        self.last_decision = decision
        self._record(snapshot, decision, state)
        if stop:
            control.should_training_stop = True
            if self.stop_decision is None and decision.should_stop:
                self.stop_decision = decision
            elif self.stop_decision is None:  # cannot happen with all-reduced inputs; say so if it does
                logger.warning("arena-callbacks: another rank decided to stop at step %d; stopping too", state.global_step)

    def _record(self, snapshot: Snapshot, decision: Decision | None, state: TrainerState) -> None:
        self.history.append(snapshot, decision)
        if self._writer is not None:
            self._writer.scalars({**snapshot.metrics, **self._budget_lines(snapshot.metrics)}, snapshot.step)
            self._write_sp_image(snapshot.step)
        for outcome in decision.fired if decision else ():
            if self._ctx.is_main:
                logger.warning("arena-callbacks: %s", outcome.message)
            if self._writer is not None:
                self._writer.text("arena/decisions", outcome.message, snapshot.step)
        if self._writer is not None:
            self._writer.flush()
        self._log_to_trainer(snapshot.metrics, state)

    def _write_sp_image(self, step: int) -> None:
        if self._writer is None or not self.config.logging.sp_plane_image:
            return
        points = trajectory(self.history.snapshots)
        if not points:
            return
        try:
            from .report import trajectory_image

            image = trajectory_image(points, self.config.operating_point, f"stability-plasticity @ step {step}")
        except Exception as e:  # a plotting problem must not end training
            logger.warning("arena-callbacks: could not draw the stability-plasticity image (%s)", e)
            return
        self._writer.image("arena/sp_plane", image, step)

    def _custom_scalars_layout(self) -> dict[str, dict[str, list[Any]]]:
        """TensorBoard custom-scalars charts: retention, stability-plasticity, geometry, and each
        budgeted key with its limit line."""
        import re

        keys = self.measured_keys
        charts: dict[str, list[Any]] = {}
        if any(k.startswith("retention/") for k in keys):
            charts["retention"] = ["Multiline", [r"^retention/"]]
            charts["delta NLL"] = ["Multiline", [r"^delta_nll/"]]
        if "sp/stability" in keys:
            charts["stability & plasticity"] = ["Multiline", [r"^sp/(stability|plasticity)$"]]
        if "sp/operating_step" in keys:
            charts["operating point"] = ["Multiline", [r"^sp/operating_(plasticity|stability)$"]]
            charts["marginal rate & overshoot"] = ["Multiline", [r"^sp/(marginal_rate|overshoot)$"]]
        if self.geometry is not None:
            for metric in ("procrustes", "cka", "gram"):
                charts[f"geometry: {metric}"] = ["Multiline", [rf"^geometry/{metric}/"]]
        if self.config.spectra.enabled:
            charts["spectra"] = ["Multiline", [r"^spectral/.*/mean$"]]
        budgets = {
            f"{b.label} ({b.action.value})": ["Multiline", [rf"^{re.escape(b.key)}$", rf"^budget/{re.escape(b.label)}$"]]
            for b in self.config.budgets
        }
        layout = {"arena": charts}
        if budgets:
            layout["arena budgets"] = budgets
        return layout

    def _log_to_trainer(self, metrics: dict[str, float], state: TrainerState) -> None:
        """Send the scalars through ``Trainer.log`` (every ``report_to`` backend, ``log_history``).

        ``Trainer.log`` itself, not a subclass override (TRL's would fold its pending training
        metrics into ours). Its TensorBoard callback is skipped for this call when the monitor
        writes TensorBoard itself, so curves are not drawn twice.
        """
        if not self.config.logging.log_to_trainer:
            return
        trainer = self._trainer
        if trainer is None:
            state.log_history.append({**metrics, "step": state.global_step})
            return
        from transformers import Trainer

        handler = trainer.callback_handler
        saved = handler.callbacks
        if self.config.logging.tensorboard:
            handler.callbacks = [cb for cb in saved if type(cb).__name__ != "TensorBoardCallback"]
        try:
            Trainer.log(trainer, dict(metrics))
        finally:
            handler.callbacks = saved

    def _write_summary(self) -> None:
        if not self._ctx.is_main or self.output_dir is None or not self.history.snapshots:
            return
        first, last = self.history.snapshots[0], self.history.snapshots[-1]
        summary = {
            "stopped": self.stop_decision is not None,
            "stop_step": self.stop_decision.step if self.stop_decision else None,
            "stop_message": self.stop_decision.message if self.stop_decision else None,
            "probes": {n: p.kind for n, p in self.runner.probes.items()},
            "baseline": first.to_json()["metrics"],
            "final_step": last.step,
            "final": last.to_json()["metrics"],
            "trainable_parameters": self._trainable_parameters,
            "config": self.config.model_dump(mode="json"),
        }
        points = trajectory(self.history.snapshots)
        if points:
            op = operating_point(points, self.config.operating_point)
            assert op is not None
            summary["operating_point"] = {"step": op.step, "plasticity": op.plasticity, "stability": op.stability}
        try:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, allow_nan=False), encoding="utf-8")
        except (OSError, ValueError) as e:
            logger.warning("arena-callbacks: could not write %s (%s)", self.output_dir / SUMMARY_FILE, e)


def _find_trainer() -> Any:
    """The ``transformers.Trainer`` whose loop is calling us (callbacks get no reference to it)."""
    from transformers import Trainer

    frame = inspect.currentframe()
    try:
        for _ in range(16):
            frame = frame.f_back if frame is not None else None
            if frame is None:
                return None
            candidate = frame.f_locals.get("self")
            if isinstance(candidate, Trainer):
                return candidate
        return None
    finally:
        del frame



def _model_key_patterns(config: MonitorConfig) -> list[str]:
    """Keys whose module part is known only at train start: wildcards until then."""
    keys: list[str] = []
    if config.geometry.enabled:
        keys.append("geometry/*")
    if config.spectra.enabled:
        keys.append("spectral/*")
    return keys


def _count_trainable(model: torch.nn.Module) -> int:
    """Trainable parameters, counting DeepSpeed ZeRO-3 partitions at their full size."""
    n = 0
    for p in model.parameters():
        if p.requires_grad:
            n += int(getattr(p, "ds_numel", 0) or p.numel())
    return n


def _has_adapters(model: torch.nn.Module) -> bool:
    return callable(getattr(model, "get_base_model", None)) and hasattr(model, "peft_config")
