"""Geometry keys live in a real Trainer run: reference modes, budgets, TensorBoard."""

import pytest
from helpers import TARGET_TEXT, pretrained_model
from test_trainer_integration import GENERAL, scalars
from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

from arena_callbacks import BudgetKeyError, ForgettingMonitor


def run(tokenizer, tmp_path, model, geometry, budgets, max_steps=20, report_to=("tensorboard",)):
    monitor = ForgettingMonitor(
        {"cadence": {"every_n_steps": 2}, "geometry": geometry, "budgets": budgets}, probes={"general": GENERAL}
    )
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=max_steps, per_device_train_batch_size=8,
                             learning_rate=2e-2, report_to=list(report_to), use_cpu=True, save_strategy="no", seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=[tokenizer(TARGET_TEXT)] * 64, processing_class=tokenizer,
                      data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False), callbacks=[monitor])
    trainer.train()
    return trainer, monitor


@pytest.mark.parametrize("method", ["full", "lora"])
def test_geometry_budget_stops_and_keys_reach_tensorboard(tokenizer, tmp_path, method):
    model = pretrained_model()
    if method == "lora":
        peft = pytest.importorskip("peft")
        model = peft.get_peft_model(model, peft.LoraConfig(r=8, target_modules="all-linear"))
    budget = {"key": "geometry/procrustes/max", "max_value": 0.4, "patience": 2}
    trainer, monitor = run(tokenizer, tmp_path, model, {"enabled": True, "tokens_per_module": 256}, [budget])
    g = monitor.geometry
    assert g.reference_mode == ("disable_adapter" if method == "lora" else "cache")
    assert g.module_names == ["model.layers.0.mlp.down_proj", "model.layers.1.self_attn.o_proj",
                              "model.layers.1.mlp.down_proj", "model.norm"]
    base = monitor.history.snapshots[0].metrics
    # At the baseline the model is its own reference: exact (to rounding) for disable_adapter, bf16 cache noise
    # otherwise.
    tol = 1e-6 if method == "lora" else 1e-2  # 1e-6: the nuclear-norm identity cancels to ~1e-8
    assert base["geometry/procrustes/max"] <= tol and base["geometry/cka/min"] >= 1 - 1e-6 - tol
    assert base["geometry/cache_mb"] == (0.0 if method == "lora" else pytest.approx(4 * 256 * 32 * 2 / 2**20))
    # The budget fired on the geometry key and stopped the run where the history says.
    stop = monitor.stop_decision
    assert stop is not None and stop.outcomes[0].key == "geometry/procrustes/max"
    assert trainer.state.global_step == stop.step < 20
    assert stop.outcomes[0].value > 0.4
    # Distortion grows with forgetting over the run.
    last = monitor.history.snapshots[-1].metrics
    assert last["delta_nll/general"] > 0 and last["geometry/procrustes/mean"] > base["geometry/procrustes/mean"]
    if method == "full":
        # The cache's own products were formed once (reference_stats) and reused: the last
        # snapshot equals the metrics with every product formed from the cache and the last capture.
        from arena_callbacks.distributed import DistContext
        from arena_callbacks.geometry import aggregate, geometry_metrics

        assert set(g.cache_stats) == set(g.module_names)
        current, ref = g.capture.collect(DistContext()), {n: x.float() for n, x in g.cache.items()}
        formed = aggregate({n: geometry_metrics(ref[n], current[n]) for n in g.module_names})
        assert {k: last[k] for k in formed} == pytest.approx(formed, rel=1e-9, abs=1e-12)
    tags = scalars(str(tmp_path / "runs"))
    for key in ("geometry/procrustes/model.norm", "geometry/cka/mean", "geometry/gram/max", "retention/general"):
        assert [s for s, _ in sorted(tags[key])] == [s.step for s in monitor.history], key


def test_geometry_errors_at_train_start(tokenizer, tmp_path):
    with pytest.raises(BudgetKeyError, match=r"'geometry/procrustes/layers.7' is not measured"):
        run(tokenizer, tmp_path, pretrained_model(), {"enabled": True},
            [{"key": "geometry/procrustes/layers.7", "max_value": 0.2}], report_to=())
    with pytest.raises(ValueError, match=r"geometry.max_cache_mb: the baseline activation cache needs"):
        run(tokenizer, tmp_path, pretrained_model(), {"enabled": True, "max_cache_mb": 0.001}, [], report_to=())
    with pytest.raises(ValueError, match=r"geometry.reference: 'disable_adapter' needs a PEFT model"):
        run(tokenizer, tmp_path, pretrained_model(), {"enabled": True, "reference": "disable_adapter"}, [],
            report_to=())
    # Before the model is known, a geometry key needs geometry switched on.
    with pytest.raises(BudgetKeyError, match="is not measured"):
        ForgettingMonitor(budgets=[{"key": "geometry/cka/min", "min_value": 0.9}], probes={"general": GENERAL})


@pytest.mark.parametrize("method", ["full", "lora", "oft"])
def test_spectra_on_their_own_cadence(tokenizer, tmp_path, method):
    model = pretrained_model()
    if method != "full":
        peft = pytest.importorskip("peft")
        cfg = (peft.LoraConfig(r=4, target_modules=["down_proj", "o_proj"]) if method == "lora"
               else peft.OFTConfig(r=0, oft_block_size=8, target_modules=["down_proj", "o_proj"],
                                   use_cayley_neumann=False))
        model = peft.get_peft_model(model, cfg)
    monitor = ForgettingMonitor(
        {
            "cadence": {"every_n_steps": 2},
            "logging": {"tensorboard": False},
            "spectra": {
                "enabled": True,
                "every_n_steps": 4,
                "modules": ["layers.1.mlp.down_proj", "layers.0.self_attn.o_proj"],
            },
            "budgets": [{"key": "spectral/rel_update_fro/max", "max_value": 1e-3, "patience": 2, "action": "log"}],
        },
        probes={"general": GENERAL},
    )
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=8, per_device_train_batch_size=8, learning_rate=1e-2,
                             report_to=[], use_cpu=True, save_strategy="no", seed=0)
    Trainer(model=model, args=args, train_dataset=[tokenizer(TARGET_TEXT)] * 64, processing_class=tokenizer,
            data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False), callbacks=[monitor]).train()
    layers = ["model.layers.1.mlp.down_proj", "model.layers.0.self_attn.o_proj"]
    steps = {s.step: s.metrics for s in monitor.history}
    assert sorted(steps) == [0, 2, 4, 6, 8]
    measured = [st for st, m in steps.items() if "spectral/rel_update_fro/max" in m]
    assert measured == [0, 4, 8]  # baseline and every 4th step only
    for layer in layers:
        assert steps[0][f"spectral/rel_update_fro/{layer}"] == 0.0
        assert steps[8][f"spectral/rel_update_fro/{layer}"] > 0
    if method == "oft":
        # An orthogonal multiplicative update keeps the spectrum: no intruders, Σ unchanged.
        assert steps[8]["spectral/intruders/max"] == 0.0
    # Patience counts measured steps only: breached at 4 and 8 → the log action fires at 8.
    fired = [d.get("action") for d in monitor.history.decisions]
    assert fired == [None, None, None, None, "log"]
