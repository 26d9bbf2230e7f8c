"""Zero-code attach (issue 19, part 2): ``ARENA_CALLBACKS_CONFIG`` / ``arena-callbacks run`` add the
monitor to every Trainer a command builds, through the ``.pth`` hook, in fresh processes (a plain
script and TRL's own ``trl sft``, which restarts itself through ``accelerate launch``)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import TARGET_TEXT, corpus, make_tokenizer, pretrained_model

from arena_callbacks.autoattach import ENV, PTH_FILE, hook_path, install_hook

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

SCRIPT = """
import sys
from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments
sys.path.insert(0, {tests!r})
from helpers import TARGET_TEXT, make_tokenizer, pretrained_model
tok = make_tokenizer()
callbacks = []
if {own!r} == "file":
    import os
    from arena_callbacks import ForgettingMonitor
    callbacks.append(ForgettingMonitor.from_config(os.environ["MONITOR_FILE"]))
elif {own!r}:
    from arena_callbacks import ForgettingMonitor
    callbacks.append(ForgettingMonitor({{"cadence": {{"every_n_steps": 3}}, "logging": {{"tensorboard": False}}}},
                                       probes={{"mine": [{{"text": "one two three four five."}}]}}))
args = TrainingArguments(output_dir={out!r}, max_steps={steps}, per_device_train_batch_size=4, report_to=[],
                         learning_rate={lr},
                         save_strategy="no", use_cpu=True, seed=0, disable_tqdm=True)
trainer = Trainer(model=pretrained_model(), args=args, train_dataset=[tok(TARGET_TEXT)] * 16, processing_class=tok,
                  data_collator=DataCollatorForLanguageModeling(tok, mlm=False), callbacks=callbacks)
