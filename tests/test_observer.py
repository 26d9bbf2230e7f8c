"""The observer effect: attached or not, the trainer's own run is the same.

Each case trains the same seeded run twice, without and with the monitor (probes at every
logging step, geometry on, a ``rewind`` budget that never fires), and compares everything the
trainer produced (``tests/observer.py``): its ``log_history`` entries and what a ``report_to``
backend receives, its TensorBoard ``train/*`` and ``eval/*`` curves, the final weights, every
checkpoint file, the learning rate at every step and the batches in order. Only the monitor's
own keys and files may differ. Dropout is on throughout (so a random number drawn by the monitor
would change the run), evaluation runs every 2 steps, and the runs cover ``Trainer`` and TRL's
``SFTTrainer``, LoRA and full finetuning, and 2 gloo processes.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import observer
import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
CASES = [("trainer", "lora"), ("trainer", "full"), ("sft", "lora"), ("sft", "full")]
# The trainer's own keys every run must log (TRL's SFTTrainer adds its own).
TRAINER_KEYS = {"loss", "grad_norm", "learning_rate", "epoch"}
TRL_KEYS = {"entropy", "num_tokens", "mean_token_accuracy"}


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """(plain, watched) records per case, each run once for the module."""
    pytest.importorskip("peft")
    pytest.importorskip("trl")
    cache: dict[tuple[str, str], tuple[dict, dict]] = {}

    def get(kind: str, method: str) -> tuple[dict, dict]:
        if (kind, method) not in cache:
            out = tmp_path_factory.mktemp(f"observer-{kind}-{method}")
            plain = observer.run(out / "plain", trainer_kind=kind, method=method, monitored=False)
            watched = observer.run(out / "watched", trainer_kind=kind, method=method, monitored=True)
            cache[kind, method] = (plain, watched)
        return cache[kind, method]

    return get


@pytest.mark.parametrize(("kind", "method"), CASES)
def test_the_monitor_leaves_the_run_unchanged(pairs, kind, method):
    plain, watched = pairs(kind, method)
    assert observer.differences(plain, watched) == []
    # The comparison has substance: the monitor probed at every logging step, the trainer logged,
    # evaluated and saved, and the run moved the weights.
    assert watched["monitor_steps"] == [0, 2, 4, 6] and watched["rewinds"] == []
    losses = [e for e in plain["log_history"] if "loss" in e]
    assert [e["step"] for e in losses] == [2, 4, 6]
    assert all(TRAINER_KEYS <= set(e) for e in losses)
    if kind == "sft":  # TRL's pending metrics stay in its own entries
        assert all(TRL_KEYS <= set(e) for e in losses)
    assert [e["step"] for e in plain["log_history"] if "eval_loss" in e] == [2, 4, 6]
    assert list(plain["checkpoints"]) == ["checkpoint-3", "checkpoint-6"]
    assert len(plain["batches"]) == observer.MAX_STEPS and len(plain["lr"]) == observer.MAX_STEPS
    assert len({str(b) for b in plain["batches"]}) > 1


@pytest.mark.parametrize(("kind", "method"), CASES)
def test_the_monitor_scalars_still_reach_every_backend(pairs, kind, method):
    _, watched = pairs(kind, method)
    # log_history and what each report_to backend's on_log receives: one entry per probe step,
    # the monitor's keys only (plus the epoch and step Trainer.log adds): nothing of TRL's.
    for entries in (watched["monitor_entries"], watched["backend_monitor_entries"]):
        assert [e["step"] for e in entries] == [0, 2, 4, 6]
        for e in entries:
            assert {"retention/general", "sp/stability", "geometry/procrustes/mean"} <= set(e)
            assert not (set(e) & (TRAINER_KEYS - {"epoch"} | TRL_KEYS))


def test_a_new_users_script_shows_the_same_loss_curve_in_tensorboard(pairs):
    """``logging_steps`` equal to the probe cadence, ``report_to=["tensorboard"]``: the curve a
    person watches is point for point the curve without the monitor."""
    plain, watched = pairs("trainer", "lora")
    assert [s for s, _ in plain["tensorboard"]["train/loss"]] == [2, 4, 6]
    assert watched["tensorboard"]["train/loss"] == plain["tensorboard"]["train/loss"]
    assert watched["tensorboard"]["eval/loss"] == plain["tensorboard"]["eval/loss"]
    assert not any(t.startswith(("train/retention", "train/sp/")) for t in watched["tensorboard"])


@pytest.mark.parametrize("config", [{}, {"cadence": {"every_n_steps": None, "on_evaluate": True}}],
                         ids=["defaults", "on-evaluate"])
def test_other_cadences_leave_the_run_unchanged(pairs, tmp_path, config):
    """The default config (cost-budgeted cadence, probes at train end) and probes inside the
    trainer's evaluation: the run is still the plain one."""
    plain, _ = pairs("trainer", "lora")
    watched = observer.run(tmp_path, trainer_kind="trainer", method="lora", monitor_config=config)
    assert observer.differences(plain, watched) == []
    steps = watched["monitor_steps"]
    assert steps[0] == 0 and steps[-1] == observer.MAX_STEPS
    if config:
        assert steps == [0, 2, 4, 6]  # every evaluation


def test_the_comparison_catches_a_monitor_that_draws_random_numbers(tmp_path, monkeypatch):
    """The suite's own check: a probe that draws one number from the global RNG changes the
    dropout masks after it, and the comparison says so."""
    from arena_callbacks.probes import ProbeRunner

    run = ProbeRunner.run

    def drawing(self, *args, **kwargs):
        torch.rand(1)
        return run(self, *args, **kwargs)

    plain = observer.run(tmp_path / "plain", method="full", monitored=False, report_to=())
    monkeypatch.setattr(ProbeRunner, "run", drawing)
    watched = observer.run(tmp_path / "watched", method="full", monitored=True, report_to=())
    diffs = observer.differences(plain, watched)
    assert "log_history" in diffs and any(d.startswith("weights/") for d in diffs)


def test_building_the_monitor_draws_no_random_numbers():
    """A script may build the monitor between seeding and creating its adapter."""
    from helpers import make_tokenizer

    from arena_callbacks import ForgettingMonitor

    states = (torch.random.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    ForgettingMonitor(observer.MONITOR, probes={"general": observer.GENERAL, "facts": observer.FACTS},
                      target=observer.TARGET, tokenizer=make_tokenizer())
    assert torch.equal(torch.random.get_rng_state(), states[0])
    assert random.getstate() == states[1]
    assert np.array_equal(np.random.get_state()[1], states[2])


def test_two_gloo_processes_run_the_same_with_and_without_the_monitor(tmp_path):
    pytest.importorskip("peft")
    from test_distributed import torchrun

    ranks = torchrun(tmp_path, "observer_worker.py", tmp_path, timeout=240)
    assert [r["rank"] for r in ranks] == [0, 1]
    assert all(r["world_size"] == 2 and r["backend"] == "gloo" for r in ranks)
    for rank in ranks:
        for name, rec in rank["records"].items():
            plain, watched = rec["plain"], rec["watched"]
            assert plain["world_size"] == watched["world_size"] == 2, name
            assert observer.differences(plain, watched) == [], name
            assert watched["monitor_steps"] == [0, 2, 4, 6], name
            assert [e["step"] for e in plain["log_history"] if "loss" in e] == [2, 4, 6], name
    # The ranks agree with each other too (synchronised DDP replicas, same monitor history).
    assert (
        ranks[0]["records"]["trainer-lora"]["watched"]["weights"]
        == ranks[1]["records"]["trainer-lora"]["watched"]["weights"]
    )
