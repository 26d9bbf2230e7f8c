"""The demo (examples/demo.py --quick) runs end to end and the monitor stops it on its budget."""

import glob
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
MAX_STEPS = 60


@pytest.mark.timeout(600)
def test_quick_demo_stops_itself_on_the_budget(tmp_path, quick_base_dir):
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "TENSORBOARD_LOGGING_DIR"}  # events go under out/
    env["HF_HUB_OFFLINE"] = "1"
    cmd = [
        sys.executable, str(REPO / "examples" / "demo.py"), "--quick",
        "--output-dir", str(out), "--max-steps", str(MAX_STEPS),
        "--cache-dir", str(quick_base_dir),  # shared with the arena test: whichever runs first pretrains
    ]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=290)
    seconds = time.perf_counter() - start
    assert proc.returncode == 0, f"demo failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    print(f"quick demo took {seconds:.1f}s")

    summary = json.loads((out / "arena" / "summary.json").read_text())
    assert summary["stopped"] is True
    assert summary["stop_step"] < MAX_STEPS
    assert summary["final_step"] == summary["stop_step"]
    assert "delta_nll/general rose to" in summary["stop_message"]
    assert summary["final"]["delta_nll/general"] > 0.5  # the budget in examples/monitor.yaml

    lines = [json.loads(x) for x in (out / "arena" / "history.jsonl").read_text().splitlines() if x.strip()]
    assert len(lines) >= 3  # baseline + two probes in breach (patience 2)
    assert lines[0]["step"] == 0 and lines[-1]["step"] == summary["stop_step"]
    assert lines[-1]["decision"]["action"] == "stop"

    events = glob.glob(str(out / "runs" / "**" / "events.out.tfevents.*"), recursive=True)
    assert events, "no TensorBoard events file under the output folder"

    # The printed summary tells where things are and what stopped the run.
    assert f"Stopped by the monitor at step {summary['stop_step']} of {MAX_STEPS}" in proc.stdout
    assert "tensorboard --logdir" in proc.stdout
    # Cached base: a second run reuses it instead of pretraining again.
    proc2 = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=290)
    assert proc2.returncode == 0, proc2.stdout[-4000:] + proc2.stderr[-4000:]
    assert "Base model: loaded from" in proc2.stdout
    assert json.loads((out / "arena" / "summary.json").read_text())["stop_step"] == summary["stop_step"]
