"""``arena-callbacks rewind <output_dir>`` on saved tiny runs (LoRA adapter and full finetuning)."""

import json

import pytest
import torch
from helpers import TARGET_TEXT, corpus, pretrained_model
from transformers import AutoModelForCausalLM, DataCollatorForLanguageModeling, Trainer, TrainingArguments

from arena_callbacks import ForgettingMonitor
from arena_callbacks.cli import main
from arena_callbacks.measurements import build_snapshot
from arena_callbacks.posthoc import RewindError, rewind_run

GENERAL = [{"text": s} for s in corpus(16, seed=7)]
TARGET = [{"prompt": "one two three", "completion": " four five six"}]


def train_run(tokenizer, tmp_path, adapter: bool, lr: float):
    base_dir = tmp_path / "base"
    pretrained_model().save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    if adapter:
        peft = pytest.importorskip("peft")
        model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    out = tmp_path / "run"
    monitor = ForgettingMonitor(
        {"cadence": {"every_n_steps": 2}, "probe": {"batch_size": 8, "max_length": 64},
         "operating_point": {"weight": 1.0},
         "budgets": [{"key": "delta_nll/general", "max_rise": 0.8, "action": "log"}]},
        probes={"general": GENERAL}, target=TARGET,
    )
    args = TrainingArguments(output_dir=str(out), max_steps=6, per_device_train_batch_size=8, learning_rate=lr,
                             report_to=[], save_strategy="steps", save_steps=2, use_cpu=True, seed=0,
                             lr_scheduler_type="constant")
    trainer = Trainer(model=model, args=args, train_dataset=[tokenizer(TARGET_TEXT) for _ in range(64)],
                      processing_class=tokenizer, data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
                      callbacks=[monitor])
    trainer.train()
    trainer.save_model(str(out))
    return out, base_dir, monitor


@pytest.fixture(scope="module")
def lora_run(tokenizer, tmp_path_factory):
    return train_run(tokenizer, tmp_path_factory.mktemp("lora"), adapter=True, lr=5e-2)


@pytest.fixture(scope="module")
def full_run(tokenizer, tmp_path_factory):
    return train_run(tokenizer, tmp_path_factory.mktemp("full"), adapter=False, lr=2e-2)


def check_choice(result, run_budget_key="delta_nll/general", limit=0.8, weight=1.0):
    cands = result["candidates"]
    chosen = [c for c in cands if c["chosen"]]
    assert len(chosen) == 1 and chosen[0]["label"] == result["chosen"]
    for c in cands:  # in budget means within the run's stop/rewind budgets: the log budget does not count
        assert c["in_budget"] is True
    best = max(cands, key=lambda c: weight * c["plasticity"] + c["stability"])
    assert weight * chosen[0]["plasticity"] + chosen[0]["stability"] == pytest.approx(
        weight * best["plasticity"] + best["stability"])
    return chosen[0]


def probe_metrics(monitor, model, tokenizer):
    runner = monitor.runner
    base = runner.run(pretrained_model())
    return build_snapshot(runner.run(model), base, runner.probes)


def test_posthoc_rewind_of_a_lora_run(tokenizer, lora_run):
    from peft import PeftModel

    out, base_dir, monitor = lora_run
    assert main(["rewind", str(out), "--alphas", "0.3", "0.6", "--refine", "0"]) == 0
    rew = out / "rewound"
    result = json.loads((rew / "rewind.json").read_text())
    labels = [c["label"] for c in result["candidates"]]
    assert labels == ["pretrained", "checkpoint-2", "checkpoint-4", "checkpoint-6", "final", "final α=0.3",
                      "final α=0.6"]
    chosen = check_choice(result)
    # Saved states measured post hoc equal what the monitor measured live at those steps.
    live = {s.step: s.metrics for s in monitor.history.snapshots}
    for c in result["candidates"]:
        if c["source"] == "checkpoint":
            assert c["plasticity"] == pytest.approx(live[c["step"]]["sp/plasticity"], abs=1e-6)
            assert c["stability"] == pytest.approx(live[c["step"]]["sp/stability"], abs=1e-6)
    # The written adapter loads with PeftModel.from_pretrained and measures as the chosen candidate.
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), rew).eval()
    m = probe_metrics(monitor, loaded, tokenizer)
    assert m["sp/stability"] == pytest.approx(chosen["stability"], abs=1e-6)
    assert m["sp/plasticity"] == pytest.approx(chosen["plasticity"], abs=1e-6)
    md = (rew / "rewind.md").read_text()
    assert f"Chosen: **{chosen['label']}**" in md and (rew / "rewind.png").stat().st_size > 1000


