"""Generative probes: greedy decoding equal to ``model.generate``, scorers, keys and bad input."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import make_tokenizer, pretrained_model

from arena_callbacks import Probe, ProbeRunner, ProbeSet
from arena_callbacks.config import ProbeSettings
from arena_callbacks.exceptions import ProbeDataError
from arena_callbacks.measurements import build_snapshot, expected_keys
from arena_callbacks.probes.forward import Forwarder
from arena_callbacks.probes.generate import cut_at_stop, decode_batch, eos_ids
from arena_callbacks.probes.scorers import make_scorer, normalize

PROMPTS = ["one two three", "the cat", "seven eight nine ten eleven twelve", "red", "the dog jumps over the"]


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def model():
    return pretrained_model()


def _reference(model, tok, ids: list[int], max_new_tokens: int) -> list[int]:
    """``model.generate`` on one prompt alone (no padding), greedy, fp32."""
    out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id)
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("cache", [True, False], ids=["kv-cache", "no-cache"])
def test_greedy_decoding_equals_generate_token_for_token_in_a_batch_of_varied_lengths(model, tok, cache):
    ids = [tok(p)["input_ids"] for p in PROMPTS]
    assert len({len(i) for i in ids}) >= 4  # really varied lengths: left padding is exercised
    fwd = Forwarder.for_model(model, tok.pad_token_id)
    if not cache:
        fwd.cache_arg = None
    eos = eos_ids(model, tok)
    got = decode_batch(fwd, ids, max_new_tokens=12, eos=eos, stop=[], decode=tok.decode)
    for i, g in zip(ids, got):
        want = _reference(model, tok, i, 12)
        if want and want[-1] in eos:  # ended on its own: the end-of-sequence token is not part of the answer
            assert g.stopped and list(g.ids) == want[:-1]
        else:
            assert not g.stopped and list(g.ids) == want and len(g.ids) == 12
        assert g.text == tok.decode(list(g.ids))


def test_rows_end_on_the_end_of_sequence_token_and_leave_the_batch(model, tok):
    ids = [tok(p)["input_ids"] for p in PROMPTS]
    fwd = Forwarder.for_model(model, tok.pad_token_id)
    free = decode_batch(fwd, ids, max_new_tokens=10, eos=frozenset(), stop=[], decode=tok.decode)
    # Make the 3rd token of the first answer an end of sequence: that row stops after 2 tokens,
    # and the others, decoded on without it, are unchanged.
    eos = frozenset({free[0].ids[2]})
    got = decode_batch(fwd, ids, max_new_tokens=10, eos=eos, stop=[], decode=tok.decode)
    first = list(free[0].ids)
    assert got[0].stopped and list(got[0].ids) == first[:first.index(free[0].ids[2])]
    for g, f in zip(got[1:], free[1:]):
        cut = next((k for k, t in enumerate(f.ids) if t in eos), None)
        assert list(g.ids) == (list(f.ids) if cut is None else list(f.ids[:cut]))
        assert g.stopped == (cut is not None)


def test_stop_strings_cut_the_answer_and_count_as_stopping(model, tok):
    ids = [tok(p)["input_ids"] for p in PROMPTS]
    fwd = Forwarder.for_model(model, tok.pad_token_id)
    free = decode_batch(fwd, ids, max_new_tokens=10, eos=frozenset(), stop=[], decode=tok.decode)
    word = free[0].text.split()[1]  # a word the first answer writes
    got = decode_batch(fwd, ids, max_new_tokens=10, eos=frozenset(), stop=[word], decode=tok.decode)
    for g, f in zip(got, free):
        text, hit = cut_at_stop(f.text, [word])
        assert g.text == text and g.stopped == hit
        if hit:  # decoding ended on the token that completed the stop string
            assert len(g.ids) <= len(f.ids) and tok.decode(list(g.ids)).find(word) >= 0
    assert got[0].stopped


def test_cut_at_stop_takes_the_earliest_stop_string():
    assert cut_at_stop("a b. c\n", ["\n", "."]) == ("a b", True)
    assert cut_at_stop("abc", ["x"]) == ("abc", False)


# ------------------------------------------------------------------------------ scorers


def test_builtin_scorers_on_known_cases():
    exact, contains, last = (make_scorer(s) for s in ("exact_match", "contains", "last_number"))
    assert normalize("  The  Answer. ") == "the answer"
    assert exact("", " Paris.", {"answer": "paris"}) == 1.0 and exact("", "Paris, France", {"answer": "paris"}) == 0.0
    assert exact("", "rome", {"answer": ["Paris", "Rome"]}) == 1.0  # any of several targets
    assert contains("", "I think it is Paris, France", {"target": "paris"}) == 1.0
    assert contains("", "London", {"answer": "paris"}) == 0.0
    assert last("", "3 apples and 4 pears make 7.", {"answer": 7}) == 1.0
    assert last("", "so -1,234.50 in all", {"answer": "-1234.5"}) == 1.0
    assert last("", "7 then 8", {"answer": 7}) == 0.0 and last("", "no digits", {"answer": 7}) == 0.0
    regex = make_scorer({"regex": r"answer is (\w+)"})
    assert regex("", "the answer is Blue!", {"answer": "blue"}) == 1.0 and regex("", "blue", {"answer": "blue"}) == 0.0
    custom = make_scorer(lambda prompt, generation, row: float(len(generation) <= row["limit"]))
    assert custom("", "short", {"limit": 10}) == 1.0


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"scorer": "exact"}, "unknown scorer 'exact'; valid: \\['contains', 'exact_match', 'last_number'\\]"),
    ({"scorer": {"regex": "("}}, "does not compile"),
    ({"max_new_tokens": 0}, "max_new_tokens must be an integer of at least 1, got 0"),
    ({"stop": [""]}, "stop must be a list of non-empty strings"),
])
def test_bad_generation_settings_are_refused_with_the_field(kwargs, match):
    with pytest.raises(ProbeDataError, match=match) as e:
        ProbeSet.build("gen", Probe([{"prompt": "a", "answer": "b"}], kind="generate", **kwargs), ProbeSettings())
    assert "'gen'" in str(e.value)


def test_rows_need_the_target_their_scorer_compares_with():
    rows = [{"prompt": "a", "answer": "b"}, {"prompt": "c"}]
    with pytest.raises(ProbeDataError, match=r"row 1: missing field 'answer' \(or 'target'\)"):
        ProbeSet.build("gen", Probe(rows, kind="generate"), ProbeSettings())
    # A callable reads what it wants: no target needed.
    ProbeSet.build("gen", Probe(rows, kind="generate", scorer=lambda p, g, r: 1.0), ProbeSettings())
    with pytest.raises(ProbeDataError, match="messages end before the answer"):
        ProbeSet.build("gen", Probe([{"messages": [{"role": "user", "content": "hi"},
                                                   {"role": "assistant", "content": "yo"}], "answer": "x"}],
                                    kind="generate"), ProbeSettings())


def test_prompt_and_answer_must_fit_in_max_length(tok):
    probe = ProbeSet.build("gen", Probe([{"prompt": " ".join(["one"] * 20), "answer": "x"}], max_new_tokens=50),
                           ProbeSettings(max_length=64))
    runner = ProbeRunner({"gen": probe}, ProbeSettings(max_length=64))
    with pytest.raises(ProbeDataError, match="max_new_tokens=50 exceed probe.max_length=64"):
        runner.prepare(tok)


def test_kind_is_inferred_from_prompt_and_answer():
    probe = ProbeSet.build("gen", [{"prompt": "2+2=", "answer": 4}], ProbeSettings())
    assert probe.kind == "generate" and probe.signal == "score" and probe.generation.max_new_tokens == 64


# ------------------------------------------------------------------------------ in a probe pass


def _runner(tok, probes, batch_size=2):
    settings = ProbeSettings(batch_size=batch_size, max_length=64)
    runner = ProbeRunner({n: ProbeSet.build(n, d, settings) for n, d in probes.items()}, settings)
    runner.prepare(tok)
    return runner


def test_a_probe_pass_scores_what_the_model_writes(model, tok):
    free = _runner(tok, {"g": Probe([{"prompt": p, "answer": "-"} for p in PROMPTS], max_new_tokens=6)})
    free.run(model)
    answers = {ex: g.text for (_, ex), g in free.last_generations.items()}
    # Targets: the model's own answer for rows 0-2 (exact match 1), something else for 3-4.
    rows = [{"prompt": p, "answer": answers[i] if i < 3 else "zebra"} for i, p in enumerate(PROMPTS)]
    runner = _runner(tok, {"g": Probe(rows, max_new_tokens=6), "text": [{"text": "one two three four"}] * 3})
    results = runner.run(model)
    g = results["g"]
    assert g.kind == "generate" and g.score == pytest.approx(3 / 5) and g.examples == 5 and math.isnan(g.nll)
    assert [r[2] for r in g.rows] == [1.0, 1.0, 1.0, 0.0, 0.0]
    lengths = [len(x.ids) for x in runner.last_generations.values()]
    assert g.gen_length == pytest.approx(sum(lengths) / 5) and g.stopped == 0.0  # 6 tokens each, no stop
    metrics = build_snapshot(results, results, runner.probes)
    assert metrics["score/g"] == pytest.approx(0.6) and metrics["retention/g"] == 1.0
    assert metrics["gen/length/g"] == g.gen_length and metrics["gen/stopped/g"] == 0.0
    assert "nll/g" not in metrics and "delta_nll/g" not in metrics  # no teacher-forced NLL of one's own words
    want = set(expected_keys(runner.probes, has_target=False)) - {"probe/seconds"}
    assert want == {k for k in metrics if not k.startswith("stderr/")}
    # The teacher-forced probe beside it is untouched by the generative one.
    alone = _runner(tok, {"text": [{"text": "one two three four"}] * 3}).run(model)
    assert results["text"].nll == alone["text"].nll


def test_retention_follows_the_score_and_leaves_stability_when_the_baseline_scores_zero(model, tok):
    runner = _runner(tok, {"g": Probe([{"prompt": p, "answer": "zebra"} for p in PROMPTS], max_new_tokens=3),
                           "text": [{"text": "one two three four"}] * 3})
    base = runner.run(model)
    metrics = build_snapshot(base, base, runner.probes)
    assert metrics["score/g"] == 0.0 and math.isnan(metrics["retention/g"])
    assert metrics["sp/stability"] == metrics["retention/text"] == 1.0  # the NaN is not averaged in
