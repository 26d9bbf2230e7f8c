"""Real Trainer / SFTTrainer runs of a few steps with the monitor attached."""

import glob
import json
import os

import pytest
from helpers import TARGET_TEXT, corpus, pretrained_model

from arena_callbacks import BudgetKeyError, ForgettingMonitor, ProbeDataError, evaluate_budgets
from arena_callbacks.history import read_history

GENERAL = [{"text": s} for s in corpus(24, seed=7)]
FACTS = [
    {"context": "red blue", "choices": [" green", " dog."], "answer": 0},
    {"context": "one two", "choices": [" three", " fish"], "answer": 0},
    {"context": "the cat", "choices": [" runs.", " nine"], "answer": 0},
]
TARGET = [{"prompt": "one two three", "completion": " four five six"}]


def monitor_config(**budget):
    return {
        "cadence": {"every_n_steps": 2},
        "probe": {"batch_size": 8, "max_length": 64},
        "budgets": [budget or {"key": "delta_nll/general", "max_rise": 0.3, "patience": 2}],
    }


def scalars(logdir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = {}
    for f in glob.glob(os.path.join(logdir, "**", "events.out.tfevents.*"), recursive=True):
        acc = EventAccumulator(f)
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            tags.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return tags


def first_firing_step(monitor):
    """Re-run the pure budget function over the recorded history: where should it have stopped?"""
    snaps = monitor.history.snapshots
    for i in range(1, len(snaps)):
        if evaluate_budgets(monitor.config.budgets, snaps[i], snaps[:i]).should_stop:
            return snaps[i].step
    return None


def check_stopped_run(trainer, monitor, out, max_steps):
    stop = first_firing_step(monitor)
    assert stop is not None and stop < max_steps, "the budget should have been breached"
    assert trainer.state.global_step == stop  # stopped at the very step of the breach
    assert monitor.stop_decision is not None and monitor.stop_decision.step == stop
    assert "delta_nll/general rose to" in monitor.stop_decision.message
    assert monitor.stop_decision.message.endswith(": stopping")
    # History on disk equals the one in memory.
    on_disk = read_history(out / "arena")
    assert [s.step for s in on_disk] == [s.step for s in monitor.history] == list(range(0, stop + 1, 2))
    assert on_disk[-1].metrics["delta_nll/general"] == pytest.approx(
        monitor.history.snapshots[-1].metrics["delta_nll/general"]
    )
    summary = json.loads((out / "arena" / "summary.json").read_text())
    assert summary["stopped"] and summary["stop_step"] == stop
    # TensorBoard has the scalars at every probe step, in the trainer's TensorBoard folder.
    tags = scalars(str(out / "runs"))
    assert [s for s, _ in sorted(tags["retention/general"])] == list(range(0, stop + 1, 2))
    assert "sp/stability" in tags and "train/loss" in tags  # trainer's and ours side by side
    assert not any(t.startswith("train/retention") for t in tags)  # not drawn twice
    # Other report_to backends get them through the trainer's log.
    logged = [h for h in trainer.state.log_history if "retention/general" in h]
    assert [h["step"] for h in logged] == list(range(0, stop + 1, 2))


def test_trainer_stops_at_the_breach_step(tokenizer, tmp_path):
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    model = pretrained_model()
    data = [tokenizer(TARGET_TEXT) for _ in range(64)]
    monitor = ForgettingMonitor(monitor_config(), probes={"general": GENERAL, "facts": FACTS}, target=TARGET)
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=30, per_device_train_batch_size=8, learning_rate=2e-2,
        report_to=["tensorboard"], logging_steps=1, save_strategy="no", use_cpu=True, seed=0,
    )
    trainer = Trainer(
        model=model, args=args, train_dataset=data, processing_class=tokenizer,
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False), callbacks=[monitor],
    )
    trainer.train()
    check_stopped_run(trainer, monitor, tmp_path, 30)
    last = monitor.history.snapshots[-1].metrics
    assert last["sp/plasticity"] > 0 and last["target/delta_nll"] < 0  # the target was being learned
    assert monitor.history.snapshots[0].metrics["retention/general"] == 1.0


