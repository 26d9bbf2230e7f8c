"""Room for rewinds: what kept states and a rewind's working copies need, checked at train start."""

from __future__ import annotations

import pytest
import torch
from helpers import corpus, pretrained_model

from arena_callbacks import ForgettingMonitor
from arena_callbacks.config import MonitorConfig, RewindConfig
from arena_callbacks.distributed import DistContext
from arena_callbacks.resources import ranks_per_node, rewind_plan
from arena_callbacks.rewind import path_rules
from arena_callbacks.rewinder import Rewinder
from arena_callbacks.shards import local_bytes, local_shapes, trainable_parameters

GiB = 2**30


def test_plan_counts_kept_and_working_copies_per_node(tmp_path):
    path = rewind_plan(GiB, RewindConfig(mode="path", storage="memory"), tmp_path, ranks=8,
                       memory_available=100 * GiB, disk_available=0)
    assert (path.kept, path.working, path.in_memory) == (2, 2, True)
    assert path.memory_bytes == 8 * (2 + 2) * GiB and path.disk_bytes == 0 and path.problem is None
    ckpt = rewind_plan(GiB, RewindConfig(mode="checkpoint", storage="disk"), tmp_path, ranks=2,
                       memory_available=100 * GiB, disk_available=100 * GiB)
    # On disk: the kept state in a file, read back (1) beside the state a later offer captures (1).
    assert (ckpt.kept, ckpt.working, ckpt.in_memory) == (1, 2, False)
    assert ckpt.memory_bytes == 2 * 2 * GiB and ckpt.disk_bytes == 2 * GiB and ckpt.problem is None


def test_auto_storage_goes_to_disk_when_memory_is_short_and_fails_when_both_are(tmp_path):
    cfg = RewindConfig(mode="path", storage="auto", max_memory_mb=4096)
    roomy = rewind_plan(GiB, cfg, tmp_path, ranks=1, memory_available=16 * GiB, disk_available=16 * GiB)
    assert roomy.in_memory and roomy.problem is None
    # 4 copies in memory do not fit in 3.5 GiB; on disk the peak is 2 working + 2 read back: still 4.
    tight = rewind_plan(GiB, cfg, tmp_path, ranks=1, memory_available=int(3.5 * GiB), disk_available=16 * GiB)
    assert not tight.in_memory and tight.memory_bytes == 4 * GiB
    assert tight.problem is not None and "4.00 GiB of host memory" in tight.problem and "3.50 GiB" in tight.problem
    big = rewind_plan(8 * GiB, cfg, tmp_path, ranks=1, memory_available=64 * GiB, disk_available=GiB)
    assert not big.in_memory  # larger than max_memory_mb
    assert big.problem is not None and "16.00 GiB of disk" in big.problem and "1.00 GiB is free" in big.problem


def test_memory_problem_names_the_numbers_and_the_fixes(tmp_path):
    plan = rewind_plan(3 * GiB, RewindConfig(mode="layerwise", storage="memory"), tmp_path, ranks=4,
                       memory_available=10 * GiB)
    assert plan.problem is not None
    for part in ("48.00 GiB of host memory", "4 rank(s)", "2 kept + 2 working", "3.00 GiB of trainable state",
                 "10.00 GiB is available", "rewind.storage: disk", "action 'stop'"):
        assert part in plan.problem


def test_ranks_per_node_reads_the_launchers_variable(monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert ranks_per_node(16) == 4
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert ranks_per_node(2) == 2 and ranks_per_node(1) == 1


def _monitor_config(storage: str = "memory") -> MonitorConfig:
    return MonitorConfig.from_dict({
        "budgets": [{"key": "delta_nll/general", "max_rise": 0.5, "action": "rewind"}],
        "rewind": {"mode": "path", "storage": storage},
        "logging": {"tensorboard": False},
    })


def test_setup_fails_at_train_start_with_the_numbers_when_memory_is_short(tmp_path, monkeypatch):
    import arena_callbacks.resources as resources

    model = pretrained_model()
    size = local_bytes(trainable_parameters(model))
    monkeypatch.setattr(resources, "host_memory_available", lambda: 3 * size)  # 4 copies needed
    with pytest.raises(ValueError, match="host memory") as e:
        Rewinder(_monitor_config(), DistContext(), tmp_path).setup(model)
    assert f"{4 * size / GiB:.2f} GiB" in str(e.value) and f"{3 * size / GiB:.2f} GiB is available" in str(e.value)
    # With room, the same setup keeps states in memory.
    monkeypatch.setattr(resources, "host_memory_available", lambda: 5 * size)
    rewinder = Rewinder(_monitor_config(), DistContext(), tmp_path)
    rewinder.setup(model)
    assert rewinder.best is not None and rewinder.best.in_memory
    assert rewinder.shapes == {n: tuple(p.shape) for n, p in trainable_parameters(model).items()}


def test_the_trainer_callback_refuses_before_any_probe(tmp_path, monkeypatch):
    """The check runs in on_train_begin, before the baseline pass (a collective forward)."""
    from helpers import make_tokenizer
    from transformers import TrainerControl, TrainerState, TrainingArguments

    import arena_callbacks.resources as resources

    monkeypatch.setattr(resources, "host_memory_available", lambda: 1024)
    monitor = ForgettingMonitor(_monitor_config().model_dump(), probes={"general": [{"text": t} for t in corpus(4)]})
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    with pytest.raises(ValueError, match="budgets: action 'rewind' needs"):
        monitor.on_train_begin(args, TrainerState(), TrainerControl(), model=pretrained_model(),
                               processing_class=make_tokenizer())
    assert not monitor.history.snapshots


def test_rules_agree_on_a_lora_b_whose_parts_differ():
    """A rank whose part of a non-zero ``B`` happens to be zero must still lerp it, as the others do."""
    theta0 = {"m.lora_B.default.weight": torch.zeros(4), "m.lora_A.default.weight": torch.ones(4)}
    assert path_rules(theta0)["m.lora_B.default.weight"] == "scale"
    agreed = path_rules(theta0, nonzero={"m.lora_B.default.weight": True})
    assert agreed == {"m.lora_B.default.weight": "lerp", "m.lora_A.default.weight": "lerp"}


def test_local_shapes_and_bytes_of_plain_parameters():
    model = torch.nn.Linear(3, 2).to(torch.bfloat16)
    params = trainable_parameters(model)
    assert local_shapes(params) == {"weight": (2, 3), "bias": (2,)}
    assert local_bytes(params) == (6 + 2) * 2
