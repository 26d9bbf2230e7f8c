"""The sp/* estimate, budget lines, the sp-plane image and the custom-scalars layout in a real Trainer run."""

import glob
import json
import os

import pytest
from helpers import TARGET_TEXT, corpus, pretrained_model

from arena_callbacks import ForgettingMonitor
from arena_callbacks.budget import threshold
from arena_callbacks.history import read_history
from arena_callbacks.sp import sp_metrics, trajectory

GENERAL = [{"text": s} for s in corpus(16, seed=7)]
TARGET = [{"prompt": "one two three", "completion": " four five six"}]


def events(logdir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = {"scalars": {}, "images": {}}
    for f in glob.glob(os.path.join(logdir, "**", "events.out.tfevents.*"), recursive=True):
        acc = EventAccumulator(f, size_guidance={"images": 0, "scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out["scalars"].setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
        for tag in acc.Tags()["images"]:
            out["images"].setdefault(tag, []).extend(acc.Images(tag))
    return out


def custom_scalars_layout(logdir):
    """The layout proto written by ``add_custom_scalars``, as a dict chart title -> tag regexes."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.plugins.custom_scalar import layout_pb2

    charts = {}
    for f in glob.glob(os.path.join(logdir, "**", "events.out.tfevents.*"), recursive=True):
        for ev in EventFileLoader(f).Load():
            for v in ev.summary.value:
                if v.metadata.plugin_data.plugin_name == "custom_scalars":
                    layout = layout_pb2.Layout()
                    layout.ParseFromString(v.tensor.string_val[0])
                    for cat in layout.category:
                        for chart in cat.chart:
                            charts[(cat.title, chart.title)] = list(chart.multiline.tag)
    return charts


def run_trainer(tokenizer, out, config, max_steps=8):
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    monitor = ForgettingMonitor(config, probes={"general": GENERAL}, target=TARGET)
    args = TrainingArguments(
        output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=8, learning_rate=2e-2,
        report_to=["tensorboard"], logging_steps=1, save_strategy="no", use_cpu=True, seed=0,
    )
    model = pretrained_model()
    trainer = Trainer(
        model=model, args=args, train_dataset=[tokenizer(TARGET_TEXT) for _ in range(64)], processing_class=tokenizer,
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False), callbacks=[monitor],
    )
    trainer.train()
    return trainer, monitor


def test_sp_keys_budget_lines_image_and_layout(tokenizer, tmp_path):
    budget = {"key": "delta_nll/general", "max_rise": 50.0, "action": "log"}
    cfg = {"cadence": {"every_n_steps": 2}, "probe": {"batch_size": 8, "max_length": 64}, "budgets": [budget],
           "operating_point": {"smoothing": 1, "overshoot_patience": 1}}
    trainer, monitor = run_trainer(tokenizer, tmp_path, cfg)
    snaps = monitor.history.snapshots
    assert [s.step for s in snaps] == [0, 2, 4, 6, 8]
    # Each snapshot's sp/* keys equal the estimator applied to the trajectory up to that step.
    for i, s in enumerate(snaps):
        expect = sp_metrics(trajectory(snaps[: i + 1]), monitor.config.operating_point)
        got = {
            k: v
            for k, v in s.metrics.items()
            if k in expect or k.startswith(("sp/operating", "sp/frontier", "sp/over", "sp/marg"))
        }
        assert got == pytest.approx(expect)
    assert "sp/marginal_rate" not in snaps[0].metrics and "sp/marginal_rate" in snaps[1].metrics
    assert read_history(tmp_path / "arena")[-1].metrics["sp/frontier_area"] == pytest.approx(
        snaps[-1].metrics["sp/frontier_area"]
    )

    ev = events(str(tmp_path / "runs"))
    # Budget line: the limit in the key's units at every probe step.
    line = threshold(monitor.config.budgets[0], snaps[0].metrics["delta_nll/general"])
    assert sorted(ev["scalars"]["budget/delta_nll/general"]) == [(s, pytest.approx(line)) for s in (0, 2, 4, 6, 8)]
    assert [s for s, _ in sorted(ev["scalars"]["sp/operating_step"])] == [0, 2, 4, 6, 8]
    # The sp-plane image at each probe step, a real PNG of some size.
    imgs = sorted(ev["images"]["arena/sp_plane"], key=lambda e: e.step)
    assert [e.step for e in imgs] == [0, 2, 4, 6, 8]
    assert imgs[-1].width > 200 and imgs[-1].height > 200 and imgs[-1].encoded_image_string[:4] == b"\x89PNG"
    # Custom-scalars layout: retention, sp and the budgeted key with its line in one chart.
    layout = custom_scalars_layout(str(tmp_path / "runs"))
    assert layout[("arena", "retention")] == ["^retention/"]
    assert layout[("arena", "stability & plasticity")] == ["^sp/(stability|plasticity)$"]
    assert layout[("arena budgets", "delta_nll/general (log)")] == [
        r"^delta_nll/general$",
        r"^budget/delta_nll/general$",
    ]

    summary = json.loads((tmp_path / "arena" / "summary.json").read_text())
    model = trainer.model
    assert summary["trainable_parameters"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    op = summary["operating_point"]
    assert op["step"] == int(snaps[-1].metrics["sp/operating_step"])
    assert op["stability"] == pytest.approx(snaps[-1].metrics["sp/operating_stability"])


def test_overshoot_budget_stops_the_run(tokenizer, tmp_path):
    # A tiny exchange rate: any stability lost per unit gained counts as overshoot.
    cfg = {"cadence": {"every_n_steps": 2}, "probe": {"batch_size": 8, "max_length": 64},
           "operating_point": {"smoothing": 1, "overshoot_patience": 1, "exchange_rate": 1e-6},
           "budgets": [{"key": "sp/overshoot", "max_value": 0, "action": "stop"}],
           "logging": {"sp_plane_image": False}}
    trainer, monitor = run_trainer(tokenizer, tmp_path, cfg, max_steps=20)
    snaps = monitor.history.snapshots
    first = next(s.step for s in snaps if s.metrics["sp/overshoot"] == 1.0)
    assert trainer.state.global_step == first == monitor.stop_decision.step < 20
    assert "sp/overshoot rose to 1.00" in monitor.stop_decision.message
    assert snaps[-1].metrics["sp/overshoot_step"] < first
    ev = events(str(tmp_path / "runs"))
    assert "arena/sp_plane" not in ev["images"]  # turned off
