"""The generative capability sets (word_problems, format_following): rows, rules, probe options, a real pass."""

from __future__ import annotations

import re

import pytest
from helpers import make_chat_tokenizer, make_model, make_tokenizer

from arena_callbacks import Probe, ProbeRunner, ProbeSet, ProbeSettings
from arena_callbacks.capabilities import (
    CAPABILITIES,
    RULES,
    build_capabilities,
    build_capability,
    capability_probe,
    follows_format,
    formats,
    word_problems,
)
from arena_callbacks.distributed import DistContext
from arena_callbacks.monitor_file import load_monitor_file
from arena_callbacks.probes.scorers import make_scorer

GENERATIVE = ("word_problems", "format_following")


@pytest.fixture(scope="module")
def chat_tokenizer():
    return make_chat_tokenizer()


def _question(prompt: str) -> str:
    """The asked question of a chat-rendered row (the last user turn)."""
    return prompt.rsplit("<s>user\n", 1)[1].split("</s>", 1)[0]


# --------------------------------------------------------------------------------------
# Registry and probe options
# --------------------------------------------------------------------------------------


def test_registered_as_generative_sets_with_their_probe_options(chat_tokenizer):
    for name in GENERATIVE:
        cap = CAPABILITIES[name]
        assert cap.kind == "generate" and cap.generative and cap.uses_tokenizer
        probe = capability_probe(name, n=12, seed=0, tokenizer=chat_tokenizer)
        assert isinstance(probe, Probe) and probe.kind == "generate"
        assert probe.data == build_capability(name, n=12, seed=0, tokenizer=chat_tokenizer)
        assert list(probe.stop) == ["</s>"]  # the template's end of turn
        assert 16 <= probe.max_new_tokens <= 48
        built = ProbeSet.build(name, probe, ProbeSettings(max_examples=None))
        assert built.kind == "generate" and len(built.rows) == 12
    assert capability_probe("word_problems", n=2).scorer == "last_number"
    assert capability_probe("format_following", n=2).scorer is follows_format
    # Without a chat template: the plain format, whose turns end at the line's end.
    assert list(capability_probe("format_following", n=2, tokenizer=make_tokenizer()).stop) == ["\n"]
    # The teacher-forced sets carry no options: the same Probe as their rows alone.
    assert not CAPABILITIES["arithmetic"].generative and CAPABILITIES["arithmetic"].options() == {}
    assert capability_probe("arithmetic", n=3) == Probe(build_capability("arithmetic", n=3))
    # Overrides win.
    assert capability_probe("word_problems", n=2, max_new_tokens=5).max_new_tokens == 5


def test_build_capabilities_gives_generative_sets_as_probes_and_the_others_as_rows():
    sets = build_capabilities(["arithmetic", "word_problems", "format_following"], n=4, seed=1)
    assert sets["arithmetic"] == build_capability("arithmetic", n=4, seed=1)
    for name in GENERATIVE:
        assert sets[name] == capability_probe(name, n=4, seed=1)
    assert not set(GENERATIVE) & set(build_capabilities(n=2))  # only by name: they cost the most


def test_a_monitor_file_gives_the_set_with_its_scorer(tmp_path, chat_tokenizer):
    spec = load_monitor_file(tmp_path / "m.yaml", tokenizer=chat_tokenizer, data={"probes": {
        "formats": {"capability": "format_following", "n": 6, "seed": 2},
        "math": {"capability": "word_problems", "n": 4, "max_new_tokens": 12},
    }})
    assert spec.probes["formats"] == capability_probe("format_following", n=6, seed=2, tokenizer=chat_tokenizer)
    math = spec.probes["math"]
    assert math.scorer == "last_number" and math.max_new_tokens == 12 and list(math.stop) == ["</s>"]


