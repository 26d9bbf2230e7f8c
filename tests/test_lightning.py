"""The Lightning adapter in real CPU fits of a few steps: stop, rewind, checkpoint → resume.

The model is the tiny random Llama of tests/helpers.py learning one repeated text at a high
learning rate: the general probe's NLL rises within a few steps, so the budgets fire early.
"""

from __future__ import annotations

import csv
import json

import pytest
import torch

pl = pytest.importorskip("lightning.pytorch")

from helpers import TARGET_TEXT, corpus, loop_config, make_model  # noqa: E402  (only where lightning is installed)

from arena_callbacks.integrations.lightning import ForgettingCallback, _write_files  # noqa: E402
from arena_callbacks.rewind import capture_state, load_state_file  # noqa: E402

GENERAL = [{"text": s} for s in corpus(6, seed=7)]
TARGET = [{"prompt": "one two three", "completion": " four five six"}]
STOP = loop_config(2, max_rise=0.3)
REWIND = loop_config(5, max_rise=0.5, action="rewind", mode="checkpoint", then="continue", max_rewinds=2, lr_factor=0.5)
MAX_STEPS = 25
LR = 1e-2


class TinyLM(pl.LightningModule):
    """A Hugging Face causal LM in a LightningModule, the usual way: ``self.model``."""

    def __init__(self, tokenizer):
        super().__init__()
        self.model = make_model(seed=0, vocab_size=len(tokenizer)).train()
        self.tokenizer = tokenizer  # the monitor finds it here

    def training_step(self, batch, batch_idx):
        loss = self.model(**batch).loss
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.model.parameters(), lr=LR)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 5))  # warm-up, then constant
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def loader(tokenizer, n=256):
    ids = torch.tensor([tokenizer(TARGET_TEXT)["input_ids"]] * n)
    rows = [{"input_ids": i, "attention_mask": torch.ones_like(i), "labels": i} for i in ids]
    return torch.utils.data.DataLoader(rows, batch_size=8)


def make_trainer(tmp_path, callbacks, *, checkpoint=None, **kwargs):
    return pl.Trainer(
        accelerator="cpu", devices=1, max_steps=MAX_STEPS, default_root_dir=str(tmp_path), callbacks=callbacks,
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=checkpoint is not None,
        logger=pl.loggers.CSVLogger(str(tmp_path), name="logs"), log_every_n_steps=1, **kwargs,
    )


