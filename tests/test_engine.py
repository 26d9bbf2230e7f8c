"""The engine's parts on their own: the schedule on a fake clock, the persisted state, the sinks,
the rewinder, and the engine driven by a plain PyTorch loop (no Trainer)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import TARGET_TEXT, corpus, pretrained_model

from arena_callbacks.budget import Decision
from arena_callbacks.config import CadenceConfig, MonitorConfig
from arena_callbacks.distributed import DistContext
from arena_callbacks.engine import ForgettingEngine, StepOutcome
from arena_callbacks.history import History, read_history
from arena_callbacks.layout import CheckpointFiles, RunLayout
from arena_callbacks.measurements import Snapshot
from arena_callbacks.probes import ProbeResult
from arena_callbacks.rewind import capture_state, interpolate, next_alpha, path_rules
from arena_callbacks.rewinder import Rewinder
from arena_callbacks.schedule import ProbeSchedule
from arena_callbacks.sinks import HistorySink, LogSink
from arena_callbacks.state import STATE_VERSION, MonitorState

GENERAL = [{"text": s} for s in corpus(12, seed=7)]


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


# ------------------------------------------------------------------ schedule
def test_fixed_cadence_probes_every_n_steps():
    s = ProbeSchedule(CadenceConfig(every_n_steps=3), clock=Clock())
    s.start()
    assert [step for step in range(1, 10) if s.step_ended(step, last_step=0)] == [3, 6, 9]
    assert s.next_probe_step is None


def test_budgeted_cadence_on_a_fake_clock():
    """b = 0.25, steps of 1 s, probes of 1 s plus 0.5 s of bookkeeping: intervals 4, then 6."""
    clock = Clock()
    s = ProbeSchedule(CadenceConfig(overhead_budget=0.25, calibration_steps=2), clock=clock)
    s.baseline_done(1.0)  # the baseline pass cost 1 s
    s.start()
    probed = []
    for step in range(1, 20):
        clock.now += 1.0  # one training step
        if s.step_ended(step, last_step=probed[-1] if probed else 0):
            with s.probe_step():
                clock.now += 1.0  # the pass...
                seconds = s.share_pass(1.0)
                s.probed(step, seconds)
                clock.now += 0.5  # ...and the bookkeeping around it
            probed.append(step)
        s.start()
    assert probed == [4, 8, 14]
    assert s.bookkeeping == 0.5 and s.probe_cost == 1.5
    assert s.overhead["monitor_seconds"] == pytest.approx(3 * 1.5)
    assert s.overhead["train_seconds"] == 14.0
    summary = s.summary()  # the five steps after the last probe count too
    assert summary["train_seconds"] == 19.0 and summary["fraction"] == pytest.approx(4.5 / 23.5)


def test_schedule_state_round_trip():
    s = ProbeSchedule(CadenceConfig(overhead_budget=0.1), clock=Clock())
    s.next_probe_step, s.probe_cost = 17, 2.5
    s.overhead["monitor_seconds"] = 3.0
    t = ProbeSchedule(CadenceConfig(overhead_budget=0.1), clock=Clock())
    t.load_state_dict(json.loads(json.dumps(s.state_dict())))
    assert (t.next_probe_step, t.probe_cost, t.overhead) == (17, 2.5, s.overhead)


# ------------------------------------------------------------------ persisted state
def test_monitor_state_round_trips_through_json_and_a_file(tmp_path):
    state = MonitorState(
        baseline_results={
            "general": ProbeResult(name="general", kind="text", nll=3.25, score=None, examples=12, tokens=120),
            # with its rows, which the paired standard errors of a resumed run need
            "facts": ProbeResult(name="facts", kind="multiple_choice", nll=1.5, score=0.5, examples=2, tokens=3,
                                 rows=((1.25, 1.0, 1.0), (3.25, 2.0, 0.0))),
        },
        history=[{"step": 0, "epoch": 0.0, "trigger": "baseline", "metrics": {"nll/general": 3.25}}],
        config=MonitorConfig().model_dump(mode="json"),
        rewinds=[{"number": 1, "at_step": 4, "alpha": 0.5}],
        last_probe_step=4,
        best={"step": 2, "metrics": {"sp/stability": 0.9, "delta_nll/general": math.inf}},
        theta0_step=0,
        schedule={"next_probe_step": 8, "probe_cost": 1.0, "overhead": {"monitor_seconds": 1.0}},
        overhead={"monitor_seconds": 1.0, "fraction": 0.1},
    )
    back = MonitorState.from_json(json.loads(json.dumps(state.to_json(), allow_nan=False)))
    assert back.best["metrics"]["delta_nll/general"] == math.inf  # non-finite values survive as strings
    assert back == state and back.baseline_results["facts"].rows == ((1.25, 1.0, 1.0), (3.25, 2.0, 0.0))
    state.write(tmp_path)
    assert MonitorState.read(tmp_path) == state
    assert not (tmp_path / "arena_state.json.tmp").exists()
    data = state.to_json()
    data["version"] = STATE_VERSION + 1
    with pytest.raises(ValueError, match=f"version {STATE_VERSION + 1} is not {STATE_VERSION}"):
        MonitorState.from_json(data)


def test_layout_names_every_file(tmp_path):
    layout = RunLayout.for_output_dir(tmp_path)
    assert layout.history == tmp_path / "arena" / "history.jsonl"
    assert layout.summary.name == "summary.json" and layout.probes.name == "probes.json"
    files = CheckpointFiles(tmp_path / "checkpoint-4")
    assert files.kept("best", 1).name == "arena_best-rank1.safetensors"
    assert files.state.name == "arena_state.json"


# ------------------------------------------------------------------ sinks
def test_history_and_log_sinks(tmp_path):
    history = History(tmp_path / "history.jsonl")
    history.start_file()
    logged = []
    sinks = [HistorySink(history), LogSink(lambda metrics, step: logged.append((step, metrics)))]
    snap = Snapshot(2, {"retention/general": 0.9}, trigger="step")
    decision = Decision(step=2, action=None, outcomes=())
    for sink in sinks:
        sink.record(snap, decision, history.snapshots)
        sink.text("arena/rewinds", "nothing", 2)  # the base class ignores what a sink does not keep
    assert history.snapshots == [snap] and [s.step for s in read_history(tmp_path)] == [2]
    assert logged == [(2, {"retention/general": 0.9})]


# ------------------------------------------------------------------ rewinder
def _sgd(model, lr=0.1):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr, momentum=0.9)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)


def test_rewinder_restores_the_best_state_and_continues_with_a_lower_rate(tmp_path):
    cfg = MonitorConfig.model_validate({
        "budgets": [{"key": "delta_nll/general", "max_rise": 0.1, "action": "rewind"}],
        "rewind": {"mode": "checkpoint", "then": "continue", "lr_factor": 0.5, "max_rewinds": 2},
    })
    model = pretrained_model()
    rewinder = Rewinder(cfg, DistContext(), tmp_path)
    rewinder.setup(model)
    base = {"delta_nll/general": 0.0}
    rewinder.offer(model, Snapshot(0, base, trigger="baseline"), base)
    kept = capture_state(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    opt, sched = _sgd(model)
    model(input_ids=torch.tensor([[1, 5, 6]]), labels=torch.tensor([[1, 5, 6]])).loss.backward()
    opt.step()
    assert opt.state  # momentum buffers exist
    rewinder.offer(model, Snapshot(2, {"delta_nll/general": 0.5}), base)  # out of budget: not kept
    decision = Decision(step=2, action=None, outcomes=())
    info, metrics = rewinder.rewind(model, 2, decision, Snapshot(2, {"delta_nll/general": 0.5}), base,
                                    measure=lambda desc: {"delta_nll/general": 0.0})
    assert info["restored_step"] == 0 and metrics == {"delta_nll/general": 0.0}
    now = capture_state(model)
    assert all(torch.equal(now[k], kept[k]) for k in kept)
    assert rewinder.then(1) == "continue" and rewinder.then(2) == "stop"
    rewinder.continue_training(opt, sched)
    assert [g["lr"] for g in opt.param_groups] == [0.05] and sched.base_lrs == [0.05] and not opt.state
    # accelerate wraps the scheduler: the rate it restores at its next step is lowered too.
    from accelerate.scheduler import AcceleratedScheduler

    opt, sched = _sgd(model)
    rewinder.continue_training(opt, AcceleratedScheduler(sched, opt))
    assert sched.base_lrs == [0.05]
    sched.step()
    assert [g["lr"] for g in opt.param_groups] == [0.05]
    # Its state round-trips through a checkpoint folder.
    rewinder.rewinds.append(info)
    rewinder.export(tmp_path)
    other = Rewinder(cfg, DistContext(), tmp_path / "other")
    other.setup(model)
    other.restore(tmp_path, json.loads(json.dumps(rewinder.state_dict())))
    assert other.best.step == 0 and other.rewinds == [info]
    assert all(torch.equal(other.best.get()[k], kept[k]) for k in kept)


@pytest.mark.parametrize(("refine", "alpha", "probed"), [(0, 0.0, [0.25, 0.5, 0.75]),
                                                        (3, 0.1875, [0.25, 0.5, 0.75, 0.125, 0.0625, 0.1875])])
def test_a_path_rewind_refines_alpha_below_the_grid(tmp_path, refine, alpha, probed):
    """S(α) = 1 − α/2 with a budget S ≥ 0.9 and P(α) = α: every grid point is out of budget, the
    best point lies at α = 0.2. The grid alone falls back to the pretrained model; refining probes
    the midpoints next to each choice and gets to α = 0.1875, loaded exactly."""
    cfg = MonitorConfig.model_validate({
        "budgets": [{"key": "retention/general", "max_drop": 0.1, "action": "rewind"}],
        "rewind": {"mode": "path", "refine": refine},
    })
    model = pretrained_model()
    rewinder = Rewinder(cfg, DistContext(), tmp_path)
    rewinder.setup(model)
    rewinder.keep_start(model, 0)
    theta0 = capture_state(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.linspace(-1, 1, p.numel()).view_as(p))
    theta1 = capture_state(model)
    name = next(iter(theta0))
    direction = theta1[name] - theta0[name]

    def metrics(a: float) -> dict[str, float]:
        return {"retention/general": 1 - a / 2, "sp/stability": 1 - a / 2, "sp/plasticity": a}

    seen = []

    def measure(desc: str) -> dict[str, float]:  # reads α off the weights the rewinder loaded
        now = capture_state(model)[name]
        a = float(((now - theta0[name]) * direction).sum() / (direction * direction).sum())
        seen.append(round(a, 6))
        return metrics(a)

    base = metrics(0.0)
    info, got = rewinder.rewind(model, 9, Decision(step=9), Snapshot(9, metrics(1.0)), base, measure)
    assert seen == probed and info["alpha"] == alpha and got == pytest.approx(metrics(alpha), abs=1e-6)
    assert [c["alpha"] for c in info["candidates"]] == sorted([0.0, 1.0, *probed])
    assert [c["alpha"] for c in info["candidates"] if c["chosen"]] == [alpha]
    now, want = capture_state(model), interpolate(theta0, theta1, alpha, path_rules(theta0))
    assert all(torch.equal(now[k], want[k]) for k in want)


def test_next_alpha_splits_the_wider_side_of_the_choice():
    assert next_alpha([0.0, 0.25, 0.5, 0.75, 1.0], 0.25) == 0.125  # equal sides: towards the pretrained model
    assert next_alpha([0.0, 0.125, 0.25, 0.5, 1.0], 0.5) == 0.75
    assert next_alpha([0.0, 0.25, 1.0], 0.0) == 0.125 and next_alpha([0.0, 0.25, 1.0], 1.0) == 0.625
    assert next_alpha([0.0, 0.01, 0.02], 0.01, min_gap=0.05) is None
    assert next_alpha([0.5], 0.5) is None


# ------------------------------------------------------------------ the engine in a plain loop
def plain_loop(engine: ForgettingEngine, model, tokenizer, out, steps: int, start: int = 0, opt=None):
    """The few lines a custom loop adds: begin, after_step (stop on request), end."""
    opt = opt or torch.optim.SGD(model.parameters(), lr=0.1)
    batch = tokenizer([TARGET_TEXT] * 4, return_tensors="pt")
    engine.begin(model, step=start, output_dir=out, tokenizer=tokenizer,
                 resume_from=out / f"ckpt-{start}" if start else None)
    outcome, step = StepOutcome(), start
    for step in range(start + 1, steps + 1):
        model.train()
        model(**batch, labels=batch["input_ids"]).loss.backward()
        opt.step()
        opt.zero_grad()
        outcome = engine.after_step(model, step, optimizer=opt)
        if step == 4:
            (out / "ckpt-4").mkdir(exist_ok=True)
            engine.save(out / "ckpt-4")
        if outcome.stop:
            break
    engine.end(model, step)
    return step, outcome


def test_engine_drives_a_plain_loop_stops_and_resumes(tokenizer, tmp_path):
    cfg = {"cadence": {"every_n_steps": 2}, "probe": {"batch_size": 8, "max_length": 64},
           "logging": {"tensorboard": False},
           "budgets": [{"key": "delta_nll/general", "max_rise": 0.3, "action": "stop"}]}
    torch.manual_seed(0)
    engine = ForgettingEngine(cfg, probes={"general": GENERAL})
    step, outcome = plain_loop(engine, pretrained_model(), tokenizer, tmp_path / "a", steps=40)
    assert outcome.stop and engine.stop_decision is not None and step == engine.stop_decision.step < 40
    assert [s.step for s in engine.history] == list(range(0, step + 1, 2))
    assert "delta_nll/general rose to" in engine.stop_decision.message
    assert json.loads((tmp_path / "a" / "arena" / "summary.json").read_text())["stop_step"] == step

    # Interrupted at step 4 and resumed from the folder saved there: the same history.
    out = tmp_path / "b"
    model = pretrained_model()
    first = ForgettingEngine(cfg, probes={"general": GENERAL})
    plain_loop(first, model, tokenizer, out, steps=4)
    resumed = ForgettingEngine(cfg, probes={"general": GENERAL})
    plain_loop(resumed, model, tokenizer, out, steps=40, start=4)
    assert resumed.resumed_from == out / "ckpt-4"
    a = [(s.step, s.metrics["delta_nll/general"]) for s in engine.history]
    b = [(s.step, s.metrics["delta_nll/general"]) for s in resumed.history]
    assert [x for x, _ in b] == [x for x, _ in a]
    assert [y for _, y in b] == pytest.approx([y for _, y in a], rel=1e-6, abs=1e-9)


# ------------------------------------------------------------------ measurement
def test_measurer_turns_a_pass_into_snapshot_keys(tokenizer):
    from arena_callbacks.measure import Measurer
    from arena_callbacks.probes import ProbeSet

    cfg = MonitorConfig.model_validate({"probe": {"batch_size": 8, "max_length": 64},
                                        "geometry": {"enabled": True, "reference": "cache", "tokens_per_module": 32}})
    measurer = Measurer(cfg, {"general": ProbeSet.build("general", GENERAL, cfg.probe)})
    assert measurer.keys == ["delta_nll/general", "nll/general", "probe/seconds", "retention/general",
                             "retention_nll/general", "sp/stability", "geometry/*"]
    model = pretrained_model()
    measurer.runner.prepare(tokenizer)
    keys = measurer.setup(model)
    assert "geometry/procrustes/model.norm" in keys and "geometry/*" not in keys
    clock = iter([10.0, 12.5])
    results, seconds, extra = measurer.run(model, DistContext(), 0, "test", baseline=True, clock=lambda: next(clock))
    assert seconds == 2.5 and extra["geometry/procrustes/max"] < 1e-2  # its own reference, cached in bf16
    measurer.baseline_results = results
    metrics = measurer.metrics(results, seconds)
    assert metrics["delta_nll/general"] == 0.0 and metrics["retention/general"] == 1.0
    assert metrics["nll/general"] == results["general"].nll and metrics["probe/seconds"] == 2.5
    with torch.no_grad():
        model.model.norm.weight.mul_(1.5)  # a scaled output: a distortion CKA forgives, Procrustes does not
    results, _, extra = measurer.run(model, DistContext(), 2, "test")
    moved = measurer.metrics(results, 0.0)
    assert moved["delta_nll/general"] != 0.0 and moved["retention/general"] == pytest.approx(
        math.exp(-moved["delta_nll/general"]))
    assert extra["geometry/procrustes/model.norm"] > 0.4  # ‖1.5·X0 − X0‖ / ‖X0‖ = 0.5, less cache noise
    assert extra["geometry/cka/model.norm"] == pytest.approx(1.0, abs=1e-2)
