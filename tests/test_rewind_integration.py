"""Rewinds and resume in real Trainer runs of a few steps."""

import json
import math

import pytest
import torch
from helpers import TARGET_TEXT, corpus, pretrained_model
from transformers import DataCollatorForLanguageModeling, Trainer, TrainerCallback, TrainingArguments

from arena_callbacks import ForgettingMonitor
from arena_callbacks.history import read_history
from arena_callbacks.rewind import capture_state, interpolate, path_rules
from arena_callbacks.sp import operating_point, trajectory

GENERAL = [{"text": s} for s in corpus(16, seed=7)]
TARGET = [{"prompt": "one two three", "completion": " four five six"}]


class WeightRecorder(TrainerCallback):
    """Trainable weights at every step end, before the monitor (placed after it) acts."""

    def __init__(self):
        self.states = {}

    def on_step_end(self, args, state, control, model=None, **kw):
        self.states[state.global_step] = capture_state(model)


class Poison(TrainerCallback):
    """Puts a NaN into the weights at the end of one step (before the monitor probes)."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, model=None, **kw):
        if state.global_step == self.step:
            with torch.no_grad():
                next(p for p in model.parameters() if p.requires_grad).view(-1)[0] = float("nan")


class Crash(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kw):
        if state.global_step == self.step:
            raise KeyboardInterrupt("simulated interruption")


def config(rewind, budget=None, every=2):
    return {
        "cadence": {"every_n_steps": every},
        "probe": {"batch_size": 8, "max_length": 64},
        "budgets": [budget or {"key": "delta_nll/general", "max_rise": 0.6, "action": "rewind"}],
        "operating_point": {"rule": "weighted", "weight": 1.0},
        "rewind": rewind,
    }


def make_trainer(tokenizer, out, monitor, max_steps=20, lr=2e-2, model=None, before=(), after=(), **args):
    targs = TrainingArguments(
        output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=8, learning_rate=lr,
        report_to=[], logging_steps=1, save_strategy=args.pop("save_strategy", "no"), use_cpu=True, seed=0,
        lr_scheduler_type="constant", **args,
    )
    return Trainer(
        model=model if model is not None else pretrained_model(), args=targs,
        train_dataset=[tokenizer(TARGET_TEXT) for _ in range(256)], processing_class=tokenizer,
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
        callbacks=[*before, monitor, *after],
    )


def lora_model():
    peft = pytest.importorskip("peft")
    return peft.get_peft_model(
        pretrained_model(), peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM")
    )


def in_budget(monitor, snap):
    from arena_callbacks.budget import in_budget as within

    return (
        within(monitor.config.budgets, snap.metrics, monitor.history.snapshots[0].metrics) or snap.trigger == "baseline"
    )


def test_checkpoint_rewind_restores_the_exact_best_state_and_stops(tokenizer, tmp_path):
    monitor = ForgettingMonitor(
        config({"mode": "checkpoint", "then": "stop"}), probes={"general": GENERAL}, target=TARGET
    )
    rec = WeightRecorder()
    trainer = make_trainer(tokenizer, tmp_path, monitor, after=[rec])
    trainer.train()
    snaps = monitor.history.snapshots
    assert snaps[-1].trigger == "rewind" and len(monitor.rewinds) == 1
    info = monitor.rewinds[0]
    breach_step = info["at_step"]
    assert trainer.state.global_step == breach_step < 20 and info["then"] == "stop"
    # The restored step is the operating point of the in-budget points before the breach.
    earlier = [s for s in snaps[:-2] if in_budget(monitor, s)]
    expect = operating_point(trajectory(earlier), monitor.config.operating_point)
    assert info["restored_step"] == expect.step
    # Exact weights of that step (step 0: the pretrained model).
    ref = capture_state(pretrained_model()) if expect.step == 0 else rec.states[expect.step]
    now = capture_state(trainer.model)
    assert all(torch.equal(now[k], ref[k]) for k in ref)
    # Logs agree with what is loaded: the re-measured metrics equal those of the restored step.
    restored = next(s for s in snaps if s.step == expect.step and s.trigger != "rewind")
    for k in ("nll/general", "target/nll", "sp/stability", "sp/plasticity"):
        assert snaps[-1].metrics[k] == pytest.approx(restored.metrics[k], abs=1e-9)
    on_disk = read_history(tmp_path / "arena")
    assert on_disk[-1].trigger == "rewind" and on_disk[-1].extra["rewind"]["restored_step"] == expect.step
    summary = json.loads((tmp_path / "arena" / "summary.json").read_text())
    assert summary["stopped"] and summary["rewinds"][0]["restored_step"] == expect.step
    # The report draws the rewind as a move from the breach to what was loaded, not a training step.
    from arena_callbacks.report import plot_trajectory
    from arena_callbacks.runs import load_run

    drawn = plot_trajectory(load_run(tmp_path), tmp_path / "t.png")
    (src, dst), = drawn["rewinds"]
    assert (src.step, dst.step) == (breach_step, breach_step)
    assert dst.stability == pytest.approx(snaps[-1].metrics["sp/stability"])
    assert "rewinding" in summary["stop_message"]


def test_path_rewind_applies_the_chosen_alpha_exactly(tokenizer, tmp_path):
    model = lora_model()
    theta0 = capture_state(model)
    monitor = ForgettingMonitor(config({"mode": "path", "then": "stop", "alphas": [0.25, 0.5, 0.75], "refine": 0}),
                                probes={"general": GENERAL}, target=TARGET)
    rec = WeightRecorder()
    trainer = make_trainer(tokenizer, tmp_path, monitor, model=model, lr=5e-2, after=[rec])
    trainer.train()
    assert len(monitor.rewinds) == 1
    info = monitor.rewinds[0]
    cands = info["candidates"]
    assert [c["alpha"] for c in cands] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert cands[-1]["in_budget"] is False and cands[0]["in_budget"] is True
    chosen = [c for c in cands if c["chosen"]]
    assert len(chosen) == 1 and chosen[0]["alpha"] == info["alpha"]
    # The chosen candidate is the operating point of the in-budget ones.
    ok = [c for c in cands if c["in_budget"]]
    w = monitor.config.operating_point.weight
    assert chosen[0] == max(ok, key=lambda c: (w * c["plasticity"] + c["stability"], -c["alpha"]))
    # The model holds exactly θ(α) on the path to the weights at the breach step.
    theta1 = rec.states[info["at_step"]]
    expect = interpolate(theta0, theta1, info["alpha"], path_rules(theta0))
    now = capture_state(trainer.model)
    assert all(torch.equal(now[k], expect[k]) for k in expect)
    assert info["after"] == {"plasticity": chosen[0]["plasticity"], "stability": chosen[0]["stability"]}


def test_rewind_and_continue_lowers_lr_and_stops_after_max_rewinds(tokenizer, tmp_path):
    monitor = ForgettingMonitor(
        config({"mode": "checkpoint", "then": "continue", "max_rewinds": 2, "lr_factor": 0.5}),
        probes={"general": GENERAL}, target=TARGET,
    )
    trainer = make_trainer(tokenizer, tmp_path, monitor, max_steps=60, lr=3e-2)
    trainer.train()
    assert 1 <= len(monitor.rewinds) <= 2
    assert [r["then"] for r in monitor.rewinds] == ["continue", "stop"][: len(monitor.rewinds)]
    first = monitor.rewinds[0]["at_step"]
    assert trainer.state.global_step > first  # training went on after the first rewind
    factor = 0.5 ** sum(r["then"] == "continue" for r in monitor.rewinds)
    assert trainer.lr_scheduler.base_lrs == pytest.approx([3e-2 * factor] * len(trainer.lr_scheduler.base_lrs))
    inner = trainer.optimizer.optimizer
    assert all(g["lr"] == pytest.approx(3e-2 * factor) for g in inner.param_groups)
    # The optimizer's moments restarted at the last continued rewind.
    last = max(r["at_step"] for r in monitor.rewinds if r["then"] == "continue")
    p = next(p for g in inner.param_groups for p in g["params"])
    assert int(inner.state[p]["step"]) == trainer.state.global_step - last


def test_nan_breach_rewinds_instead_of_crashing(tokenizer, tmp_path):
    monitor = ForgettingMonitor(config({"mode": "path", "then": "stop"}), probes={"general": GENERAL}, target=TARGET)
    trainer = make_trainer(tokenizer, tmp_path, monitor, max_steps=10, lr=1e-3, before=[Poison(4)])
    trainer.train()
    assert trainer.state.global_step == 4
    breach = [s for s in monitor.history.snapshots if s.step == 4 and s.trigger == "step"][0]
    assert not math.isfinite(breach.metrics["nll/general"])
    info = monitor.rewinds[0]
    assert info["mode"] == "checkpoint" and "non-finite" in info["fallback"]
    expect = operating_point(trajectory(monitor.history.snapshots[:-2]), monitor.config.operating_point)
    assert info["restored_step"] == expect.step
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert math.isfinite(monitor.history.snapshots[-1].metrics["nll/general"])


def strip(snaps):
    return [(s.step, s.trigger, {k: v for k, v in s.metrics.items() if k != "probe/seconds"}) for s in snaps]


@pytest.mark.parametrize("geometry", [False, True], ids=["probes", "with-geometry"])
def test_resume_gives_the_same_history_as_an_uninterrupted_run(tokenizer, tmp_path, geometry):
    cfg = config({"mode": "checkpoint"}, budget={"key": "delta_nll/general", "max_rise": 50.0, "action": "rewind"})
    if geometry:  # the baseline activation cache travels in the checkpoint
        cfg["geometry"] = {"enabled": True, "reference": "cache", "tokens_per_module": 64}
    full = ForgettingMonitor(cfg, probes={"general": GENERAL}, target=TARGET)
    make_trainer(tokenizer, tmp_path / "a", full, max_steps=8, lr=1e-2, save_strategy="steps", save_steps=4).train()

    first = ForgettingMonitor(cfg, probes={"general": GENERAL}, target=TARGET)
    with pytest.raises(KeyboardInterrupt):
        make_trainer(tokenizer, tmp_path / "b", first, max_steps=8, lr=1e-2, save_strategy="steps", save_steps=4,
                     after=[Crash(6)]).train()
    assert [s.step for s in read_history(tmp_path / "b" / "arena")] == [0, 2, 4, 6]  # step 6 measured, then lost
    ckpt = tmp_path / "b" / "checkpoint-4"
    assert (ckpt / "arena_state.json").is_file() and (ckpt / "arena_best-rank0.safetensors").is_file()

    resumed = ForgettingMonitor(cfg, probes={"general": GENERAL}, target=TARGET)
    trainer = make_trainer(
        tokenizer, tmp_path / "b", resumed, max_steps=8, lr=1e-2, save_strategy="steps", save_steps=4
    )
    trainer.train(resume_from_checkpoint=str(ckpt))
    assert resumed.resumed_from == ckpt
    assert [s.trigger for s in resumed.history.snapshots].count("baseline") == 1  # baseline not re-measured
    a, b = strip(full.history.snapshots), strip(resumed.history.snapshots)
    assert [x[:2] for x in a] == [x[:2] for x in b]
    for (_, _, ma), (_, _, mb) in zip(a, b):
        assert mb == pytest.approx(ma, rel=1e-6, abs=1e-9)
    assert strip(read_history(tmp_path / "b" / "arena")) == b  # the file was rewritten, not appended to
    assert resumed.engine.rewinder.best.step == full.engine.rewinder.best.step
    assert all(
        torch.equal(resumed.engine.rewinder.best.get()[k], full.engine.rewinder.best.get()[k])
        for k in full.engine.rewinder.best.get()
    )
    if geometry:
        assert any(k.startswith("geometry/procrustes/") for k in b[-1][2])
        g, h = resumed.geometry, full.geometry
        assert set(g.cache) == set(h.cache) and all(torch.equal(g.cache[n], h.cache[n]) for n in h.cache)
        assert g.cache_mb == h.cache_mb and set(g.cache_stats) == set(h.cache_stats)  # stats formed on restore
        for n in h.cache_stats:
            assert (
                g.cache_stats[n].sum_sq == h.cache_stats[n].sum_sq
                and g.cache_stats[n].cka_norm == h.cache_stats[n].cka_norm
            )


def test_resume_refuses_other_probes(tokenizer, tmp_path):
    cfg = config({"mode": "checkpoint"}, budget={"key": "delta_nll/general", "max_rise": 50.0, "action": "log"})
    make_trainer(tokenizer, tmp_path, ForgettingMonitor(cfg, probes={"general": GENERAL}), max_steps=4,
                 save_strategy="steps", save_steps=4).train()
    other = ForgettingMonitor(cfg, probes={"general": GENERAL, "more": GENERAL[:4]})
    with pytest.raises(ValueError, match="differ from this monitor's"):
        make_trainer(tokenizer, tmp_path, other, max_steps=6, save_strategy="steps",
                     save_steps=4).train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))


def test_rewind_of_a_zero3_partition_without_an_optimizer_is_refused_at_train_start(tmp_path):
    from arena_callbacks.distributed import DistContext
    from arena_callbacks.rewinder import Rewinder

    monitor = ForgettingMonitor(config({"mode": "checkpoint"}), probes={"general": GENERAL})
    model = pretrained_model()
    first = next(model.named_parameters())
    first[1].ds_id = 0  # how DeepSpeed ZeRO-3 marks a partitioned parameter; no ``_z3_optimizer`` holds its master
    with pytest.raises(ValueError, match="ZeRO-3 partition without a ZeRO optimizer") as e:
        Rewinder(monitor.config, DistContext(), tmp_path).setup(model)
    assert first[0] in str(e.value) and "action 'stop'" in str(e.value)
