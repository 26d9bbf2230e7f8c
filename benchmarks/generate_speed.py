"""Generative probe speed: an lm-eval ``generate_until`` task as the project's generative probe
against lm-eval's own ``HFLM.generate_until`` on the same model, rows and settings.

SmolLM2-135M-Instruct (``load_model_and_tokenizer("smollm2-135m-instruct")``), one in-memory
model shared by both, fp32, the same batch size for both, torch threads = 2 on the CPU. Both
decode greedily from the same lm-eval contexts with the task's ``until`` and ``max_gen_toks``;
lm-eval gets the task's own request instances. Workloads:

* ``arithmetic``: the shipped ``arena_arithmetic_gen`` task (two-shot sums, answers of a few
  tokens, ``until: ["\\n", "Question:"]``, ``max_gen_toks: 16``), its 24 rows repeated to ``--rows``;
* ``continue``: the openings of the shipped ``arena_general`` passages to be continued until a
  blank line, ``max_gen_toks: 48`` (answers of very different lengths: a row that ends early
  leaves the probe's batch, while ``HFLM`` keeps generating for the whole batch).

The answers and the task's per-row scores are checked equal (text for text); times are medians
of interleaved repetitions. The tokenisation is outside the probe's timed pass (done once per
training run) and inside lm-eval's (it tokenises at each call), as in ``probe_throughput.py``.

    python benchmarks/generate_speed.py                  # both workloads, 24 rows, 7/3 repetitions
    python benchmarks/generate_speed.py --rows 16 --repeats 1 --workloads arithmetic
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, interleaved, machine, model_label, paired_ratio, set_threads, write_json  # noqa: E402

TARGET = 1.5  # lm-eval time / probe time; never below 1
# Timed repetitions per workload: more where a pass is short and the machine's drift weighs most.
REPEATS = {"arithmetic": 7, "continue": 3}
MODEL = "smollm2-135m-instruct"
SHIPPED = ROOT / "integrations" / "lm_eval"


def _continue_task(folder: Path, rows: int) -> str:
    """A generate_until task over the openings of the shipped general passages."""
    passages = [json.loads(x)["text"] for x in (SHIPPED / "arena_general.jsonl").read_text().splitlines() if x]
    docs = [{"opening": " ".join(p.split()[: 6 + i % 5])} for i, p in enumerate(passages)]
    docs = [docs[i % len(docs)] for i in range(rows)]
    data = folder / "continue.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
    (folder / "bench_continue.yaml").write_text(f"""
task: bench_continue
dataset_path: json
dataset_kwargs:
  data_files: {{test: {data}}}
