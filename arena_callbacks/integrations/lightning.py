"""The Lightning callback: Lightning hooks translated into engine calls.

The only module that knows Lightning's API (``pip install "arena-callbacks[lightning]"``).
Everything the monitor does is in :class:`arena_callbacks.engine.ForgettingEngine`; this adapter
passes it the model, optimizer, learning-rate scheduler, step and folder, and turns its answers
into ``trainer.should_stop``:

=====================================  =========================================================
Lightning                              engine
=====================================  =========================================================
``on_train_start``                     ``begin`` (baseline; a resumed fit restores the state)
``on_train_batch_end``                 ``after_step``, only when an optimizer step happened
                                       (``trainer.global_step`` counts optimizer steps, so
                                       gradient accumulation is respected)
``on_validation_end``                  ``measure(trigger="evaluate")`` with ``cadence.on_evaluate``
``state_dict`` / ``load_state_dict``   ``save`` / ``restore``: the monitor's state and kept tensors
                                       travel inside Lightning's checkpoint
``on_train_end``                       ``end`` (summary)
=====================================  =========================================================

A rewind loads the weights in place; when training goes on, the engine clears the optimizer's
moments and lowers the learning rate of ``trainer.optimizers[0]`` and of the first scheduler of
``trainer.lr_scheduler_configs``. Scalars go to the trainer's loggers (``log_metrics``, rank 0).

Example:
    >>> from arena_callbacks.integrations.lightning import ForgettingCallback  # doctest: +SKIP
    >>> monitor = ForgettingCallback({"budgets": [{"key": "retention/general", "max_drop": 0.1}]},
    ...                              probes={"general": rows}, tokenizer=tok)       # doctest: +SKIP
    >>> pl.Trainer(max_steps=100, callbacks=[monitor]).fit(module)                  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import math
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

try:
    import lightning.pytorch as pl
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        "arena_callbacks.integrations.lightning needs Lightning: pip install \"arena-callbacks[lightning]\" "
        "(or pip install lightning)"
    ) from e

from ..config import MonitorConfig
from ..engine import ForgettingEngine, StepOutcome
from ..layout import STATE_FILE
from ..rewind import load_state_file, save_state_file
from ..views import EngineViews

__all__ = ["ForgettingCallback"]

logger = logging.getLogger("arena_callbacks")

#: Version of what :meth:`ForgettingCallback.state_dict` returns.
STATE_VERSION = 1


class ForgettingCallback(EngineViews, pl.Callback):
    """Watches a Lightning fit for forgetting and stops (or rewinds) it when a budget is exhausted.

    Args:
        config: A :class:`MonitorConfig`, a dict, a path to a YAML/JSON file, or ``None``.
        probes: Capability probes by name: ``datasets.Dataset``, list of dicts, JSONL path, or
            :class:`~arena_callbacks.Probe`.
        target: Optional probe of the task being learned (gives ``sp/plasticity``).
        tokenizer: Tokenizer for the probes; defaults to the LightningModule's ``tokenizer``.
        module: The causal LM the probes run on (and rewinds load into): the name of an attribute
            of the LightningModule, or a function of it. Default: its ``model`` attribute when that
            is a module (the usual wrapper of a Hugging Face model), else the LightningModule
            itself, whose ``forward`` must then take ``input_ids``/``attention_mask`` and return
            logits.
        **config_fields: Top-level config fields, merged over ``config``.

    The monitor writes into ``<trainer.default_root_dir>/arena`` (``logging.output_dir`` to change).
    """

    def __init__(
        self,
        config: MonitorConfig | dict[str, Any] | str | Path | None = None,
        probes: dict[str, Any] | None = None,
        target: Any = None,
        *,
        tokenizer: Any = None,
        module: str | Callable[[Any], torch.nn.Module] | None = None,
        **config_fields: Any,
    ) -> None:
        self.engine = ForgettingEngine(MonitorConfig.coerce(config, **config_fields), probes, target,
                                       tokenizer=tokenizer)
        self.module = module
        self._last_step: int | None = None
        self._loaded: dict[str, Any] | None = None
        self._trainer: Any = None

    @classmethod
    def from_config(
        cls, path: str | Path, *, tokenizer: Any = None, module: str | Callable[[Any], torch.nn.Module] | None = None,
        **config_fields: Any,
    ) -> ForgettingCallback:
        """A callback described entirely by one monitor file (settings, ``probes``, ``target``;
        :mod:`arena_callbacks.monitor_file`), as ``ForgettingMonitor.from_config``. Errors name the key."""
        from ..monitor_file import build_from_file

        return build_from_file(cls, path, tokenizer=tokenizer, module=module, **config_fields)

    # ------------------------------------------------------------------ Lightning hooks
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._trainer = trainer
        step = trainer.global_step
        self._last_step = step
        kwargs: dict[str, Any] = {
            "step": step, "epoch": float(trainer.current_epoch), "output_dir": trainer.default_root_dir,
            "tokenizer": getattr(pl_module, "tokenizer", None), "tensorboard_dir": self._tensorboard_dir(trainer),
            "log": self._log,
        }
        model = self._model(pl_module)
        if step > 0 and self._loaded:
            with tempfile.TemporaryDirectory(prefix="arena-lightning-") as tmp:
                _write_files(self._loaded, Path(tmp), int(trainer.global_rank), trainer)
                self.engine.begin(model, resume_from=tmp, **kwargs)
            if trainer.ckpt_path:
                self.engine.resumed_from = Path(trainer.ckpt_path)
        else:
            self.engine.begin(model, **kwargs)
        self._loaded = None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if step == self._last_step:  # gradient accumulation: no optimizer step at this batch
            return
        self._last_step = step
        outcome = self.engine.after_step(self._model(pl_module), step, epoch=_epoch(trainer, batch_idx),
                                         **self._optimizers(trainer))
        _apply(outcome, trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if (not self.config.cadence.on_evaluate or trainer.sanity_checking or trainer.state.fn != "fit"
                or self.engine.baseline_results is None):
            return
        outcome = self.engine.measure(self._model(pl_module), trainer.global_step, trigger="evaluate",
                                      epoch=float(trainer.current_epoch), **self._optimizers(trainer))
        _apply(outcome, trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.engine.baseline_results is not None:
            self.engine.end(self._model(pl_module), trainer.global_step, epoch=float(trainer.current_epoch))

    # ------------------------------------------------------------------ Lightning checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The monitor's state and kept tensors (what :meth:`ForgettingEngine.save` writes into a
        checkpoint folder), for Lightning's checkpoint; empty before training starts."""
        if self.engine.baseline_results is None:
            return {}
        with tempfile.TemporaryDirectory(prefix="arena-lightning-") as tmp:
            self.engine.save(tmp)
            files: dict[str, Any] = {}
            for path in sorted(Path(tmp).iterdir()):
                if path.name.endswith(".safetensors"):
                    files[path.name] = load_state_file(path)
                elif path.name.endswith(".json"):
                    files[path.name] = path.read_text(encoding="utf-8")
        return {"version": STATE_VERSION, "rank": self.engine.ctx.rank, "files": files}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Kept until training starts: :meth:`on_train_start` hands it to the engine."""
        if not state_dict:
            return
        if state_dict.get("version") != STATE_VERSION:
            raise ValueError(f"the checkpoint's arena-callbacks state has version {state_dict.get('version')}, "
                             f"not {STATE_VERSION}")
        self._loaded = state_dict

    # ------------------------------------------------------------------ helpers
    def _model(self, pl_module: pl.LightningModule) -> torch.nn.Module:
        if callable(self.module):
            return self.module(pl_module)
        if isinstance(self.module, str):
            return getattr(pl_module, self.module)
        inner = getattr(pl_module, "model", None)
        return inner if isinstance(inner, torch.nn.Module) else pl_module

    @staticmethod
    def _optimizers(trainer: pl.Trainer) -> dict[str, Any]:
        """What a continued rewind adjusts: the first optimizer and the first LR scheduler."""
        configs = trainer.lr_scheduler_configs
        return {"optimizer": trainer.optimizers[0] if trainer.optimizers else None,
                "lr_scheduler": configs[0].scheduler if configs else None}

    def _tensorboard_dir(self, trainer: pl.Trainer) -> str | None:
        """Beside a ``TensorBoardLogger``'s events (``<log_dir>/arena``), unless the config names a folder."""
        if not self.config.logging.tensorboard or self.config.logging.tensorboard_dir:
            return None
        for lg in trainer.loggers:
            if isinstance(lg, pl.loggers.TensorBoardLogger) and trainer.is_global_zero:
                return os.path.join(lg.log_dir, "arena")
        return None

    def _log(self, metrics: dict[str, float], step: int) -> None:
        """The scalars to the trainer's loggers, from rank 0. A ``TensorBoardLogger`` is skipped
        when the monitor writes TensorBoard itself (the curves would be drawn twice); non-finite
        values are left out (some loggers refuse them)."""
        trainer = self._trainer
        if trainer is None or not trainer.is_global_zero:
            return
        finite = {k: float(v) for k, v in metrics.items() if math.isfinite(v)}
        for lg in trainer.loggers:
            if self.config.logging.tensorboard and isinstance(lg, pl.loggers.TensorBoardLogger):
                continue
            lg.log_metrics(finite, step)


