"""The monitor's engine, free of any training framework.

A training loop drives it with four calls: :meth:`ForgettingEngine.begin` before the first
update (measures the baseline, or restores a saved state), :meth:`~ForgettingEngine.after_step`
after every optimizer step (probes when the cadence says so), :meth:`~ForgettingEngine.save` /
:meth:`~ForgettingEngine.restore` with the loop's checkpoints, and :meth:`~ForgettingEngine.end`.
Each probing call returns a :class:`StepOutcome`: nothing to do, stop, or "the weights were
rewound" (and whether to save a checkpoint now). Every rank makes every call.

Adapters: :class:`arena_callbacks.ForgettingMonitor` (Hugging Face ``Trainer`` and TRL),
:mod:`arena_callbacks.integrations.lightning`, and ``examples/custom_loop.py`` for a plain loop.

Example:
    >>> engine = ForgettingEngine({"cadence": {"every_n_steps": 10}}, probes={"general": rows})  # doctest: +SKIP
    >>> engine.begin(model, step=0, output_dir="out", tokenizer=tok)                              # doctest: +SKIP
    >>> for step in range(1, 101):                                                              # doctest: +SKIP
    ...     train_one_step()
    ...     if engine.after_step(model, step, optimizer=opt, lr_scheduler=sched).stop:
    ...         break
    >>> engine.end(model, step)                                                                 # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .advice import Advice, log_advice, sample_size_advice
from .budget import Decision, check_budget_keys, check_limit, evaluate_budgets
from .config import Action, MonitorConfig
from .distributed import DistContext, current_context
from .exceptions import ProbeDataError
from .history import History
from .layout import STATE_FILE, CheckpointFiles, RunLayout
from .measure import Measurer, with_sp
from .measurements import TARGET, Snapshot, current_records
from .probes import ProbeFailure, ProbeResult, ProbeSet
from .rewind import load_state_file, save_state_file
from .rewinder import Rewinder, rewind_message, sp_pair
from .samples import GenerationSamples
from .schedule import ProbeSchedule, ProbeTiming, overhead_fraction
from .sinks import HistorySink, LogSink, Sink
from .sp import operating_point, trajectory
from .state import MonitorState
from .tensorboard import ScalarWriter, TensorBoardSink, resolve_tensorboard_dir

__all__ = ["ForgettingEngine", "StepOutcome"]

logger = logging.getLogger("arena_callbacks")

@dataclass(frozen=True)
class StepOutcome:
    """What the loop must do after a call.

    Attributes:
        stop: Stop training (a budget fired, or a rewind ended the run).
        rewound: The weights were rewound: the model now holds an earlier state.
        snapshot: The record of this step, when it was probed.
    """

    stop: bool = False
    rewound: bool = False
    snapshot: Snapshot | None = None


class ForgettingEngine:
    """Probes, budgets and rewinds for any training loop (see the module docstring).

    Args:
        config: A :class:`MonitorConfig`, a dict, a path to a YAML/JSON file, or ``None``.
        probes: Capability probes by name: ``datasets.Dataset``, list of dicts, JSONL path, or
            :class:`~arena_callbacks.Probe`.
        target: Optional probe of the task being learned (gives ``sp/plasticity``).
        tokenizer: Tokenizer for the probes (else give it to :meth:`begin`).
        clock: Seconds, for the cost-budgeted cadence (a test may give a fake one).
    """

    def __init__(
        self,
        config: MonitorConfig | dict[str, Any] | str | Path | None = None,
        probes: dict[str, Any] | None = None,
        target: Any = None,
        *,
        tokenizer: Any = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.config = MonitorConfig.coerce(config)
        self.measurer = Measurer(self.config, _probe_sets(probes, target, self.config))
        self.measured_keys = self.measurer.keys
        check_budget_keys(self.config.budgets, self.measured_keys)
        self.tokenizer = tokenizer
        if tokenizer is not None:
            self.measurer.runner.prepare(tokenizer)  # report long rows now, not at train start
        self.schedule = ProbeSchedule(self.config.cadence, clock=clock)
        self.history = History()
        self.last_decision: Decision | None = None
        self.stop_decision: Decision | None = None
        self.output_dir: Path | None = None
        self.layout: RunLayout | None = None
        self.ctx = DistContext()
        self.rewinder: Rewinder | None = None
        self.samples: GenerationSamples | None = None
        self.sinks: list[Sink] = []
        self.trainable_parameters: int | None = None
        self.base_model_path: str | None = None
        self.resumed_from: Path | None = None
        self.last_probe_step = -1

    @classmethod
    def from_config(
        cls, path: str | Path, *, tokenizer: Any = None, clock: Callable[[], float] = time.perf_counter,
        **config_fields: Any,
    ) -> ForgettingEngine:
        """An engine described entirely by one monitor file (settings, ``probes``, ``target``;
        :mod:`arena_callbacks.monitor_file`), as ``ForgettingMonitor.from_config``. Errors name the key."""
        from .monitor_file import build_from_file

        return build_from_file(cls, path, tokenizer=tokenizer, clock=clock, **config_fields)

    # ------------------------------------------------------------------ views
    @property
    def baseline_results(self) -> dict[str, ProbeResult] | None:
        return self.measurer.baseline_results

    @property
    def rewinds(self) -> list[dict[str, Any]]:
        return self.rewinder.rewinds if self.rewinder is not None else []

    # ------------------------------------------------------------------ the four calls
    def begin(
        self, model: torch.nn.Module, *, step: int = 0, output_dir: str | Path, epoch: float | None = None,
        tokenizer: Any = None, resume_from: str | Path | None = None, tensorboard_dir: str | None = None,
        log: Callable[[dict[str, float], int], None] | None = None,
    ) -> None:
        """Get ready to watch ``model`` from ``step``: measure the baseline, or (``step > 0`` and a
        ``resume_from`` folder holding the monitor's state) take that state back.

        Args:
            output_dir: The training run's folder; the monitor writes into ``<output_dir>/arena``
                unless ``logging.output_dir`` says otherwise.
            tokenizer: Tokenizer for the probes, if not given at construction.
            resume_from: The checkpoint folder the loop resumes from.
            tensorboard_dir: Where the monitor's TensorBoard events go (default: the configured
                folder, ``$TENSORBOARD_LOGGING_DIR``, else ``<output_dir>/runs/arena``).
            log: The loop's own logger, ``log(metrics, step)``, given every record's metrics.
        """
        self.ctx = current_context()
        self.schedule.ctx = self.ctx
        if not self.measurer.runner.prepared:
            self.measurer.runner.prepare(self.tokenizer if self.tokenizer is not None else tokenizer)
        self.trainable_parameters = _count_trainable(model)
        self.base_model_path = _base_model_path(model)
        if self.measurer.geometry is not None or self.config.spectra.enabled:
            check_budget_keys(self.config.budgets, self.measurer.setup(model))
        self.output_dir = self.folder_for(output_dir)
        self.layout = RunLayout(self.output_dir)
        self.history = History(self.layout.history if self.ctx.is_main else None)
        self.history.start_file(fresh=step == 0)  # a resumed run appends to its file, never wipes it
        self.samples = GenerationSamples(self.measurer.runner, self.layout.generations if self.ctx.is_main else None)
        self.samples.start(fresh=step == 0)
        self._open_sinks(output_dir, tensorboard_dir, log)
        if any(b.action is Action.REWIND for b in self.config.budgets):
            self.rewinder = Rewinder(self.config, self.ctx, self.layout.rewind_dir)
            self.rewinder.setup(model)
        if self.ctx.is_main:
            self._save_probes()
        if step > 0:
            folder = Path(resume_from) if resume_from is not None else None
            if folder is not None and (folder / STATE_FILE).is_file():
                self.restore(folder)
                self.schedule.start()
                return
            logger.warning(
                "arena-callbacks: training resumes at step %d without monitor state (%s has no %s); the baseline "
                "is measured now, not at step 0", step, folder, STATE_FILE,
            )
        self._measure_baseline(model, step, epoch)
        self.schedule.start()

    def folder_for(self, output_dir: str | Path) -> Path:
        """The monitor's folder for a run in ``output_dir``: ``logging.output_dir``, else ``<output_dir>/arena``."""
        return Path(self.config.logging.output_dir or RunLayout.for_output_dir(output_dir).root)

    def after_step(
        self, model: torch.nn.Module, step: int, *, epoch: float | None = None, optimizer: Any = None,
        lr_scheduler: Any = None,
    ) -> StepOutcome:
        """Call after every optimizer step; probes when the cadence says so."""
        last = self.history.snapshots[-1].step if self.history.snapshots else step
        outcome = StepOutcome()
        if self.schedule.step_ended(step, last):
            outcome = self.measure(model, step, epoch=epoch, optimizer=optimizer, lr_scheduler=lr_scheduler)
        self.schedule.start()
        return outcome

    def measure(
        self, model: torch.nn.Module, step: int, *, trigger: str = "step", epoch: float | None = None,
        optimizer: Any = None, lr_scheduler: Any = None,
    ) -> StepOutcome:
        """Probe now (``trigger``: ``step``, ``evaluate`` or ``train_end``); at most once per step."""
        if step == self.last_probe_step or self.baseline_results is None:
            return StepOutcome()
        self.last_probe_step = step
        with self.schedule.probe_step() as timing:
            return self._probe_step(model, step, epoch, trigger, optimizer, lr_scheduler, timing)

    def end(self, model: torch.nn.Module, step: int, *, epoch: float | None = None) -> StepOutcome:
        """Training ended: a last probe if the cadence asks for one, then the summary; sinks closed."""
        outcome = StepOutcome()
        if self.config.cadence.at_train_end and self.last_probe_step != step:
            outcome = self.measure(model, step, trigger="train_end", epoch=epoch)
        self._write_summary()
        for sink in self.sinks:
            sink.close()
        self.sinks = []
        return outcome

    # ------------------------------------------------------------------ probing
    def _run(self, model: torch.nn.Module, step: int, desc: str, *, baseline: bool = False, spectra: bool = True
             ) -> tuple[dict[str, ProbeResult], float, dict[str, float]]:
        results, seconds, extra = self.measurer.run(model, self.ctx, step, desc, baseline=baseline, spectra=spectra,
                                                    clock=self.schedule.clock)
        return results, self.schedule.share_pass(seconds), extra

    def _measure_baseline(self, model: torch.nn.Module, step: int, epoch: float | None) -> None:
        self.measurer.baseline_results = None
        results, seconds, extra = self._run(model, step, "arena baseline", baseline=True)
        self.measurer.baseline_results = results
        self.schedule.baseline_done(seconds)
        metrics = with_sp(self.history.snapshots, step, {**self.measurer.metrics(results, seconds), **extra},
                          self.config)
        for budget in self.config.budgets:
            value = metrics[budget.key]
            if check_limit(budget, value, value):
                logger.warning(
                    "arena-callbacks: budget %r is already exceeded at baseline (%s = %.4g); it will count as "
                    "breached from the first probe at or after step %d (patience %d)",
                    budget.label, budget.key, value, budget.min_step, budget.patience,
                )
        snapshot = Snapshot(step, metrics, epoch, trigger="baseline")
        self._record(snapshot, None)
        if self.samples is not None:
            self.samples.after_pass(self.ctx, step, self.sinks, baseline=True)
        if self.ctx.is_main:
            log_advice(self.sample_size_advice(), logger)
        if self.rewinder is not None:
            self.rewinder.keep_start(model, step)
            self.rewinder.offer(model, snapshot, snapshot.metrics)

    def _probe_step(
        self, model: torch.nn.Module, step: int, epoch: float | None, trigger: str, optimizer: Any,
        lr_scheduler: Any, timing: ProbeTiming,
    ) -> StepOutcome:
        try:
            results, seconds, extra = self._run(model, step, f"arena probes @ {step}")
        except ProbeFailure as e:
            # Training and checkpoints go on; the measurement of this step is lost.
            logger.warning("arena-callbacks: skipping the probe at step %d: %s", step, e)
            return StepOutcome()
        metrics = with_sp(self.history.snapshots, step, {**self.measurer.metrics(results, seconds), **extra},
                          self.config)
        self._scalars(self.schedule.probed(step, seconds), step)
        snapshot = Snapshot(step, metrics, epoch, trigger=trigger)
        decision = evaluate_budgets(self.config.budgets, snapshot, self.history.snapshots)
        # Decisions are computed from all-reduced numbers, so they agree; still, stop every
        # rank if any rank says stop (a diverged rank must never keep others training).
        stop = self.ctx.any(decision.should_stop)
        rewind = self.ctx.any(decision.action is Action.REWIND)
        self.last_decision = decision
        self._record(snapshot, decision)
        if self.samples is not None:
            self.samples.after_pass(self.ctx, step, self.sinks)
        if rewind:
            timing.rewinding = True
            return self._rewind(model, step, epoch, decision, snapshot, optimizer, lr_scheduler)
        if self.rewinder is not None:
            self.rewinder.offer(model, snapshot, self.history.snapshots[0].metrics)
        if stop:
            if self.stop_decision is None and decision.should_stop:
                self.stop_decision = decision
            elif self.stop_decision is None:  # cannot happen with all-reduced inputs; say so if it does
                logger.warning("arena-callbacks: another rank decided to stop at step %d; stopping too", step)
        return StepOutcome(stop=stop, snapshot=snapshot)

    def _rewind(
        self, model: torch.nn.Module, step: int, epoch: float | None, decision: Decision, breach: Snapshot,
        optimizer: Any, lr_scheduler: Any,
    ) -> StepOutcome:
        """Carry out a ``rewind`` decision on every rank; the model, the logs and the kept state then agree."""
        assert self.rewinder is not None
        baseline = self.history.snapshots[0].metrics

        def measure(desc: str) -> dict[str, float]:
            results, seconds, extra = self._run(model, step, desc, spectra=False)
            return {**self.measurer.metrics(results, seconds), **extra}

        info, metrics = self.rewinder.rewind(model, step, decision, breach, baseline, measure)
        metrics = with_sp(self.history.snapshots, step, metrics, self.config, trigger="rewind")
        info["before"] = sp_pair(breach.metrics)
        info["after"] = sp_pair(metrics)
        info["then"] = self.rewinder.then(info["number"])
        self.rewinder.rewinds.append(info)
        snapshot = Snapshot(step, metrics, epoch, trigger="rewind", extra={"rewind": info})
        self._record(snapshot, None)
        self.rewinder.offer(model, snapshot, baseline)
        message = rewind_message(info, self.config.rewind.lr_factor)
        if self.ctx.is_main:
            logger.warning("arena-callbacks: %s", message)
        self._scalars({"rewind/count": float(len(self.rewinds)),
                       **({"rewind/alpha": float(info["alpha"])} if "alpha" in info else {})}, step)
        for sink in self.sinks:
            sink.text("arena/rewinds", message, step)
        stop = info["then"] == "stop"
        if stop:
            self.stop_decision = self.stop_decision or decision
        else:
            self.rewinder.continue_training(optimizer, lr_scheduler)
        return StepOutcome(stop=stop, rewound=True, snapshot=snapshot)

    # ------------------------------------------------------------------ outputs
    def _open_sinks(self, output_dir: str | Path, tensorboard_dir: str | None,
                    log: Callable[[dict[str, float], int], None] | None) -> None:
        self.sinks = [HistorySink(self.history)]
        if self.ctx.is_main and self.config.logging.tensorboard:
            folder = tensorboard_dir or resolve_tensorboard_dir(self.config.logging.tensorboard_dir, None,
                                                                str(output_dir))
            self.sinks.append(TensorBoardSink(ScalarWriter(folder), self.config, self.measured_keys))
        if log is not None and self.config.logging.log_to_trainer:
            self.sinks.append(LogSink(log))

    def _record(self, snapshot: Snapshot, decision: Decision | None) -> None:
        for sink in self.sinks:
            sink.record(snapshot, decision, self.history.snapshots)
        if self.ctx.is_main:
            for outcome in decision.fired if decision else ():
                logger.warning("arena-callbacks: %s", outcome.message)

    def _scalars(self, values: dict[str, float], step: int) -> None:
        if values:
            for sink in self.sinks:
                sink.scalars(values, step)

    def _save_probes(self) -> None:
        """The probe rows used, so a finished run can be probed again (``arena-callbacks rewind``)."""
        assert self.layout is not None
        data = {n: {"kind": p.kind, "signal": p.signal, "rows": p.rows,
                    **({"generation": p.generation.to_json()} if p.generation is not None else {})}
                for n, p in self.measurer.probes.items()}
        try:
            self.layout.root.mkdir(parents=True, exist_ok=True)
            self.layout.probes.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
        except (OSError, TypeError, ValueError) as e:
            logger.warning("arena-callbacks: could not save the probe rows to %s (%s); post-hoc rewinds will need "
                           "them again", self.layout.probes, e)

    def sample_size_advice(self) -> list[Advice]:
        """Rows each budget's probe needs to fire reliably, from the baseline (:mod:`arena_callbacks.advice`)."""
        base = self.measurer.baseline_results
        if not base or not self.history.snapshots:
            return []
        return sample_size_advice(self.config.budgets, base, self.measurer.probes,
                                  self.history.snapshots[0].metrics)

    def summary(self) -> dict[str, Any]:
        """What ``summary.json`` holds (docs/outputs.md)."""
        first, last = self.history.snapshots[0], self.history.snapshots[-1]
        summary = {
            "stopped": self.stop_decision is not None,
            "stop_step": self.stop_decision.step if self.stop_decision else None,
            "stop_message": self.stop_decision.message if self.stop_decision else None,
            "probes": {n: p.kind for n, p in self.measurer.probes.items()},
            "baseline": first.to_json()["metrics"],
            "final_step": last.step,
            "final": last.to_json()["metrics"],
            "trainable_parameters": self.trainable_parameters,
            "base_model": self.base_model_path,
            "rewinds": self.rewinds,
            "overhead": self.schedule.summary(),
            "sample_size": [a.to_json() for a in self.sample_size_advice()],
            "config": self.config.model_dump(mode="json"),
        }
        op = operating_point(trajectory(current_records(self.history.snapshots)), self.config.operating_point)
        if op is not None:
            summary["operating_point"] = {"step": op.step, "plasticity": op.plasticity, "stability": op.stability}
        return summary

    def _write_summary(self) -> None:
        if not self.ctx.is_main or self.layout is None or not self.history.snapshots:
            return
        try:
            self.layout.root.mkdir(parents=True, exist_ok=True)
            self.layout.summary.write_text(json.dumps(self.summary(), indent=2, allow_nan=False), encoding="utf-8")
        except (OSError, ValueError) as e:
            logger.warning("arena-callbacks: could not write %s (%s)", self.layout.summary, e)

    # ------------------------------------------------------------------ saved state
    def state_dict(self) -> MonitorState:
        """The monitor's state (its tensors apart: :meth:`save` writes those)."""
        assert self.baseline_results is not None
        records = [{**snap.to_json(), **({"decision": dec} if dec else {})}
                   for snap, dec in zip(self.history.snapshots, self.history.decisions)]
        rewinder = self.rewinder.state_dict() if self.rewinder is not None else {}
        overhead = self.schedule.overhead
        return MonitorState(
            baseline_results=dict(self.baseline_results), history=records,
            config=self.config.model_dump(mode="json"), rewinds=list(self.rewinds),
            last_probe_step=self.last_probe_step, best=rewinder.get("best"), theta0_step=rewinder.get("theta0_step"),
            schedule=self.schedule.state_dict(), overhead={**overhead, "fraction": overhead_fraction(overhead)},
        )

    def load_state_dict(self, state: MonitorState, source: str = "the saved state") -> None:
        """Take the monitor back to ``state`` (the kept tensors come with :meth:`restore`)."""
        names = set(state.baseline_results)
        if names != set(self.measurer.probes):
            raise ValueError(
                f"resume from {source}: the checkpoint's probes {sorted(names)} differ from this monitor's "
                f"{sorted(self.measurer.probes)}; give the same probes, or remove {STATE_FILE} to start a new baseline"
            )
        self.measurer.baseline_results = dict(state.baseline_results)
        self.history.restore(state.history)
        self.last_probe_step = state.last_probe_step
        self.schedule.load_state_dict(state.schedule)

    def save(self, folder: str | Path) -> None:
        """Everything a resumed run needs, into a checkpoint folder (every rank its own tensors)."""
        if self.baseline_results is None:
            return
        folder = Path(folder)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            if self.rewinder is not None:
                self.rewinder.export(folder)
            if self.ctx.is_main:
                files, geometry = CheckpointFiles(folder), self.measurer.geometry
                if geometry is not None and geometry.cache is not None:
                    save_state_file(geometry.cache, files.geometry_reference)
                if self.measurer.spectra_reference is not None:
                    save_state_file(self.measurer.spectra_reference, files.spectra_reference)
                self.state_dict().write(folder)
        except (OSError, ValueError, TypeError) as e:
            logger.warning("arena-callbacks: could not save the monitor state into %s (%s); a resume from it will "
                           "measure a new baseline", folder, e)

    def restore(self, folder: str | Path) -> None:
        """Take the monitor back to what it was when ``folder`` was saved (no baseline is measured)."""
        folder = Path(folder)
        state = MonitorState.read(folder)
        self.load_state_dict(state, str(folder))
        if self.rewinder is not None:
            self.rewinder.restore(folder, {"rewinds": state.rewinds, "best": state.best,
                                           "theta0_step": state.theta0_step})
        files, geometry = CheckpointFiles(folder), self.measurer.geometry
        if geometry is not None and files.geometry_reference.is_file():
            geometry.restore_cache(load_state_file(files.geometry_reference))
        if self.config.spectra.enabled and files.spectra_reference.is_file():
            self.measurer.spectra_reference = load_state_file(files.spectra_reference)
        self.resumed_from = folder
        logger.info("arena-callbacks: monitor state restored from %s (%d probe steps, baseline kept)",
                    folder, len(self.history))


