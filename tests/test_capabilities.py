"""Built-in capability sets: valid probe rows, deterministic, held out, described in the registry."""

from __future__ import annotations

import json
import re

import pytest
from helpers import make_chat_tokenizer, make_tokenizer

from arena_callbacks import ProbeRunner, ProbeSet, ProbeSettings
from arena_callbacks import capabilities as caps
from arena_callbacks.capabilities import CAPABILITIES, build_capabilities, build_capability, capability_probe
from arena_callbacks.models import default_cache_dir

KINDS = ("text", "multiple_choice", "completion", "generate")  # the probe kinds of arena_callbacks.probes
NAMES = sorted(CAPABILITIES)


@pytest.fixture(scope="module")
def chat_tokenizer():
    return make_chat_tokenizer()


def _key(row: dict) -> str:
    return json.dumps(row, sort_keys=True)


def _asked(row: dict) -> str:
    """What a row asks or shows, without the fixed prefix shared by every row."""
    if "text" in row:
        return row["text"]
    if "choices" in row:
        return row["context"].rsplit("Question: ", 1)[1]
    if "instruction" in row or "answer" in row:  # chat rows (and the generative ones): the whole prompt
        return row["prompt"]
    return row["prompt"].rsplit("\n", 1)[-1]


# --------------------------------------------------------------------------------------
# Valid rows
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_rows_are_valid_probe_rows_of_the_declared_kind(name, chat_tokenizer):
    cap = CAPABILITIES[name]
    rows = build_capability(name, tokenizer=chat_tokenizer)
    assert len(rows) == cap.default_size
    data = capability_probe(name, tokenizer=chat_tokenizer)  # rows and the set's probe options (generative sets)
    probe = ProbeSet.build(name, data, ProbeSettings())
    assert probe.kind == cap.kind
    assert len(probe.rows) == min(len(rows), ProbeSettings().max_examples)
    # ...and they tokenise within the default max_length, even with a tiny byte-level tokenizer.
    settings = ProbeSettings(max_examples=None)
    runner = ProbeRunner({name: ProbeSet.build(name, data, settings)}, settings)
    runner.prepare(chat_tokenizer)
    assert len({s.example for s in runner.sequences(name)}) == len(rows)


def test_build_capabilities_gives_every_teacher_forced_set_by_default():
    sets = build_capabilities(n=4, seed=1)
    assert list(sets) == [n for n, c in CAPABILITIES.items() if not c.generative]  # generative ones by name
    assert all(len(rows) == 4 for rows in sets.values())
    assert sets["arithmetic"] == build_capability("arithmetic", n=4, seed=1)
    assert list(build_capabilities(["world_knowledge", "general_text"], n=2)) == ["world_knowledge", "general_text"]


def test_passages_are_short_prose_and_code():
    for text in caps.text_passages("probe"):
        assert caps.MIN_CHARS <= len(text) <= caps.MAX_CHARS and caps._pieces(text) <= caps.MAX_PIECES
        assert text[0].isupper() and text.endswith((".", "!", "?")) and "\n" not in text and "::=" not in text
    for code in caps.code_passages("probe"):
        assert caps.MIN_CHARS <= len(code) <= caps.MAX_CHARS and caps._pieces(code) <= caps.MAX_PIECES
        assert re.match(r"(async def|def|class) ", code) and code.count("\n") >= 2


def test_world_knowledge_rows_point_at_the_right_answer():
    rows = build_capability("world_knowledge", n=len(caps.FACTS))
    facts = {q: (a, set(d)) for _, q, a, d in caps.FACTS}
    positions = set()
    for row in rows:
        question = row["context"].rsplit("Question: ", 1)[1].removesuffix("\nAnswer:")
        answer, distractors = facts[question]
        assert row["choices"][row["answer"]] == f" {answer}"
        assert {c.strip() for c in row["choices"]} == {answer} | distractors and len(row["choices"]) == 4
        assert row["context"].startswith("Question: How many wheels does a bicycle have?\nAnswer: two\n\n")
        positions.add(row["answer"])
    assert positions == {0, 1, 2, 3}  # the correct choice is not always in the same place


def test_arithmetic_answers_are_correct():
    for row in build_capability("arithmetic", n=caps.CAPABILITIES["arithmetic"].available()):
        a, op, b = row["prompt"].rsplit("\n", 1)[1].removesuffix(" =").split()
        expected = int(a) + int(b) if op == "+" else int(a) * int(b)
        assert row["completion"] == f" {expected}" and op == row["operation"]
        assert 1 <= int(a) <= 9 and 1 <= int(b) <= 9


def test_instruction_following_uses_the_chat_template_and_its_end_of_turn(chat_tokenizer):
    rows = build_capability("instruction_following", n=30, tokenizer=chat_tokenizer)
    assert {r["instruction"] for r in rows} == {"repeat", "only_word", "uppercase"}
    for row in rows:
        assert row["prompt"].startswith("<s>user\n") and row["prompt"].endswith("</s>\n<s>assistant\n")
        assert row["prompt"].count("<s>user\n") == 2  # one worked example, then the instruction
        assert row["completion"].endswith("</s>")
        instruction = row["prompt"].rsplit("<s>user\n", 1)[1].split("</s>", 1)[0]
        reply = row["completion"].removesuffix("</s>")
        if row["instruction"] == "repeat":
            assert instruction == f"Repeat exactly: {reply}"
        elif row["instruction"] == "only_word":
            assert instruction == f"Reply with only the word {reply}."
        else:
            assert instruction == f"Write the word {reply.lower()} in capital letters." and reply.isupper()


