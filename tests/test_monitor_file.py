"""A monitor described entirely by its YAML file (issue 19, part 1): probes and target named in
the file, paths relative to it, shipped capability sets and lm-eval tasks by name, and errors
that name the file and the key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from helpers import TARGET_TEXT, corpus, pretrained_model

from arena_callbacks import ForgettingMonitor
from arena_callbacks.capabilities import build_capability
from arena_callbacks.monitor_file import MonitorFileError, load_monitor_file

REPO = Path(__file__).resolve().parent.parent
GENERAL = [{"text": s} for s in corpus(10, seed=7)]
TARGET = [{"prompt": "one two three", "completion": " four five six"}]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


@pytest.fixture
def folder(tmp_path, monkeypatch):
    """A run folder with data beside the YAML, and a working directory elsewhere."""
    root = tmp_path / "project"
    write_jsonl(root / "data" / "general.jsonl", GENERAL)
    write_jsonl(root / "data" / "heldout.jsonl", TARGET)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    return root


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


SETTINGS = {
    "cadence": {"every_n_steps": 2},
    "probe": {"batch_size": 8, "max_length": 64},
    "logging": {"tensorboard": False},
    "budgets": [{"key": "delta_nll/general", "max_rise": 0.3, "action": "stop"}],
}


def test_the_file_names_probes_target_and_settings(folder):
    path = write_yaml(folder / "monitor.yaml", {
        **SETTINGS,
        "probes": {"general": "data/general.jsonl",
                   "facts": {"capability": "world_knowledge", "n": 8, "seed": 3},
                   "again": {"path": "data/general.jsonl", "kind": "text"}},
        "target": {"path": "data/heldout.jsonl", "signal": "nll"},
    })
    monitor = ForgettingMonitor.from_config(path)
    assert monitor.config.cadence.every_n_steps == 2 and monitor.config.budgets[0].max_rise == 0.3
    probes = monitor.runner.probes
    assert list(probes) == ["general", "facts", "again", "target"]
    assert probes["general"].rows == GENERAL and probes["again"].kind == "text"
    assert probes["facts"].rows == build_capability("world_knowledge", n=8, seed=3)
    assert probes["target"].rows == TARGET and probes["target"].signal == "nll"
    # Keyword fields override the file's settings.
    assert ForgettingMonitor.from_config(path, stability="min").config.stability == "min"


def test_a_monitor_from_the_file_measures_what_one_built_in_python_does(folder, tokenizer, tmp_path):
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    settings = {**SETTINGS, "budgets": [{"key": "delta_nll/general", "max_rise": 0.05, "action": "log"}]}
    path = write_yaml(folder / "monitor.yaml", {**settings, "probes": {"general": "data/general.jsonl"},
                                                "target": "data/heldout.jsonl"})
    histories = []
    for name, monitor in (("file", ForgettingMonitor.from_config(path)),
                          ("python", ForgettingMonitor(settings, probes={"general": GENERAL}, target=TARGET))):
        args = TrainingArguments(output_dir=str(tmp_path / name), max_steps=4, per_device_train_batch_size=4,
                                 learning_rate=2e-2, report_to=[], save_strategy="no", use_cpu=True, seed=0)
        Trainer(model=pretrained_model(), args=args, train_dataset=[tokenizer(TARGET_TEXT)] * 16,
                processing_class=tokenizer, data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
                callbacks=[monitor]).train()
        histories.append([(s.step, {k: v for k, v in s.metrics.items() if k != "probe/seconds"})
                          for s in monitor.history])
    assert histories[0] == histories[1] and [s for s, _ in histories[0]] == [0, 2, 4]


def test_lm_eval_tasks_by_name(folder, monkeypatch):
    pytest.importorskip("lm_eval")
    monkeypatch.chdir(REPO)  # the shipped task files name their data relative to the repository
    tasks = REPO / "integrations" / "lm_eval"
    path = write_yaml(folder / "monitor.yaml", {
        "probes": {"facts": {"lm_eval": "arena_facts", "limit": 5, "include_path": str(tasks)}},
    })
    spec = load_monitor_file(path)
    assert spec.probes["facts"].kind == "multiple_choice" and len(spec.probes["facts"].data) == 5


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"probes": {"general": "data/missing.jsonl"}},
         r"monitor.yaml: probes.general: file data/missing.jsonl not found \(looked at .*project/data/missing.jsonl\)"),
        ({"probes": {"facts": {"capability": "world_knowlege"}}},
         r"monitor.yaml: probes.facts: capability 'world_knowlege' is not built in; known: .*'world_knowledge'"),
        ({"probes": {"general": {"path": "data/general.jsonl", "limit": 3}}},
         r"monitor.yaml: probes.general: unknown keys \['limit'\] for a 'path' source; valid: "),
        ({"probes": {"general": {"path": "a.jsonl", "capability": "arithmetic"}}},
         r"monitor.yaml: probes.general: give exactly one of \['path', 'capability', 'lm_eval'\]"),
        ({"probes": {"target": "data/general.jsonl"}}, r"monitor.yaml: probes.target: the name 'target' is reserved"),
        ({"probes": ["data/general.jsonl"]}, r"monitor.yaml: probes: expected a mapping of name -> source, got list"),
        ({"cadence": {"every_n_steps": 2}}, r"monitor.yaml: probes: give at least one probe"),
        ({"probes": {"general": "data/general.jsonl"}, "budgets": [{"key": "delta_nll/general", "max_rise": -1}]},
         r"monitor.yaml: budgets.0.max_rise: Input should be greater than or equal to 0"),
        ({"probes": {"general": "data/general.jsonl"}, "cadense": {"every_n_steps": 2}},
         r"monitor.yaml: cadense: Extra inputs are not permitted"),
        ({"probes": {"general": "data/general.jsonl"}, "budgets": [{"key": "retention/genral", "max_drop": 0.1}]},
         r"monitor.yaml: budgets\[0\].key: 'retention/genral' is not measured"),
    ],
    ids=["missing-file", "unknown-capability", "unknown-key", "two-sources", "reserved-name", "not-a-mapping",
         "no-probes", "bad-setting", "unknown-setting", "unmeasured-budget-key"],
)
def test_errors_name_the_file_and_the_key(folder, content, message):
    path = write_yaml(folder / "monitor.yaml", content)
    with pytest.raises(MonitorFileError, match=message):
        ForgettingMonitor.from_config(path)


def test_file_errors(folder):
    with pytest.raises(MonitorFileError, match=r"nowhere.yaml: monitor file not found"):
        ForgettingMonitor.from_config(folder / "nowhere.yaml")
    (folder / "bad.yaml").write_text("probes: [unclosed\n", encoding="utf-8")
    with pytest.raises(MonitorFileError, match=r"bad.yaml: not valid YAML"):
        load_monitor_file(folder / "bad.yaml")
    (folder / "list.yaml").write_text("- 1\n- 2\n", encoding="utf-8")
    with pytest.raises(MonitorFileError, match=r"list.yaml: expected a mapping of settings at the top, got list"):
        load_monitor_file(folder / "list.yaml")
    (folder / "monitor.json").write_text(json.dumps({"probes": {"general": "data/general.jsonl"}}), encoding="utf-8")
    assert list(load_monitor_file(folder / "monitor.json").probes) == ["general"]


def _adapters() -> list:
    from arena_callbacks.engine import ForgettingEngine

    adapters = [pytest.param(ForgettingEngine, id="engine"), pytest.param(ForgettingMonitor, id="trainer")]
    try:
        from arena_callbacks.integrations.lightning import ForgettingCallback
    except ImportError:  # lightning is an extra
        return adapters
    return [*adapters, pytest.param(ForgettingCallback, id="lightning")]


@pytest.mark.parametrize("adapter", _adapters())
def test_every_adapter_is_built_from_the_same_file(folder, adapter):
    """One monitor file drives the engine, the Trainer callback and the Lightning callback alike;
    keyword config fields override the file, and errors name the file."""
    path = write_yaml(folder / "monitor.yaml", {**SETTINGS, "probes": {"general": "data/general.jsonl"},
                                                "target": "data/heldout.jsonl"})
    built = adapter.from_config(path, cadence={"every_n_steps": 5})
    engine = getattr(built, "engine", built)
    assert engine.config.cadence.every_n_steps == 5
    assert engine.config.budgets == load_monitor_file(path).config.budgets
    assert sorted(engine.measurer.runner.probes) == ["general", "target"]
    assert "delta_nll/general" in engine.measured_keys
    bad = write_yaml(folder / "bad.yaml", {**SETTINGS, "budgets": [{"key": "retention/genral", "max_drop": 0.1}],
                                           "probes": {"general": "data/general.jsonl"}})
    with pytest.raises(MonitorFileError, match=r"bad.yaml: budgets\[0\].key: 'retention/genral' is not measured"):
        adapter.from_config(bad)
