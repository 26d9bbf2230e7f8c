"""examples/custom_loop.py: the engine in a plain PyTorch loop (stop, rewind, save → resume, 2 gloo ranks).

The model is the tiny random Llama of tests/helpers.py learning one repeated text at a high
learning rate: the general probe's NLL rises within a few steps, so the budgets fire early.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))

import custom_loop
from helpers import loop_config, make_model
from test_distributed import torchrun

from arena_callbacks.rewind import capture_state

STOP = loop_config(2, max_rise=0.3)
REWIND = loop_config(5, max_rise=1.0, action="rewind", mode="checkpoint", then="continue", max_rewinds=2, lr_factor=0.5)
MAX_STEPS = 20
LR = 1e-2


def tiny(tokenizer):
    return make_model(seed=0, vocab_size=len(tokenizer))


def strip(snaps):
    return [(s.step, s.trigger, {k: v for k, v in s.metrics.items() if k != "probe/seconds"}) for s in snaps]


def loop_weights(folder: Path) -> dict[str, torch.Tensor]:
    return torch.load(folder / "loop.pt", map_location="cpu")["model"]


@pytest.fixture(scope="module")
def stop_run(tokenizer, tmp_path_factory):
    out = tmp_path_factory.mktemp("loop_stop")
    return out, custom_loop.train(tiny(tokenizer), tokenizer, output_dir=out, config=STOP, max_steps=MAX_STEPS, lr=LR)


@pytest.fixture(scope="module")
def rewind_run(tokenizer, tmp_path_factory):
    out = tmp_path_factory.mktemp("loop_rewind")
    return out, custom_loop.train(tiny(tokenizer), tokenizer, output_dir=out, config=REWIND, max_steps=MAX_STEPS,
                                  lr=LR, save_every=5)


def test_a_stop_budget_stops_the_loop_at_the_probe_step(stop_run):
    out, result = stop_run
    engine = result.engine
    stop = engine.stop_decision.step
    assert result.stopped and result.step == stop < MAX_STEPS  # no update after the stop
    assert [s.step for s in engine.history.snapshots] == list(range(0, stop + 1, 2))
    assert [s.trigger for s in engine.history.snapshots] == ["baseline"] + ["step"] * (stop // 2)
    assert engine.history.snapshots[-1].metrics["delta_nll/general"] > 0.3
    assert all(s.metrics["delta_nll/general"] <= 0.3 for s in engine.history.snapshots[:-1])
    summary = json.loads((out / "arena" / "summary.json").read_text())
    assert summary["stopped"] and summary["stop_step"] == stop == summary["final_step"]
    assert [json.loads(line)["step"] for line in (out / "arena" / "history.jsonl").read_text().splitlines()] == \
        list(range(0, stop + 1, 2))


def test_a_continued_rewind_loads_the_kept_state_and_lowers_the_learning_rate(rewind_run, tokenizer):
    out, result = rewind_run
    engine = result.engine
    assert not result.stopped and result.step == MAX_STEPS
    (info,) = engine.rewinds
    at, restored = info["at_step"], info["restored_step"]
    assert info["then"] == "continue" and restored < at
    snaps = engine.history.snapshots
    steps = [(s.step, s.trigger) for s in snaps]
    assert steps == [(0, "baseline"), *[(s, "step") for s in range(5, at + 1, 5)], (at, "rewind"),
                     *[(s, "step") for s in range(at + 5, MAX_STEPS + 1, 5)]]
    assert snaps[steps.index((at, "rewind"))].extra["rewind"]["restored_step"] == restored
    # The loop saved right after the rewind: the weights then are exactly those of the restored step.
    want = capture_state(tiny(tokenizer)) if restored == 0 else loop_weights(out / f"checkpoint-{restored}")
    now = loop_weights(out / f"checkpoint-{at}")
    assert set(want) <= set(now) and all(torch.equal(now[k], want[k]) for k in want)
    # What the re-measure found equals what was measured at the restored step.
    before = next(s for s in snaps if s.step == restored)
    after = snaps[steps.index((at, "rewind"))]
    assert after.metrics["nll/general"] == pytest.approx(before.metrics["nll/general"], abs=1e-9)
    # Going on: the learning rate halved, and the optimizer started again from fresh moments.
    assert result.lr == pytest.approx(LR * 0.5)
    saved = torch.load(out / f"checkpoint-{at}" / "loop.pt", map_location="cpu")
    assert saved["optimizer"]["state"] == {}
    assert saved["scheduler"]["base_lrs"] == [pytest.approx(LR * 0.5)]


def test_resume_from_a_saved_checkpoint_gives_the_same_history(rewind_run, tokenizer, tmp_path):
    out, full = rewind_run
    at = full.engine.rewinds[0]["at_step"]
    ckpt = out / f"checkpoint-{at - 5}"  # before the rewind: the resumed run must rewind the same way
    assert (ckpt / "arena_state.json").is_file() and (ckpt / "arena_best-rank0.safetensors").is_file()
    resumed = custom_loop.train(tiny(tokenizer), tokenizer, output_dir=tmp_path, config=REWIND, max_steps=MAX_STEPS,
                                lr=LR, save_every=5, resume=ckpt)
    assert resumed.engine.resumed_from == ckpt
    assert [s.trigger for s in resumed.engine.history.snapshots].count("baseline") == 1  # not measured again
    a, b = strip(full.engine.history.snapshots), strip(resumed.engine.history.snapshots)
    assert [x[:2] for x in a] == [x[:2] for x in b]
    for (_, _, ma), (_, _, mb) in zip(a, b):
        assert mb == pytest.approx(ma, rel=1e-6, abs=1e-9)
    assert resumed.engine.rewinds == full.engine.rewinds
    assert resumed.lr == full.lr and resumed.step == full.step
    last = capture_state(resumed.model)
    assert all(torch.equal(last[k], v) for k, v in capture_state(full.model).items())


def test_two_gloo_processes_agree_and_stop_at_the_same_step(stop_run, tmp_path):
    config = tmp_path / "monitor.json"
    config.write_text(json.dumps(STOP))
    r0, r1 = torchrun(tmp_path, "custom_loop_worker.py", tmp_path, config, MAX_STEPS, timeout=150)
    assert [r0["rank"], r1["rank"]] == [0, 1]
    for r in (r0, r1):
        assert r["world_size"] == r["loop_world_size"] == r["engine_world_size"] == 2
        assert r["backend"] == "gloo"
    assert r0["history"] == r1["history"] and r0["decisions"] == r1["decisions"]
    assert r0["stop_step"] == r1["stop_step"] == r0["step"] == r1["step"] and r0["stopped"] and r1["stopped"]
    assert r0["final_checksum"] == r1["final_checksum"]  # DDP kept the replicas equal
    assert r0["history_path"] is not None and r1["history_path"] is None  # only rank 0 writes
    # Identical rows on every rank: the same run as in one process, up to rounding.
    _, single = stop_run
    assert r0["stop_step"] == single.engine.stop_decision.step
    assert [h["step"] for h in r0["history"]] == [s.step for s in single.engine.history.snapshots]
    for h, s in zip(r0["history"], single.engine.history.snapshots):
        assert h["metrics"]["nll/general"] == pytest.approx(s.metrics["nll/general"], rel=1e-4)


def test_a_monitor_file_on_the_command_line_gives_the_same_run(stop_run, tmp_path):
    """``--monitor monitor.yaml`` (settings, probes and target in one file) measures and stops exactly
    as the monitor built in Python."""
    out, result = stop_run
    for name, rows in (("general", custom_loop.GENERAL), ("heldout", custom_loop.TARGET)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = tmp_path / "monitor.yaml"
    path.write_text(yaml.safe_dump({**STOP, "probes": {"general": "general.jsonl"}, "target": "heldout.jsonl"}))
    from_file = custom_loop.main(["--output_dir", str(tmp_path / "run"), "--monitor", str(path),
                                  "--max_steps", str(MAX_STEPS)])
    assert from_file.stopped and from_file.step == result.step
    assert strip(from_file.engine.history.snapshots) == strip(result.engine.history.snapshots)
