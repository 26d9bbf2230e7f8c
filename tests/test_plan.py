"""``arena-callbacks plan`` against the real thing on the tiny model: the probe pass's forwards,
positions and scored positions as a real ``ProbeRunner`` pass processes them, parameter and
byte counts as a real model holds them, the schedule's interval rule, the JSON, and bad input.
Offline and CPU-only; no assertion on wall-clock time (timings are benchmarks/plan_check.py's)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from helpers import corpus, make_model, make_tokenizer

from arena_callbacks.cli import main
from arena_callbacks.config import CadenceConfig, MonitorConfig
from arena_callbacks.distributed import DistContext
from arena_callbacks.planning import PlanError, PlanInputs, format_plan, make_plan, probe_interval
from arena_callbacks.probes import ProbeRunner, ProbeSet

MC = [{"context": f"Question {i}: which word comes after {w}? Answer:", "choices": [" one", " two three", " red",
                                                                                    " blue cat"], "answer": i % 4}
      for i, w in enumerate(["the", "a", "model", "river", "city", "dog"])]
COMPLETION = [{"prompt": f"say {w}:", "completion": f" {w} {w}"} for w in ["cat", "dog", "bird", "fish"]]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A model folder (config and tokenizer of the tests' tiny Llama) and a monitor file."""
    root = tmp_path_factory.mktemp("plan")
    model_dir = root / "tiny"
    make_model().config.save_pretrained(model_dir)
    make_tokenizer().save_pretrained(model_dir)
    (root / "general.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in corpus(20, seed=1)))
    (root / "mc.jsonl").write_text("\n".join(json.dumps(r) for r in MC))
    (root / "target.jsonl").write_text("\n".join(json.dumps(r) for r in COMPLETION))
    monitor = {
        "cadence": {"overhead_budget": 0.05},
        "probe": {"batch_size": 4, "max_length": 64},
        "probes": {"general": "general.jsonl", "mc": "mc.jsonl"},
        "target": "target.jsonl",
        "geometry": {"enabled": True, "tokens_per_module": 64},
        "spectra": {"enabled": True},
        "budgets": [{"key": "delta_nll/general", "max_rise": 0.3, "action": "rewind"}],
        "rewind": {"mode": "path"},
        "logging": {"tensorboard": False},
    }
    (root / "monitor.yaml").write_text(yaml.safe_dump(monitor))
    return {"root": root, "model": str(model_dir), "monitor": str(root / "monitor.yaml"), "config": monitor}


def plan_of(setup, **kw):
    args = {"model": setup["model"], "monitor": setup["monitor"], "tokens_per_step": 512, "seq_length": 64,
            "accelerator": "h100", **kw}
    return make_plan(PlanInputs(**args))


def real_runner(setup):
    cfg = MonitorConfig.model_validate({k: v for k, v in setup["config"].items() if k not in ("probes", "target")})
    root = setup["root"]
    sets = {"general": ProbeSet.build("general", str(root / "general.jsonl"), cfg.probe),
            "mc": ProbeSet.build("mc", str(root / "mc.jsonl"), cfg.probe),
            "target": ProbeSet.build("target", str(root / "target.jsonl"), cfg.probe)}
    runner = ProbeRunner(sets, cfg.probe)
    runner.prepare(make_tokenizer())
    return runner, cfg


def count_forwards(model, fn):
    """Forwards, positions fed (input_ids elements) and logits rows of the model while ``fn`` runs."""
    seen = {"forwards": 0, "positions": 0, "scored": 0}
    vocab = model.config.vocab_size

    def pre(module, args, kwargs):
        seen["forwards"] += 1
        seen["positions"] += kwargs["input_ids"].numel()

    def post(module, args, kwargs, out):
        seen["scored"] += out["logits"].numel() // vocab

    handles = [model.register_forward_pre_hook(pre, with_kwargs=True),
               model.register_forward_hook(post, with_kwargs=True)]
    try:
        fn()
    finally:
        for h in handles:
            h.remove()
    return seen


def test_probe_pass_counts_equal_a_real_pass(setup):
    plan = plan_of(setup)
    runner, _ = real_runner(setup)
    model = make_model()
    seen = count_forwards(model, lambda: runner.run(model))
    per_rank = plan["probes"]["per_rank"]
    assert per_rank["forwards"] == seen["forwards"]
    assert per_rank["positions"] == seen["positions"]
    assert per_rank["scored"] == seen["scored"]
    assert plan["probes"]["shared_contexts"] and plan["probes"]["packed_rows"]  # trees and packing were planned
    assert plan["probes"]["rows"] == {"general": 20, "mc": 6, "target": 4}
    assert plan["tokenizer"] == setup["model"]


def test_geometry_reference_pass_counts_equal_a_real_one(setup):
    """A LoRA plan adds the logits-free pass with the adapters off over the geometry probes."""
    plan = plan_of(setup, lora_rank=4)
    assert plan["geometry"]["reference"] == "disable_adapter"
    runner, _ = real_runner(setup)
    model = make_model()
    seen = count_forwards(model, lambda: runner.run(model, only=["general"], forward_only=True))
    ref = plan["geometry"]["reference_pass_per_rank"]
    assert (ref["forwards"], ref["positions"], ref["scored"]) == (seen["forwards"], seen["positions"], seen["scored"])
    assert plan["geometry"]["probes"] == ["general"]


def test_parameters_and_bytes_equal_a_real_model(setup, tmp_path):
    import peft

    from arena_callbacks.capture import GeometryTracker
    from arena_callbacks.rewind import capture_state, state_bytes
    from arena_callbacks.spectra import spectra_layer_names

    full = plan_of(setup, dtype="fp32")
    model = make_model()
    assert full["model"]["params"] == sum(p.numel() for p in model.parameters())
    assert full["model"]["trainable"] == full["model"]["params"]
    state = capture_state(model)
    assert full["rewind"]["bytes_per_state"] == state_bytes(state)
    assert full["rewind"]["bytes_per_rank"] == 2 * state_bytes(state)  # path mode: best + θ0
    assert full["spectra"]["layers"] == len(spectra_layer_names(model))
    # The geometry cache (full finetuning: reference cached at the baseline), as a real tracker keeps it.
    runner, cfg = real_runner(setup)
    tracker = GeometryTracker(cfg.geometry, runner)
    tracker.setup(model)
    with tracker.capturing() as capture:
        runner.run(model, observer=capture)
    tracker.measure(model, DistContext(), baseline=True)
    assert full["geometry"]["cache_bytes_per_rank"] == round(tracker.cache_mb * 2**20)
    assert sorted(full["geometry"]["modules"]) == sorted(tracker.module_names)

    sharded = plan_of(setup, dtype="fp32", num_accelerators=4, sharding="fsdp")
    assert sharded["rewind"]["bytes_per_state"] == math.ceil(state_bytes(state) / 4)
    # ZeRO-3: each rank keeps its fp32 master partition, 4 bytes a parameter over the ranks.
    zero3 = plan_of(setup, dtype="bf16", sharding="zero3", num_accelerators=2)["rewind"]
    assert zero3["bytes_per_state"] == math.ceil(4 * sum(t.numel() for t in state.values()) / 2)
    # The peak is the rule the monitor checks at train start: kept states plus a rewind's working copies.
    from arena_callbacks.config import RewindConfig
    from arena_callbacks.resources import rewind_plan

    checked = rewind_plan(zero3["bytes_per_state"], RewindConfig(mode="path", storage="memory"), tmp_path, ranks=1,
                          memory_available=2**62)
    assert zero3["peak_bytes_per_rank"] == checked.memory_bytes == 4 * zero3["bytes_per_state"]

    lora = plan_of(setup, lora_rank=4, lora_targets=("q_proj", "v_proj"))
    real = peft.get_peft_model(make_model(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    trainable = [p for p in real.parameters() if p.requires_grad]
    assert lora["model"]["trainable"] == sum(p.numel() for p in trainable)
    assert lora["rewind"]["bytes_per_state"] == state_bytes(capture_state(real))
    assert lora["model"]["params"] == full["model"]["params"]
    assert lora["spectra"]["layers"] == len(spectra_layer_names(real)) == 4
    assert lora["geometry"]["cache_bytes_per_rank"] == 0  # disable_adapter: nothing cached


def test_adapter_config_gives_rank_and_targets(setup, tmp_path):
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({"r": 4, "target_modules": ["q_proj", "v_proj"], "peft_type": "LORA"}))
    assert plan_of(setup, adapter_config=str(path))["model"] == plan_of(setup, lora_rank=4)["model"]


@pytest.mark.parametrize("cadence, cost, step, want", [
    ({"overhead_budget": 0.03}, 3.0, 1.0, 100),
    ({"overhead_budget": 0.1}, 2.5, 0.5, 50),
    ({"overhead_budget": 0.1, "max_interval": 20}, 2.5, 0.5, 20),
    ({"overhead_budget": 0.5, "min_interval": 7}, 1.0, 1.0, 7),
    ({"every_n_steps": 13}, 5.0, 1.0, 13),
    ({"overhead_budget": None, "on_evaluate": True}, 5.0, 1.0, None),
])
def test_interval_is_the_schedules_rule(cadence, cost, step, want):
    assert probe_interval(CadenceConfig(**cadence), cost, step) == want


def test_interval_of_a_plan_follows_its_costs(setup):
    plan = plan_of(setup, step_seconds=0.01)
    s = plan["schedule"]
    assert plan["training"]["step_seconds"] == 0.01
    assert s["interval"] == max(1, math.ceil(s["probe_step_seconds"] / (0.05 * 0.01) - 1e-9))
    added = s["probe_step_seconds"] / (s["interval"] * 0.01)
    assert s["added_time"] == pytest.approx(added) and s["added_time"] <= 0.05 + 1e-12


def test_json_round_trip_and_cli(setup, tmp_path, capsys):
    out = tmp_path / "plan.json"
    rc = main(["plan", "--model", setup["model"], "--monitor", setup["monitor"], "--tokens-per-step", "512",
               "--seq-length", "64", "--accelerator", "h100", "--num-accelerators", "8", "--sharding", "fsdp",
               "--lora-rank", "4", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    plan = json.loads(out.read_text())
    assert json.loads(json.dumps(plan)) == plan
    assert format_plan(plan) in printed
    assert plan["inputs"]["num_accelerators"] == 8 and plan["accelerator"]["sharding"] == "fsdp"
    assert plan["probes"]["slowest_rank"] in range(8)
    assert sum(1 for _ in plan["probes"]["all_ranks"]) == 4
    for key in ("probes", "geometry", "spectra", "rewind", "training", "schedule"):
        assert key in plan


def test_cpu_plan_times_the_model_itself(setup, monkeypatch):
    """The tiny model (2 layers) is timed whole on this CPU; no assertion on the seconds themselves."""
    monkeypatch.setattr("arena_callbacks.planning.calibrate.MIN_SECONDS", 0.0)  # the fewest rounds: a quick test
    plan = plan_of(setup, accelerator="cpu", repeats=1)
    assert plan["accelerator"]["timing"]["probe"] == "timed whole, random weights"
    assert plan["probes"]["seconds"] > 0 and plan["training"]["step_seconds"] > 0
    flops = plan_of(setup, accelerator="cpu", calibrate=False)
    assert flops["accelerator"]["timing"]["probe"] == "flops"


def test_no_tokenizer_is_said(setup, tmp_path):
    folder = tmp_path / "config-only"
    make_model().config.save_pretrained(folder)
    plan = plan_of(setup, model=str(folder / "config.json"))
    assert plan["tokenizer"].startswith("approximate")
    assert plan["probes"]["per_rank"]["tokens"] > 0


@pytest.mark.parametrize("change, message", [
    ({"accelerator": "tpu"}, "--accelerator: 'tpu' is not one of"),
    ({"sharding": "zero9"}, "--sharding: 'zero9' is not one of ['none', 'ddp', 'fsdp', 'zero2', 'zero3']"),
    ({"num_accelerators": 0}, "--num-accelerators: 0 must be a positive integer"),
    ({"tokens_per_step": 4, "num_accelerators": 8}, "--tokens-per-step: 4 is fewer than one token per accelerator"),
    ({"dtype": "int8"}, "--dtype: 'int8' is not one of"),
    ({"lora_rank": 0}, "--lora-rank: 0 must be a positive integer"),
    ({"lora_rank": 4, "lora_targets": ("nope_proj",)}, "--lora-targets: ['nope_proj']"),
    ({"model": "/no/such/model"}, "--model: /no/such/model not found"),
    ({"monitor": "/no/such.yaml"}, "--monitor: file /no/such.yaml not found"),
    ({"tokenizer": "/no/such/tok"}, "--tokenizer: /no/such/tok is not a folder holding a tokenizer"),
    ({"adapter_config": "/no/adapter_config.json"}, "--adapter-config: /no/adapter_config.json is not a PEFT"),
])
def test_bad_input_is_named(setup, change, message):
    with pytest.raises(PlanError) as e:
        plan_of(setup, **change)
    assert message in str(e.value)


def test_bad_monitor_file_and_cli_exit_status(setup, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"probes": {"general": str(setup["root"] / "general.jsonl")},
                                   "geometry": {"enabled": True, "modules": ["no_such_module"]}}))
    with pytest.raises(PlanError, match="geometry.modules: pattern 'no_such_module' matches no module"):
        plan_of(setup, monitor=str(bad))
    rc = main(["plan", "--model", setup["model"], "--monitor", str(bad), "--tokens-per-step", "64"])
    assert rc == 2
    assert "arena-callbacks plan: error:" in capsys.readouterr().err


def test_meta_model_allocates_nothing(setup):
    from arena_callbacks.planning.model import build_meta_model, load_config

    model = build_meta_model(load_config(setup["model"]), 4, ("q_proj",), torch.bfloat16)
    assert all(p.device.type == "meta" for p in model.parameters())


def _gen_plan_docs():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "scripts" / "gen_plan_docs.py"
    spec = importlib.util.spec_from_file_location("gen_plan_docs", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_plan_page_renders_from_the_stored_plans():
    """docs/plan.md's table is what scripts/gen_plan_docs.py renders from docs/plan/results/*.json."""
    assert _gen_plan_docs().main(["--check"]) == 0, "run: python scripts/gen_plan_docs.py (and commit the page)"


def test_a_stored_plan_is_what_the_tool_makes_now():
    """The Llama-3-8B plan on 8 H100s (LoRA) is remade from its config: the page stays true."""
    gen = _gen_plan_docs()
    name = "llama-3-8b-8xh100-lora"
    assert gen.make(name) == gen.load(name), "run: python scripts/gen_plan_docs.py (and commit the plans)"


def test_generative_probes_are_planned_as_an_upper_bound(setup, tmp_path):
    """A ``generate`` probe decodes: its prefill and at most ``max_new_tokens - 1`` one-token steps
    per batch; a real pass (answers may stop early) feeds no more, and the teacher-forced probes
    are planned as before."""
    root = setup["root"]
    (tmp_path / "gen.jsonl").write_text("\n".join(json.dumps({"prompt": f"say {w}:", "answer": w})
                                                  for w in ["cat", "dog", "bird", "fish", "red"]))
    monitor = {**setup["config"], "probes": {"general": str(root / "general.jsonl"),
                                             "gen": {"path": "gen.jsonl", "kind": "generate",
                                                     "scorer": "exact_match", "max_new_tokens": 5}}}
    monitor.pop("target")
    (tmp_path / "monitor.yaml").write_text(yaml.safe_dump(monitor))
    plan = plan_of(setup, monitor=str(tmp_path / "monitor.yaml"))
    per_rank = plan["probes"]["per_rank"]
    assert per_rank["decode_steps"] == 2 * 4  # batch_size 4: two batches of 5 rows, 4 steps after each prefill

    from arena_callbacks.monitor_file import load_monitor_file

    spec = load_monitor_file(tmp_path / "monitor.yaml")
    sets = {n: ProbeSet.build(n, p, spec.config.probe) for n, p in spec.probes.items()}
    runner = ProbeRunner(sets, spec.config.probe)
    runner.prepare(make_tokenizer())
    model = make_model()
    seen = count_forwards(model, lambda: runner.run(model))
    assert seen["forwards"] <= per_rank["forwards"] and seen["positions"] <= per_rank["positions"]
    general = count_forwards(model, lambda: runner.run(model, only=["general"]))
    assert per_rank["forwards"] - per_rank["decode_steps"] - 2 == general["forwards"]  # the two prefills apart
