"""lm-eval tasks as probes: rows built from lm-eval's own requests, and the same log-likelihoods
as lm-eval's ``HFLM`` on the same (tiny, in-memory) model. Offline: local task YAML files."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("lm_eval")

from helpers import corpus, make_model  # noqa: E402

from arena_callbacks import ForgettingMonitor, ProbeDataError, ProbeRunner, ProbeSet, ProbeSettings  # noqa: E402
from arena_callbacks.integrations.lm_eval import lm_eval_probes, rows_from_task  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SHIPPED = REPO / "integrations" / "lm_eval"
SETTINGS = ProbeSettings(batch_size=8, max_length=256)

MC_TRAIN = [
    {"q": "one two", "opts": ["three", "fish"], "gold": 0},
    {"q": "red blue", "opts": ["green", "dog"], "gold": 0},
    {"q": "the dog", "opts": ["runs.", "nine"], "gold": 0},
]
MC_TEST = [
    {"q": "the cat", "opts": ["runs.", "nine", "bird"], "gold": 2},
    {"q": "seven eight", "opts": ["nine", "river", "sings"], "gold": 0},
    {"q": "a fish reads", "opts": ["text.", "code", "four five"], "gold": 1},
    {"q": "the mountain is", "opts": ["blue", "green", "red"], "gold": 2},
    {"q": "one two three", "opts": ["four", "ten", "cat"], "gold": 0},
]
LL_TEST = [{"q": "one two three", "a": "four five"}, {"q": "the cat", "a": "runs."}, {"q": "red", "a": "blue green"}]
TEXT_TEST = [{"text": s} for s in corpus(4, seed=5)]
TASK_NAMES = ["t_mc", "t_mc_str", "t_ll", "t_gen", "t_text"]


def _write_tasks(folder: Path) -> Path:
    def jsonl(name: str, rows: list[dict]) -> str:
        path = folder / name
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        return str(path)

    mc_train, mc_test = jsonl("mc_train.jsonl", MC_TRAIN), jsonl("mc_test.jsonl", MC_TEST)
    ll, text = jsonl("ll.jsonl", LL_TEST), jsonl("text.jsonl", TEXT_TEST)
    tasks = {
        # Two-shot multiple choice from a train split, a custom context and target delimiter.
        "t_mc": f"""
task: t_mc
dataset_path: json
dataset_kwargs:
  data_files: {{train: {mc_train}, test: {mc_test}}}
training_split: train
fewshot_split: train
test_split: test
output_type: multiple_choice
doc_to_text: "Q: {{{{q}}}}\\nA:"
doc_to_choice: opts
doc_to_target: gold
num_fewshot: 2
metric_list: [{{metric: acc, aggregation: mean, higher_is_better: true}}]
""",
        # The target is the text of the right choice, not its index.
        "t_mc_str": f"""
task: t_mc_str
dataset_path: json
dataset_kwargs:
  data_files: {{test: {mc_test}}}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{q}}}}"
doc_to_choice: opts
doc_to_target: "{{{{opts[gold]}}}}"
metric_list: [{{metric: acc, aggregation: mean, higher_is_better: true}}]
""",
        "t_ll": f"""
task: t_ll
dataset_path: json
dataset_kwargs:
  data_files: {{test: {ll}}}
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{q}}}}"
doc_to_target: " {{{{a}}}}"
metric_list: [{{metric: acc, aggregation: mean, higher_is_better: true}}]
""",
        "t_gen": f"""
task: t_gen
dataset_path: json
dataset_kwargs:
  data_files: {{test: {ll}}}
test_split: test
output_type: generate_until
doc_to_text: "{{{{q}}}} ->"
doc_to_target: "{{{{a}}}}"
generation_kwargs: {{until: ["."], max_gen_toks: 8}}
metric_list: [{{metric: exact_match, aggregation: mean, higher_is_better: true}}]
""",
        "t_text": f"""
task: t_text
dataset_path: json
dataset_kwargs:
  data_files: {{test: {text}}}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list: [{{metric: word_perplexity, aggregation: weighted_perplexity, higher_is_better: false}}]