# --------------------------------------------------------------------------------------
# Rows: deterministic, correct, held out
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", GENERATIVE)
def test_rows_follow_the_seed(name, chat_tokenizer):
    a = build_capability(name, n=24, seed=0, tokenizer=chat_tokenizer)
    assert a == build_capability(name, n=24, seed=0, tokenizer=chat_tokenizer)
    b = build_capability(name, n=24, seed=1, tokenizer=chat_tokenizer)
    assert [r["prompt"] for r in a] != [r["prompt"] for r in b]
    full = CAPABILITIES[name].available()
    x, y = (build_capability(name, n=full, seed=s, tokenizer=chat_tokenizer) for s in (0, 3))
    assert sorted(r["prompt"] for r in x) == sorted(r["prompt"] for r in y)  # the same pool, another order
    assert len({r["prompt"] for r in x}) == full  # no row twice


@pytest.mark.parametrize("name", GENERATIVE)
def test_rows_are_balanced_across_families(name):
    field = "operation" if name == "word_problems" else "instruction"
    rows = build_capability(name, n=32)
    counts = {}
    for r in rows:
        counts[r[field]] = counts.get(r[field], 0) + 1
    families = {f for f, *_ in (word_problems._word_problem_pool() if name == "word_problems"
                                else formats._format_pool())}
    assert set(counts) == families and max(counts.values()) - min(counts.values()) <= 1


