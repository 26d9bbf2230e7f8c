"""lm-eval ``generate_until`` tasks as generative probes: the same answers, filtered answers and
per-row scores as lm-eval's ``HFLM.generate_until`` followed by the task's own filters and metric,
on the same in-memory model (fp32). Offline: local task YAML files and JSONL rows."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")

from helpers import make_tokenizer, pretrained_model  # noqa: E402

from arena_callbacks import ProbeDataError, ProbeRunner, ProbeSet, ProbeSettings  # noqa: E402
from arena_callbacks.integrations.lm_eval import lm_eval_probes  # noqa: E402
from arena_callbacks.integrations.lm_eval_generate import LmEvalScorer  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SHIPPED = REPO / "integrations" / "lm_eval"
BATCH = 4
SETTINGS = ProbeSettings(batch_size=BATCH, max_length=128)

# Targets the briefly pretrained test model writes for some rows and not for others.
REGEX_ROWS = [
    {"q": "one two", "a": "Blue"}, {"q": "the cat", "a": "IS!"}, {"q": "red blue green", "a": "green"},
    {"q": "seven eight", "a": "even"}, {"q": "a fish reads", "a": "dog"}, {"q": "the mountain is", "a": "tree"},
    {"q": "one two three four", "a": "targets"}, {"q": "the dog runs", "a": "ity."}, {"q": "river and", "a": "ode"},
    {"q": "five six", "a": "river"}, {"q": "blue", "a": "is"}, {"q": "code with", "a": "sings"},
]
LIST_ROWS = [
    {"q": q, "targets": t} for q, t in [
        ("one two", ["one", "Blue is"]), ("the cat", ["cat", "is is is is"]), ("seven eight", ["blue", "x"]),
        ("a fish reads", ["bird"]), ("blue", ["is is is is is is"]), ("five six", ["IS IS", "six"]),
        ("red blue green", ["lue is is"]), ("code with", ["code"]),
    ]
]
TASKS = ["g_regex", "g_list"]


def _write_tasks(folder: Path) -> Path:
    regex = folder / "regex.jsonl"
    regex.write_text("".join(json.dumps(r) + "\n" for r in REGEX_ROWS), encoding="utf-8")
    lists = folder / "lists.jsonl"
    lists.write_text("".join(json.dumps(r) + "\n" for r in LIST_ROWS), encoding="utf-8")
    # A regex filter then take_first, exact match ignoring case and punctuation, "." as the stop.
    (folder / "g_regex.yaml").write_text(f"""
task: g_regex
dataset_path: json
dataset_kwargs:
  data_files: {{test: {regex}}}
test_split: test
output_type: generate_until
doc_to_text: "{{{{q}}}} ->"
doc_to_target: "{{{{a}}}}"
generation_kwargs: {{until: ["."], max_gen_toks: 10, do_sample: false}}
filter_list:
  - name: first-word
    filter:
      - function: regex
        regex_pattern: "([a-z]+)"
      - function: take_first
  - name: whole
    filter:
      - function: remove_whitespace
      - function: take_first
metric_list:
  - {{metric: exact_match, aggregation: mean, higher_is_better: true, ignore_case: true, ignore_punctuation: true}}
""".lstrip(), encoding="utf-8")
    # Several acceptable answers (lm-eval's multiple-target path), the default filter, spaces
    # ignored by the metric, two stop strings, and max_gen_toks under lm-eval's alias max_new_tokens.
    (folder / "g_list.yaml").write_text(f"""
task: g_list
dataset_path: json
dataset_kwargs:
  data_files: {{test: {lists}}}
test_split: test
output_type: generate_until
doc_to_text: "{{{{q}}}} ->"
doc_to_target: targets
generation_kwargs: {{until: ["\\n", "river"], max_new_tokens: 12}}
metric_list:
  - {{metric: exact_match, aggregation: mean, higher_is_better: true, ignore_case: true, regexes_to_ignore: [" "]}}
