"""One seeded training run, with or without the monitor, and everything the trainer produced.

Shared by ``tests/test_observer.py`` (in process) and ``tests/dist_scripts/observer_worker.py``
(one copy per rank under torchrun). A run returns a JSON-able record of what the *trainer*
produced; :func:`differences` compares two records and names what differs. The monitor's own
keys and files are set apart, so the rule "attached or not, the trainer's run is the same" is
checked on everything else:

* ``log_history``: every entry the trainer wrote, with its own keys (``loss``, ``grad_norm``,
  ``learning_rate``, ``epoch``, eval metrics, TRL's metrics), timing keys left out;
* TensorBoard: the trainer's ``train/*`` and ``eval/*`` scalars (when ``report_to`` has it);
* the final weights, the learning rate seen by the optimizer at every step, the batches in the
  order the data loader gave them;
* every checkpoint file: bytes, except ``trainer_state.json`` (its ``log_history`` filtered as
  above) and ``training_args.bin`` (its fields, the output folder apart).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from helpers import TARGET_TEXT, corpus, pretrained_model

GENERAL = [{"text": s} for s in corpus(12, seed=7)]
FACTS = [
    {"context": "red blue", "choices": [" green", " dog."], "answer": 0},
    {"context": "one two", "choices": [" three", " fish"], "answer": 0},
]
TARGET = [{"prompt": "one two three", "completion": " four five six"}]

#: The monitor in every case: default settings, probes at every logging step (so a probe step is
#: always a logging step), geometry on, and a rewind budget that never fires.
MONITOR = {
    "cadence": {"every_n_steps": 2},
    "probe": {"batch_size": 8, "max_length": 64},
    "geometry": {"enabled": True, "tokens_per_module": 64},
    "budgets": [{"key": "delta_nll/general", "max_rise": 1000.0, "action": "rewind"}],
    "rewind": {"mode": "path"},
}
MAX_STEPS = 6
TIMING = ("runtime", "per_second", "total_flos")


def _timing(key: str) -> bool:
    """Wall-clock keys (``train_runtime``, ``eval/samples_per_second``...), which no two runs share."""
    return key.rsplit("/", 1)[-1].endswith(TIMING)


def is_monitor_entry(entry: dict[str, Any]) -> bool:
    """The monitor's own log entries: its keys are namespaced with ``/``, the trainer's are not."""
    return any("/" in k for k in entry)


def trainer_entries(log_history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The trainer's own entries, timing keys left out (they differ between any two runs)."""
    return [{k: v for k, v in e.items() if not _timing(k)} for e in log_history if not is_monitor_entry(e)]


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _checkpoint_record(folder: Path) -> dict[str, Any]:
    """Every file of a checkpoint folder but the monitor's own (``arena_*``)."""
    files: dict[str, Any] = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        name = path.relative_to(folder).as_posix()
        if name.startswith("arena_"):
            continue
        if name == "trainer_state.json":
            state = json.loads(path.read_text())
            state["log_history"] = trainer_entries(state["log_history"])
            state.pop("stateful_callbacks", None)
            files[name] = state
        elif name == "training_args.bin":
            args = torch.load(path, weights_only=False)
            files[name] = {k: str(v) for k, v in args.to_dict().items() if k != "output_dir"}
        else:
            files[name] = _digest(path)
    return files