def test_word_problem_answers_are_right_and_small(chat_tokenizer):
    rows = build_capability("word_problems", n=CAPABILITIES["word_problems"].available(), tokenizer=chat_tokenizer)
    for row in rows:
        question = _question(row["prompt"])
        assert question.endswith(" Answer with the calculation.")
        a, b = (int(x) for x in re.findall(r"\d+", question))
        want = {"add": a + b, "subtract": a - b, "multiply": a * b, "divide": a // b}[row["operation"]]
        assert row["operation"] != "divide" or a % b == 0
        assert row["answer"] == want and 1 <= want <= 25
        assert row["prompt"].count("<s>user\n") == 2  # one worked example first
        demo_q, demo_a = word_problems._DEMOS[row["operation"]]
        assert f"<s>user\n{demo_q}</s>\n<s>assistant\n{demo_a}</s>" in row["prompt"]
        assert make_scorer("last_number")("", demo_a, {"answer": demo_a.rsplit("=", 1)[1]}) == 1.0
    demos = {q for q, _ in word_problems._DEMOS.values()}
    assert not demos & {_question(r["prompt"]) for r in rows}


def test_format_rows_carry_what_their_rule_needs(chat_tokenizer):
    rows = build_capability("format_following", n=CAPABILITIES["format_following"].available(),
                            tokenizer=chat_tokenizer)
    assert {r["instruction"] for r in rows} == set(RULES)
    for row in rows:
        question = _question(row["prompt"])
        if row["instruction"] == "word_count":
            assert f"exactly {['one word', 'two words', 'three words'][row['words'] - 1]}." in question
        elif row["instruction"] in ("avoid_word", "start_with"):
            assert f'the word "{row["word"]}".' in question
    demos = {q for q, _ in formats._DEMOS.values()}
    assert not demos & {_question(r["prompt"]) for r in rows}


def test_plain_format_without_a_chat_template():
    for tok in (None, make_tokenizer()):
        for name in GENERATIVE:
            row = build_capability(name, n=1, tokenizer=tok)[0]
            assert row["prompt"].startswith("User: ") and row["prompt"].endswith("\nAssistant:")
            assert row["prompt"].count("\nAssistant:") == 2


# --------------------------------------------------------------------------------------
# The rules, each both ways
# --------------------------------------------------------------------------------------

CASES = [
    # (row, reply, kept?)
    ({"instruction": "word_count", "words": 1}, "Paris.", True),
    ({"instruction": "word_count", "words": 1}, "The city of Paris.", False),
    ({"instruction": "word_count", "words": 2}, "Probably autumn.", True),
    ({"instruction": "word_count", "words": 2}, "Autumn", False),
    ({"instruction": "word_count", "words": 3}, "I don't know!", True),  # an apostrophe stays in its word
    ({"instruction": "word_count", "words": 3}, "Red, blue, green and gold.", False),
    ({"instruction": "uppercase"}, "I LIKE AUTUMN, 2 TIMES!", True),
    ({"instruction": "uppercase"}, "I LIKE Autumn.", False),
    ({"instruction": "uppercase"}, "42", False),  # no letters: not a reply in capitals
    ({"instruction": "lowercase"}, "i like autumn best.", True),
    ({"instruction": "lowercase"}, "I like autumn best.", False),
    ({"instruction": "avoid_word", "word": "sun"}, "A bright star, sunny and warm.", True),  # a whole word only
    ({"instruction": "avoid_word", "word": "sun"}, "The Sun is bright.", False),  # in any case
    ({"instruction": "start_with", "word": "Yes"}, '"yes, it is."', True),
    ({"instruction": "start_with", "word": "Yes"}, "Well, yes.", False),
    ({"instruction": "number_only", }, " 4.", True),
    ({"instruction": "number_only"}, "3.5", True),
    ({"instruction": "number_only"}, "4 legs", False),
    ({"instruction": "number_only"}, "four", False),
]


@pytest.mark.parametrize("row, reply, kept", CASES, ids=[f"{r['instruction']}-{k}-{i}" for i, (r, _, k) in
                                                       enumerate(CASES)])
def test_each_rule_both_ways(row, reply, kept):
    assert follows_format("prompt", reply, row) == float(kept)


def test_every_rule_has_cases_both_ways_and_its_worked_example_keeps_it():
    assert {(r["instruction"], k) for r, _, k in CASES} == {(rule, k) for rule in RULES for k in (True, False)}
    rows = {r["instruction"]: r for r in build_capability("format_following", n=CAPABILITIES["format_following"]
                                                          .available())}
    fields = {"word_count": {"words": 2}, "avoid_word": {"word": "roof"}, "start_with": {"word": "Well"}}
    for rule, (_, reply) in formats._DEMOS.items():
        assert follows_format("", reply, {"instruction": rule, **fields.get(rule, {})}) == 1.0
        assert rule in rows


def test_empty_replies_keep_no_rule_and_unknown_rules_are_named():
    for rule in RULES:
        assert follows_format("", "  ", {"instruction": rule, "word": "x", "words": 1}) == 0.0
    with pytest.raises(ValueError, match=r"no known rule in 'instruction' \(got 'shout'"):
        follows_format("", "HI", {"instruction": "shout"})


# --------------------------------------------------------------------------------------
# A real pass
# --------------------------------------------------------------------------------------


def test_a_probe_pass_on_a_small_model_writes_and_scores_every_row(chat_tokenizer):
    # The tiny Llama of the helpers; its random weights do (helpers.pretrained_model would cost a
    # pretraining run here): what is checked is the pass and the scoring, not what it knows.
    model = make_model(seed=0)
    settings = ProbeSettings(batch_size=8, max_examples=None, max_length=512, progress_bar=False)
    probes = {name: ProbeSet.build(name, capability_probe(name, n=6, seed=0, tokenizer=chat_tokenizer,
                                                          max_new_tokens=6), settings) for name in GENERATIVE}
    runner = ProbeRunner(probes, settings)
    runner.prepare(chat_tokenizer)
    results = runner.run(model, DistContext())
    for name, probe in probes.items():
        r = results[name]
        assert r.kind == "generate" and r.examples == 6 and 0.0 <= r.score <= 1.0
        assert 0 < r.gen_length <= 6 and 0.0 <= r.stopped <= 1.0
        scorer = make_scorer(capability_probe(name, n=1).scorer)
        row_scores = [runner.last_row_scores[(name, i)] for i in range(6)]
        assert all(s in (0.0, 1.0) for s in row_scores) and r.score == pytest.approx(sum(row_scores) / 6)
        for i, row in enumerate(probe.rows):  # each score is the set's scorer on what the model wrote
            assert row_scores[i] == scorer(row["prompt"], runner.last_generations[(name, i)].text, row)
