import json

import pytest
from pydantic import ValidationError

from arena_callbacks import Action, BudgetConfig, MonitorConfig


def _errors(exc_info):
    return [(".".join(str(p) for p in e["loc"]), e["msg"]) for e in exc_info.value.errors()]


def test_defaults_are_valid_and_frozen():
    cfg = MonitorConfig()
    assert cfg.cadence.every_n_steps is None and cfg.cadence.overhead_budget == 0.03 and cfg.cadence.budgeted
    assert cfg.probe.precision == "fp32"
    assert cfg.budgets == ()
    with pytest.raises(ValidationError):
        cfg.stability = "min"  # frozen


def test_unknown_field_rejected_with_its_name():
    with pytest.raises(ValidationError) as e:
        MonitorConfig(cadense={"every_n_steps": 5})
    assert _errors(e) == [("cadense", "Extra inputs are not permitted")]
    with pytest.raises(ValidationError) as e:
        MonitorConfig(probe={"batchsize": 4})
    assert _errors(e) == [("probe.batchsize", "Extra inputs are not permitted")]


@pytest.mark.parametrize(
    "data, loc",
    [
        ({"cadence": {"every_n_steps": 0}}, "cadence.every_n_steps"),
        ({"probe": {"batch_size": 0}}, "probe.batch_size"),
        ({"probe": {"max_length": 1}}, "probe.max_length"),
        ({"probe": {"max_examples": 0}}, "probe.max_examples"),
        ({"probe": {"precision": "fp8"}}, "probe.precision"),
        ({"stability": "median"}, "stability"),
        ({"plasticity": "log"}, "plasticity"),
        ({"budgets": [{"key": "retention/x", "max_drop": -0.1}]}, "budgets.0.max_drop"),
        ({"budgets": [{"key": "retention/x", "max_drop": 0.1, "patience": 0}]}, "budgets.0.patience"),
        ({"budgets": [{"key": "retention/x", "max_drop": 0.1, "action": "explode"}]}, "budgets.0.action"),
    ],
)
def test_invalid_values_name_the_field(data, loc):
    with pytest.raises(ValidationError) as e:
        MonitorConfig.model_validate(data)
    assert [where for where, _ in _errors(e)] == [loc]


def test_cadence_must_run_somewhere():
    with pytest.raises(ValidationError) as e:
        MonitorConfig(cadence={"every_n_steps": None, "overhead_budget": None, "on_evaluate": False})
    (loc, msg), = _errors(e)
    assert loc == "cadence" and "probes would never run" in msg


def test_cadence_schedules():
    fixed = MonitorConfig(cadence={"every_n_steps": 7})
    assert fixed.cadence.every_n_steps == 7 and not fixed.cadence.budgeted  # a fixed cadence takes precedence
    with pytest.raises(ValidationError, match="overhead_budget"):
        MonitorConfig(cadence={"overhead_budget": 1.5})
    with pytest.raises(ValidationError, match="max_interval: 2 is below min_interval 5"):
        MonitorConfig(cadence={"min_interval": 5, "max_interval": 2})


def test_budget_needs_exactly_one_limit():
    with pytest.raises(ValidationError) as e:
        BudgetConfig(key="retention/x")
    assert "set exactly one of max_drop" in str(e.value) and "found: none" in str(e.value)
    with pytest.raises(ValidationError) as e:
        BudgetConfig(key="retention/x", max_drop=0.1, min_value=0.5)
    assert "found: max_drop=0.1, min_value=0.5" in str(e.value)


def test_budget_key_must_be_namespaced():
    with pytest.raises(ValidationError) as e:
        BudgetConfig(key="retention", max_drop=0.1)
    assert "'retention' is not a namespaced metric key" in str(e.value)


def test_rewind_action_and_section():
    assert BudgetConfig(key="retention/x", max_drop=0.1, action="rewind").action is Action.REWIND
    cfg = MonitorConfig.from_dict({"rewind": {"mode": "path", "then": "continue", "alphas": [0.3, 0.6]}})
    assert cfg.rewind.mode == "path" and cfg.rewind.alphas == (0.3, 0.6) and cfg.rewind.lr_factor == 0.5
    with pytest.raises(ValidationError) as e:
        MonitorConfig.from_dict({"rewind": {"alphas": [0.5, 1.0]}})
    assert "alphas: each must lie strictly between 0 and 1" in str(e.value) and "[0.5, 1.0]" in str(e.value)
    with pytest.raises(ValidationError, match="lr_factor"):
        MonitorConfig.from_dict({"rewind": {"lr_factor": 0}})
    with pytest.raises(ValidationError, match="mode"):
        MonitorConfig.from_dict({"rewind": {"mode": "sideways"}})


def test_budget_labels_unique():
    with pytest.raises(ValidationError) as e:
        MonitorConfig(budgets=[{"key": "retention/x", "max_drop": 0.1}, {"key": "retention/x", "min_value": 0.5}])
    assert "labels must be unique" in str(e.value)
    cfg = MonitorConfig(
        budgets=[{"key": "retention/x", "max_drop": 0.1}, {"key": "retention/x", "min_value": 0.5, "name": "floor"}]
    )
    assert [b.label for b in cfg.budgets] == ["retention/x", "floor"]


def test_load_from_yaml_json_dict_roundtrip(tmp_path):
    data = {
        "cadence": {"every_n_steps": 10, "on_evaluate": True},
        "probe": {"batch_size": 4, "max_length": 64, "max_examples": 16, "precision": "bf16"},
        "stability": "min",
        "budgets": [{"key": "retention/general", "max_drop": 0.1, "patience": 2, "min_step": 20, "action": "log"}],
        "logging": {"output_dir": "out", "tensorboard": False},
    }
    y = tmp_path / "m.yaml"
    import yaml

    y.write_text(yaml.safe_dump(data))
    j = tmp_path / "m.json"
    j.write_text(json.dumps(data))
    a, b, c = MonitorConfig.from_file(y), MonitorConfig.from_file(j), MonitorConfig.from_dict(data)
    assert a == b == c
    assert a.budgets[0].action is Action.LOG and a.budgets[0].limit == ("max_drop", 0.1)
    # A dump loads back to an equal config.
    assert MonitorConfig.model_validate_json(a.model_dump_json()) == a
    # coerce: a path, a dict or a config, with keyword overrides validated too.
    assert MonitorConfig.coerce(str(y), stability="mean").stability == "mean"
    with pytest.raises(ValidationError):
        MonitorConfig.coerce(a, stability="median")


def test_from_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="monitor config file not found"):
        MonitorConfig.from_file(tmp_path / "nope.yaml")
    bad = tmp_path / "m.toml"
    bad.write_text("x = 1")
    with pytest.raises(ValueError, match="unknown suffix '.toml'"):
        MonitorConfig.from_file(bad)
    lst = tmp_path / "m.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="top level must be a mapping"):
        MonitorConfig.from_file(lst)