""",
    }
    for name, body in tasks.items():
        (folder / f"{name}.yaml").write_text(body.lstrip(), encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    return _write_tasks(tmp_path_factory.mktemp("lm_eval_tasks"))


@pytest.fixture(scope="module")
def probes(task_dir):
    return lm_eval_probes(TASK_NAMES, include_path=task_dir)


@pytest.fixture(autouse=True)
def _quiet_lm_eval():
    logging.getLogger("lm_eval").setLevel(logging.ERROR)


# --------------------------------------------------------------------------------------
# Rows
# --------------------------------------------------------------------------------------


def test_rows_reproduce_lm_eval_request_strings(probes, task_dir):
    assert sorted(probes) == sorted(TASK_NAMES)
    assert {n: p.kind for n, p in probes.items()} == {
        "t_mc": "multiple_choice", "t_mc_str": "multiple_choice", "t_ll": "completion", "t_gen": "generate",
        "t_text": "text",
    }
    # Multiple choice: lm-eval scores context + target_delimiter (" ") + choice; two shots from train.
    mc = probes["t_mc"].data
    assert [r["doc_id"] for r in mc] == list(range(len(MC_TEST)))
    assert [r["answer"] for r in mc] == [d["gold"] for d in MC_TEST]
    for row, doc in zip(mc, MC_TEST):
        assert row["choices"] == [" " + c for c in doc["opts"]]
        shots, question = row["context"].rsplit("\n\n", 1)
        assert question == f"Q: {doc['q']}\nA:"
        assert len(shots.split("\n\n")) == 2  # num_fewshot: 2 (fewshot_delimiter "\n\n")
        assert all(s.startswith("Q: ") and s.count("\nA: ") == 1 for s in shots.split("\n\n"))
    # A string target is matched against the choices, as lm-eval does.
    assert [r["answer"] for r in probes["t_mc_str"].data] == [d["gold"] for d in MC_TEST]
    assert probes["t_mc_str"].data[0]["context"] == "the cat"
    # loglikelihood: lm-eval's (context, target) as they are (no delimiter added).
    assert [(r["prompt"], r["completion"]) for r in probes["t_ll"].data] == [(d["q"], " " + d["a"]) for d in LL_TEST]
    # generate_until: the model writes after the context (tests/test_lm_eval_generate.py), or, on
    # request, the teacher-forced target after target_delimiter.
    assert [(r["prompt"], r["answer"]) for r in probes["t_gen"].data] == [(d["q"] + " ->", d["a"]) for d in LL_TEST]
    assert (probes["t_gen"].stop, probes["t_gen"].max_new_tokens) == ((".",), 8)
    forced = lm_eval_probes("t_gen", include_path=task_dir, generate_until="teacher_forced")["t_gen"]
    assert forced.kind == "completion"
    assert [(r["prompt"], r["completion"]) for r in forced.data] == [(d["q"] + " ->", " " + d["a"]) for d in LL_TEST]
    assert [r["text"] for r in probes["t_text"].data] == [d["text"] for d in TEXT_TEST]
    # They are valid probe rows.
    for name, probe in probes.items():
        ProbeSet.build(name, probe, SETTINGS)


def test_limit_is_honoured_and_rows_are_deterministic(task_dir, probes):
    limited = lm_eval_probes(["t_mc", "t_text"], include_path=task_dir, limit=2)
    assert [len(p.data) for p in limited.values()] == [2, 2]
    assert limited["t_mc"].data == probes["t_mc"].data[:2]  # the first documents, few-shot contexts included
    again = lm_eval_probes(["t_mc", "t_text"], include_path=task_dir, limit=2)
    assert again == limited
    # Another few-shot seed draws other shots; zero shots leave only the question.
    other = lm_eval_probes("t_mc", include_path=task_dir, seed=7)["t_mc"].data
    assert [r["context"] for r in other] != [r["context"] for r in probes["t_mc"].data]
    zero = lm_eval_probes("t_mc", include_path=task_dir, num_fewshot=0)["t_mc"].data
    assert [r["context"] for r in zero] == [f"Q: {d['q']}\nA:" for d in MC_TEST]
    with pytest.raises(ValueError, match="limit: expected a positive integer"):
        lm_eval_probes("t_mc", include_path=task_dir, limit=0)


def test_all_tasks_of_a_folder_and_errors(task_dir):
    assert sorted(lm_eval_probes(include_path=task_dir, limit=1)) == sorted(TASK_NAMES)
    # A name missing from the folder would make lm-eval index its built-in tasks (seconds) before
    # giving up; a given task manager without them answers at once.
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(task_dir), include_defaults=False)
    with pytest.raises(ProbeDataError, match=r"lm-eval tasks \['no_such_task'\] are not known"):
        lm_eval_probes(["t_mc", "no_such_task"], task_manager=manager)
    with pytest.raises(ValueError, match="tasks: give lm-eval task names"):
        lm_eval_probes()


def test_unsupported_output_types_name_the_task():
    task = SimpleNamespace(OUTPUT_TYPE="generate_until_multi", config=SimpleNamespace(task="weird"), task_name="weird")
    with pytest.raises(ProbeDataError, match=r"lm-eval task 'weird': output_type 'generate_until_multi' has no probe"):
        rows_from_task(task)
    winogrande_like = SimpleNamespace(OUTPUT_TYPE="multiple_choice", multiple_input=2, task_name="wg",
                                      config=SimpleNamespace(task="wg"))
    with pytest.raises(ProbeDataError, match=r"lm-eval task 'wg' \(multiple_choice\): doc_to_text gives one context"):
        rows_from_task(winogrande_like)


def test_shipped_tasks(monkeypatch, tokenizer):
    monkeypatch.chdir(REPO)  # their data_files are relative to the repository root
    shipped = lm_eval_probes(["arena"], include_path=SHIPPED)  # the tag of all four
    assert {n: (p.kind, len(p.data)) for n, p in shipped.items()} == {
        "arena_facts": ("multiple_choice", 24), "arena_general": ("text", 16), "arena_arithmetic": ("completion", 24),
        "arena_arithmetic_gen": ("generate", 24),
    }
    facts = [json.loads(x) for x in (SHIPPED / "arena_facts.jsonl").read_text().splitlines()]
    assert shipped["arena_facts"].data[0] == {
        "context": facts[0]["question"], "choices": [" " + c for c in facts[0]["choices"]],
        "answer": facts[0]["answer"], "doc_id": 0,
    }
    monitor = ForgettingMonitor(probes=shipped, tokenizer=tokenizer, probe={"max_length": 128})
    assert {n: p.kind for n, p in monitor.runner.probes.items()} == {n: p.kind for n, p in shipped.items()}


# --------------------------------------------------------------------------------------
# Agreement with lm-eval's own HFLM on the same model
# --------------------------------------------------------------------------------------


def _per_request_loglikelihoods(rows: list[dict], kind: str, tokenizer, model) -> list[list[float]]:
    """ProbeRunner's log-likelihood of every (row, continuation): one probe set per request."""
    sets = {}
    for i, row in enumerate(rows):
        if kind == "multiple_choice":
            pairs = [{"prompt": row["context"], "completion": c} for c in row["choices"]]
        elif kind == "completion":
            pairs = [{"prompt": row["prompt"], "completion": row["completion"]}]
        else:
            pairs = [{"text": row["text"]}]
        for j, pair in enumerate(pairs):
            sets[f"r{i}c{j}"] = ProbeSet.build(f"r{i}c{j}", [pair], SETTINGS)
    runner = ProbeRunner(sets, SETTINGS)
    runner.prepare(tokenizer)
    res = runner.run(model)
    out: list[list[float]] = [[] for _ in rows]
    for name, r in res.items():
        i = int(name[1:].split("c")[0])
        out[i].append(-r.nll * r.tokens)
    return out