class Recorder(pl.Callback):
    """Weights, learning rate and optimizer state after every optimizer step, once the monitor
    (placed before it) has acted."""

    def __init__(self):
        self.states, self.lrs, self.moments = {}, {}, {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        self.states[step] = capture_state(pl_module.model)
        self.lrs[step] = trainer.optimizers[0].param_groups[0]["lr"]
        self.moments[step] = len(trainer.optimizers[0].state)


def strip(snaps):
    return [(s.step, s.trigger, {k: v for k, v in s.metrics.items() if k != "probe/seconds"}) for s in snaps]


@pytest.mark.parametrize("accumulate", [1, 2], ids=["one-batch-per-step", "accumulate-2"])
def test_a_stop_budget_stops_the_fit_at_the_probe_step(tokenizer, tmp_path, accumulate):
    monitor = ForgettingCallback(STOP, probes={"general": GENERAL}, target=TARGET)
    calls, after_step = [], monitor.engine.after_step
    monitor.engine.after_step = lambda model, step, **kw: (calls.append(step), after_step(model, step, **kw))[1]
    trainer = make_trainer(tmp_path, [monitor], accumulate_grad_batches=accumulate)
    trainer.fit(TinyLM(tokenizer), loader(tokenizer))
    stop = monitor.stop_decision.step
    assert trainer.global_step == stop < MAX_STEPS  # optimizer steps, whatever the accumulation
    assert calls == list(range(1, stop + 1))  # once per optimizer step, not per batch
    snaps = monitor.history.snapshots
    assert [s.step for s in snaps] == list(range(0, stop + 1, 2))
    assert [s.trigger for s in snaps] == ["baseline"] + ["step"] * (stop // 2)
    assert snaps[-1].metrics["delta_nll/general"] > 0.3 >= max(s.metrics["delta_nll/general"] for s in snaps[:-1])
    assert monitor.output_dir == tmp_path / "arena"
    summary = json.loads((tmp_path / "arena" / "summary.json").read_text())
    assert summary["stopped"] and summary["stop_step"] == stop == summary["final_step"]
    # The scalars went to the trainer's logger at the probe steps.
    trainer.logger.save()
    with open(trainer.logger.log_dir + "/metrics.csv") as f:
        logged = [r for r in csv.DictReader(f) if r.get("delta_nll/general")]
    assert [int(r["step"]) for r in logged] == [s.step for s in snaps]


@pytest.fixture(scope="module")
def rewind_fit(tokenizer, tmp_path_factory):
    out = tmp_path_factory.mktemp("lightning_rewind")
    monitor = ForgettingCallback(REWIND, probes={"general": GENERAL}, target=TARGET)
    recorder = Recorder()
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=str(out / "ckpt"), filename="{step}", every_n_train_steps=5,
                                        save_top_k=-1)
    trainer = make_trainer(out, [monitor, recorder, ckpt], checkpoint=True)
    initial = TinyLM(tokenizer)
    start = capture_state(initial.model)
    trainer.fit(initial, loader(tokenizer))
    return out, trainer, monitor, recorder, start


def test_a_continued_rewind_loads_the_kept_state_and_lowers_the_learning_rate(rewind_fit):
    _, trainer, monitor, rec, start = rewind_fit
    assert trainer.global_step == MAX_STEPS and monitor.stop_decision is None
    (info,) = monitor.rewinds
    at, restored = info["at_step"], info["restored_step"]
    assert info["then"] == "continue" and restored < at
    snaps = monitor.history.snapshots
    steps = [(s.step, s.trigger) for s in snaps]
    assert steps == [(0, "baseline"), *[(s, "step") for s in range(5, at + 1, 5)], (at, "rewind"),
                     *[(s, "step") for s in range(at + 5, MAX_STEPS + 1, 5)]]
    assert snaps[steps.index((at, "rewind"))].extra["rewind"]["restored_step"] == restored
    # After the monitor acted at the breach, the model holds exactly the weights of the restored step.
    want = start if restored == 0 else rec.states[restored]
    assert all(torch.equal(rec.states[at][k], want[k]) for k in want)
    assert not all(torch.equal(rec.states[at - 1][k], want[k]) for k in want)  # it had moved on
    # Going on: learning rate halved (optimizer and scheduler), optimizer moments dropped.
    assert rec.lrs[at - 1] == pytest.approx(LR) and rec.lrs[at] == pytest.approx(LR / 2)
    assert rec.lrs[MAX_STEPS] == pytest.approx(LR / 2)  # the scheduler did not put it back
    assert rec.moments[at - 1] > 0 and rec.moments[at] == 0
    assert trainer.lr_scheduler_configs[0].scheduler.base_lrs == [pytest.approx(LR / 2)]


@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`")
@pytest.mark.filterwarnings("ignore:You're resuming from a checkpoint that ended before the epoch ended")
def test_resume_from_a_lightning_checkpoint_gives_the_same_history(rewind_fit, tokenizer, tmp_path):
    out, _, full, rec, _ = rewind_fit
    at = full.rewinds[0]["at_step"]
    ckpt = out / "ckpt" / f"step={at - 5}.ckpt"  # before the rewind: the resumed fit must rewind the same way
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    state = saved["callbacks"]["ForgettingCallback"]
    assert {"arena_state.json", "arena_best-rank0.safetensors"} <= set(state["files"])

    resumed = ForgettingCallback(REWIND, probes={"general": GENERAL}, target=TARGET)
    recorder = Recorder()
    trainer = make_trainer(tmp_path, [resumed, recorder])
    trainer.fit(TinyLM(tokenizer), loader(tokenizer), ckpt_path=str(ckpt))
    assert resumed.resumed_from == ckpt
    assert [s.trigger for s in resumed.history.snapshots].count("baseline") == 1  # not measured again
    a, b = strip(full.history.snapshots), strip(resumed.history.snapshots)
    assert [x[:2] for x in a] == [x[:2] for x in b]
    for (_, _, ma), (_, _, mb) in zip(a, b):
        assert mb == pytest.approx(ma, rel=1e-6, abs=1e-9)
    assert resumed.rewinds == full.rewinds
    assert min(recorder.states) == at - 4  # it did resume at the checkpoint's step
    assert recorder.lrs[MAX_STEPS] == rec.lrs[MAX_STEPS]
    assert all(torch.equal(recorder.states[MAX_STEPS][k], v) for k, v in rec.states[MAX_STEPS].items())


def test_tensorboard_events_go_beside_the_lightning_logger_and_not_through_it(tokenizer, tmp_path):
    cfg = {**STOP, "logging": {"tensorboard": True, "sp_plane_image": False}}
    monitor = ForgettingCallback(cfg, probes={"general": GENERAL}, target=TARGET)
    tb = pl.loggers.TensorBoardLogger(str(tmp_path), name="tb")
    logged = []
    tb.log_metrics = lambda metrics, step=None: logged.append(metrics)  # what reaches the logger
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=4, default_root_dir=str(tmp_path),
                         callbacks=[monitor], enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, logger=tb, log_every_n_steps=1)
    trainer.fit(TinyLM(tokenizer), loader(tokenizer))
    assert list((tmp_path / "tb" / "version_0" / "arena").glob("events.out.tfevents.*"))
    assert logged and not any("delta_nll/general" in m for m in logged)  # the monitor's curves are drawn once


class TinyLMWithValidation(TinyLM):
    def validation_step(self, batch, batch_idx):
        return self.model(**batch).loss


def test_validation_probes_with_on_evaluate_and_none_in_the_sanity_check(tokenizer, tmp_path):
    cfg = {**STOP, "cadence": {"every_n_steps": 100, "on_evaluate": True}}
    monitor = ForgettingCallback(cfg, probes={"general": GENERAL}, target=TARGET)
    trainer = make_trainer(tmp_path, [monitor], val_check_interval=3, limit_val_batches=1, num_sanity_val_steps=1)
    trainer.fit(TinyLMWithValidation(tokenizer), loader(tokenizer), loader(tokenizer, n=8))
    assert [(s.step, s.trigger) for s in monitor.history.snapshots][:3] == [(0, "baseline"), (3, "evaluate"),
                                                                           (6, "evaluate")]


def test_rank_zero_kept_states_go_to_every_rank_of_a_replicated_strategy(rewind_fit, tmp_path):
    out, trainer, *_ = rewind_fit
    state = torch.load(out / "ckpt" / "step=10.ckpt", map_location="cpu", weights_only=True)["callbacks"][
        "ForgettingCallback"]
    assert state["rank"] == 0
    _write_files(state, tmp_path, 1, trainer)  # rank 1 of a DDP-like run: rank 0's state under rank 1's name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["arena_best-rank1.safetensors", "arena_state.json"]
    best = state["files"]["arena_best-rank0.safetensors"]
    again = load_state_file(tmp_path / "arena_best-rank1.safetensors")
    assert set(again) == set(best) and all(torch.equal(again[k], best[k]) for k in best)

    class FSDPStrategy:  # a sharded strategy: each rank keeps its own shard, which the checkpoint lacks
        pass

    sharded = type("T", (), {"strategy": FSDPStrategy()})()
    with pytest.raises(ValueError, match="each rank keeps its own shard"):
        _write_files(state, tmp_path / "x", 1, sharded)