def _probe_sets(probes: dict[str, Any] | None, target: Any, config: MonitorConfig) -> dict[str, ProbeSet]:
    if probes is not None and not isinstance(probes, dict):
        raise TypeError(
            f"probes: expected a dict of name -> probe data (e.g. {{'general': dataset}}), got {type(probes).__name__}"
        )
    probes = dict(probes or {})
    if TARGET in probes:
        raise ProbeDataError(f"probes: the name {TARGET!r} is reserved for the target probe; pass it as target=...")
    sets = {name: ProbeSet.build(name, data, config.probe) for name, data in probes.items()}
    if target is not None:
        sets[TARGET] = ProbeSet.build(TARGET, target, config.probe)
    if not sets:
        raise ProbeDataError("probes: give at least one capability probe (probes={...}) or a target probe (target=...)")
    return sets


def _base_model_path(model: torch.nn.Module) -> str | None:
    """Where the pretrained weights came from, for post-hoc rewinds (``None`` if unknown)."""
    base = getattr(model, "module", model)
    peft_config = getattr(base, "peft_config", None)
    if isinstance(peft_config, dict):
        for cfg in peft_config.values():
            path = getattr(cfg, "base_model_name_or_path", None)
            if path:
                return str(path)
    path = getattr(getattr(base, "config", None), "_name_or_path", None)
    return str(path) if path else None


def _count_trainable(model: torch.nn.Module) -> int:
    """Trainable parameters, counting DeepSpeed ZeRO-3 partitions at their full size."""
    return sum(int(getattr(p, "ds_numel", 0) or p.numel()) for p in model.parameters() if p.requires_grad)