names = [type(cb).__name__ for cb in trainer.callback_handler.callbacks]
print("monitors:", names.count("ForgettingMonitor"))
trainer.train()
"""


@pytest.fixture(scope="module")
def hook():
    """The hook in this environment (inert while the variable is unset, as in every other test)."""
    return install_hook()


@pytest.fixture
def monitor_yaml(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "general.jsonl").write_text("".join(json.dumps({"text": s}) + "\n" for s in corpus(8, seed=7)))
    path = tmp_path / "monitor.yaml"
    path.write_text(yaml.safe_dump({
        "cadence": {"every_n_steps": 2}, "probe": {"batch_size": 8, "max_length": 64},
        "logging": {"tensorboard": False}, "probes": {"general": "data/general.jsonl"},
    }))
    return path


def env(**extra: str) -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if k != ENV}
    e.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1",
             PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    e.update(extra)
    return e


def run_script(tmp_path: Path, own: bool | str, out: str = "out", steps: int = 4, lr: float = 5e-5,
               **extra: str) -> subprocess.CompletedProcess:
    script = tmp_path / f"train_{out}.py"
    script.write_text(SCRIPT.format(tests=str(REPO / "tests"), out=str(tmp_path / out), own=own, steps=steps, lr=lr))
    return subprocess.run([sys.executable, str(script)], env=env(**extra), cwd=tmp_path, capture_output=True,
                          text=True, timeout=240)


def history(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "arena" / "history.jsonl").read_text().splitlines() if x]


def test_the_hook_is_one_inert_line(hook):
    assert hook == hook_path() and hook.name == PTH_FILE
    line = hook.read_text()
    assert line.count("\n") == 1 and line.startswith("import os;") and ENV in line
    assert install_hook() == hook and hook.read_text() == line  # idempotent


def test_a_script_with_its_own_monitor_keeps_it(hook, monitor_yaml, tmp_path):
    proc = run_script(tmp_path, own=True, **{ENV: str(monitor_yaml)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "monitors: 1" in proc.stdout
    records = history(tmp_path / "out")
    assert [r["step"] for r in records] == [0, 3, 4] and "retention/mine" in records[0]["metrics"]


def test_without_the_variable_nothing_happens(hook, tmp_path):
    """The hook is installed but the variable unset: not even the package is imported, and
    Trainer.__init__ is the library's own."""
    check = ("import sys, transformers.trainer as t; "
             "print('wrapped' if getattr(t.Trainer.__init__, '__arena_callbacks_wrapped__', False) else 'plain', "
             "'imported' if 'arena_callbacks' in sys.modules else 'absent')")
    proc = subprocess.run([sys.executable, "-c", check], env=env(), cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["plain", "absent"]


def test_a_bad_config_fails_the_command_at_start(hook, tmp_path):
    bad = tmp_path / "monitor.yaml"
    bad.write_text(yaml.safe_dump({"probes": {"general": "data/missing.jsonl"}}))
    proc = run_script(tmp_path, own=False, **{ENV: str(bad)})
    assert proc.returncode == 2 and "monitors:" not in proc.stdout
    assert "probes.general: file data/missing.jsonl not found" in proc.stderr
    cli = subprocess.run([str(BIN / "arena-callbacks"), "run", "--config", str(bad), "--", "true"], env=env(),
                         capture_output=True, text=True, timeout=120)
    assert cli.returncode == 2 and "probes.general: file data/missing.jsonl not found" in cli.stderr


def test_attached_by_the_variable_or_in_python_the_run_is_the_same(hook, monitor_yaml, tmp_path):
    """The same file, attached by ARENA_CALLBACKS_CONFIG or passed in Python as
    ``ForgettingMonitor.from_config``: the same history, TensorBoard scalars and stop decision."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    spec = yaml.safe_load(monitor_yaml.read_text())
    spec["logging"] = {"tensorboard": True}
    spec["budgets"] = [{"key": "delta_nll/general", "max_rise": 0.05, "action": "stop"}]
    monitor_yaml.write_text(yaml.safe_dump(spec))
    runs = {"hook": run_script(tmp_path, own=False, out="hook", steps=12, lr=2e-2, **{ENV: str(monitor_yaml)}),
            "python": run_script(tmp_path, own="file", out="python", steps=12, lr=2e-2, MONITOR_FILE=str(monitor_yaml))}
    seen = {}
    for name, proc in runs.items():
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "monitors: 1" in proc.stdout  # the variable added one to a script that has none
        out = tmp_path / name
        records = [(r["step"], {k: v for k, v in r["metrics"].items() if k != "probe/seconds"}) for r in history(out)]
        summary = json.loads((out / "arena" / "summary.json").read_text())
        events = EventAccumulator(str(out / "runs" / "arena")).Reload()  # beside the trainer's (none here)
        scalars = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]
                   if not tag.endswith("probe/seconds")}
        assert "retention/general" in scalars
        seen[name] = (records, summary["stopped"], summary["stop_step"], scalars)
    assert seen["hook"][1] and seen["hook"][2] < 12  # the budget fired and the run stopped early
    steps = [r[0] for r in seen["hook"][0]]
    assert steps == list(range(0, seen["hook"][2] + 1, 2))  # probes every 2 steps, from the file
    assert all("retention/general" in m for _, m in seen["hook"][0])
    assert seen["hook"][:3] == seen["python"][:3]
    assert seen["hook"][3] == seen["python"][3]


@pytest.mark.timeout(600)
@pytest.mark.parametrize("processes", [2])
def test_trl_sft_command_with_arena_callbacks_run(hook, monitor_yaml, tmp_path, processes):
    """TRL's own console command, which relaunches itself through ``accelerate launch``; with 2
    processes (gloo on the CPU) each step covers twice the rows, which the logged epoch shows.
    (One process takes the same relaunch and hook path; it was dropped to keep the suite within
    its time: ``processes=1`` still runs when added here.)"""
    pytest.importorskip("trl")
    if shutil.which("trl", path=str(BIN)) is None:
        pytest.skip("no trl command in this environment")
    from test_distributed import _free_port

    model_dir, data_dir, out = tmp_path / "model", tmp_path / "sft-data", tmp_path / "sft-out"
    pretrained_model().save_pretrained(model_dir)
    tok = make_tokenizer()
    tok.save_pretrained(model_dir)
    data_dir.mkdir()
    (data_dir / "train.jsonl").write_text("".join(json.dumps({"text": TARGET_TEXT}) + "\n" for _ in range(32)))
    launch: list[str] = []
    if processes == 2:
        config = yaml.safe_load((REPO / "integrations" / "accelerate" / "ddp_cpu.yaml").read_text())
        config["main_process_port"] = _free_port()
        (tmp_path / "ddp.yaml").write_text(yaml.safe_dump(config))
        launch = ["--accelerate_config", str(tmp_path / "ddp.yaml")]
    cmd = [str(BIN / "arena-callbacks"), "run", "--config", str(monitor_yaml), "--",
           str(BIN / "trl"), "sft", *launch, "--model_name_or_path", str(model_dir), "--dataset_name", str(data_dir),
           "--output_dir", str(out), "--max_steps", "4", "--per_device_train_batch_size", "4", "--report_to", "none",
           "--use_cpu", "true", "--bf16", "false", "--gradient_checkpointing", "false", "--max_length", "32",
           "--save_strategy", "no", "--logging_steps", "1"]
    proc = subprocess.run(cmd, env=env(), cwd=tmp_path, capture_output=True, text=True, timeout=560)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])
    records = history(out)  # one writer: every probe step once
    assert [r["step"] for r in records] == [0, 2, 4]
    assert all("retention/general" in r["metrics"] for r in records)
    # 32 rows, 4 per process and step: the world size the run had.
    assert [r["epoch"] for r in records[1:]] == [2 * 4 * processes / 32, 4 * 4 * processes / 32]