test_split: test
output_type: generate_until
doc_to_text: "{{{{opening}}}}"
doc_to_target: "{{{{opening}}}}"
generation_kwargs: {{until: ["\\n\\n"], max_gen_toks: 48, do_sample: false}}
metric_list: [{{metric: exact_match, aggregation: mean, higher_is_better: true}}]
""".lstrip(), encoding="utf-8")
    return "bench_continue"


def _arithmetic_task(folder: Path, rows: int) -> str:
    """The shipped arena_arithmetic_gen task, its rows repeated to ``rows``."""
    lines = [x for x in (SHIPPED / "arena_arithmetic.jsonl").read_text().splitlines() if x]
    data = folder / "arithmetic.jsonl"
    data.write_text("".join(lines[i % len(lines)] + "\n" for i in range(rows)), encoding="utf-8")
    body = (SHIPPED / "arena_arithmetic_gen.yaml").read_text()
    body = body.replace("integrations/lm_eval/arena_arithmetic.jsonl", str(data))
    body = body.replace("task: arena_arithmetic_gen", "task: bench_arithmetic").replace("tag: arena\n", "")
    (folder / "bench_arithmetic.yaml").write_text(body, encoding="utf-8")
    return "bench_arithmetic"


WORKLOADS = {"arithmetic": _arithmetic_task, "continue": _continue_task}


def run_workload(name: str, model: Any, tok: Any, lm: Any, args: argparse.Namespace) -> dict[str, Any]:
    from lm_eval.tasks import TaskManager

    from arena_callbacks import ProbeRunner, ProbeSet, ProbeSettings
    from arena_callbacks.integrations.lm_eval import lm_eval_probes

    folder = Path(tempfile.mkdtemp(prefix=f"gen_speed_{name}_"))
    task_name = WORKLOADS[name](folder, args.rows)
    manager = TaskManager(include_path=str(folder), include_defaults=False)
    probe = lm_eval_probes(task_name, task_manager=manager)[task_name]
    settings = ProbeSettings(batch_size=args.batch_size, max_length=512, progress_bar=False)
    runner = ProbeRunner({task_name: ProbeSet.build(task_name, probe, settings)}, settings)
    runner.prepare(tok)
    task = manager.load([task_name])["tasks"][task_name] if hasattr(manager, "load") else None
    if task is None:  # older lm-eval
        from lm_eval.tasks import get_task_dict

        task = get_task_dict([task_name], manager)[task_name]
    task.set_config(key="num_fewshot", value=task.get_config("num_fewshot") or 0)
    task.set_fewshot_seed(seed=1234)
    task.build_all_requests(rank=0, world_size=1)
    instances = sorted(task.instances, key=lambda i: i.doc_id)
    assert [i.args[0] for i in instances] == [r["prompt"] for r in probe.data], "lm-eval's contexts differ"

    # Warm-up: one batch through each.
    few = probe.data[: args.batch_size]
    warm_runner = ProbeRunner({task_name: ProbeSet.build(task_name, replace(probe, data=few), settings)}, settings)
    warm_runner.prepare(tok)

    def ours() -> list[str]:
        runner.run(model)
        return [runner.last_generations[(task_name, i)].text for i in range(len(probe.data))]

    def theirs() -> list[str]:
        return lm.generate_until(instances, disable_tqdm=True)

    warmup = {"probe": lambda: warm_runner.run(model),
              "hflm": lambda: lm.generate_until(instances[: args.batch_size], disable_tqdm=True)}
    repeats = args.repeats or REPEATS.get(name, 3)
    timed = interleaved({"probe": ours, "hflm": theirs}, repeats, device=args.device, warmup=warmup)
    a, b = timed["probe"]["last"], timed["hflm"]["last"]
    same = a == b
    scores_ours = [probe.scorer("", x, r) for x, r in zip(a, probe.data)]
    scores_theirs = [probe.scorer("", x, r) for x, r in zip(b, probe.data)]
    gens = [runner.last_generations[(task_name, i)] for i in range(len(probe.data))]
    speedup = paired_ratio(timed, "hflm", "probe")
    return {
        "workload": name,
        "rows": len(probe.data),
        "batch_size": args.batch_size,
        "repeats": repeats,
        "max_gen_toks": probe.max_new_tokens,
        "until": list(probe.stop),
        "answer_tokens_mean": sum(len(g.ids) for g in gens) / len(gens),
        "answer_tokens_max": max(len(g.ids) for g in gens),
        "stopped_share": sum(g.stopped for g in gens) / len(gens),
        "probe_s": timed["probe"]["median_s"],
        "lm_eval_hflm_s": timed["hflm"]["median_s"],
        "probe_times_s": timed["probe"]["times_s"],
        "lm_eval_times_s": timed["hflm"]["times_s"],
        "speedup": speedup,
        "target_speedup": TARGET,
        "answers_equal": same,
        "differing_rows": [i for i, (x, y) in enumerate(zip(a, b)) if x != y],
        "score": {"probe": sum(scores_ours) / len(scores_ours), "lm_eval_hflm": sum(scores_theirs) / len(b)},
        "meets_target": same and speedup >= TARGET,
        "never_slower": speedup >= 1.0,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=24, help="rows per workload")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=None, help=f"timed repetitions (default {REPEATS})")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (0: leave as is)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--workloads", default="arithmetic,continue")
    ap.add_argument("--model", default=MODEL, help="model spec for load_model_and_tokenizer (built-in name or folder)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    set_threads(args.threads)
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    import torch
    from lm_eval.models.huggingface import HFLM

    from arena_callbacks.models import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(args.model, progress=False)
    model.to(args.device)
    torch.manual_seed(0)
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=args.batch_size, device=args.device)
    results = []
    for name in args.workloads.split(","):
        r = run_workload(name.strip(), model, tok, lm, args)
        print(f"{r['workload']}: lm-eval {r['lm_eval_hflm_s']:.2f} s, probe {r['probe_s']:.2f} s, "
              f"{r['speedup']:.2f}x; answers equal: {r['answers_equal']}; answer tokens mean "
              f"{r['answer_tokens_mean']:.1f}, max {r['answer_tokens_max']}", flush=True)
        results.append(r)
    path = write_json(f"generate_speed{'_cuda' if args.device.startswith('cuda') else ''}", {
        "benchmark": "generate_speed",
        "model": model_label(args.model),
        "machine": machine(args.device),
        "settings": {"rows": args.rows, "batch_size": args.batch_size, "repeats": args.repeats,
                     "threads": args.threads, "precision": "fp32"},
        "results": results,
    }, args.out)
    print(f"wrote {path}")
    return 0 if all(r["answers_equal"] and r["never_slower"] for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
