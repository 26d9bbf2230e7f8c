"""Two real CPU processes (gloo): every rank takes part in the probe forwards (rows split across
ranks, sums all-reduced), every rank gets the same results and decisions, only rank 0 writes.

The ranks run as subprocesses (scripts in ``tests/dist_scripts``); each writes what it saw to a
JSON file and this module compares the ranks with each other and with a single-process run.
A hang fails the test (process-group timeout 60 s, subprocess timeout below) instead of
blocking it.
"""

from __future__ import annotations

import glob
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

SCRIPTS = Path(__file__).resolve().parent / "dist_scripts"
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(SCRIPTS))

import dist_common as C  # noqa: E402,N812
from helpers import make_model, make_tokenizer  # noqa: E402

from arena_callbacks import Snapshot, evaluate_budgets  # noqa: E402
from arena_callbacks.config import BudgetConfig, MonitorConfig  # noqa: E402
from arena_callbacks.distributed import DistContext  # noqa: E402
from arena_callbacks.measurements import TARGET, build_snapshot  # noqa: E402

WORKER_TIMEOUT_S = 120  # subprocess wall limit; the ranks' own process-group timeout is 60 s
TRAIN_MAX_STEPS = 30
TRAIN_LR = 3e-3


# --------------------------------------------------------------------------------------
# Launching
# --------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("TENSORBOARD_LOGGING_DIR", None)  # the monitor's TensorBoard folder must be the default one
    env.update(
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONPATH=os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p),
    )
    env.update(extra)
    return env


def _run_all(commands: list[tuple[list[str], dict[str, str]]], logs: list[Path], timeout: float) -> float:
    """Start the commands together, each in its own session; fail (never block) past ``timeout``."""
    procs = []
    start = time.monotonic()
    for (cmd, env), log in zip(commands, logs):
        with open(log, "wb") as f:
            procs.append(subprocess.Popen(cmd, env=env, cwd=REPO, stdout=f, stderr=subprocess.STDOUT,
                                          start_new_session=True))
    hung = False
    for p in procs:
        try:
            p.wait(timeout=max(1.0, timeout - (time.monotonic() - start)))
        except subprocess.TimeoutExpired:
            hung = True
            break
    if hung:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)  # the group of a process this test started
                p.wait()
    tails = "\n".join(f"--- {log.name} ---\n{log.read_text(errors='replace')[-4000:]}" for log in logs)
    assert not hung, f"processes still running after {timeout} s (a rank hangs):\n{tails}"
    codes = [p.returncode for p in procs]
    assert codes == [0] * len(procs), f"exit codes {codes}:\n{tails}"
    return time.monotonic() - start


def _two_ranks(script: str, out: Path) -> None:
    """Run ``SCRIPTS/script out`` as ranks 0 and 1 of a gloo group (RANK, WORLD_SIZE... set)."""
    port = str(_free_port())
    commands = [
        (
            [sys.executable, str(SCRIPTS / script), str(out)],
            _env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port),
        )
        for r in range(2)
    ]
    _run_all(commands, [out / "log0.txt", out / "log1.txt"], WORKER_TIMEOUT_S)


def _read_ranks(out: Path) -> list[dict]:
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


# --------------------------------------------------------------------------------------
# ProbeRunner across 2 processes
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def probe_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("probe_workers")
    _two_ranks("probe_worker.py", out)
    return _read_ranks(out)


@pytest.fixture(scope="module")
def single_process():
    """The same probes on the same model in this one process: the reference."""
    tok = make_tokenizer()
    runner = C.build_runner(tok)
    model = make_model(seed=0, vocab_size=len(tok))
    clean = runner.run(model)
    C.perturb(model)
    damaged = runner.run(model)
    budgets = [BudgetConfig(**b) for b in C.BUDGETS]
    base = Snapshot(0, build_snapshot(clean, clean, runner.probes), trigger="baseline")
    decision = evaluate_budgets(budgets, Snapshot(10, build_snapshot(damaged, clean, runner.probes)), [base])
    return {"runner": runner, "clean": C.results_json(clean), "damaged": C.results_json(damaged), "decision": decision}


