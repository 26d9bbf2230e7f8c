"""The monitor inside LLaMA-Factory (issue 19, part 4), in its own environment
(``bash scripts/integration_env.sh llamafactory``; ``make test-integrations INTEGRATIONS=llamafactory``).

The shipped ``integrations/llamafactory/train.yaml`` and its dataset run on a tiny local model on
the CPU: through ``arena-callbacks run ... -- llamafactory-cli train`` (1 process, and 2 through
LLaMA-Factory's own ``torchrun`` relaunch), and through LLaMA-Factory's Python entry point
``run_exp(callbacks=[ForgettingMonitor.from_config(...)])``; both routes must give the same
history and the same stop decision. A bad monitor file fails the command at start.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import corpus, make_tokenizer, pretrained_model

from arena_callbacks.autoattach import ENV

pytest.importorskip("llamafactory")

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "integrations" / "llamafactory"
BIN = Path(sys.executable).parent
STEPS, EVERY = 4, 2

RUN_EXP = """
import sys
from pathlib import Path
import yaml
from llamafactory.train.tuner import run_exp
from arena_callbacks import ForgettingMonitor

run_exp(args=yaml.safe_load(Path(sys.argv[1]).read_text()), callbacks=[ForgettingMonitor.from_config(sys.argv[2])])
"""


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """A tiny local model and tokenizer, and a probe of text unlike the training rows."""
    root = tmp_path_factory.mktemp("llamafactory")
    pretrained_model().save_pretrained(root / "model")
    make_tokenizer().save_pretrained(root / "model")
    (root / "general.jsonl").write_text("".join(json.dumps({"text": s}) + "\n" for s in corpus(8, seed=7)))
    return root


def train_yaml(work: Path, name: str, **over) -> Path:
    """The shipped train.yaml on the tiny model, on the CPU, for a few steps."""
    cfg = yaml.safe_load((SHIPPED / "train.yaml").read_text())
    cfg.update(model_name_or_path=str(work / "model"), template="default", dataset_dir=str(SHIPPED / "data"),
               output_dir=str(work / name), cutoff_len=64, lora_rank=4, per_device_train_batch_size=4,
               gradient_accumulation_steps=1, learning_rate=1e-2, lr_scheduler_type="constant", warmup_steps=0,
               max_steps=STEPS, logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, bf16=False)
    cfg.pop("save_steps", None)
    cfg.update(over)
    path = work / f"{name}.train.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def monitor_yaml(work: Path, name: str, **over) -> Path:
    """The shipped monitor.yaml with the local probe and a short cadence."""
    cfg = yaml.safe_load((SHIPPED / "monitor.yaml").read_text())
    cfg.update(cadence={"every_n_steps": EVERY}, probe={"batch_size": 8, "max_length": 64},
               probes={"general": str(work / "general.jsonl")}, logging={"tensorboard": False},
               budgets=[{"key": "delta_nll/general", "max_rise": 100.0, "action": "stop"}])
    cfg.update(over)
    path = work / f"{name}.monitor.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def env(**extra: str) -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if k != ENV}
    e.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1",
             PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    e.pop("FORCE_TORCHRUN", None)
    e.update(extra)
    return e


def cli(work: Path, monitor: Path, train: Path, **extra: str) -> subprocess.CompletedProcess:
    cmd = [str(BIN / "arena-callbacks"), "run", "--config", str(monitor), "--", str(BIN / "llamafactory-cli"),
           "train", str(train)]
    return subprocess.run(cmd, env=env(**extra), cwd=work, capture_output=True, text=True, timeout=240)


def python_route(work: Path, monitor: Path, train: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", RUN_EXP, str(train), str(monitor)], env=env(), cwd=work,
                          capture_output=True, text=True, timeout=240)


def history(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "arena" / "history.jsonl").read_text().splitlines() if x]


def trainer_state(out: Path) -> dict:
    return json.loads((out / "trainer_state.json").read_text())


def assert_same_history(a: list[dict], b: list[dict]) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        ma = {k: v for k, v in ra["metrics"].items() if k != "probe/seconds"}
        mb = {k: v for k, v in rb["metrics"].items() if k != "probe/seconds"}
        assert ma.keys() == mb.keys()
        for k in ma:
            assert ma[k] == pytest.approx(mb[k], rel=1e-4, abs=1e-6), (ra["step"], k)
        assert (ra.get("decision") or {}).get("action") == (rb.get("decision") or {}).get("action")


@pytest.fixture(scope="module")
def plain_runs(work):
    """The same run through both routes: the command line and run_exp in Python."""
    monitor = monitor_yaml(work, "plain")
    runs = {}
    for route, launch in (("cli", cli), ("python", python_route)):
        proc = launch(work, monitor, train_yaml(work, f"plain-{route}"))
        assert proc.returncode == 0, (route, proc.stdout[-2000:], proc.stderr[-4000:])
        runs[route] = work / f"plain-{route}"
    return runs


def test_the_shipped_monitor_file_loads():
    from arena_callbacks.monitor_file import load_monitor_file

    spec = load_monitor_file(SHIPPED / "monitor.yaml")
    assert set(spec.probes) == {"general", "facts"} and spec.config.cadence.every_n_steps == 20


def test_llamafactory_cli_with_arena_callbacks_run(plain_runs):
    out = plain_runs["cli"]
    records = history(out)
    assert [r["step"] for r in records] == [0, 2, 4]  # every probe step once: one writer
    assert [r["epoch"] for r in records[1:]] == [0.5, 1.0]  # 16 rows, 4 per step: 1 process
    assert all("retention/general" in r["metrics"] and "delta_nll/general" in r["metrics"] for r in records)
    assert records[-1]["metrics"]["nll/general"] != records[0]["metrics"]["nll/general"]  # the model was trained
    state = trainer_state(out)
    assert state["global_step"] == STEPS
    # The monitor's scalars reached the trainer's own log (Trainer.log) at the probe steps.
    assert [r["step"] for r in state["log_history"] if "retention/general" in r] == [0, 2, 4]
    assert (out / "adapter_model.safetensors").is_file()  # LLaMA-Factory finished its own work


def test_run_exp_with_the_callback_gives_the_same_history(plain_runs):
    assert_same_history(history(plain_runs["python"]), history(plain_runs["cli"]))


def test_llamafactory_cli_relaunched_through_torchrun_in_2_processes(work):
    """``FORCE_TORCHRUN=1`` makes ``llamafactory-cli train`` restart itself through ``torchrun``
    (as it does on several GPUs): both ranks attach the monitor from the variable, rank 0 alone
    writes. 16 rows, 4 per process and step: an epoch is 2 steps with 2 processes (4 with 1)."""
    out = work / "torchrun"
    proc = cli(work, monitor_yaml(work, "torchrun"), train_yaml(work, "torchrun"), FORCE_TORCHRUN="1",
               NPROC_PER_NODE="2")
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])
    assert "world size: 2" in proc.stdout + proc.stderr
    records = history(out)
    assert [r["step"] for r in records] == [0, 2, 4]
    assert [r["epoch"] for r in records[1:]] == [1.0, 2.0]
    assert all("retention/general" in r["metrics"] for r in records)


def test_a_breach_stops_the_run_through_the_cli(work):
    """A fast learning rate on text unlike the probe: retention/general falls far below its
    baseline at step 2 and step 4 (patience 2), and the run stops at step 4 of 8, as the same
    monitor added in Python decides."""
    budget = [{"key": "retention/general", "max_drop": 0.5, "patience": 2, "action": "stop"}]
    monitor = monitor_yaml(work, "breach", budgets=budget)
    outs = {}
    for route, launch in (("cli", cli), ("python", python_route)):
        proc = launch(work, monitor, train_yaml(work, f"breach-{route}", learning_rate=5e-2, max_steps=8))
        assert proc.returncode == 0, (route, proc.stdout[-2000:], proc.stderr[-4000:])
        outs[route] = work / f"breach-{route}"
        assert "arena-callbacks: retention/general fell to" in proc.stderr + proc.stdout
    records = history(outs["cli"])
    assert [r["step"] for r in records] == [0, 2, 4]
    assert [(r.get("decision") or {}).get("action") for r in records] == [None, None, "stop"]
    assert trainer_state(outs["cli"])["global_step"] == 4
    assert_same_history(history(outs["python"]), records)
    assert trainer_state(outs["python"])["global_step"] == 4
    summary = json.loads((outs["cli"] / "arena" / "summary.json").read_text())
    assert summary["stopped"] and summary["stop_step"] == 4 and "retention/general" in summary["stop_message"]


def test_a_bad_monitor_file_fails_the_command_at_start(work):
    bad = work / "bad.monitor.yaml"
    bad.write_text(yaml.safe_dump({"probes": {"general": "data/missing.jsonl"}}))
    train = train_yaml(work, "bad")
    message = "probes.general: file data/missing.jsonl not found"
    proc = cli(work, bad, train)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-3000:]
    # The same through the variable (the hook is in this environment: arena-callbacks run installed it).
    proc = subprocess.run([str(BIN / "llamafactory-cli"), "train", str(train)], env=env(**{ENV: str(bad)}), cwd=work,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-3000:]
    assert not (work / "bad").exists()  # nothing trained
