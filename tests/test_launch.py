"""The launch recipe of integrations/accelerate/README.md, end to end on the CPU:

    accelerate launch --config_file integrations/accelerate/ddp_cpu.yaml \
        tests/dist_scripts/train_accelerate.py ... --use_cpu true

Two real processes (gloo) must start, train as one DDP run, and hold the same monitor history
and decisions, with rank 0 alone writing it. Also pinned: the silent fallback of docs/design.md §8
(no config file: ``--cpu --num_processes 2`` starts one process).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import make_model, make_tokenizer

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "tests" / "dist_scripts" / "train_accelerate.py"
DDP_CPU = REPO / "integrations" / "accelerate" / "ddp_cpu.yaml"
MAX_STEPS = 12
TIMEOUT_S = 150  # the ranks' own process-group timeout is 60 s (--ddp_timeout)


def _accelerate() -> list[str]:
    exe = Path(sys.executable).with_name("accelerate")
    if exe.exists():
        return [str(exe)]
    if shutil.which("accelerate") is None:
        pytest.skip("the accelerate command is not installed")
    return ["accelerate"]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(out: Path, launch_args: list[str]) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR",
                                                             "MASTER_PORT", "TENSORBOARD_LOGGING_DIR")}
    env.update(
        OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false", HF_HOME=str(out / "hf_home"),  # no user default_config.yaml
        PYTHONPATH=os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p),
    )
    cmd = [
        *_accelerate(), "launch", *launch_args, str(SCRIPT),
        "--output_dir", str(out), "--max_steps", str(MAX_STEPS), "--per_device_train_batch_size", "4",
        "--learning_rate", "1e-2", "--seed", "0", "--logging_steps", "1", "--ddp_timeout", "60", "--use_cpu", "true",
    ]
    with open(out / "launch.log", "wb") as log:
        proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            proc.wait(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the process group this test started
            proc.wait()
    text = (out / "launch.log").read_text(errors="replace")
    assert proc.returncode == 0, f"accelerate launch exited {proc.returncode}:\n{text[-6000:]}"
    return subprocess.CompletedProcess(cmd, proc.returncode, text)


@pytest.fixture(scope="module")
def ddp_cpu_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("launch_ddp_cpu")
    _launch(out, ["--config_file", str(DDP_CPU), "--main_process_port", str(_free_port())])
    return out, [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def test_ddp_cpu_config_starts_two_gloo_processes(ddp_cpu_run):
    _, (r0, r1) = ddp_cpu_run
    assert [r0["rank"], r1["rank"]] == [0, 1]
    assert r0["world_size"] == r1["world_size"] == 2  # from torch.distributed
    assert r0["env_world_size"] == r1["env_world_size"] == "2"
    assert r0["args_world_size"] == r1["args_world_size"] == 2
    assert r0["backend"] == r1["backend"] == "gloo"
    assert r0["device"] == r1["device"] and r0["device"].startswith("cpu")  # --use_cpu true
    assert r0["ddp_wrapped"] and r1["ddp_wrapped"]
    assert r0["pid"] != r1["pid"]


def test_training_ran_as_one_ddp_run(ddp_cpu_run):
    _, (r0, r1) = ddp_cpu_run
    assert r0["global_step"] == r1["global_step"] > 0
    assert r0["train_loss"] and r0["train_loss"][-1] < r0["train_loss"][0]
    # Synchronised replicas: the same final weights, which moved from the initial ones.
    tok = make_tokenizer()
    initial = [float(p.detach().double().sum()) for p in make_model(seed=0, vocab_size=len(tok)).parameters()]
    assert r0["final_checksum"] == r1["final_checksum"] != initial
    # Two ranks of 4 rows each per step: the epoch advances at 8 of the 64 rows per step.
    assert r0["epoch"] == pytest.approx(r0["global_step"] * 8 / 64)


def test_monitor_history_and_decisions_identical_on_both_ranks(ddp_cpu_run):
    out, (r0, r1) = ddp_cpu_run
    assert r0["history"] == r1["history"]  # every metric, probe/seconds included
    assert r0["decisions"] == r1["decisions"]
    steps = [s["step"] for s in r0["history"]]
    assert steps == list(range(0, r0["global_step"] + 1, 2)) and len(steps) >= 3
    # The stop budget fired on both ranks at the same step, and training stopped there.
    assert r0["stop_step"] == r1["stop_step"] == r0["global_step"] < MAX_STEPS
    assert r0["decisions"][-1]["action"] == "stop"
    assert "target_learned" in r0["decisions"][-1]["message"]
    # Rank 0 alone wrote history.jsonl, once.
    history = out / "arena" / "history.jsonl"
    assert r0["history_path"] == str(history) and r1["history_path"] is None
    lines = [json.loads(x) for x in history.read_text().splitlines() if x.strip()]
    assert [{k: v for k, v in x.items() if k != "decision"} for x in lines] == r0["history"]
    assert [x.get("decision", {}) for x in lines] == r0["decisions"]
    assert sorted(p.name for p in out.rglob("history.jsonl")) == ["history.jsonl"]


def test_without_a_config_file_accelerate_starts_one_process(tmp_path):
    """docs/design.md §8: ``--cpu --num_processes 2`` with no config file runs ONE process, silently."""
    _launch(tmp_path, ["--cpu", "--num_processes", "2", "--main_process_port", str(_free_port())])
    assert not (tmp_path / "rank1.json").exists()
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    assert r0["world_size"] == 1 and r0["args_world_size"] == 1 and not r0["ddp_wrapped"]
