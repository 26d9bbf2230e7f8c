"""The Hugging Face ``Trainer`` / TRL callback: Trainer events translated into engine calls.

The only module that knows the ``transformers`` trainer API. Everything the monitor does is in
:class:`arena_callbacks.engine.ForgettingEngine`; this adapter passes it what the hooks pass
(model, optimizer, learning-rate scheduler, tokenizer, step, output folder) and turns its
answers into ``TrainerControl`` flags.
"""

from __future__ import annotations

import inspect
import logging
import os
from pathlib import Path
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from .config import MonitorConfig
from .engine import ForgettingEngine, StepOutcome
from .layout import STATE_FILE
from .tensorboard import resolve_tensorboard_dir
from .views import EngineViews

__all__ = ["ForgettingMonitor"]

logger = logging.getLogger("arena_callbacks")


class ForgettingMonitor(EngineViews, TrainerCallback):
    """Watches a finetune for forgetting and stops (or rewinds) it when a budget is exhausted.

    Args:
        config: A :class:`MonitorConfig`, a dict, a path to a YAML/JSON file, or ``None``.
        probes: Capability probes by name: ``datasets.Dataset``, list of dicts, JSONL path, or
            :class:`~arena_callbacks.Probe`.
        target: Optional probe of the task being learned (gives ``sp/plasticity``).
        tokenizer: Tokenizer for the probes; defaults to the trainer's ``processing_class``.
        trainer: The trainer this monitor is attached to (or call :meth:`attach`). It is needed
            only to pass the monitor's scalars through ``Trainer.log`` to every ``report_to``
            backend and to put its TensorBoard events beside the trainer's; without it the
            trainer is found once, when training starts, as the owner of the ``TrainerControl``
            the hooks receive.
        **config_fields: Top-level config fields, merged over ``config``.

    What the engine knows is readable on the monitor (:class:`~arena_callbacks.views.EngineViews`):
    ``history``, ``stop_decision``, ``rewinds``, ``config``, ``output_dir``...

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
        trainer: Any = None,
        **config_fields: Any,
    ) -> None:
        self.engine = ForgettingEngine(MonitorConfig.coerce(config, **config_fields), probes, target,
                                       tokenizer=tokenizer)
        self._trainer = trainer
        self._state: TrainerState | None = None

    @classmethod
    def from_config(
        cls, path: str | Path, *, tokenizer: Any = None, trainer: Any = None, **config_fields: Any
    ) -> ForgettingMonitor:
        """A monitor described entirely by one YAML/JSON file: settings, ``probes`` and ``target``
        (:mod:`arena_callbacks.monitor_file`; paths relative to the file). Errors name the key."""
        from .monitor_file import build_from_file

        return build_from_file(cls, path, tokenizer=tokenizer, trainer=trainer, **config_fields)

    def attach(self, trainer: Any) -> ForgettingMonitor:
        """Tell the monitor which trainer it watches (see ``trainer`` above); returns the monitor."""
        self._trainer = trainer
        return self

    # ------------------------------------------------------------------ trainer events
    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._state = state
        if self._trainer is None:
            self._trainer = _trainer_of(control)
        self._check_alone(args)
        tb_dir = None
        if self.config.logging.tensorboard:
            tb_dir = resolve_tensorboard_dir(self.config.logging.tensorboard_dir, self._trainer, args.output_dir)
        self.engine.begin(
            kwargs["model"], step=state.global_step, epoch=state.epoch, output_dir=args.output_dir,
            tokenizer=kwargs.get("processing_class"), tensorboard_dir=tb_dir, log=self._log,
            resume_from=_resume_checkpoint(args, state) if state.global_step > 0 else None,
        )

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        outcome = self.engine.after_step(kwargs["model"], state.global_step, epoch=state.epoch,
                                         optimizer=kwargs.get("optimizer"), lr_scheduler=kwargs.get("lr_scheduler"))
        _apply(outcome, args, control)

    def on_evaluate(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.config.cadence.on_evaluate:
            outcome = self.engine.measure(kwargs["model"], state.global_step, trigger="evaluate", epoch=state.epoch,
                                          optimizer=kwargs.get("optimizer"), lr_scheduler=kwargs.get("lr_scheduler"))
            _apply(outcome, args, control)

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if not ckpt.is_dir():
            logger.warning("arena-callbacks: checkpoint folder %s not found; monitor state not saved with it", ckpt)
            return
        self.engine.save(ckpt)

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        _apply(self.engine.end(kwargs["model"], state.global_step, epoch=state.epoch), args, control)

    def _check_alone(self, args: TrainingArguments) -> None:
        """Two monitors of one trainer must not write the same folder (refused at train start)."""
        mine = self.engine.folder_for(args.output_dir).resolve()
        callbacks = getattr(getattr(self._trainer, "callback_handler", None), "callbacks", [])
        for other in callbacks:
            if (isinstance(other, ForgettingMonitor) and other is not self
                    and other.engine.folder_for(args.output_dir).resolve() == mine):
                raise ValueError(
                    f"two ForgettingMonitors on one trainer would both write {mine}; attach one, or "
                    "give each its own logging.output_dir"
                )

    # ------------------------------------------------------------------ the trainer's log
    def _log(self, metrics: dict[str, float], step: int) -> None:
        """Send the scalars through ``Trainer.log`` (every ``report_to`` backend, ``log_history``).

        ``Trainer.log`` itself, not a subclass override (TRL's would fold its pending training
        metrics into ours). Its TensorBoard callback is skipped for this call when the monitor
        writes TensorBoard itself, so curves are not drawn twice. The handler's ``on_log`` clears
        ``control.should_log``, which ``DefaultFlowCallback`` set at this step for the trainer's
        own log: it is put back, or the trainer's loss of this step would be lost.
        """
        trainer = self._trainer
        if trainer is None:
            if self._state is not None:
                self._state.log_history.append({**metrics, "step": step})
            return
        from transformers import Trainer

        handler = trainer.callback_handler
        saved = handler.callbacks
        should_log = trainer.control.should_log
        if self.config.logging.tensorboard:
            handler.callbacks = [cb for cb in saved if type(cb).__name__ != "TensorBoardCallback"]
        try:
            Trainer.log(trainer, dict(metrics))
        finally:
            handler.callbacks = saved
            trainer.control.should_log = should_log


def _apply(outcome: StepOutcome, args: TrainingArguments, control: TrainerControl) -> None:
    """The engine's answer as ``TrainerControl`` flags."""
    if outcome.stop:
        control.should_training_stop = True
    if outcome.rewound:
        save = getattr(args, "save_strategy", "no")
        if getattr(save, "value", save) != "no":
            control.should_save = True  # the newest checkpoint holds what was loaded


