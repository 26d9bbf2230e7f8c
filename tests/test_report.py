"""Saved runs read back, reports, comparisons and the command line (no training except one small run)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from arena_callbacks import MonitorConfig, Snapshot, evaluate_budgets
from arena_callbacks.cli import main
from arena_callbacks.history import History
from arena_callbacks.report import (
    compare_runs,
    compare_table,
    plot_compare,
    plot_geometry,
    plot_retention,
    plot_trajectory,
    write_report,
)
from arena_callbacks.runs import RunNotFoundError, load_run

MODULES = ("layers.0.mlp", "layers.1.mlp")

# Run A: (step, P, S, delta_nll/general); step 8 is dominated by step 6; delta_nll breaks 0.3 at step 8.
A_POINTS = [(0, 0.0, 1.0, 0.0), (2, 0.2, 0.98, 0.02), (4, 0.5, 0.95, 0.05), (6, 0.6, 0.85, 0.2), (8, 0.55, 0.70, 0.35)]
A_BUDGETS = [
    {"key": "delta_nll/general", "max_rise": 0.3, "action": "stop"},
    {"key": "retention/general", "max_drop": 0.1, "action": "log"},
    {"key": "retention/facts", "name": "facts-rel", "max_relative_drop": 0.35, "action": "log"},
    {"key": "sp/stability", "min_value": 0.5, "action": "log"},  # not a retention/delta_nll key: no line
]
# Run B: every point on its frontier, no geometry, no stop.
B_POINTS = [(0, 0.0, 1.0, 0.0), (3, 0.3, 0.9, 0.1), (6, 0.7, 0.6, 0.25)]


def procrustes(module_index, step):
    return round(0.01 * step * (module_index + 1), 6)


def make_snapshots(points, geometry):
    snaps = []
    for i, (step, p, s, d) in enumerate(points):
        gen, facts = (1.0, 1.0) if step == 0 else (round(s - 0.02, 6), round(s + 0.02, 6))
        m = {
            "sp/plasticity": p,
            "sp/stability": s,
            "retention/general": gen,
            "retention/facts": facts,
            "delta_nll/general": d,
            "nll/general": 3.0 + d,
            "target/nll": 2.0 - p,
            "target/delta_nll": -p,
        }
        if geometry:
            m.update({f"geometry/procrustes/{mod}": procrustes(j, step) for j, mod in enumerate(MODULES)})
        snaps.append(Snapshot(step, m, epoch=step / 10, trigger="baseline" if i == 0 else "step"))
    return snaps


def save_run(out, points, budgets=(), geometry=False, trainable=None, summary=True, checkpoints=()):
    """A trainer output_dir with arena/history.jsonl (decisions from the real budget code) and summary.json."""
    cfg = MonitorConfig.from_dict({"budgets": list(budgets)})
    snaps = make_snapshots(points, geometry)
    hist = History(out / "arena" / "history.jsonl")
    hist.start_file()
    stop = None
    for i, snap in enumerate(snaps):
        dec = evaluate_budgets(cfg.budgets, snap, snaps[:i]) if i else None
        hist.append(snap, dec)
        if dec is not None and dec.should_stop and stop is None:
            stop = dec
    if summary:
        data = {
            "stopped": stop is not None,
            "stop_step": stop.step if stop else None,
            "stop_message": stop.message if stop else None,
            "probes": {"general": "text", "facts": "multiple_choice"},
            "baseline": snaps[0].to_json()["metrics"],
            "final_step": snaps[-1].step,
            "final": snaps[-1].to_json()["metrics"],
            "config": cfg.model_dump(mode="json"),
        }
        if trainable is not None:
            data["trainable_parameters"] = trainable
        (out / "arena" / "summary.json").write_text(json.dumps(data), encoding="utf-8")
    for c in checkpoints:
        (out / f"checkpoint-{c}").mkdir(parents=True)
    return snaps, hist


@pytest.fixture
def run_a(tmp_path):
    out = tmp_path / "lora-r8"
    snaps, hist = save_run(out, A_POINTS, A_BUDGETS, geometry=True, trainable=1234, checkpoints=(4, 8))
    return out, snaps, hist


@pytest.fixture
def run_b(tmp_path):
    out = tmp_path / "full-ft"
    save_run(out, B_POINTS)
    return out


def test_load_run_round_trips(run_a):
    out, snaps, hist = run_a
    for path in (out, out / "arena", out / "arena" / "history.jsonl"):
        run = load_run(path)
        assert run.snapshots == snaps  # equal to what was written, decisions taken out of `extra`
        assert run.decisions == hist.decisions
        assert run.name == "lora-r8" and run.path == out / "arena" and run.output_dir == out
    assert run.decisions[0] == {} and run.decisions[-1]["action"] == "stop"
    assert [b.key for b in run.config.budgets] == [b["key"] for b in A_BUDGETS]
    assert run.trainable_parameters == 1234
    assert run.summary["stop_step"] == run.stop_step == 8
    assert "delta_nll/general rose to 0.35" in run.stop_message
    assert [c for c, _ in run.checkpoints()] == [4, 8]
    assert [(p.step, p.plasticity, p.stability) for p in run.points()] == [(s, p, st) for s, p, st, _ in A_POINTS]
    assert load_run(out, name="mine").name == "mine"


def test_load_run_without_summary_and_missing(tmp_path):
    out = tmp_path / "running"
    snaps, _ = save_run(out, B_POINTS, summary=False)
    run = load_run(out)
    assert run.snapshots == snaps and run.summary == {} and run.config == MonitorConfig()
    assert run.trainable_parameters is None and run.stop_step is None
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunNotFoundError, match="empty"):
        load_run(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_run(tmp_path / "nowhere")


def test_frames(run_a):
    out, snaps, _ = run_a
    run = load_run(out)
    mf = run.metrics_frame()
    keys = sorted(snaps[0].metrics)
    assert list(mf.columns) == ["step", "epoch", "trigger", *keys]
    assert list(mf["step"]) == [s.step for s in snaps]
    assert list(mf["trigger"]) == ["baseline"] + ["step"] * 4
    assert list(mf["sp/stability"]) == [s for _, _, s, _ in A_POINTS]
    assert mf["epoch"].tolist() == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8])

    df = run.decisions_frame()
    assert list(df.columns) == ["step", "action", "reason", "message", "budget", "key", "value"]
    rows = sorted(zip(df["step"], df["action"], df["key"]))
    assert rows == [(6, "log", "retention/general"), (8, "log", "retention/general"), (8, "stop", "delta_nll/general")]
    stop = df[df["action"] == "stop"].iloc[0]
    assert stop["value"] == pytest.approx(0.35) and stop["reason"] == "patience_exhausted"
    assert stop["message"].endswith(": stopping")


def test_plot_data(run_a, tmp_path):
    out, snaps, _ = run_a
    run = load_run(out)
    t = plot_trajectory(run, tmp_path / "t.png")
    assert (tmp_path / "t.png").stat().st_size > 0
    assert t["x"] == [p for _, p, _, _ in A_POINTS] and t["y"] == [s for _, _, s, _ in A_POINTS]
    assert t["steps"] == [0, 2, 4, 6, 8]
    assert [p.step for p in t["frontier"]] == [0, 2, 4, 6]  # step 8 is dominated by step 6
    assert t["operating_point"].step == 6  # max of 2P + S: 2.05 at step 6 vs 1.95 at step 4

    r = plot_retention(run, tmp_path / "r.png")
    assert set(r["retention"]) == {"retention/general", "retention/facts"}
    assert r["retention"]["retention/general"] == [s.metrics["retention/general"] for s in snaps]
    assert r["delta_nll"]["delta_nll/general"] == [d for *_, d in A_POINTS]
    lines = {ln["label"]: ln["threshold"] for ln in r["budgets"]}
    assert set(lines) == {"delta_nll/general", "retention/general", "facts-rel"}  # sp/stability has no line
    assert lines["delta_nll/general"] == pytest.approx(0.0 + 0.3)
    assert lines["retention/general"] == pytest.approx(1.0 - 0.1)
    assert lines["facts-rel"] == pytest.approx(1.0 * (1 - 0.35))
    assert r["stop_step"] == 8

    g = plot_geometry(run, tmp_path / "g.png")
    assert g["modules"] == list(MODULES) and g["steps"] == [0, 2, 4, 6, 8]
    assert g["matrix"] == [[procrustes(j, s) for s, *_ in A_POINTS] for j in range(len(MODULES))]


def test_write_report(run_a):
    out, snaps, _ = run_a
    run = load_run(out)
    path = write_report(run, out / "report")
    assert path == out / "report" / "report.md"
    for f in ("trajectory.png", "retention.png", "geometry.png"):
        assert (out / "report" / f).stat().st_size > 1000
    md = path.read_text()
    assert "| `sp/stability` | 1.0000 | 0.7000 | 0.8500 |" in md  # baseline, final, best (step 6)
    assert "| `delta_nll/general` | 0.0000 | 0.3500 | 0.2000 |" in md
    assert "Best (operating) point: step 6, P = 0.6000, S = 0.8500" in md
    assert "**Stopped at step 8**" in md and run.stop_message in md
    assert "- step 8: **stop** — delta_nll/general rose to 0.35" in md
    assert "- step 6: **log** — retention/general fell to 0.83" in md
    assert "closest saved checkpoint at or before it: `checkpoint-4`" in md  # 4 <= 6 < 8
    assert "Trainable parameters: 1234" in md
    for link in ("(trajectory.png)", "(retention.png)", "(geometry.png)"):
        assert link in md


def test_report_without_geometry_or_checkpoints(run_b, tmp_path):
    run = load_run(run_b)
    md = write_report(run, tmp_path / "rep").read_text()
    assert not (tmp_path / "rep" / "geometry.png").exists() and "geometry.png" not in md
    assert plot_geometry(run, tmp_path / "g.png") is None
    assert "Not stopped by a budget" in md and "No budgets were configured." in md
    assert "Step 6 (the operating point); no `checkpoint-<step>` folders found" in md
    assert "Trainable parameters: n/a" in md


def test_compare(run_a, run_b, tmp_path):
    c = tmp_path / "c"
    save_run(c, [(0, 0.0, 1.0, 0.0), (5, 0.1, 0.99, 0.01)], summary=False)
    runs = [load_run(run_a[0]), load_run(run_b), load_run(c)]
    rows = {r["run"]: r for r in compare_table(runs)}
    assert list(rows) == ["lora-r8", "full-ft", "c"]
    a, b = rows["lora-r8"], rows["full-ft"]
    assert (a["gain_final"], a["gain_best"], a["retention_final"]) == (0.55, 0.6, 0.70)
    assert a["trainable_parameters"] == 1234 and b["trainable_parameters"] is None
    # Dominated area above (0, 0), by hand: sum of (P_i - P_{i-1}) * S_i over the frontier.
    assert a["frontier_area"] == pytest.approx(0.2 * 0.98 + 0.3 * 0.95 + 0.1 * 0.85)
    assert b["frontier_area"] == pytest.approx(0.3 * 0.9 + 0.4 * 0.6)
    assert rows["c"]["frontier_area"] == pytest.approx(0.1 * 0.99)
    assert (a["operating_step"], b["operating_step"], rows["c"]["operating_step"]) == (6, 6, 5)

    data = plot_compare(runs, tmp_path / "p.png")
    assert data["full-ft"]["x"] == [0.0, 0.3, 0.7] and [p.step for p in data["lora-r8"]["frontier"]] == [0, 2, 4, 6]

    path = compare_runs(runs, tmp_path / "cmp")
    assert (tmp_path / "cmp" / "compare.png").stat().st_size > 1000
    md = path.read_text()
    assert "| lora-r8 | 0.5500 | 0.6000 | 0.7000 | 1,234 | 0.5660 | 6 |" in md
    assert "| full-ft | 0.7000 | 0.7000 | 0.6000 | n/a | 0.5100 | 6 |" in md


def test_cli(run_a, run_b, tmp_path, capsys, monkeypatch):
    out = run_a[0]
    assert main(["report", str(out)]) == 0
    assert (out / "report" / "report.md").is_file() and (out / "report" / "trajectory.png").is_file()
    assert main(["report", str(out / "arena"), "--out", str(tmp_path / "r2")]) == 0
    assert (tmp_path / "r2" / "retention.png").is_file()

    (tmp_path / "nothing").mkdir()
    capsys.readouterr()
    assert main(["report", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "nothing") in err and "history.jsonl" in err

    monkeypatch.chdir(tmp_path)
    assert main(["compare", str(out), str(run_b), "--names", "A", "B"]) == 0
    md = (tmp_path / "arena-compare" / "compare.md").read_text()
    assert "| A |" in md and "| B |" in md
    assert main(["compare", str(out), str(tmp_path / "nothing")]) == 2
    assert main(["compare", str(out), "--names", "A", "B"]) == 2


def test_python_m(run_a, tmp_path):
    out = run_a[0]
    path = os.pathsep.join(filter(None, [str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path}
    res = subprocess.run([sys.executable, "-m", "arena_callbacks", "report", str(out), "--out", str(tmp_path / "m")],
                         capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == str(tmp_path / "m" / "report.md") and (tmp_path / "m" / "report.md").is_file()


def test_report_from_a_real_trainer_run(tokenizer, tmp_path):
    from helpers import TARGET_TEXT, corpus, pretrained_model
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    from arena_callbacks import ForgettingMonitor

    monitor = ForgettingMonitor(
        {"cadence": {"every_n_steps": 2}, "probe": {"batch_size": 8, "max_length": 64},
         "budgets": [{"key": "delta_nll/general", "max_rise": 5.0}]},
        probes={"general": [{"text": s} for s in corpus(16, seed=7)]},
        target=[{"prompt": "one two three", "completion": " four five six"}],
    )
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=8, learning_rate=2e-2, report_to=[],
        save_strategy="steps", save_steps=2, use_cpu=True, seed=0,
    )
    Trainer(
        model=pretrained_model(), args=args, train_dataset=[tokenizer(TARGET_TEXT) for _ in range(32)],
        processing_class=tokenizer, data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
        callbacks=[monitor],
    ).train()
    run = load_run(tmp_path)
    assert [s.step for s in run.snapshots] == [s.step for s in monitor.history] == [0, 2, 4]
    assert run.config == monitor.config
    t = plot_trajectory(run, tmp_path / "t.png")
    assert t["x"] == pytest.approx([s.metrics["sp/plasticity"] for s in monitor.history])
    assert t["y"] == pytest.approx([s.metrics["sp/stability"] for s in monitor.history])
    md = write_report(run, tmp_path / "report").read_text()
    op = t["operating_point"]
    assert op is not None and math.isfinite(op.plasticity)
    expected = max((c for c in (2, 4) if c <= op.step), default=None)
    if expected is not None:
        assert f"`checkpoint-{expected}`" in md


# --------------------------------------------------------------------------- after a rewind
# (step, trigger, P, S, delta_nll/general); a breach at step 10, then the record of what the rewind loaded.
# With weight 1 the breach would win the operating point (1.8 + 0.329 = 2.129 > 1.982): it must not.
REWIND_BUDGET = {"key": "delta_nll/general", "max_rise": 0.5, "action": "rewind"}
BASE_MODEL = "HuggingFaceTB/SmolLM2-135M"


def rewind_info(then="stop", mode="path", restored=None, after=(1.0, 0.982), before=(1.8, 0.329)):
    info = {"number": 1, "at_step": 10, "mode": mode, "reason": "delta_nll/general rose to 1.2"}
    if mode == "checkpoint":
        info["restored_step"] = restored
    else:
        info["alpha"] = 0.5
        info["candidates"] = [{"alpha": a, "layerwise": False, "chosen": a == 0.5} for a in (0.0, 0.5, 1.0)]
    info.update(before={"plasticity": before[0], "stability": before[1]},
                after={"plasticity": after[0], "stability": after[1]}, then=then)
    return info


def save_rewind_run(out, points, info, checkpoints=(), saved=None, summary=True):
    """A run whose history holds a live rewind at step 10: the breach record, then the rewind record.

    ``points``: (step, trigger, P, S, delta_nll/general); ``saved``: "adapter" or "model" files in the
    output folder (what ``trainer.save_model`` writes); checkpoints get an adapter file each.
    """
    cfg = MonitorConfig.from_dict({"budgets": [REWIND_BUDGET], "operating_point": {"weight": 1.0}})
    hist = History(out / "arena" / "history.jsonl")
    hist.start_file()
    snaps, stop = [], None
    for step, trigger, p, s, d in points:
        m = {"sp/plasticity": p, "sp/stability": s, "retention/general": s, "delta_nll/general": d,
             "target/nll": 2.0 - p}
        extra = {"rewind": info} if trigger == "rewind" else {}
        snap = Snapshot(step, m, epoch=step / 10, trigger=trigger, extra=extra)
        dec = evaluate_budgets(cfg.budgets, snap, snaps) if trigger == "step" else None
        if dec is not None and dec.action is not None and dec.action.value == "rewind":
            assert step == 10
            if info["then"] == "stop":
                stop = dec
        hist.append(snap, dec)
        snaps.append(snap)
    if summary:
        data = {"stopped": stop is not None, "stop_step": stop.step if stop else None,
                "stop_message": stop.message if stop else None, "probes": {"general": "text", "target": "completion"},
                "baseline": snaps[0].to_json()["metrics"], "final_step": snaps[-1].step,
                "final": snaps[-1].to_json()["metrics"], "base_model": BASE_MODEL, "rewinds": [info],
                "config": cfg.model_dump(mode="json")}
        (out / "arena" / "summary.json").write_text(json.dumps(data), encoding="utf-8")
    for c in checkpoints:
        (out / f"checkpoint-{c}").mkdir(parents=True)
        (out / f"checkpoint-{c}" / "adapter_model.safetensors").write_bytes(b"")
    if saved == "adapter":
        (out / "adapter_model.safetensors").write_bytes(b"")
        (out / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": BASE_MODEL}))
    elif saved == "model":
        (out / "model.safetensors").write_bytes(b"")
    return snaps


STOPPED = [(0, "baseline", 0.0, 1.0, 0.0), (5, "step", 0.6, 0.95, 0.1), (10, "step", 1.8, 0.329, 1.2),
           (10, "rewind", 1.0, 0.982, 0.03)]
CONTINUED = [*STOPPED, (15, "step", 1.1, 0.7, 0.4), (20, "step", 1.2, 0.6, 0.45)]


@pytest.fixture
def rewound_run(tmp_path):
    out = tmp_path / "rewound"
    snaps = save_rewind_run(out, STOPPED, rewind_info(), saved="adapter")
    return out, snaps


def test_superseded_records_rule():
    from arena_callbacks.measurements import current_records, superseded

    snaps = [Snapshot(s, {}, trigger=t) for s, t, *_ in CONTINUED]
    assert superseded(snaps) == [2]
    assert [(s.step, s.trigger) for s in current_records(snaps)] == [
        (0, "baseline"), (5, "step"), (10, "rewind"), (15, "step"), (20, "step")]
    assert all(a is b for a, b in zip(current_records(snaps), [snaps[i] for i in (0, 1, 3, 4, 5)]))
    # Only the records just before a rewind at its own step: a step measured again after a resume stays.
    again = [Snapshot(0, {}, trigger="baseline"), Snapshot(10, {}), Snapshot(5, {}, trigger="baseline"),
             Snapshot(10, {}), Snapshot(10, {}, trigger="rewind")]
    assert superseded(again) == [3] and superseded(again[:4]) == []


def test_load_run_after_a_rewind(rewound_run):
    from arena_callbacks.sp import SPPoint

    out, snaps = rewound_run
    run = load_run(out)
    assert run.snapshots == snaps  # every record is still there, the breach too
    assert [(s.step, s.trigger) for s in run.current_snapshots()] == [(0, "baseline"), (5, "step"), (10, "rewind")]
    assert run.final is run.snapshots[3] and run.operating_record() is run.snapshots[3]
    assert run.points() == [SPPoint(0, 0.0, 1.0), SPPoint(5, 0.6, 0.95), SPPoint(10, 1.0, 0.982)]
    assert run.points(include_superseded=True)[2] == SPPoint(10, 1.8, 0.329)
    assert run.rewinds() == [{**rewind_info(), "step": 10}]
    assert run.saved_model() == out and run.base_model(out) == BASE_MODEL
    assert run.stop_step == 10


def test_plots_after_a_rewind(rewound_run, tmp_path):
    from arena_callbacks.sp import SPPoint

    run = load_run(rewound_run[0])
    t = plot_trajectory(run, tmp_path / "t.png")
    assert t["steps"] == [0, 5, 10, 10]  # the breach is drawn...
    assert t["rewinds"] == [(SPPoint(10, 1.8, 0.329), SPPoint(10, 1.0, 0.982))]
    assert t["superseded"] == [SPPoint(10, 1.8, 0.329)]
    # ...but is neither the operating point (it would win, 2.129 > 1.982) nor on the frontier.
    assert t["operating_point"] == SPPoint(10, 1.0, 0.982)
    assert [(p.step, p.stability) for p in t["frontier"]] == [(0, 1.0), (10, 0.982)]

    r = plot_retention(run, tmp_path / "r.png")
    assert r["steps"] == [0, 5, 10, 10]
    assert r["retention"]["retention/general"] == [1.0, 0.95, 0.329, 0.982]  # the jump at the rewind step
    assert r["rewinds"] == [{"step": 10, "index": 3, "number": 1, "mode": "path", "alpha": 0.5, "restored_step": None,
                             "then": "stop", "label": "rewind 1 → α = 0.5, then stop"}]
    assert r["stop_step"] == 10 and (tmp_path / "r.png").stat().st_size > 1000


def test_report_after_a_rewind(rewound_run):
    out, _ = rewound_run
    md = write_report(load_run(out), out / "report").read_text()
    assert "| metric | baseline (step 0) | final (step 10, after rewind 1) | best (step 10, after rewind 1) |" in md
    assert "| `sp/stability` | 1.0000 | 0.9820 | 0.9820 |" in md  # not the breach's 0.3290
    assert "| `sp/plasticity` | 0.0000 | 1.0000 | 1.0000 |" in md
    assert "| `delta_nll/general` | 0.0000 | 0.0300 | 0.0300 |" in md
    assert ("Best (operating) point: step 10 after rewind 1 (the state it loaded, α = 0.5), P = 1.0000, S = 0.9820 "
            "(rule: max of 1·P + S).") in md
    assert "At step 10 rewind 1 replaced the breach measured there (P = 1.8000, S = 0.3290)" in md
    assert "(P = 1.0000, S = 0.9820): the weights the run ended with, and what a checkpoint" in md
    assert "- Rewind 1 at step 10 (path): loaded α = 0.5 (P 1.800 → 1.000; S 0.329 → 0.982); then stop." in md
    assert "- Probe steps: 3 (baseline at step 0, last at step 10); 1 more record replaced by a rewind" in md
    assert "| 10 | delta_nll/general | `delta_nll/general` | 1.2000 | 0.0000 | patience_exhausted | rewind |" in md
    assert "- step 10: **rewind** — delta_nll/general rose to 1.2" in md
    assert "Step 10 after rewind 1 (the operating point: the state the rewind loaded, α = 0.5)." in md
    assert (f"The model saved in `{out}` is this rewound state (rewind 1 at step 10, α = 0.5): load it with "
            f"`PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained('{BASE_MODEL}'), '{out}')`.") in md
    assert "no `checkpoint-<step>` folders found" not in md


def test_report_after_a_rewind_that_went_on(tmp_path):
    out = tmp_path / "went-on"
    save_rewind_run(out, CONTINUED, rewind_info(then="continue"), checkpoints=(10, 20), saved="model")
    run = load_run(out)
    assert run.stop_step is None and run.final.step == 20
    assert run.operating_record() is run.snapshots[3]
    md = write_report(run, out / "report").read_text()
    assert "| metric | baseline (step 0) | final (step 20) | best (step 10, after rewind 1) |" in md
    assert "| `sp/stability` | 1.0000 | 0.6000 | 0.9820 |" in md
    assert "the weights training went on from, and what a checkpoint saved at that step holds" in md
    assert f"The model saved in `{out}` is the final state (step 20), not this one" in md
    assert f"`checkpoint-10` (`{out / 'checkpoint-10'}`) holds this rewound state" in md
    r = plot_retention(run, tmp_path / "r.png")
    assert r["stop_step"] is None and r["rewinds"][0]["label"] == "rewind 1 → α = 0.5"
    # Without summary.json (a run still going) a rewind that went on is no stop either.
    (out / "arena" / "summary.json").unlink()
    assert load_run(out).stop_step is None


def test_report_after_a_checkpoint_rewind(tmp_path):
    # A checkpoint rewind re-measures the restored state: a little noise can make it the operating point.
    out = tmp_path / "ckpt"
    points = [*STOPPED[:3], (10, "rewind", 0.6, 0.951, 0.09)]
    save_rewind_run(out, points, rewind_info(mode="checkpoint", restored=5, after=(0.6, 0.951)), checkpoints=(5,))
    run = load_run(out)
    md = write_report(run, out / "report").read_text()
    assert "Step 10 after rewind 1 (the operating point: the state the rewind loaded, step 5)." in md
    assert (f"`checkpoint-5` (`{out / 'checkpoint-5'}`) holds the same weights: the rewind restored the state "
            "of step 5.") in md
    assert plot_retention(run, tmp_path / "r.png")["rewinds"][0]["label"] == "rewind 1 → step 5, then stop"


def test_compare_after_a_rewind(rewound_run, run_b, tmp_path):
    runs = [load_run(rewound_run[0]), load_run(run_b)]
    row = compare_table(runs)[0]
    assert (row["final_step"], row["gain_final"], row["gain_best"], row["retention_final"]) == (10, 1.0, 1.0, 0.982)
    assert (row["operating_step"], row["operating_rewind"], row["rewinds"]) == (10, 1, 1)
    assert row["frontier_area"] == pytest.approx(1.0 * 0.982)  # the breach (1.8, 0.329) adds nothing
    assert compare_table(runs)[1]["operating_rewind"] is None
    data = plot_compare(runs, tmp_path / "p.png")
    assert data["rewound"]["x"] == [0.0, 0.6, 1.0] and data["rewound"]["y"] == [1.0, 0.95, 0.982]
    md = compare_runs(runs, tmp_path / "cmp").read_text()
    assert "| rewound | 1.0000 | 1.0000 | 0.9820 | n/a | 0.9820 | 10 (after rewind 1) |" in md
    assert "After a rewind the state it loaded counts for its step" in md


def test_report_from_a_real_run_that_rewound(tokenizer, tmp_path):
    """A real path rewind then stop: the report's final record and recommendation are what was loaded."""
    import torch
    from helpers import TARGET_TEXT, corpus, pretrained_model
    from transformers import AutoModelForCausalLM, DataCollatorForLanguageModeling, Trainer, TrainingArguments

    from arena_callbacks import ForgettingMonitor

    monitor = ForgettingMonitor(
        {"cadence": {"every_n_steps": 2}, "probe": {"batch_size": 8, "max_length": 64},
         "budgets": [{"key": "delta_nll/general", "max_rise": 0.3, "action": "rewind"}],
         "operating_point": {"weight": 1.0}, "rewind": {"mode": "path", "then": "stop", "alphas": [0.5]}},
        probes={"general": [{"text": s} for s in corpus(16, seed=7)]},
        target=[{"prompt": "one two three", "completion": " four five six"}],
    )
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=8, per_device_train_batch_size=8, learning_rate=1e-2, report_to=[],
        save_strategy="steps", save_steps=100, use_cpu=True, seed=0, lr_scheduler_type="constant",
    )
    trainer = Trainer(
        model=pretrained_model(), args=args, train_dataset=[tokenizer(TARGET_TEXT) for _ in range(64)],
        processing_class=tokenizer, data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
        callbacks=[monitor],
    )
    trainer.train()
    trainer.save_model(str(tmp_path))
    assert len(monitor.rewinds) == 1, "the budget is meant to break by the first probe steps"
    step = monitor.rewinds[0]["at_step"]
    run = load_run(tmp_path)
    loaded = monitor.history.snapshots[-1]
    assert loaded.trigger == "rewind" and run.final == loaded
    assert run.rewinds()[0]["alpha"] == monitor.rewinds[0]["alpha"]
    assert [c for c, _ in run.checkpoints()] == [step]  # saved at the rewind, not by save_steps
    md = write_report(run, tmp_path / "report").read_text()
    assert f"| final (step {step}, after rewind 1) |" in md
    # Here (seed 0) the breach at step 2 learned the target at a stability of ~0.64 and α = 0.5 keeps it at ~0.9.
    assert run.operating_record() is run.final
    assert f"best (step {step}, after rewind 1) |" in md
    assert (f"The model saved in `{tmp_path}` is this rewound state (rewind 1 at step {step}, "
            f"α = {monitor.rewinds[0]['alpha']:g}): load it with "
            f"`AutoModelForCausalLM.from_pretrained('{tmp_path}')`") in md
    assert f"`checkpoint-{step}` (`{tmp_path / f'checkpoint-{step}'}`) holds this rewound state" in md
    # ...and it does: the checkpoint and the saved model hold the same (rewound) weights.
    ckpt = AutoModelForCausalLM.from_pretrained(tmp_path / f"checkpoint-{step}").state_dict()
    final = AutoModelForCausalLM.from_pretrained(tmp_path).state_dict()
    assert all(torch.equal(ckpt[k], final[k]) for k in final)
    assert plot_retention(run, tmp_path / "r.png")["rewinds"][0]["label"].startswith("rewind 1 → α = ")


def test_report_names_the_saved_model_when_it_is_the_operating_point(run_b, tmp_path):
    (run_b / "model.safetensors").write_bytes(b"")  # trainer.save_model of a full finetune; step 6 is final and best
    md = write_report(load_run(run_b), tmp_path / "rep").read_text()
    assert "Step 6 (the operating point); no `checkpoint-<step>` folders found" in md
    assert (f"The model saved in `{run_b}` is this state (the final one): load it with "
            f"`AutoModelForCausalLM.from_pretrained('{run_b}')`.") in md