def _lm_eval_samples(task_dir: Path, tasks: list[str], model, tokenizer, **hflm_kwargs) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=8, device="cpu", **hflm_kwargs)
    out = simple_evaluate(
        model=lm,
        tasks=tasks,
        task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
        bootstrap_iters=0,
        log_samples=True,
    )
    return out


def test_probe_runner_agrees_with_lm_eval_hflm(task_dir, probes, tokenizer):
    model = make_model(seed=3, vocab_size=len(tokenizer))
    out = _lm_eval_samples(task_dir, ["t_mc", "t_mc_str", "t_ll"], model, tokenizer)
    worst = 0.0
    for name in ("t_mc", "t_mc_str", "t_ll"):
        samples = sorted(out["samples"][name], key=lambda s: s["doc_id"])
        rows = probes[name].data
        # lm-eval scored exactly the strings of our rows.
        for s, row in zip(samples, rows, strict=True):
            want = (
                [(row["context"], c) for c in row["choices"]]
                if "choices" in row
                else [(row["prompt"], row["completion"])]
            )
            assert [tuple(a) for a in s["arguments"]] == want
        ours = _per_request_loglikelihoods(rows, probes[name].kind, tokenizer, model)
        theirs = [[float(r[0]) for r in s["filtered_resps"]] for s in samples]
        for a, b in zip(ours, theirs, strict=True):
            assert a == pytest.approx(b, abs=1e-4)
            worst = max(worst, *(abs(x - y) for x, y in zip(a, b)))
        # The probe's own aggregate: accuracy equal to lm-eval's acc.
        runner = ProbeRunner({name: ProbeSet.build(name, probes[name], SETTINGS)}, SETTINGS)
        runner.prepare(tokenizer)
        result = runner.run(model)[name]
        if probes[name].kind == "multiple_choice":
            assert result.score == out["results"][name]["acc,none"]
            assert 0 < result.score < 1  # a real ranking was compared, not all-right or all-wrong
            gold = [ll[row["answer"]] for ll, row in zip(ours, rows)]
            assert result.nll * result.tokens == pytest.approx(-sum(gold), abs=1e-4)
        else:  # loglikelihood acc is "greedy continuation", our exact match
            assert result.score == out["results"][name]["acc,none"]
    print(f"largest |log-likelihood difference| vs lm-eval HFLM: {worst:.2e}")


def test_text_rows_agree_with_lm_eval_rolling_loglikelihood(task_dir, probes, tokenizer):
    # lm-eval conditions the first token on a prefix BOS and, with a tokenizer that adds BOS
    # itself, also predicts that second BOS (lm-eval issue #3333); add_bos_token=False gives
    # exactly the tokens a text probe scores: BOS + text, every text token predicted once.
    model = make_model(seed=4, vocab_size=len(tokenizer))
    out = _lm_eval_samples(task_dir, ["t_text"], model, tokenizer, add_bos_token=False)
    samples = sorted(out["samples"]["t_text"], key=lambda s: s["doc_id"])
    ours = [x[0] for x in _per_request_loglikelihoods(probes["t_text"].data, "text", tokenizer, model)]
    theirs = [float(s["filtered_resps"][0]) for s in samples]
    assert ours == pytest.approx(theirs, abs=1e-4)