def _tensorboard(folder: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags: dict[str, list[tuple[int, float]]] = {}
    for f in sorted(glob.glob(str(folder / "**" / "events.out.tfevents.*"), recursive=True)):
        acc = EventAccumulator(f)
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            if tag.startswith(("train/", "eval/")) and not _timing(tag):
                tags.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return tags


def run(
    out: str | Path,
    *,
    trainer_kind: str = "trainer",
    method: str = "lora",
    monitored: bool = True,
    monitor_config: dict[str, Any] | None = None,
    tokenizer: Any = None,
    report_to: tuple[str, ...] = ("tensorboard",),
    extra_args: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train the tiny GPT-2 (dropout 0.1 in embeddings, attention and residuals; LoRA dropout
    0.1) for :data:`MAX_STEPS` seeded steps, with evaluation every 2 steps and a checkpoint every
    3, and return what the trainer produced (see the module docstring)."""
    from helpers import make_tokenizer
    from transformers import DataCollatorForLanguageModeling, TrainerCallback

    from arena_callbacks import ForgettingMonitor

    out = Path(out)
    tok = tokenizer or make_tokenizer()
    model = pretrained_model("gpt2")
    # The adapter's initialisation is seeded here, as a user's script should (README: reproducible
    # runs): the first pretrained_model() call of a process pretrains and so draws more random numbers.
    torch.manual_seed(0)
    assert model.config.resid_pdrop > 0 and model.config.attn_pdrop > 0  # dropout on: RNG matters
    peft_config = None
    if method == "lora":
        import peft

        peft_config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["c_attn", "c_proj"],
                                      fan_in_fan_out=True, task_type="CAUSAL_LM")
    texts = [TARGET_TEXT, *corpus(15, seed=3)]
    callbacks: list[Any] = []
    monitor = None
    if monitored:
        monitor = ForgettingMonitor(monitor_config or MONITOR, probes={"general": GENERAL, "facts": FACTS},
                                    target=TARGET)
        callbacks.append(monitor)

    seen: dict[str, list[Any]] = {"lr": [], "batches": [], "backend": []}

    class Watch(TrainerCallback):
        """The learning rate the optimizer holds after each step, and what a ``report_to``
        backend (W&B, MLflow...) receives in ``on_log``."""

        def on_step_end(self, args, state, control, optimizer=None, **kwargs):
            seen["lr"].append([g["lr"] for g in optimizer.param_groups])

        def on_log(self, args, state, control, logs=None, **kwargs):
            seen["backend"].append({**logs, "step": state.global_step})

    callbacks.append(Watch())
    common = {
        "output_dir": str(out), "max_steps": MAX_STEPS, "per_device_train_batch_size": 4, "learning_rate": 5e-3,
        "lr_scheduler_type": "linear", "warmup_steps": 2, "logging_steps": 2, "eval_strategy": "steps", "eval_steps": 2,
        "per_device_eval_batch_size": 4, "save_strategy": "steps", "save_steps": 3, "report_to": list(report_to),
        "use_cpu": True, "seed": 0, "disable_tqdm": True, "dataloader_num_workers": 0,
    }
    common.update(extra_args or {})
    if trainer_kind == "sft":
        import trl
        from datasets import Dataset

        # TRL's own defaults, written out: bf16 autocast and gradient checkpointing, even on the CPU.
        cfg = trl.SFTConfig(**common, bf16=True, gradient_checkpointing=True, max_length=64,
                            dataset_text_field="text")
        data = Dataset.from_list([{"text": t} for t in texts * 4])
        trainer = trl.SFTTrainer(model=model, args=cfg, train_dataset=data, eval_dataset=data.select(range(8)),
                                 processing_class=tok, peft_config=peft_config, callbacks=callbacks)
    else:
        from transformers import Trainer, TrainingArguments

        if peft_config is not None:
            import peft

            model = peft.get_peft_model(model, peft_config)
        data = [tok(t) for t in texts * 4]
        trainer = Trainer(model=model, args=TrainingArguments(**common), train_dataset=data, eval_dataset=data[:8],
                          processing_class=tok, data_collator=DataCollatorForLanguageModeling(tok, mlm=False),
                          callbacks=callbacks)

    def record_batch(module, args, kwargs):
        if torch.is_grad_enabled():  # training forwards (evaluation and probes run under no_grad)
            seen["batches"].append(kwargs["input_ids"].tolist())

    hook = trainer.model.register_forward_pre_hook(record_batch, with_kwargs=True)
    trainer.train()
    hook.remove()

    weights = {k: v.detach().double() for k, v in trainer.model.state_dict().items()}
    record = {
        "log_history": trainer_entries(trainer.state.log_history),
        "monitor_entries": [e for e in trainer.state.log_history if is_monitor_entry(e)],
        "backend": trainer_entries(seen["backend"]),
        "backend_monitor_entries": [e for e in seen["backend"] if is_monitor_entry(e)],
        "weights": {k: hashlib.sha256(v.numpy().tobytes()).hexdigest() for k, v in weights.items()},
        "lr": seen["lr"],
        "batches": seen["batches"],
        "checkpoints": {p.name: _checkpoint_record(p) for p in sorted(out.glob("checkpoint-*"))},
        "tensorboard": _tensorboard(out / "runs") if "tensorboard" in report_to else {},
        "global_step": trainer.state.global_step,
        "monitor_steps": [s.step for s in monitor.history] if monitor is not None else [],
        "rewinds": monitor.rewinds if monitor is not None else [],
        "rank": int(os.environ.get("RANK", "0")),
        "world_size": trainer.args.world_size,
    }
    return record


#: What a monitored run may add: its own record lists, nothing of the trainer's.
MONITOR_ONLY = ("monitor_entries", "backend_monitor_entries", "monitor_steps", "rewinds")


def differences(plain: dict[str, Any], watched: dict[str, Any]) -> list[str]:
    """What differs between two records, item by item (``[]``: the same run)."""
    diffs = []
    for key in sorted(set(plain) | set(watched)):
        if key in MONITOR_ONLY:
            continue
        a, b = plain.get(key), watched.get(key)
        if key == "checkpoints" and a is not None and b is not None and a != b:
            for name in sorted(set(a) | set(b)):
                for f in sorted(set(a.get(name, {})) | set(b.get(name, {}))):
                    if a.get(name, {}).get(f) != b.get(name, {}).get(f):
                        diffs.append(f"checkpoints/{name}/{f}")
        elif key == "weights" and a != b:
            diffs += [f"weights/{k}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        elif a != b:
            diffs.append(key)
    return diffs
