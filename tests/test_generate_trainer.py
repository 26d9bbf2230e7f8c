"""A generative probe in a TRL ``SFTTrainer`` run: it sees a broken answer format that
teacher-forced NLL barely notices, and it leaves samples to look at.

The tiny model first learns a chat format in a few plain steps: ``user: <x>\\nassistant: <y>\\n``,
so greedy decoding writes ``<y>`` and then the newline that ends a turn. The finetune then
trains on answers that run on (``<y> and so on``): the answer itself stays as likely as before
(the teacher-forced probe's NLL of ``<y>`` barely moves), but the model no longer stops after
it, and the generated answer stops matching.
"""

from __future__ import annotations

import json

import pytest
import torch

trl = pytest.importorskip("trl")

from datasets import Dataset  # noqa: E402
from helpers import make_model, make_tokenizer  # noqa: E402

from arena_callbacks import ForgettingMonitor, Probe, ProbeRunner, ProbeSet, ProbeSettings  # noqa: E402
from arena_callbacks.samples import GenerationSamples  # noqa: E402

PAIRS = [("one two", "three four five"), ("red blue", "green"), ("the cat", "runs"), ("seven eight", "nine ten"),
         ("a bird", "sings"), ("four five", "six seven")]
GEN = [{"prompt": f"user: {x}\nassistant:", "answer": y} for x, y in PAIRS]
FORCED = [{"prompt": f"user: {x}\nassistant:", "completion": f" {y}"} for x, y in PAIRS]
PROBE = {"batch_size": 4, "max_length": 64, "samples": 2}
MAX_STEPS = 18


def gen_probe() -> Probe:
    return Probe(GEN, kind="generate", scorer="exact_match", max_new_tokens=8, stop=["\n"])


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def chat_state(tok):
    """The tiny model after a few steps on the chat format (the "pretrained" model here)."""
    torch.manual_seed(0)
    model = make_model(seed=0, vocab_size=len(tok)).train()
    enc = tok([f"user: {x}\nassistant: {y}\n" for x, y in PAIRS], padding=True, return_tensors="pt")
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(60):
        model(**enc, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    return {k: v.clone() for k, v in model.state_dict().items()}


def chat_model(tok, state):
    model = make_model(seed=0, vocab_size=len(tok))
    model.load_state_dict(state)
    return model.eval()


def test_a_broken_answer_format_drops_generative_retention_while_teacher_forced_nll_barely_moves(
        tmp_path, tok, chat_state):
    rows = [{"prompt": f"user: {x}\nassistant:", "completion": f" {y} and so on\n"} for x, y in PAIRS] * 6
    monitor = ForgettingMonitor(
        {"cadence": {"every_n_steps": 9}, "probe": PROBE, "logging": {"tensorboard": True},
         "budgets": [{"key": "retention/answers", "max_drop": 0.5, "action": "log"}]},
        probes={"answers": gen_probe(), "forced": FORCED},
    )
    cfg = trl.SFTConfig(
        output_dir=str(tmp_path), max_steps=MAX_STEPS, per_device_train_batch_size=4, learning_rate=1e-2,
        report_to="none", save_strategy="no", use_cpu=True, seed=0, logging_steps=1, disable_tqdm=True,
        bf16=True, gradient_checkpointing=True, max_length=64,  # TRL's defaults, written out
    )
    trainer = trl.SFTTrainer(model=chat_model(tok, chat_state), args=cfg, train_dataset=Dataset.from_list(rows),
                             processing_class=tok, callbacks=[monitor])
    trainer.train()
    first, last = monitor.history.snapshots[0].metrics, monitor.history.snapshots[-1].metrics
    assert [s.step for s in monitor.history.snapshots] == [0, 9, 18]
    # Before: every answer right and ended by the turn's newline.
    assert first["score/answers"] == 1.0 and first["gen/stopped/answers"] == 1.0
    # After: the answers run on, and the generative probe sees it ...
    assert last["score/answers"] <= 0.25 and last["retention/answers"] <= 0.25
    assert last["gen/length/answers"] > first["gen/length/answers"]
    assert monitor.history.decisions[-1]  # the budget on it breached
    # ... while the teacher-forced NLL of the same answers barely moves.
    assert abs(last["delta_nll/forced"]) < 0.1 and last["retention/forced"] > 0.9

    # The monitor decoded in fp32 under TRL's bf16 autocast: its last numbers are a plain fp32 pass's.
    settings = ProbeSettings(**PROBE)
    runner = ProbeRunner({"answers": ProbeSet.build("answers", gen_probe(), settings)}, settings)
    runner.prepare(tok)
    plain = runner.run(trainer.model)["answers"]
    assert plain.score == last["score/answers"] and plain.gen_length == last["gen/length/answers"]

    # Samples: the same rows at every step, the baseline's answers beside each step's.
    lines = [json.loads(x) for x in (tmp_path / "arena" / "generations.jsonl").read_text().splitlines()]
    assert [(r["step"], r["probe"], r["baseline"]) for r in lines] == [(0, "answers", True), (9, "answers", False),
                                                                      (18, "answers", False)]
    chosen = [[s["row"] for s in r["samples"]] for r in lines]
    assert len(chosen[0]) == 2 and chosen[0] == chosen[1] == chosen[2]
    for s0, s in zip(lines[0]["samples"], lines[-1]["samples"]):
        assert s0["generation"] == s0["baseline"] == s["baseline"] == " " + GEN[s["row"]]["answer"]
        assert s["generation"] != s["baseline"] and s["score"] == 0.0 and s["prompt"] == GEN[s["row"]]["prompt"]
    # ... and in TensorBoard, as a text table per probe step.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "runs" / "arena"), size_guidance={"tensors": 0})
    events.Reload()
    tables = events.Tensors("arena/generations/answers/text_summary")
    assert [t.step for t in tables] == [0, 9, 18]
    assert "baseline" in tables[-1].tensor_proto.string_val[0].decode()

    # A resumed run takes the baseline's answers back from the file.
    again = GenerationSamples(runner, tmp_path / "arena" / "generations.jsonl")
    again.start(fresh=False)
    assert sorted(again.baseline.values()) == sorted(s["generation"] for s in lines[0]["samples"])