@pytest.mark.parametrize("method", ["lora", "oft"])
def test_sft_trainer_with_peft_stops(tokenizer, tmp_path, method):
    peft = pytest.importorskip("peft")
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    if method == "lora":
        pcfg = peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM")
        lr = 5e-2
    else:
        pcfg = peft.OFTConfig(r=0, oft_block_size=8, target_modules="all-linear", task_type="CAUSAL_LM")
        lr = 5e-2
    cfg = trl.SFTConfig(
        output_dir=str(tmp_path), max_steps=40, per_device_train_batch_size=8, learning_rate=lr,
        report_to=["tensorboard"], logging_steps=1, save_strategy="no", use_cpu=True, seed=0,
        # TRL turns these on by default even on CPU; this test runs them as TRL does, so the
        # monitor's own fp32 probe precision is exercised under the trainer's bf16 autocast.
        bf16=True, gradient_checkpointing=True, max_length=64, dataset_text_field="text",
    )
    monitor = ForgettingMonitor(monitor_config(), probes={"general": GENERAL})
    trainer = trl.SFTTrainer(
        model=pretrained_model(), args=cfg, train_dataset=Dataset.from_list([{"text": TARGET_TEXT}] * 64),
        processing_class=tokenizer, peft_config=pcfg, callbacks=[monitor],
    )
    trainer.train()
    check_stopped_run(trainer, monitor, tmp_path, 40)
    # Probes ran in fp32 despite the trainer's bf16: the baseline equals a plain fp32 pass.
    base = monitor.runner.run(pretrained_model())["general"].nll
    assert monitor.history.snapshots[0].metrics["nll/general"] == pytest.approx(base, rel=1e-6)


def test_tokenizer_from_trainer_and_errors_at_train_start(tokenizer, tmp_path):
    from transformers import Trainer, TrainingArguments

    long_row = [{"text": " ".join(["seven"] * 300)}]
    monitor = ForgettingMonitor(monitor_config(), probes={"general": GENERAL + long_row})
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, report_to=[], use_cpu=True, save_strategy="no")
    trainer = Trainer(model=pretrained_model(), args=args, train_dataset=[tokenizer(TARGET_TEXT)] * 4,
                      processing_class=tokenizer, callbacks=[monitor])
    with pytest.raises(ProbeDataError, match=r"probe 'general' \(text\), row 24: \d+ tokens, longer than"):
        trainer.train()
    assert trainer.state.global_step == 0  # reported before the first update


def test_construction_errors():
    with pytest.raises(BudgetKeyError) as e:
        ForgettingMonitor(monitor_config(key="retention/genral", max_drop=0.1), probes={"general": GENERAL})
    assert "budgets[0].key: 'retention/genral' is not measured" in str(e.value)
    assert "retention/general" in str(e.value)  # lists what exists
    with pytest.raises(ProbeDataError, match="give at least one capability probe"):
        ForgettingMonitor(monitor_config())
    with pytest.raises(ProbeDataError, match="reserved for the target probe"):
        ForgettingMonitor(probes={"target": GENERAL})
    # Keyword config fields work and are validated.
    m = ForgettingMonitor(probes={"general": GENERAL}, stability="min", cadence={"every_n_steps": 7})
    assert m.config.stability == "min" and m.config.cadence.every_n_steps == 7


def test_on_evaluate_cadence_and_log_action(tokenizer, tmp_path):
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    cfg = {
        "cadence": {"every_n_steps": None, "on_evaluate": True},
        "budgets": [{"key": "delta_nll/general", "max_rise": 0.0, "action": "log"}],
        "logging": {"tensorboard": False},
    }
    monitor = ForgettingMonitor(cfg, probes={"general": GENERAL})
    data = [tokenizer(TARGET_TEXT) for _ in range(16)]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=6, eval_strategy="steps", eval_steps=3,
                             per_device_train_batch_size=4, learning_rate=2e-2, report_to=[], use_cpu=True,
                             save_strategy="no")
    trainer = Trainer(model=pretrained_model(), args=args, train_dataset=data, eval_dataset=data[:4],
                      processing_class=tokenizer, data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
                      callbacks=[monitor])
    trainer.train()
    assert trainer.state.global_step == 6  # 'log' never stops
    assert [(s.step, s.trigger) for s in monitor.history] == [(0, "baseline"), (3, "evaluate"), (6, "evaluate")]
    assert monitor.last_decision is not None and monitor.last_decision.action.value == "log"
    assert not glob.glob(str(tmp_path / "runs" / "**" / "events*"), recursive=True)  # tensorboard off