""".lstrip(), encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    return _write_tasks(tmp_path_factory.mktemp("lm_eval_gen_tasks"))


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def model():
    return pretrained_model()


@pytest.fixture(autouse=True)
def _quiet_lm_eval():
    logging.getLogger("lm_eval").setLevel(logging.ERROR)


def _hflm_samples(task_dirs: list[Path], tasks: list[str], model, tok, limit: int) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=BATCH, device="cpu")
    return simple_evaluate(model=lm, tasks=tasks, task_manager=TaskManager(include_path=[str(d) for d in task_dirs],
                           include_defaults=False), bootstrap_iters=0, log_samples=True, limit=limit)


def _run(probes: dict, model, tok) -> tuple[ProbeRunner, dict]:
    runner = ProbeRunner({n: ProbeSet.build(n, p, SETTINGS) for n, p in probes.items()}, SETTINGS)
    runner.prepare(tok)
    return runner, runner.run(model)


def test_generate_until_tasks_become_generative_probes(task_dir):
    probes = lm_eval_probes(TASKS, include_path=task_dir)
    regex, lists = probes["g_regex"], probes["g_list"]
    assert (regex.kind, regex.stop, regex.max_new_tokens) == ("generate", (".",), 10)
    assert (lists.kind, lists.stop, lists.max_new_tokens) == ("generate", ("\n", "river"), 12)
    assert isinstance(regex.scorer, LmEvalScorer) and (regex.scorer.metric, regex.scorer.filter_name) == (
        "exact_match", "first-word")
    assert (lists.scorer.metric, lists.scorer.filter_name) == ("exact_match", "none")  # lm-eval's default filter
    assert [(r["prompt"], r["answer"], r["doc_id"]) for r in regex.data] == [
        (d["q"] + " ->", d["a"], i) for i, d in enumerate(REGEX_ROWS)]
    assert [(r["prompt"], r["answer"]) for r in lists.data] == [(d["q"] + " ->", d["targets"]) for d in LIST_ROWS]
    # The scorer is lm-eval's filters and metric: first word, case and punctuation ignored.
    row = regex.data[1]  # target "IS!"
    assert regex.scorer.filtered("  is river", row) == "is" and regex.scorer("", "  is river", row) == 1.0
    assert regex.scorer.filtered("...", row) == "[invalid]"  # the regex filter's fallback
    assert regex.scorer("", "isn't", row) == 0.0
    assert lists.scorer("", " CAT", lists.data[1]) == 1.0 and lists.scorer("", "isisis is", lists.data[1]) == 1.0
    assert lists.scorer("", "dog", lists.data[1]) == 0.0
    # Options: cap max_gen_toks, choose a metric by lm-eval's result key, or keep the old mapping.
    capped = lm_eval_probes(TASKS, include_path=task_dir, max_gen_toks=11)
    assert capped["g_regex"].max_new_tokens == 10 and capped["g_list"].max_new_tokens == 11
    whole = lm_eval_probes("g_regex", include_path=task_dir, metric="exact_match,whole")["g_regex"]
    assert whole.scorer.filter_name == "whole" and whole.scorer.filtered("  is river", row) == "is river"
    forced = lm_eval_probes("g_regex", include_path=task_dir, generate_until="teacher_forced")["g_regex"]
    assert forced.kind == "completion"
    assert [(r["prompt"], r["completion"]) for r in forced.data] == [(d["q"] + " ->", " " + d["a"]) for d in REGEX_ROWS]


def test_bad_options_are_named(task_dir):
    with pytest.raises(ProbeDataError, match=r"g_regex.*filter 'nope' is not one of \['first-word', 'whole'\]"):
        lm_eval_probes("g_regex", include_path=task_dir, metric="exact_match,nope")
    with pytest.raises(ProbeDataError, match=r"g_regex.*metric 'bleu' is not among its per-row results"):
        lm_eval_probes("g_regex", include_path=task_dir, metric="bleu")
    with pytest.raises(ValueError, match="generate_until: expected one of"):
        lm_eval_probes("g_regex", include_path=task_dir, generate_until="sampled")
    with pytest.raises(ValueError, match="max_gen_toks: expected a positive integer"):
        lm_eval_probes("g_regex", include_path=task_dir, max_gen_toks=0)


def test_answers_filtered_answers_and_scores_equal_lm_eval_hflm(task_dir, model, tok, monkeypatch):
    monkeypatch.chdir(REPO)  # the shipped task's data_files are relative to the repository root
    names = [*TASKS, "arena_arithmetic_gen"]  # the shipped one: two-shot prompts, a number regex
    probes = lm_eval_probes(names, include_path=[task_dir, SHIPPED], limit=12)  # the shipped one's first 12 rows
    out = _hflm_samples([task_dir, SHIPPED], names, model, tok, limit=12)
    runner, results = _run(probes, model, tok)
    for name in names:
        probe = probes[name]
        scorer = probe.scorer
        samples = sorted((s for s in out["samples"][name] if s["filter"] == scorer.filter_name),
                         key=lambda s: s["doc_id"])
        assert [s["arguments"][0][0] for s in samples] == [r["prompt"] for r in probe.data]  # same prompts
        answers = [runner.last_generations[(name, i)].text for i in range(len(probe.data))]
        assert answers == [s["resps"][0][0] for s in samples]  # what HFLM wrote, cut at the stop strings
        filtered = [scorer.filtered(a, r) for a, r in zip(answers, probe.data)]
        assert filtered == [s["filtered_resps"][0] for s in samples]
        per_row = [r[2] for r in results[name].rows]
        assert per_row == [float(s["exact_match"]) for s in samples]
        assert results[name].score == pytest.approx(out["results"][name][f"exact_match,{scorer.filter_name}"])
        if name in TASKS:
            assert 0 < results[name].score < 1  # some rows right, some wrong: a real comparison
    # Rows that stopped on "." (g_regex) and rows cut by max_gen_toks are both present.
    stopped = [runner.last_generations[("g_regex", i)].stopped for i in range(len(REGEX_ROWS))]
    assert any(stopped) and not all(stopped)


def test_shipped_arithmetic_task_is_generative(monkeypatch):
    monkeypatch.chdir(REPO)  # its data_files are relative to the repository root
    probe = lm_eval_probes("arena_arithmetic_gen", include_path=SHIPPED)["arena_arithmetic_gen"]
    assert (probe.kind, len(probe.data), probe.stop, probe.max_new_tokens) == ("generate", 24, ("\n", "Question:"), 16)
    first = json.loads((SHIPPED / "arena_arithmetic.jsonl").read_text().splitlines()[0])
    row = probe.data[0]
    assert row["prompt"].endswith(f"Question: {first['question']}\nAnswer:") and row["prompt"].count("Answer:") == 3
    assert probe.scorer("", f" {first['answer']}, since", row) == 1.0
    assert probe.scorer("", f" It is {first['answer']}.", row) == 1.0  # the first number, wherever it is
    assert probe.scorer("", " 0", row) == 0.0


def test_monitor_file_lm_eval_source(tmp_path, monkeypatch):
    from arena_callbacks.monitor_file import load_monitor_file

    monkeypatch.chdir(REPO)
    path = tmp_path / "monitor.json"
    path.write_text(json.dumps({"probes": {
        "written": {"lm_eval": "arena_arithmetic_gen", "include_path": str(SHIPPED), "limit": 4, "max_gen_toks": 8},
        "forced": {"lm_eval": "arena_arithmetic_gen", "include_path": str(SHIPPED), "limit": 4, "kind": "completion"},
    }}), encoding="utf-8")
    probes = load_monitor_file(path).probes
    written, forced = probes["written"], probes["forced"]
    assert (written.kind, written.max_new_tokens, len(written.data)) == ("generate", 8, 4)
    assert isinstance(written.scorer, LmEvalScorer) and written.scorer.filter_name == "first-number"
    assert forced.kind == "completion" and forced.data[0]["completion"] == " 54"
