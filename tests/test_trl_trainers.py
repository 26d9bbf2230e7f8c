"""The monitor on TRL's trainers: SFT (prompt-completion and conversational data, packing on and
off), DPO and GRPO, each a few real steps on the tiny model.

Every run uses TRL's own defaults for precision and memory, written out so the test says what
it runs: ``bf16=True`` (on the CPU: bf16 autocast around the model's forward, weights in fp32)
and ``gradient_checkpointing=True``. The monitor probes in fp32 (``probe.precision`` default):
its baseline and its last probe equal a plain fp32 ``ProbeRunner`` pass on the same weights,
which a bf16 pass does not.
"""

from __future__ import annotations

import copy

import pytest
import torch

trl = pytest.importorskip("trl")

from datasets import Dataset  # noqa: E402
from helpers import corpus, make_model, make_tokenizer  # noqa: E402

from arena_callbacks import ForgettingMonitor, ProbeRunner, ProbeSet, ProbeSettings  # noqa: E402
from arena_callbacks.history import read_history  # noqa: E402

GENERAL = [{"text": s} for s in corpus(8, seed=7)]
FACTS = [
    {"context": "red blue", "choices": [" green", " dog."], "answer": 0},
    {"context": "one two", "choices": [" three", " fish"], "answer": 0},
    {"context": "the cat", "choices": [" runs.", " nine"], "answer": 0},
]
TARGET = [{"prompt": "one two", "completion": " three four five."}]
PROBE = {"batch_size": 8, "max_length": 64}
MONITOR = {"cadence": {"every_n_steps": 2}, "probe": PROBE, "logging": {"tensorboard": False},
           "budgets": [{"key": "delta_nll/general", "max_rise": 5.0, "action": "log"}]}
MAX_STEPS = 4
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
# Keys every probe step must hold (probes 'general' and 'facts', and a target).
CORE_KEYS = {
    "nll/general", "delta_nll/general", "retention/general", "nll/facts", "score/facts", "retention/facts",
    "sp/stability", "target/nll", "sp/plasticity", "probe/seconds",
}


@pytest.fixture(scope="module")
def chat_tokenizer():
    tok = copy.deepcopy(make_tokenizer())  # the shared one stays without a template
    tok.chat_template = CHAT_TEMPLATE
    return tok


def common_args(out) -> dict:
    return dict(
        output_dir=str(out), max_steps=MAX_STEPS, per_device_train_batch_size=4, learning_rate=1e-2,
        report_to="none", save_strategy="no", use_cpu=True, seed=0, logging_steps=1, disable_tqdm=True,
        # TRL's defaults, explicit: bf16 autocast on the CPU, and gradient checkpointing.
        bf16=True, gradient_checkpointing=True,
    )


def fp32_runner(tok, precision: str = "fp32") -> ProbeRunner:
    settings = ProbeSettings(**PROBE, precision=precision)
    runner = ProbeRunner({n: ProbeSet.build(n, d, settings) for n, d in {"general": GENERAL, "facts": FACTS}.items()},
                         settings)
    runner.prepare(tok)
    return runner