def test_overhead_budget_schedules_probes_from_measured_costs(tokenizer, tmp_path, monkeypatch):
    """A controlled clock: a training step takes 1 s, a probe pass 1 s, the bookkeeping after it
    (metrics, budgets, history, TensorBoard) 0.5 s. With b = 0.25 the probes may add a quarter to
    the training time: the first two intervals (cost 1 s, step time timed over 2 calibration
    steps) are ceil(1 / (0.25 · 1)) = 4 steps, as no bookkeeping has been measured before the
    first probe step; after the second, the cost includes the first one's bookkeeping, 1.5 s, so
    the next interval is ceil(1.5 / 0.25) = 6 steps."""
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainerCallback, TrainingArguments

    from arena_callbacks import ProbeRunner
    from arena_callbacks.engine import ForgettingEngine

    clock = [0.0]

    def ticking(fn, seconds):
        def wrapper(*args, **kwargs):
            clock[0] += seconds
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(ProbeRunner, "run", ticking(ProbeRunner.run, 1.0))
    monkeypatch.setattr(ForgettingEngine, "_record", ticking(ForgettingEngine._record, 0.5))

    class Step(TrainerCallback):
        def on_step_begin(self, *args, **kwargs):
            clock[0] += 1.0

    monitor = ForgettingMonitor(
        {"cadence": {"overhead_budget": 0.25, "calibration_steps": 2, "at_train_end": False},
         "probe": {"batch_size": 8, "max_length": 64}, "logging": {"tensorboard": False}},
        probes={"general": GENERAL},
    )
    monitor.engine.schedule.clock = lambda: clock[0]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=10, per_device_train_batch_size=8, report_to=[],
                             save_strategy="no", use_cpu=True, seed=0)
    Trainer(model=pretrained_model(), args=args, train_dataset=[tokenizer(TARGET_TEXT) for _ in range(64)],
            processing_class=tokenizer, data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
            callbacks=[Step(), monitor]).train()
    assert [s.step for s in monitor.history] == [0, 4, 8]  # the next one would be at 14
    assert all(s.metrics["probe/seconds"] == 1.0 for s in monitor.history)
    assert monitor.next_probe_step == 14
    summary = json.loads((tmp_path / "arena" / "summary.json").read_text())
    assert summary["overhead"]["baseline_seconds"] == 1.0
    # Two probe steps of 1 s + 0.5 s; ten 1-s steps, the four after the last probe included.
    assert summary["overhead"]["monitor_seconds"] == 3.0
    assert summary["overhead"]["train_seconds"] == 10.0
    assert summary["overhead"]["fraction"] == pytest.approx(3 / 13)


def test_the_trainer_is_found_as_the_owner_of_the_control_the_hooks_receive(tokenizer, tmp_path):
    """No trainer given: the monitor finds it from the ``TrainerControl`` its hooks get, without
    looking at the call stack, and logs through it (``epoch`` is what ``Trainer.log`` adds)."""
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainerControl, TrainingArguments

    from arena_callbacks.callback import _trainer_of

    monitor = ForgettingMonitor(monitor_config(), probes={"general": GENERAL})
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, report_to=[], use_cpu=True, save_strategy="no")
    trainer = Trainer(model=pretrained_model(), args=args, train_dataset=[tokenizer(TARGET_TEXT)] * 8,
                      processing_class=tokenizer, data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
                      callbacks=[monitor])
    assert _trainer_of(trainer.control) is trainer
    vars(trainer)  # an attribute dict made concrete: found through it
    assert _trainer_of(trainer.control) is trainer
    assert _trainer_of(TrainerControl()) is None
    trainer.train()
    assert monitor._trainer is trainer
    logged = [h for h in trainer.state.log_history if "retention/general" in h]
    assert [h["step"] for h in logged] == [0, 2] and all("epoch" in h for h in logged)


def test_two_monitors_writing_one_folder_are_refused_at_train_start(tokenizer, tmp_path):
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    def trainer_with(*monitors):
        args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, report_to=[], use_cpu=True,
                                 save_strategy="no")
        return Trainer(model=pretrained_model(), args=args, train_dataset=[tokenizer(TARGET_TEXT)] * 8,
                       processing_class=tokenizer,
                       data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False), callbacks=list(monitors))

    cfg = {"cadence": {"every_n_steps": 2}, "logging": {"tensorboard": False}}
    first, second = (ForgettingMonitor(cfg, probes={"general": GENERAL}) for _ in range(2))
    trainer = trainer_with(first, second)
    with pytest.raises(ValueError, match=r"two ForgettingMonitors on one trainer would both write .*arena; attach "
                                         r"one, or give each its own logging.output_dir"):
        trainer.train()
    assert trainer.state.global_step == 0
    mine = ForgettingMonitor({**cfg, "logging": {"tensorboard": False, "output_dir": str(tmp_path / "mine")}},
                             probes={"general": GENERAL})
    trainer_with(ForgettingMonitor(cfg, probes={"general": GENERAL}), mine).train()
    assert [s.step for s in mine.history] == [0, 2] and (tmp_path / "arena" / "history.jsonl").is_file()