def test_posthoc_path_points_are_exact_interpolations(tokenizer, lora_run, tmp_path):
    from peft import PeftModel
    from peft.utils import load_peft_weights

    out, base_dir, monitor = lora_run
    rew = rewind_run(out, tmp_path / "half", alphas=[0.5])
    result = json.loads((rew / "rewind.json").read_text())
    half = next(c for c in result["candidates"] if c["label"] == "final α=0.5")
    # Measure θ(0.5) by hand: lora_B halved, lora_A kept.
    final = load_peft_weights(str(out))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), out).eval()
    from peft import set_peft_model_state_dict

    set_peft_model_state_dict(model, {k: v * 0.5 if ".lora_B." in k else v for k, v in final.items()})
    m = probe_metrics(monitor, model, tokenizer)
    assert m["sp/plasticity"] == pytest.approx(half["plasticity"], abs=1e-6)
    assert m["sp/stability"] == pytest.approx(half["stability"], abs=1e-6)


def test_posthoc_rewind_of_a_full_finetune(tokenizer, full_run, tmp_path):
    out, base_dir, monitor = full_run
    rew = rewind_run(out, tmp_path / "rewound", base_model=base_dir, alphas=[0.5])
    result = json.loads((rew / "rewind.json").read_text())
    chosen = check_choice(result)
    # The run's rewind.refine (2) probes up to two midpoints next to a choice on the path.
    path = [c["alpha"] for c in result["candidates"] if c["source"] == "path"]
    assert path[0] == 0.5 and len(set(path)) == len(path) <= 3
    assert all(a * 8 == int(a * 8) for a in path[1:])  # midpoints of 0, 0.5, 1: quarters, then eighths
    loaded = AutoModelForCausalLM.from_pretrained(rew, dtype=torch.float32).eval()
    m = probe_metrics(monitor, loaded, tokenizer)
    assert m["sp/stability"] == pytest.approx(chosen["stability"], abs=1e-6)
    # θ(0.5) of full finetuning is the float64 midpoint of the weights.
    if chosen["label"] == "final α=0.5":
        base = AutoModelForCausalLM.from_pretrained(base_dir).state_dict()
        fin = AutoModelForCausalLM.from_pretrained(out).state_dict()
        k = "model.layers.0.mlp.down_proj.weight"
        ref = (base[k].double() + 0.5 * (fin[k].double() - base[k].double())).float()
        assert torch.equal(loaded.state_dict()[k], ref)


def test_posthoc_errors(full_run, tmp_path, capsys):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(full_run[0], out)
    (out / "arena" / "probes.json").unlink()
    with pytest.raises(RewindError, match="probes.json not found"):
        rewind_run(out, base_model=full_run[1])
    empty = tmp_path / "empty"
    (empty / "arena").mkdir(parents=True)
    (out / "arena" / "history.jsonl").rename(empty / "arena" / "history.jsonl")
    assert main(["rewind", str(empty)]) == 2
    assert "no saved weights" in capsys.readouterr().err


def test_saved_states_after_a_live_rewind(tmp_path):
    """A checkpoint saved at a live rewind's step, and the final model of a run that stopped there, hold
    what the rewind loaded: their candidates say so (no training: a hand-written run)."""
    from arena_callbacks import Snapshot
    from arena_callbacks.history import History
    from arena_callbacks.posthoc import Candidate, _rewound_at, _saved_states, _write_outputs
    from arena_callbacks.runs import load_run

    out = tmp_path / "run"
    hist = History(out / "arena" / "history.jsonl")
    hist.start_file()
    info = {"number": 1, "at_step": 4, "mode": "path", "alpha": 0.5, "then": "stop"}
    for snap in (Snapshot(0, {"sp/stability": 1.0}, trigger="baseline"), Snapshot(2, {"sp/stability": 0.9}),
                 Snapshot(4, {"sp/stability": 0.3}), Snapshot(4, {"sp/stability": 0.95}, trigger="rewind",
                                                              extra={"rewind": info})):
        hist.append(snap, None)
    (out / "arena" / "summary.json").write_text(json.dumps({"final_step": 4, "rewinds": [info]}))
    for folder in (out / "checkpoint-2", out / "checkpoint-4", out):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "adapter_model.safetensors").write_bytes(b"")
    run = load_run(out)
    assert [(label, source, step) for label, source, step, _ in _saved_states(run)] == [
        ("checkpoint-2", "checkpoint", 2), ("checkpoint-4", "checkpoint", 4), ("final", "final", 4)]
    assert _rewound_at(run) == {4: 1}

    cands = [Candidate("pretrained", "pretrained", 0, 0.0, {"sp/plasticity": 0.0, "sp/stability": 1.0}),
             Candidate("checkpoint-4", "checkpoint", 4, 1.0, {"sp/plasticity": 0.5, "sp/stability": 0.95}, rewind=1,
                       chosen=True)]
    assert cands[1].to_json()["rewind"] == 1 and cands[0].to_json()["rewind"] is None
    (tmp_path / "rewound").mkdir()
    _write_outputs(run, tmp_path / "rewound", cands, cands[1], "base", adapter=True)
    md = (tmp_path / "rewound" / "rewind.md").read_text()
    assert "| **checkpoint-4 (after rewind 1)** | checkpoint | 4 | 1.0 | 0.5000 | 0.9500 | yes |" in md
    assert "it holds what that rewind loaded, not the breach recorded before it" in md
    assert json.loads((tmp_path / "rewound" / "rewind.json").read_text())["candidates"][1]["rewind"] == 1