def check_run(trainer, monitor, out, tok) -> None:
    assert trainer.state.global_step == MAX_STEPS
    # TRL's defaults were really in force while the monitor probed.
    model = trainer.model
    assert trainer.args.bf16 and model.is_gradient_checkpointing
    assert "_original_forward" in model.__dict__  # accelerate's bf16 autocast wrapper around forward
    assert next(model.parameters()).dtype == torch.float32

    snaps = monitor.history.snapshots
    assert [(s.step, s.trigger) for s in snaps] == [(0, "baseline"), (2, "step"), (4, "step")]
    on_disk = read_history(out / "arena")
    assert [s.step for s in on_disk] == [0, 2, 4]
    for mem, disk in zip(snaps, on_disk):
        assert CORE_KEYS <= set(mem.metrics) == set(disk.metrics)
        assert disk.metrics["nll/general"] == pytest.approx(mem.metrics["nll/general"])
    assert [bool(d) for d in monitor.history.decisions] == [False, True, True]  # budgets judged at each probe
    assert snaps[-1].metrics["nll/facts"] != snaps[0].metrics["nll/facts"]  # training moved the model
    logged = [h["step"] for h in trainer.state.log_history if "retention/general" in h]
    assert logged == [0, 2, 4]  # through the trainer's log too

    # Probe numbers under bf16=True equal a plain fp32 pass: at the baseline (initial weights)
    # and at the last probe (the final weights, no update after it).
    runner = fp32_runner(tok)
    base = runner.run(make_model(seed=0, vocab_size=len(tok)))
    final = runner.run(model)
    for snap, want in ((snaps[0], base), (snaps[-1], final)):
        for name in ("general", "facts"):
            assert snap.metrics[f"nll/{name}"] == pytest.approx(want[name].nll, rel=1e-6), (snap.step, name)
        assert snap.metrics["score/facts"] == want["facts"].score
    bf16 = fp32_runner(tok, precision="bf16").run(model)["general"].nll
    assert abs(bf16 - final["general"].nll) > 1e-5  # a bf16 pass would have been told apart


def monitor() -> ForgettingMonitor:
    return ForgettingMonitor(MONITOR, probes={"general": GENERAL, "facts": FACTS}, target=TARGET)


@pytest.mark.parametrize("packing", [False, True], ids=["unpacked", "packed"])
@pytest.mark.parametrize("data", ["prompt_completion", "conversational"])
def test_sft_trainer(tmp_path, chat_tokenizer, data, packing):
    if data == "prompt_completion":
        rows = [{"prompt": "one two", "completion": " three four five."}] * 32
    else:
        rows = [{"messages": [{"role": "user", "content": "one two"},
                              {"role": "assistant", "content": "three four five"}]}] * 32
    mon = monitor()
    cfg = trl.SFTConfig(**common_args(tmp_path), max_length=64, packing=packing)
    trainer = trl.SFTTrainer(model=make_model(seed=0, vocab_size=len(chat_tokenizer)), args=cfg,
                             train_dataset=Dataset.from_list(rows), processing_class=chat_tokenizer, callbacks=[mon])
    # The data went through TRL's own preparation: chat template, packing.
    first = chat_tokenizer.decode(trainer.train_dataset[0]["input_ids"])
    assert ("user: one two\nassistant: three four five" in first) == (data == "conversational")
    assert (len(trainer.train_dataset) < len(rows)) == packing
    trainer.train()
    check_run(trainer, mon, tmp_path, chat_tokenizer)


def test_dpo_trainer(tmp_path, chat_tokenizer):
    rows = [{"prompt": "one two", "chosen": " three four.", "rejected": " fish dog."}] * 32
    mon = monitor()
    cfg = trl.DPOConfig(**common_args(tmp_path), max_length=32)
    vocab = len(chat_tokenizer)
    # An explicit reference model: TRL would otherwise reload the policy from its (empty) hub path.
    trainer = trl.DPOTrainer(model=make_model(seed=0, vocab_size=vocab), ref_model=make_model(seed=0, vocab_size=vocab),
                             args=cfg, train_dataset=Dataset.from_list(rows), processing_class=chat_tokenizer,
                             callbacks=[mon])
    trainer.train()
    check_run(trainer, mon, tmp_path, chat_tokenizer)


def test_grpo_trainer(tmp_path, chat_tokenizer):
    def reward_length(completions, **kwargs):
        return [float(len(c)) for c in completions]

    mon = monitor()
    cfg = trl.GRPOConfig(**{**common_args(tmp_path), "per_device_train_batch_size": 2}, num_generations=2,
                         max_completion_length=4)
    trainer = trl.GRPOTrainer(model=make_model(seed=0, vocab_size=len(chat_tokenizer)), args=cfg,
                              train_dataset=Dataset.from_list([{"prompt": "one two"}] * 32),
                              processing_class=chat_tokenizer, reward_funcs=reward_length, callbacks=[mon])
    trainer.train()
    check_run(trainer, mon, tmp_path, chat_tokenizer)