def _trainer_of(control: TrainerControl) -> Any:
    """The ``transformers.Trainer`` that owns ``control``, when none was given.

    Hooks receive the model, optimizer and scheduler but not the trainer, and only the trainer
    can pass scalars to the ``report_to`` backends. The ``TrainerControl`` they receive is the
    trainer's own ``control`` attribute, so its owner is the trainer: found once, at train start,
    among the objects that refer to it (two passes over the garbage collector's objects, tens of
    milliseconds). Give ``ForgettingMonitor(trainer=...)`` or call :meth:`ForgettingMonitor.attach`
    to skip it.
    """
    import gc

    from transformers import Trainer

    for ref in gc.get_referrers(control):
        if isinstance(ref, Trainer) and ref.control is control:
            return ref
        if isinstance(ref, dict) and ref.get("control") is control:  # the trainer's attribute dict
            for owner in gc.get_referrers(ref):
                if isinstance(owner, Trainer) and getattr(owner, "__dict__", None) is ref:
                    return owner
    return None


def _resume_checkpoint(args: TrainingArguments, state: TrainerState) -> Path | None:
    """The checkpoint folder a resumed run starts from: ``args.resume_from_checkpoint`` when it
    holds the monitor's state, else ``<output_dir>/checkpoint-<step>`` (what
    ``train(resume_from_checkpoint=True)`` picks); only a run resumed from a folder elsewhere
    needs the caller's ``resume_from_checkpoint`` argument, looked up on the stack."""
    guess = Path(args.output_dir) / f"checkpoint-{state.global_step}"
    for candidate in (getattr(args, "resume_from_checkpoint", None), guess):
        if isinstance(candidate, (str, os.PathLike)) and (Path(candidate) / STATE_FILE).is_file():
            return Path(candidate)
    frame = inspect.currentframe()
    try:
        for _ in range(24):
            frame = frame.f_back if frame is not None else None
            if frame is None:
                break
            value = frame.f_locals.get("resume_from_checkpoint")
            if isinstance(value, (str, os.PathLike)) and os.path.isdir(value):
                return Path(value)
    finally:
        del frame
    return guess if guess.is_dir() else None