def _apply(outcome: StepOutcome, trainer: pl.Trainer) -> None:
    if outcome.stop:
        trainer.should_stop = True


def _epoch(trainer: pl.Trainer, batch_idx: int) -> float:
    batches = trainer.num_training_batches
    if isinstance(batches, (int, float)) and math.isfinite(batches) and batches > 0:
        return trainer.current_epoch + (batch_idx + 1) / batches
    return float(trainer.current_epoch)


def _write_files(state: dict[str, Any], folder: Path, rank: int, trainer: pl.Trainer) -> None:
    """Put the saved files back into a folder the engine restores from.

    Lightning writes the checkpoint from rank 0, so it holds rank 0's kept rewind states; they are
    every rank's under replicated strategies (single device, DDP, DeepSpeed ZeRO-1/2) and are given
    to this rank under its own file name. Sharded weights (FSDP) differ per rank: refused.
    """
    saved_rank = int(state.get("rank", 0))
    kept = [n for n in state["files"] if re.search(r"-rank\d+\.safetensors$", n)]
    if kept and rank != saved_rank and "FSDP" in type(trainer.strategy).__name__.upper():
        raise ValueError(
            "resume: the Lightning checkpoint holds the kept rewind states of rank "
            f"{saved_rank} only, and under {type(trainer.strategy).__name__} each rank keeps its own shard; "
            "use action 'stop' (rewind the saved run afterwards with `arena-callbacks rewind`) or resume on one device"
        )
    for name, data in state["files"].items():
        if name in kept:
            save_state_file(data, folder / re.sub(r"-rank\d+\.safetensors$", f"-rank{rank}.safetensors", name))
        elif isinstance(data, str):
            (folder / name).write_text(data, encoding="utf-8")
        else:
            save_state_file(data, folder / name)
    if not (folder / STATE_FILE).is_file():
        logger.warning("arena-callbacks: the Lightning checkpoint's monitor state has no %s", STATE_FILE)