def assert_results_close(got: dict, want: dict, rel: float) -> None:
    assert set(got) == set(want) == {"general", "facts", "answers"}
    for name, w in want.items():
        g = got[name]
        fields = ("name", "kind", "examples", "tokens")
        assert [g[f] for f in fields] == [w[f] for f in fields], name
        assert g["score"] == w["score"], name  # counts over the same rows: exact
        assert g["nll"] == pytest.approx(w["nll"], rel=rel), name
        # Every row's (NLL, tokens, correct), gathered from both ranks: the paired errors' input.
        assert len(g["rows"]) == len(w["rows"]) == w["examples"], name
        for got_row, want_row in zip(g["rows"], w["rows"]):
            assert list(got_row) == pytest.approx(list(want_row), rel=rel, abs=1e-9), name


def test_both_ranks_ran_in_one_process_group_of_two(probe_ranks):
    assert [r["rank"] for r in probe_ranks] == [0, 1]
    assert [r["world_size"] for r in probe_ranks] == [2, 2]
    assert probe_ranks[0]["pid"] != probe_ranks[1]["pid"]


def test_probe_rows_are_split_across_ranks_with_filler_batches(probe_ranks, single_process):
    runner = single_process["runner"]
    # Which sequences each rank should carry: rows i with i % 2 == rank, every choice of a row
    # together, each fed but its last token (only a target).
    want = [
        sorted(list(s.ids[:-1]) for seqs in runner._seqs.values() for s in seqs if s.example % 2 == r) for r in range(2)
    ]
    plan = [len(runner._batches(DistContext(rank=r, world_size=2))) for r in range(2)]
    assert plan == [5, 3], "the probe data no longer gives an uneven split; fix dist_common"
    for r, rank in enumerate(probe_ranks):
        clean = rank["clean"]
        # Every rank runs as many forwards as the busiest one: rank 1 replays 3 filler batches.
        assert clean["forwards"] == max(plan)
        seen = clean["sequences"]
        assert {tuple(s) for s in seen} == {tuple(s) for s in want[r]}, f"rank {r} scored rows of the other rank"
        assert clean["train_mode_restored"] is True
    assert len(probe_ranks[0]["clean"]["sequences"]) == len(want[0])  # no filler on rank 0
    assert len(probe_ranks[1]["clean"]["sequences"]) > len(want[1])  # filler rows on rank 1
    # Each rank's counts cover all rows, so the sums were all-reduced.
    for rank in probe_ranks:
        res = rank["clean"]["results"]
        assert [res[n]["examples"] for n in ("general", "facts", "answers")] == [len(C.TEXT), len(C.MC), len(C.COMP)]


def test_results_identical_on_both_ranks_and_equal_to_single_process(probe_ranks, single_process):
    r0, r1 = probe_ranks
    for key in ("clean", "damaged"):
        a = r0[key]["results"] if key == "clean" else r0[key]
        b = r1[key]["results"] if key == "clean" else r1[key]
        assert a == b  # bit-identical: both hold the same all-reduced float64 sums
        assert_results_close(a, single_process[key], rel=1e-6)
    # The perturbation really changed the numbers (so the comparison above is not vacuous).
    assert r0["damaged"]["general"]["nll"] > r0["clean"]["results"]["general"]["nll"] + 1.0


def test_budget_decision_identical_on_every_rank(probe_ranks, single_process):
    d0, d1 = (r["decision"] for r in probe_ranks)
    assert d0 == d1
    assert d0["should_stop"] is True and d0["any_stop"] is True and d0["step"] == 10
    ref = single_process["decision"]
    assert d0["json"]["action"] == ref.action.value == "stop"
    assert d0["json"]["message"] == ref.message
    message = d0["json"]["message"]
    assert message.startswith("retention/general fell to") and message.endswith(": stopping")
    got = {o["budget"]: o for o in d0["json"]["outcomes"]}
    for o in ref.outcomes:
        g = got[o.budget]
        want = (o.reason.value, o.action.value if o.action else None, o.in_breach)
        assert (g["reason"], g["action"], g["in_breach"]) == want, o.budget
        assert g["value"] == pytest.approx(o.value, rel=1e-6, abs=1e-12)
    assert [got[b]["reason"] for b in ("retention/general", "loose", "patient")] == [
        "patience_exhausted",
        "within_budget",
        "breach_pending",
    ]


