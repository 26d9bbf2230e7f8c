"""The evidence study (benchmarks/study.py --quick): runs cached as JSON, finished runs skipped on a
second invocation, and docs/evidence.md-style tables generated from the cache alone."""

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
RUNS = {"aggressive-lora-s0", "aggressive-full-s0", "control-lora-s0", "control-full-s0"}


def _args(tmp_path, base, *extra) -> list[str]:
    return ["--quick", "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "evidence.md"),
            "--base-cache", str(base), *extra]


def _study(tmp_path, base, *extra):
    """The command as a user runs it, in its own process (it trains)."""
    env = {k: v for k, v in os.environ.items() if k != "TENSORBOARD_LOGGING_DIR"}
    env["HF_HUB_OFFLINE"] = "1"
    cmd = [sys.executable, str(REPO / "benchmarks" / "study.py"), *_args(tmp_path, base, *extra)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=880, check=False)
    assert proc.returncode == 0, f"study failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout


def _study_here(tmp_path, base, capsys, *extra):
    """The same command in this process, for invocations that train nothing (no process-wide settings change)."""
    import torch

    spec = importlib.util.spec_from_file_location("study_cli", REPO / "benchmarks" / "study.py")
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    threads = torch.get_num_threads()
    capsys.readouterr()
    assert study.main(_args(tmp_path, base, *extra)) == 0
    assert torch.get_num_threads() == threads
    return capsys.readouterr().out


@pytest.mark.timeout(900)
def test_quick_study_caches_runs_skips_them_and_reports_from_the_cache(tmp_path, quick_base_dir, capsys):
    out = _study(tmp_path, quick_base_dir)
    cache = tmp_path / "cache"
    assert {p.stem for p in cache.glob("*.json")} == RUNS
    assert len(re.findall(r"\] \S+: done in \d+ s", out)) == 4  # a progress line per run
    rec = json.loads((cache / "aggressive-lora-s0.json").read_text())
    # Every probe step holds every row of the full sets and the target; the forgetting run has rewind states.
    assert [s["step"] for s in rec["steps"]] == [0, 2, 4]
    assert {n: len(r) for n, r in rec["steps"][1]["rows"].items()} == {"general": 16, "code": 16, "target": 8}
    assert any(k.startswith("geometry/procrustes/") for k in rec["steps"][1]["geometry"])
    assert {p["why"] for p in rec["rewind"]["points"]} >= {"grid"} and rec["seconds"]["total"] > 0
    assert "rewind" not in json.loads((cache / "control-full-s0.json").read_text())
    mtimes = {p.name: p.stat().st_mtime_ns for p in cache.glob("*.json")}

    md = (tmp_path / "evidence.md").read_text()
    for part in ("## (a) False alarms and delay", "## (b) Does the probe stand for the capability?",
                 "## (c) Does geometry see it coming?", "## (d) Does the rewind pay?", "## (e) The methods' frontiers",
                 "## (f) Defaults that follow the evidence"):
        assert part in md
    assert "4 of 4 planned runs" in md and "| `general` | 6 / 16 |" in md
    assert "`delta_nll/general max_rise 0.5 @95%`" in md and "| procrustes |" in md and "| path+refine |" in md
    assert (tmp_path / "evidence-quick" / "probe_vs_full.png").stat().st_size > 1000

    # A second invocation trains nothing: every run is read from the cache.
    out2 = _study_here(tmp_path, quick_base_dir, capsys)
    assert out2.count("cached") == 4 and "training" not in out2
    assert {p.name: p.stat().st_mtime_ns for p in cache.glob("*.json")} == mtimes

    # The page's numbers come from the cache: change a cached run and regenerate the report only.
    total = sum(json.loads(p.read_text())["seconds"]["total"] for p in cache.glob("*.json"))
    assert f"{total / 60:.1f} minutes in all (4 runs," in md
    rec["seconds"]["total"] += 600.0
    (cache / "aggressive-lora-s0.json").write_text(json.dumps(rec))
    (cache / "control-full-s0.json").unlink()
    _study_here(tmp_path, quick_base_dir, capsys, "--only", "report")
    md2 = (tmp_path / "evidence.md").read_text()
    total2 = sum(json.loads(p.read_text())["seconds"]["total"] for p in cache.glob("*.json"))
    assert "**partial**: 3 of 4 planned runs" in md2
    assert "| control | full | 0.0001 | none | 0 of 1 |" in md2
    assert f"{total2 / 60:.1f} minutes in all (3 runs," in md2 and total2 != total
