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
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH")]))}
    res = subprocess.run([sys.executable, "-m", "arena_callbacks", "report", str(out), "--out", str(tmp_path / "m")],
                         capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == str(tmp_path / "m" / "report.md") and (tmp_path / "m" / "report.md").is_file()


def test_report_from_a_real_trainer_run(tokenizer, tmp_path):
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    from arena_callbacks import ForgettingMonitor
    from helpers import TARGET_TEXT, corpus, pretrained_model

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