@pytest.mark.parametrize("case", [0, 1], ids=["rank1-fails-first-forward", "rank0-fails-second-forward"])
def test_a_fault_on_one_rank_raises_probe_failure_on_every_rank(probe_ranks, single_process, case):
    entries = [r["faults"][case] for r in probe_ranks]
    bad = entries[0]["bad_rank"]
    assert entries[1]["bad_rank"] == bad
    for rank, e in enumerate(entries):
        assert e["raised"] == "ProbeFailure", e
        assert e["message"].startswith("probe pass failed on 1 rank(s): ")
        if rank == bad:
            assert f"injected fault on rank {bad}" in e["message"] and e["cause"] is not None
        else:
            assert "another rank failed" in e["message"] and e["cause"] is None
            assert 1 <= e["forwards"] <= 6  # it ran (part of) its pass, then learned of the fault
        assert e["seconds"] < 20, "a rank waited for the other (process-group timeout is 60 s)"
        assert e["train_mode_restored"] is True
    # Afterwards the ranks are still in step: a clean pass gives the same numbers as before.
    assert probe_ranks[0]["after_faults"] == probe_ranks[1]["after_faults"] == probe_ranks[0]["damaged"]


# --------------------------------------------------------------------------------------
# A real Trainer under torchrun (DDP on CPU) with the ForgettingMonitor attached
# --------------------------------------------------------------------------------------