def test_instruction_following_without_a_chat_template_uses_a_plain_format():
    for tok in (None, make_tokenizer()):
        row = build_capability("instruction_following", n=1, tokenizer=tok)[0]
        assert row["prompt"].startswith("User: ") and row["prompt"].endswith("\nAssistant:")
        assert row["completion"].startswith(" ") and row["completion"].endswith("\n")


# --------------------------------------------------------------------------------------
# Deterministic
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_same_seed_same_rows_other_seed_other_rows(name, chat_tokenizer):
    a = build_capability(name, n=16, seed=0, tokenizer=chat_tokenizer)
    assert a == build_capability(name, n=16, seed=0, tokenizer=chat_tokenizer)
    b = build_capability(name, n=16, seed=1, tokenizer=chat_tokenizer)
    assert {_key(r) for r in a} != {_key(r) for r in b}  # another sample
    # The whole pool: the same rows in another order (multiple choice: choices reshuffled too).
    full = CAPABILITIES[name].available()
    if full <= 200:
        x, y = build_capability(name, n=full, seed=0), build_capability(name, n=full, seed=2)
        assert [_asked(r) for r in x] != [_asked(r) for r in y]
        assert sorted(_asked(r) for r in x) == sorted(_asked(r) for r in y)


def test_rows_do_not_depend_on_process_state():
    """String seeds, no hash(): the same rows in a fresh interpreter (PYTHONHASHSEED differs)."""
    import subprocess
    import sys

    # The module imports nothing from the package, so it loads alone (without torch: fast).
    code = (
        "import importlib.util, json, sys; "
        f"spec = importlib.util.spec_from_file_location('caps', {caps.__file__!r}); "
        "m = importlib.util.module_from_spec(spec); sys.modules['caps'] = m; spec.loader.exec_module(m); "
        "print(json.dumps({n: m.build_capability(n, n=5, seed=3) for n in m.CAPABILITIES}, sort_keys=True))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONHASHSEED": "123", "PATH": ""})
    here = {n: build_capability(n, n=5, seed=3) for n in CAPABILITIES}
    assert json.loads(out.stdout) == json.loads(json.dumps(here, sort_keys=True))


# --------------------------------------------------------------------------------------
# Held out
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_no_duplicated_rows(name, chat_tokenizer):
    rows = build_capability(name, n=CAPABILITIES[name].available(), tokenizer=chat_tokenizer)
    assert len({_key(r) for r in rows}) == len(rows)
    assert len({_asked(r) for r in rows}) == len(rows)


def test_probe_passages_never_appear_in_the_train_split():
    for passages in (caps.text_passages, caps.code_passages):
        probe, train = set(passages("probe")), set(passages("train"))
        assert probe and train and not probe & train
    # By source: probe passages come only from probe topics and probe modules.
    from pydoc_data.topics import topics

    probe_topics = [k for k in topics if caps._split_of(k) == "probe"]
    assert 0 < len(probe_topics) < len(topics) / 2
    from_probe_topics = {t for k in probe_topics for t in caps._prose_paragraphs(topics[k])}
    assert set(caps.text_passages("probe")) == from_probe_topics
    stdlib = caps._stdlib()
    from_probe_modules = {c for m in caps.CODE_PROBE_MODULES for c in caps._code_chunks((stdlib / m).read_text())}
    assert set(caps.code_passages("probe")) == from_probe_modules


def test_worked_examples_are_never_asked(chat_tokenizer):
    shots = {f"{a} {op} {b} =" for a, op, b in caps.ARITHMETIC_SHOTS}
    assert not shots & {r["prompt"].rsplit("\n", 1)[1] for r in build_capability("arithmetic", n=160)}
    questions = {q for _, q, _, _ in caps.FACTS}
    assert not questions & {q for q, _ in caps.WORLD_KNOWLEDGE_SHOTS}
    demos = {q for q, _ in caps._DEMOS.values()}
    assert not demos & {i for _, i, _ in caps._instruction_pool()}
    from arena_callbacks.capabilities import formats, word_problems

    for module, pool in ((word_problems, caps._word_problem_pool()), (formats, caps._format_pool())):
        assert not {q for q, _ in module._DEMOS.values()} & {q for _, q, _ in pool}


# --------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------


def test_registry_metadata_is_complete():
    assert set(NAMES) >= {"general_text", "python_code", "world_knowledge", "arithmetic", "instruction_following"}
    for name, cap in CAPABILITIES.items():
        assert cap.name == name and "/" not in name
        assert cap.kind in KINDS
        assert cap.description and cap.provenance and cap.license
        assert 32 <= cap.default_size <= cap.available()
    chat = {"instruction_following", "word_problems", "format_following"}
    assert all(CAPABILITIES[n].uses_tokenizer for n in chat)
    assert not any(c.uses_tokenizer for n, c in CAPABILITIES.items() if n not in chat)
    assert {n for n, c in CAPABILITIES.items() if c.generative} == {n for n, c in CAPABILITIES.items()
                                                                     if c.kind == "generate"}


def test_bad_requests_say_what_would_work():
    with pytest.raises(KeyError, match=r"'nope' is not built in; known: \['arithmetic'"):
        build_capability("nope")
    with pytest.raises(ValueError, match="n must be a positive integer, got 0"):
        build_capability("arithmetic", n=0)
    with pytest.raises(ValueError, match=r"n=1000 is more than the 160 distinct rows it has"):
        build_capability("arithmetic", n=1000)


SMOLLM2 = default_cache_dir() / "smollm2-135m-instruct"


@pytest.mark.skipif(not (SMOLLM2 / "tokenizer.json").is_file(), reason="SmolLM2 not converted on this machine")
def test_passages_fit_in_64_smollm2_tokens():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(SMOLLM2)
    for text in caps.text_passages("probe") + caps.code_passages("probe"):
        assert len(tok(text)["input_ids"]) <= 64
