"""The Axolotl plugin (issue 19, part 3) inside Axolotl 0.21.0's own pins (transformers 5.20.1, TRL
1.14.1), through the real ``axolotl train`` command (1 process, CPU; it relaunches itself through
``accelerate launch``): the plugin's history, the same monitor attached by ``ARENA_CALLBACKS_CONFIG``,
a budget that stops the run, and bad keys that fail the command at start.

The four commands run at once in one module fixture (each ~40 s of mostly imports on its own)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import TARGET_TEXT, corpus, make_tokenizer, pretrained_model

from arena_callbacks.autoattach import ENV, install_hook

# Axolotl's telemetry is on unless opted out before it is imported; without network its exit waits on retries.
os.environ.setdefault("AXOLOTL_DO_NOT_TRACK", "1")
pytest.importorskip("axolotl")
# 3.5 min measured on 2 cores shared with other work (the four commands overlap); 6.5 under heavy load.
pytestmark = pytest.mark.timeout(900)

BIN = Path(sys.executable).parent
SHIPPED = Path(__file__).resolve().parents[2] / "integrations" / "axolotl" / "config.yml"
STEPS = 6
MONITOR = {
    "cadence": {"every_n_steps": 2}, "probe": {"batch_size": 8, "max_length": 64},
    "logging": {"tensorboard": False}, "probes": {"general": "data/general.jsonl"},
}
# Fires at the first probe step: training on one sentence moves the general text's NLL at once.
STOP = {**MONITOR, "budgets": [{"key": "retention/general", "max_drop": 1e-5, "action": "stop"}]}
PLUGIN = ["arena_callbacks.integrations.axolotl.ArenaPlugin"]


def axolotl_config(tmp: Path, name: str, **extra) -> Path:
    """The shipped ``integrations/axolotl/config.yml`` without its plugin keys, on the test's model,
    data and folders, with ``extra`` keys."""
    cfg = {k: v for k, v in yaml.safe_load(SHIPPED.read_text()).items() if k not in ("plugins", "arena_config")}
    cfg.update({
        "base_model": str(tmp / "model"),
        "datasets": [{**cfg["datasets"][0], "path": str(tmp / "data" / "train.jsonl")}],
        "dataset_prepared_path": str(tmp / f"prepared-{name}"), "output_dir": str(tmp / f"out-{name}"),
        "max_steps": STEPS, "learning_rate": 0.005, "dataset_num_proc": 1, **extra,
    })
    path = tmp / f"{name}.yml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def env(**extra: str) -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if k != ENV}
    # `axolotl train` runs `accelerate` by name; telemetry off (it retries an unreachable host at exit).
    e.update(PATH=f"{BIN}{os.pathsep}{e.get('PATH', '')}", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
             TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", AXOLOTL_DO_NOT_TRACK="1", DO_NOT_TRACK="1",
             WANDB_MODE="disabled")
    e.update(extra)
    return e


@pytest.fixture(scope="module")
def tmp(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("axolotl")
    model = pretrained_model()
    model.save_pretrained(tmp / "model")
    make_tokenizer().save_pretrained(tmp / "model")
    (tmp / "data").mkdir()
    (tmp / "data" / "train.jsonl").write_text("".join(json.dumps({"text": TARGET_TEXT}) + "\n" for _ in range(64)))
    (tmp / "data" / "general.jsonl").write_text("".join(json.dumps({"text": s}) + "\n" for s in corpus(8, seed=7)))
    (tmp / "monitor.yaml").write_text(yaml.safe_dump(MONITOR))
    return tmp


@pytest.fixture(scope="module")
def runs(tmp) -> dict[str, subprocess.CompletedProcess]:
    install_hook()  # `arena-callbacks hook install` in this environment (inert without the variable)
    commands = {
        "plugin": (axolotl_config(tmp, "plugin", plugins=PLUGIN, arena_config="monitor.yaml"), {}),
        "env": (axolotl_config(tmp, "env"), {ENV: str(tmp / "monitor.yaml")}),
        "stop": (axolotl_config(tmp, "stop", plugins=PLUGIN, arena=STOP), {}),
        "typo": (axolotl_config(tmp, "typo", plugins=PLUGIN, arena_confg="monitor.yaml"), {}),
    }
    procs = {name: subprocess.Popen([str(BIN / "axolotl"), "train", str(cfg)], env=env(**extra), cwd=tmp,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for name, (cfg, extra) in commands.items()}
    done = {}
    for name, proc in procs.items():
        out, _ = proc.communicate(timeout=800)
        done[name] = subprocess.CompletedProcess(proc.args, proc.returncode, out, "")
    return done


def history(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "arena" / "history.jsonl").read_text().splitlines() if x]


def ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stdout[-6000:]


def test_plugin_logs_retention_at_the_probe_steps(runs, tmp):
    ok(runs["plugin"])
    records = history(tmp / "out-plugin")
    assert [r["step"] for r in records] == [0, 2, 4, 6]  # one writer: every probe step once
    assert all("retention/general" in r["metrics"] for r in records)
    assert records[0]["metrics"]["retention/general"] == 1.0


def test_the_env_var_hook_gives_the_plugins_history(runs, tmp):
    ok(runs["env"])
    plugin, hooked = history(tmp / "out-plugin"), history(tmp / "out-env")
    assert [r["step"] for r in hooked] == [r["step"] for r in plugin]
    for a, b in zip(plugin, hooked, strict=True):
        keys = {k for k in a["metrics"] if k != "probe/seconds"}
        assert keys == {k for k in b["metrics"] if k != "probe/seconds"}
        for k in keys:
            assert b["metrics"][k] == pytest.approx(a["metrics"][k], rel=1e-5, abs=1e-7), (a["step"], k)


def test_a_breached_budget_stops_the_run(runs, tmp):
    ok(runs["stop"])
    records = history(tmp / "out-stop")
    decisions = [r["decision"] for r in records if r.get("decision", {}).get("action") == "stop"]
    assert decisions and records[-1]["step"] == 2 < STEPS, [(r["step"], r.get("decision")) for r in records]
    assert [o["key"] for o in decisions[0]["outcomes"] if o["in_breach"]] == ["retention/general"]


def test_a_misspelt_key_fails_the_command_at_start(runs, tmp):
    proc = runs["typo"]
    assert proc.returncode != 0
    assert "unknown key 'arena_confg'" in proc.stdout, proc.stdout[-4000:]
    assert not (tmp / "out-typo" / "arena").exists()
    assert "Starting trainer" not in proc.stdout


@pytest.mark.parametrize(("extra", "files", "message"), [
    ({"arena_config": "missing.yaml"}, {}, "arena_config: monitor file missing.yaml not found"),
    ({"arena_config": "m.yaml"}, {"m.yaml": {**MONITOR, "cadnce": {}}}, "cadnce: Extra inputs are not permitted"),
    ({"arena_config": "m.yaml"}, {"m.yaml": {**MONITOR, "probes": {"general": "data/none.jsonl"}}},
     "probes.general: file data/none.jsonl not found"),
    ({"arena": {**MONITOR, "cadence": {"every_n_step": 2}}}, {}, "arena.cadence.every_n_step: Extra inputs"),
    ({"arena": {**MONITOR, "probes": {"general": "data/none.jsonl"}}}, {}, "arena.probes.general: file"),
    ({"arena": {**MONITOR, "budgets": [{"key": "retention/facts", "max_drop": 0.1}]}}, {},
     "arena.budgets[0].key: 'retention/facts' is not measured"),
    ({"arena_confg": "monitor.yaml"}, {}, "unknown key 'arena_confg'"),
    ({"arena_config": "monitor.yaml", "arena": MONITOR}, {}, "exactly one of ['arena_config', 'arena'] (both"),
    ({}, {}, "exactly one of ['arena_config', 'arena'] (neither"),
])
def test_bad_keys_fail_when_axolotl_loads_the_config(tmp, extra, files, message):
    """What ``axolotl train`` does first in its training process (``load_cfg``), before the model."""
    from axolotl.cli.config import load_cfg

    from arena_callbacks.integrations.axolotl import ArenaPluginError

    for name, content in files.items():
        (tmp / name).write_text(yaml.safe_dump(content))
    cfg = axolotl_config(tmp, "bad", plugins=PLUGIN, **extra)
    with pytest.raises(ArenaPluginError) as err:
        load_cfg(str(cfg))
    assert message in str(err.value)