def torchrun(work: Path, script: str, *script_args, timeout: float = WORKER_TIMEOUT_S) -> list[dict]:
    """``tests/dist_scripts/<script>`` under torchrun with 2 processes; returns the ranks' reports
    (``work/rank<r>.json``)."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--nnodes", "1",
        "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
        str(SCRIPTS / script), *map(str, script_args),
    ]
    env = _env()
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    _run_all([(cmd, env)], [work / "torchrun.txt"], timeout)
    return _read_ranks(work)


def _torchrun_train(work, *script_args):
    """train_ddp.py under torchrun with 2 processes; returns (work, [rank0 report, rank1 report])."""
    return work, torchrun(work, "train_ddp.py", work, *script_args)


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    return _torchrun_train(tmp_path_factory.mktemp("train_ddp"), TRAIN_MAX_STEPS, TRAIN_LR)


def test_ddp_run_is_real_ddp_with_two_ranks(ddp_run):
    _, (r0, r1) = ddp_run
    assert [r0["rank"], r1["rank"]] == [0, 1]
    assert r0["world_size"] == r1["world_size"] == 2  # from torch.distributed
    assert r0["args_world_size"] == r1["args_world_size"] == 2
    assert r0["backend"] == r1["backend"] == "gloo"
    assert r0["ddp_wrapped"] and r1["ddp_wrapped"]
    # Synchronised replicas (use_cpu=True): same starting and same final weights on both ranks.
    assert r0["pretrained_checksum"] == r1["pretrained_checksum"]
    assert r0["final_checksum"] == r1["final_checksum"]
    assert r0["final_checksum"] != r0["pretrained_checksum"]
    # Two ranks of 4 rows each: 8 rows of the 64 per step, so the epoch runs twice as fast.
    assert r0["epoch"] == pytest.approx(r0["global_step"] * 8 / 64)


def test_ddp_every_rank_gets_the_same_decisions_and_stops_at_the_same_step(ddp_run):
    _, (r0, r1) = ddp_run
    assert r0["global_step"] == r1["global_step"]
    assert r0["stop_step"] == r1["stop_step"] == r0["global_step"] < TRAIN_MAX_STEPS
    assert r0["stop_decision"] == r1["stop_decision"]
    assert r0["stop_decision"]["action"] == "stop"
    assert r0["stop_message"].startswith("retention/general fell to")
    assert r0["decisions"] == r1["decisions"]
    assert r0["history"] == r1["history"]  # every metric (probe/seconds included) bit-identical
    steps = [s["step"] for s in r0["history"]]
    assert steps == list(range(0, r0["stop_step"] + 1, 2)) and len(steps) >= 3
    # The recorded stop is where the pure budget function says it should be.
    snaps = [Snapshot.from_json(s) for s in r0["history"]]
    budgets = MonitorConfig.from_dict(C.TRAIN_MONITOR).budgets
    stops = [snaps[i].step for i in range(1, len(snaps)) if evaluate_budgets(budgets, snaps[i], snaps[:i]).should_stop]
    assert stops == [r0["stop_step"]]
    assert snaps[-1].metrics["retention/general"] < 0.8 < snaps[1].metrics["retention/general"]


def test_ddp_only_rank0_writes_the_monitor_files(ddp_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    work, (r0, r1) = ddp_run
    arena = work / "run" / "arena"
    assert r0["history_path"] == str(arena / "history.jsonl") and r1["history_path"] is None
    assert sorted(glob.glob(str(work / "**" / "history.jsonl"), recursive=True)) == [str(arena / "history.jsonl")]
    assert sorted(glob.glob(str(work / "**" / "summary.json"), recursive=True)) == [str(arena / "summary.json")]
    lines = [json.loads(x) for x in (arena / "history.jsonl").read_text().splitlines() if x.strip()]
    # Written once (not once per rank), and exactly what rank 0 held.
    assert [{k: v for k, v in x.items() if k != "decision"} for x in lines] == r0["history"]
    assert [x.get("decision", {}) for x in lines] == r0["decisions"]
    summary = json.loads((arena / "summary.json").read_text())
    assert summary["stopped"] is True and summary["stop_step"] == r0["stop_step"]

    tb_dir = work / "run" / "runs" / "arena"
    assert r0["writer_dirs"] == [str(tb_dir)] and r1["writer_dirs"] == []
    events = glob.glob(str(work / "**" / "events.out.tfevents.*"), recursive=True)
    assert len(events) == 1, events
    event = Path(events[0])
    assert event.parent == tb_dir
    assert event.name.split(".")[-2] == str(r0["pid"])  # written by rank 0's process
    acc = EventAccumulator(str(event))
    acc.Reload()
    assert [e.step for e in acc.Scalars("retention/general")] == [s["step"] for s in r0["history"]]


def test_ddp_baseline_equals_single_process_probes_on_the_same_weights(ddp_run):
    from arena_callbacks import ProbeRunner, ProbeSet, ProbeSettings

    work, (r0, _) = ddp_run
    tok = make_tokenizer()
    model = make_model(seed=0, vocab_size=len(tok))
    model.load_state_dict(torch.load(work / "pretrained.pt", weights_only=True))
    assert [float(p.detach().double().sum()) for p in model.parameters()] == r0["pretrained_checksum"]
    settings = ProbeSettings(**C.TRAIN_MONITOR["probe"])
    data = {"general": C.TRAIN_GENERAL, "facts": C.TRAIN_FACTS, TARGET: C.TRAIN_TARGET}
    runner = ProbeRunner({n: ProbeSet.build(n, d, settings) for n, d in data.items()}, settings)
    runner.prepare(tok)
    results = runner.run(model)
    want = build_snapshot(results, results, runner.probes)
    got = r0["history"][0]["metrics"]
    assert {k for k in got if not k.startswith("sp/") or k in want} - {"probe/seconds"} == set(want)
    for key, value in want.items():
        if math.isnan(value):
            assert got[key] == "nan", key
        else:
            assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-9), key
    assert results["facts"].score is not None and 0 < results["facts"].score  # a real score was compared
    # Rank 1's probe forwards carried the other half of the rows, and as many forwards as rank 0.
    r1 = ddp_run[1][1]
    assert r0["probe_forwards"] == r1["probe_forwards"] > 0
    want_rows = [
        {tuple(s.ids[:-1]) for seqs in runner._seqs.values() for s in seqs if s.example % 2 == r} for r in range(2)
    ]
    assert {tuple(x) for x in r0["probe_rows"]} == want_rows[0]
    assert {tuple(x) for x in r1["probe_rows"]} == want_rows[1]


# --------------------------------------------------------------------------------------
# A fault on one rank of a sharded (FSDP2) model
# --------------------------------------------------------------------------------------


def test_fsdp_fault_on_one_rank_raises_on_every_rank_without_waiting(tmp_path, single_process):
    _two_ranks("fsdp_fault.py", tmp_path)
    ranks = _read_ranks(tmp_path)
    assert [r["world_size"] for r in ranks] == [2, 2]
    # Sharded probes give the unsharded numbers.
    assert ranks[0]["clean"] == ranks[1]["clean"]
    assert_results_close(ranks[0]["clean"], single_process["clean"], rel=1e-5)
    for r in ranks:
        assert r["raised"] == "ProbeFailure", r
        assert r["message"].startswith("probe pass failed on 1 rank(s): ")
        assert r["seconds"] < 20, "a rank waited for the other until a timeout"
    assert "injected fault after the forward on rank 1" in ranks[1]["message"]
    assert ranks[0]["forwards"] == 1  # rank 0 learned of the fault before its next sharded forward


# --------------------------------------------------------------------------------------
# Geometry capture across 2 processes
# --------------------------------------------------------------------------------------


def test_geometry_keys_identical_on_both_ranks_and_equal_to_single_process(tmp_path, single_process):
    _two_ranks("geometry_worker.py", tmp_path)
    ranks = _read_ranks(tmp_path)
    assert [r["world_size"] for r in ranks] == [2, 2]
    runner = single_process["runner"]
    for mode in ("disable_adapter", "cache"):
        assert ranks[0][mode] == ranks[1][mode]
        want = C.geometry_metrics_for(runner, DistContext(), mode)
        assert sorted(ranks[0][mode]) == sorted(want)
        assert want["geometry/procrustes/max"] > 0.01  # the change was seen
        for key, value in want.items():
            assert ranks[0][mode][key] == pytest.approx(value, rel=1e-5, abs=1e-6), (mode, key)


@pytest.fixture(scope="module")
def ddp_rewind_run(tmp_path_factory):
    return _torchrun_train(tmp_path_factory.mktemp("train_ddp_rewind"), 16, TRAIN_LR * 3, "rewind")


def test_ddp_rewind_keeps_ranks_in_step(ddp_rewind_run):
    _, (r0, r1) = ddp_rewind_run
    assert r0["world_size"] == r1["world_size"] == 2 and r0["ddp_wrapped"] and r1["ddp_wrapped"]
    assert len(r0["rewinds"]) >= 1, "the budget should have fired a rewind"
    # Same rewinds (step, α, candidates measured on all-reduced probes) on both ranks.
    assert r0["rewinds"] == r1["rewinds"]
    first = r0["rewinds"][0]
    # The grid (0.3, 0.6), the known ends, then rewind.refine (2) midpoints next to the choices:
    # the same on both ranks, since every choice is made on all-reduced numbers.
    alphas = [c["alpha"] for c in first["candidates"]]
    assert first["mode"] == "path" and first["alpha"] in alphas and alphas == sorted(alphas)
    assert {0.0, 0.3, 0.6, 1.0} <= set(alphas) and len(alphas) == 6
    # Training went on in step: same history, same final weights, same lowered learning rate.
    assert r0["history"] == r1["history"] and r0["global_step"] == r1["global_step"]
    assert r0["global_step"] > first["at_step"]
    assert r0["final_checksum"] == r1["final_checksum"]
    assert r0["base_lrs"] == r1["base_lrs"]
    continued = sum(r["then"] == "continue" for r in r0["rewinds"])
    assert r0["base_lrs"] == pytest.approx([TRAIN_LR * 3 * 0.5**continued] * len(r0["base_lrs"]))


def test_fsdp2_rewind_restores_each_rank_shard_in_place(tmp_path):
    _two_ranks("fsdp_rewind.py", tmp_path)
    r0, r1 = _read_ranks(tmp_path)
    assert r0["world_size"] == r1["world_size"] == 2
    # Really sharded: each rank keeps about half of the weights.
    assert r0["local_numel"] + r1["local_numel"] == r0["full_numel"] and r0["local_numel"] < r0["full_numel"]
    assert r0["exact"] and r1["exact"]
    for r in (r0, r1):
        assert r["moved"] != r["base"]  # the move changed the probes
        assert r["restored"] == r["base"] and r["at_zero"] == r["base"]  # exact restore, α = 0 is the start
        assert r["at_one"] == r["moved"]
    assert r0["restored"] == r1["restored"]


def test_generative_probes_decode_in_step_on_an_fsdp2_model_and_equal_one_process(tmp_path):
    _two_ranks("generate_worker.py", tmp_path)
    r0, r1 = _read_ranks(tmp_path)
    assert r0["world_size"] == r1["world_size"] == 2
    assert r0["results"] == r1["results"]  # all-reduced
    # Each rank decoded its own rows (row i on rank i % 2), and together they are the one-process answers.
    assert {k for k in r0["answers"]} == {"short/0", "short/2", "short/4", "long/0", "long/2"}
    assert {k for k in r1["answers"]} == {"short/1", "short/3", "long/1"}
    tok = make_tokenizer()
    runner = C.build_runner(tok, probes=C.generative_probes(), settings={"batch_size": 2, "max_length": 64})
    want = runner.run(make_model(seed=0, vocab_size=len(tok)))
    answers = {**r0["answers"], **r1["answers"]}
    for (probe, row), g in runner.last_generations.items():
        assert answers[f"{probe}/{row}"] == [list(g.ids), g.text, g.stopped], (probe, row)
    assert {len(a[0]) for k, a in answers.items() if k.startswith("long")} != {3}  # longer answers than 'short'
    for name, result in want.items():
        got = r0["results"][name]
        for key in ("score", "examples", "gen_length", "stopped"):
            assert got[key] == pytest.approx(getattr(result, key)), (name, key)
        if name == "general":
            assert got["nll"] == pytest.approx(result.nll, rel=1e-5)


# --------------------------------------------------------------------------------------
# DeepSpeed ZeRO-3 (accelerate + integrations/accelerate/deepspeed_zero3.yaml) and ZeRO-2
# (the Trainer's `deepspeed=` config under torchrun), 2 CPU processes over gloo
# --------------------------------------------------------------------------------------

ZERO3_YAML = REPO / "integrations" / "accelerate" / "deepspeed_zero3.yaml"
DS_MAX_STEPS = 4
DS_TIMEOUT_S = 240  # startup of two DeepSpeed processes on a loaded 2-core machine; the ranks' own timeout is 60 s
DS_ENGINE = "deepspeed.runtime.engine.DeepSpeedEngine"
# ZeRO-2 from the Trainer's own `deepspeed=` argument: "auto" values come from TrainingArguments.
ZERO2_CONFIG = {
    "zero_optimization": {"stage": 2},
    "train_micro_batch_size_per_gpu": "auto",
    "train_batch_size": "auto",
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
}


def _train_args(out: Path) -> list[str]:
    return [
        "--output_dir", str(out), "--max_steps", str(DS_MAX_STEPS), "--per_device_train_batch_size", "4",
        "--learning_rate", "1e-2", "--seed", "0", "--logging_steps", "1", "--ddp_timeout", "60", "--use_cpu", "true",
    ]


def _ds_env(out: Path) -> dict[str, str]:
    # DS_ACCELERATOR: never pick up a GPU, these tests are about CPU processes. An empty
    # extensions folder: no op compiled on an earlier run may hide a compile of ~2 minutes.
    env = _env(DS_ACCELERATOR="cpu", TORCH_EXTENSIONS_DIR=str(out / "torch_extensions"))
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def _require_deepspeed() -> None:
    import importlib.util

    # Not a skip: deepspeed is in the dev extra, and a missing one must not pass silently.
    assert importlib.util.find_spec("deepspeed"), "deepspeed is missing: pip install -e '.[dev]'"


def _assert_no_op_compiled(log: Path) -> None:
    text = log.read_text(errors="replace")
    assert "built successfully" not in text and "Building extension" not in text, "a DeepSpeed op was JIT-compiled"


@pytest.fixture(scope="module")
def zero3_run(tmp_path_factory):
    _require_deepspeed()
    out = tmp_path_factory.mktemp("zero3")
    accelerate = Path(sys.executable).with_name("accelerate")
    cmd = [
        str(accelerate) if accelerate.exists() else "accelerate", "launch", "--config_file", str(ZERO3_YAML),
        "--num_processes", "2", "--main_process_port", str(_free_port()),
        str(SCRIPTS / "train_deepspeed.py"), *_train_args(out),
    ]
    # no user default_config.yaml; then the rewind scenario of zero3_rewind.py in the same processes
    env = {**_ds_env(out), "HF_HOME": str(out / "hf_home"), "ARENA_TEST_REWIND_DIR": str(out / "rewind")}
    seconds = _run_all([(cmd, env)], [out / "launch.txt"], DS_TIMEOUT_S)
    _assert_no_op_compiled(out / "launch.txt")
    return out, _read_ranks(out), seconds


@pytest.fixture(scope="module")
def zero2_run(tmp_path_factory):
    _require_deepspeed()
    out = tmp_path_factory.mktemp("zero2")
    (out / "ds_zero2.json").write_text(json.dumps(ZERO2_CONFIG))
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--nnodes", "1",
        "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
        str(SCRIPTS / "train_deepspeed.py"), *_train_args(out), "--deepspeed", str(out / "ds_zero2.json"),
    ]
    seconds = _run_all([(cmd, _ds_env(out))], [out / "torchrun.txt"], DS_TIMEOUT_S)
    _assert_no_op_compiled(out / "torchrun.txt")
    return out, _read_ranks(out), seconds


def _ds_reference(out: Path) -> tuple[dict[str, float], dict[str, float]]:
    """Baseline and final metrics of one process, no DeepSpeed, on the weights the run saved."""
    import train_deepspeed as T  # noqa: N812

    from arena_callbacks import ProbeRunner, ProbeSet
    from arena_callbacks.capture import GeometryTracker
    from arena_callbacks.spectra import aggregate_spectra, snapshot_weights, spectra_layer_names, weight_spectra

    cfg = MonitorConfig.from_dict(T.MONITOR)
    tok = make_tokenizer()
    model = make_model(seed=0, vocab_size=len(tok))
    model.load_state_dict(torch.load(out / "initial.pt", weights_only=True))
    data = {**T.PROBES, TARGET: C.TRAIN_TARGET}
    runner = ProbeRunner({n: ProbeSet.build(n, d, cfg.probe) for n, d in data.items()}, cfg.probe)
    runner.prepare(tok)
    tracker = GeometryTracker(cfg.geometry, runner)
    tracker.setup(model)
    layers = spectra_layer_names(model, cfg.spectra.modules)
    reference = snapshot_weights(model, layers)

    def measure(baseline_results):
        with tracker.capturing() as cap:
            results = runner.run(model, DistContext(), observer=cap)
        base = baseline_results or results
        metrics = build_snapshot(results, base, runner.probes, stability=cfg.stability, plasticity=cfg.plasticity)
        metrics.update(tracker.measure(model, DistContext(), baseline=baseline_results is None))
        sc = cfg.spectra
        metrics.update(aggregate_spectra(weight_spectra(model, reference, names=layers, k=sc.top_k,
                                                        eps=sc.intruder_threshold, solver=sc.solver())))
        return results, metrics

    base_results, base_metrics = measure(None)
    model.load_state_dict(torch.load(out / "final.pt", weights_only=True))
    _, final_metrics = measure(base_results)
    return base_metrics, final_metrics


def _assert_metrics_close(got: dict, want: dict, where: str) -> None:
    assert set(want) <= set(got), f"{where}: missing {sorted(set(want) - set(got))}"
    for key, value in want.items():
        if math.isnan(value):
            assert got[key] == "nan", (where, key)
        else:
            assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-6), (where, key)


def _assert_ds_run(run, stage: int) -> None:
    out, (r0, r1), _ = run
    # Really two ranks of one DeepSpeed engine at the asked ZeRO stage (not a DDP or replica fallback).
    assert [r0["rank"], r1["rank"]] == [0, 1] and r0["pid"] != r1["pid"]
    assert r0["world_size"] == r1["world_size"] == r0["args_world_size"] == 2
    assert r0["backend"] == r1["backend"] == "gloo"
    assert r0["device"] == r1["device"] and r0["device"].startswith("cpu")
    for r in (r0, r1):
        assert r["engine"] == DS_ENGINE
        assert r["engine_zero_stage"] == r["plugin_zero_stage"] == stage
        assert r["trainable_parameters"] == r["full_numel"]  # ZeRO-3 partitions counted at full size
    # Trained in step: same gathered final weights on both ranks, moved from the start.
    tok = make_tokenizer()
    initial = [float(p.detach().double().sum()) for p in make_model(seed=0, vocab_size=len(tok)).parameters()]
    assert r0["final_checksum"] == r1["final_checksum"] != initial
    assert r0["global_step"] == r1["global_step"] == DS_MAX_STEPS
    assert r0["epoch"] == pytest.approx(DS_MAX_STEPS * 8 / 64)  # 2 ranks × 4 rows per step
    # Every rank took part in every probe pass and holds the same numbers and decisions.
    assert r0["history"] == r1["history"]
    assert r0["decisions"] == r1["decisions"]
    assert [s["step"] for s in r0["history"]] == list(range(0, DS_MAX_STEPS + 1, 2))
    history = out / "arena" / "history.jsonl"
    assert r0["history_path"] == str(history) and r1["history_path"] is None
    assert [p for p in out.rglob("history.jsonl") if not {"rewind_check", "rewind"} & set(p.parts)] == [history]
    # ... and those numbers are the single-process ones on the same weights.
    base, final = _ds_reference(out)
    assert any(k.startswith("geometry/procrustes/") for k in final) and any(k.startswith("spectral/") for k in final)
    assert final["geometry/procrustes/max"] > 0.01 and final["delta_nll/general"] != 0  # training changed them
    _assert_metrics_close(r0["history"][0]["metrics"], base, "baseline")
    _assert_metrics_close(r0["history"][-1]["metrics"], final, f"step {DS_MAX_STEPS}")


def test_deepspeed_zero3_via_accelerate_probes_and_geometry_match_single_process(zero3_run):
    _, (r0, r1), _ = zero3_run
    # Parameters really partitioned: each rank holds a part of the weights between forwards.
    for r in (r0, r1):
        assert r["partitioned"] and r["local_numel"] < r["full_numel"]
    _assert_ds_run(zero3_run, stage=3)


def test_deepspeed_zero3_rewind_budgets_start_on_every_rank(zero3_run):
    _, ranks, _ = zero3_run
    for r in ranks:
        assert r["rewind"]["raised"] is None and r["rewind"]["probed"] is True


@pytest.fixture(scope="module")
def zero3_rewind_run(zero3_run):
    """``zero3_rewind.py`` (rewind, save, resume, rewind again), run by the ZeRO-3 launch after its
    training run: one accelerate launch for both."""
    return zero3_run[0] / "rewind"


def _interpolation_f64(theta0: dict, theta1: dict, alpha: float) -> dict:
    """The path point at ``α`` (docs/design.md §4), computed whole in float64: LoRA ``B`` (zero at
    the start) scaled with ``A`` kept, everything else ``θ0 + α(θ1 − θ0)``."""
    out = {}
    for n, t1 in theta1.items():
        t0, t1d = theta0[n].double(), t1.double()
        if "lora_B" in n:
            ref = alpha * t1d
        elif "lora_A" in n:
            ref = t1d
        else:
            ref = t0 + alpha * (t1d - t0)
        out[n] = ref.to(t1.dtype)
    return out


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_deepspeed_zero3_rewinds_resumes_and_rewinds_again_exactly(zero3_rewind_run, kind):
    folder = zero3_rewind_run / kind
    r0, r1 = _read_ranks(folder)
    # Two ranks of one ZeRO-3 engine, the trainable parameters really partitioned.
    assert r0["world_size"] == r1["world_size"] == 2 and r0["backend"] == "gloo"
    for r in (r0, r1):
        assert r["engine_zero_stage"] == 3 and r["partitioned"]
        assert r["local_numel"] < r["full_numel"] <= r0["local_numel"] + r1["local_numel"]
    assert all("lora_" in n for n in r0["trainable"]) == (kind == "lora")
    # Run A rewound at step 2 and saved checkpoint-2; run B resumed from it (one rewind restored)
    # and rewound again at step 4: the same on both ranks.
    assert r0["global_step_a"] == 2 and r0["global_step_b"] == 4 and r0["restored_rewinds"] == 1
    assert [w["number"] for w in r0["rewinds_a"]] == [1]
    assert [(w["number"], w["at_step"]) for w in r0["rewinds_b"]] == [(1, 2), (2, 4)]
    assert r0["rewinds_b"] == r1["rewinds_b"] and r0["history_b"] == r1["history_b"]
    # The kept states came back from the checkpoint unchanged, each rank's θ0 its own slice.
    for r in (r0, r1):
        assert r["best_round_trip"] and r["theta0_round_trip"] and r["theta0_is_my_slice"]
    # Each rewind left exactly the float64 interpolation between θ0 and the weights it started from,
    # in the fp32 master weights and in the weights the forward gathers.
    saved = torch.load(folder / "rewinds.pt", weights_only=True)
    assert len(saved["rewinds"]) == 2
    for rec, info in zip(saved["rewinds"], r0["rewinds_b"]):
        alpha = info["alpha"]
        assert 0.0 < alpha < 1.0, "an interior point was chosen, so the interpolation is really tested"
        want = _interpolation_f64(saved["theta0"], rec["theta1"], alpha)
        assert sorted(want) == sorted(rec["after_master"]) == sorted(r0["trainable"])
        for n, w in want.items():
            assert torch.equal(rec["after_master"][n], w), n
            assert torch.equal(rec["after_forward"][n], w), n
        assert any(not torch.equal(rec["theta1"][n], want[n]) for n in want)  # the rewind moved the weights


def test_deepspeed_zero2_via_trainer_config_probes_and_geometry_match_single_process(zero2_run):
    _, (r0, r1), _ = zero2_run
    for r in (r0, r1):
        assert not r["partitioned"] and r["local_numel"] == r["full_numel"]  # ZeRO-2 keeps whole weights
    _assert_ds_run(zero2_run, stage=2)


def test_deepspeed_zero2_rewind_reaches_the_optimizer_master_weights(zero2_run):
    _, ranks, _ = zero2_run
    for r in ranks:
        assert r["rewind"]["raised"] is None and r["rewind"]["probed"] is True  # rewind budgets start
        # ZeRO-2 copies its master weights over the model after every step: load_state (what a
        # rewind does) must set them too, or the next step silently undoes the rewind.
        assert r["master_synced"] is True
