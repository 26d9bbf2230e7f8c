"""The Axolotl plugin's key checks (issue 19, part 3), without Axolotl: what ``register`` runs on the raw
config. The plugin inside ``axolotl train`` is tested in integration_tests/axolotl (its own environment)."""

from __future__ import annotations

import json

import pytest
import yaml

from arena_callbacks.integrations.axolotl import ArenaPluginError, check_config

MONITOR = {"cadence": {"every_n_steps": 2}, "probes": {"general": "data/general.jsonl"}}


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "general.jsonl").write_text(json.dumps({"text": "one two three."}) + "\n")
    (tmp_path / "monitor.yaml").write_text(yaml.safe_dump(MONITOR))
    (tmp_path / "config.yml").write_text("")
    return tmp_path


def cfg(folder, **keys):
    return {"axolotl_config_path": str(folder / "config.yml"), "base_model": "m", **keys}


def test_a_monitor_file_relative_to_the_config(folder, monkeypatch, tmp_path_factory):
    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))
    source, inline = check_config(cfg(folder, arena_config="monitor.yaml"))
    assert source == folder / "monitor.yaml" and inline is None


def test_inline_content_resolves_against_the_config_folder(folder):
    source, inline = check_config(cfg(folder, arena=MONITOR))
    assert source == (folder / "config.yml").resolve() and inline == MONITOR


@pytest.mark.parametrize(("keys", "message"), [
    ({"arena_confg": "monitor.yaml"}, "unknown key 'arena_confg'"),
    ({"arena_config": "monitor.yaml", "arnea": {}}, "unknown key 'arnea'"),
    ({"arena_config": "nope.yaml"}, "arena_config: monitor file nope.yaml not found"),
    ({"arena": {**MONITOR, "cadence": {"every_n_step": 2}}}, "arena.cadence.every_n_step: Extra inputs"),
    ({"arena": {**MONITOR, "probes": {"general": "data/none.jsonl"}}}, "arena.probes.general: file data/none.jsonl"),
    ({"arena": ["general"]}, "arena: expected a mapping"),
    ({"arena": {**MONITOR, "budgets": [{"key": "retention/facts", "max_drop": 0.1}]}},
     "arena.budgets[0].key: 'retention/facts' is not measured"),
    ({}, "(neither given)"),
])
def test_bad_keys_name_the_key(folder, keys, message):
    with pytest.raises(ArenaPluginError) as err:
        check_config(cfg(folder, **keys))
    assert message in str(err.value)
