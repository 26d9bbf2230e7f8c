"""Probe throughput: the project's ProbeRunner against lm-eval's HFLM on the same model and rows.

SmolLM2-135M-Instruct (``load_model_and_tokenizer("smollm2-135m-instruct")``), one in-memory
model shared by both, batch size 16 for both, fp32, torch threads = 2 on the CPU. Workloads:

* ``mc_single``: four-way multiple choice with single-token choices (the built-in
  ``world_knowledge`` facts as lettered questions, choices `` A``..`` D``);
* ``mc_multi``: four-way multiple choice with HellaSwag-like endings of ~10-20 tokens (a
  passage's opening as context, its true continuation and three spans of other passages);
* ``text``: rolling log-likelihood of passages (built-in ``general_text`` and ``python_code``).

lm-eval runs ``HFLM.loglikelihood`` / ``loglikelihood_rolling`` on the same (context,
continuation) strings; text rows start with the BOS string so that both score every passage
token after the same prefix token. Scores are checked to agree (per-choice or per-passage
log-likelihood within 1e-4, accuracy equal); times are medians of interleaved repetitions.
The tokenisation is outside ProbeRunner's timed pass (it is done once per training run) and
inside lm-eval's (it re-tokenises at each call).

    python benchmarks/probe_throughput.py                 # 128 rows each, 7/3/5 repetitions
    python benchmarks/probe_throughput.py --rows 32 --repeats 1 --workloads mc_single
    python benchmarks/probe_throughput.py --device cuda   # the GPU variant
"""

from __future__ import annotations

import argparse
import contextlib
import random
import statistics
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import interleaved, machine, model_label, paired_ratio, set_threads, write_json  # noqa: E402

TARGETS = {"mc_single": 1.3, "mc_multi": 2.0, "text": 2.0}  # lm-eval time / ProbeRunner time
TOLERANCE = 1e-4
# Timed repetitions per workload: more where a pass is short and the machine's drift weighs most.
REPEATS = {"mc_single": 7, "mc_multi": 3, "text": 5}
MODEL = "smollm2-135m-instruct"


# --------------------------------------------------------------------------------------
# Rows
# --------------------------------------------------------------------------------------


def mc_single_rows(n: int, seed: int) -> list[dict[str, Any]]:
    """World-knowledge questions written as lettered four-way questions: one-token answers."""
    from arena_callbacks.capabilities import build_capability

    letters = "ABCD"
    rows = []
    for row in build_capability("world_knowledge", n=n, seed=seed):
        *shots, question = row["context"].split("\n\n")
        options = "".join(f"{letters[j]}. {c.strip()}\n" for j, c in enumerate(row["choices"]))
        rows.append({
            "context": f"{question.removesuffix('Answer:').rstrip()}\n{options}Answer:",
            "choices": [f" {x}" for x in letters[: len(row["choices"])]],
            "answer": row["answer"],
        })
    return rows


def mc_multi_rows(n: int, seed: int) -> list[dict[str, Any]]:
    """HellaSwag-like rows: a window of pydoc prose, its true next words and three spans from elsewhere.

    Windows do not overlap, so no context is a prefix of another row's context and ending (lm-eval
    0.4.13 caches logits by context + continuation[:-1] tokens, whatever the split between the
    two: rows that repeat a passage at other cut points get each other's scores there).
    """
    from arena_callbacks.capabilities import text_passages

    rng = random.Random(seed)
    words = " ".join(text_passages("train") + text_passages("probe")).split()
    step = 36  # 18-24 context words, 7-11 ending words, a gap
    starts = list(range(0, len(words) - step, step))
    if n > len(starts):
        raise ValueError(f"mc_multi: at most {len(starts)} rows from the pydoc passages, asked for {n}")
    rows = []
    for a in rng.sample(starts, n):
        cut = a + rng.randint(18, 24)
        ending = " ".join(words[cut : cut + rng.randint(7, 11)])
        others = []
        while len(others) < 3:
            b = rng.randrange(0, len(words) - 12)
            if abs(b - cut) > step:
                others.append(" ".join(words[b : b + rng.randint(7, 11)]))
        choices = [ending, *others]
        rng.shuffle(choices)
        rows.append({"context": " ".join(words[a:cut]), "choices": [f" {c}" for c in choices],
                     "answer": choices.index(ending)})
    return rows


def text_rows(n: int, seed: int) -> list[dict[str, Any]]:
    from arena_callbacks.capabilities import build_capability

    half = n // 2
    return build_capability("general_text", n=half, seed=seed) + build_capability("python_code", n=n - half, seed=seed)


# --------------------------------------------------------------------------------------
# One workload
# --------------------------------------------------------------------------------------


def lm_eval_requests(kind: str, rows: list[dict[str, Any]]) -> list[Any]:
    from lm_eval.api.instance import Instance

    if kind == "text":
        return [Instance("loglikelihood_rolling", {}, (r["text"],), 0, ("bench", i, 1)) for i, r in enumerate(rows)]
    return [
        Instance("loglikelihood", {}, (r["context"], c), j, ("bench", i, 1))
        for i, r in enumerate(rows)
        for j, c in enumerate(r["choices"])
    ]


BUILDERS = {"mc_single": mc_single_rows, "mc_multi": mc_multi_rows, "text": text_rows}


def kind_of(name: str) -> str:
    return "text" if name == "text" else "multiple_choice"


def probe_runner(name: str, rows: list[dict[str, Any]], tok: Any, lm: Any, batch_size: int) -> Any:
    """A prepared ProbeRunner over ``rows``, scoring what lm-eval scores on them."""
    from arena_callbacks import ProbeRunner, ProbeSet, ProbeSettings

    settings = ProbeSettings(batch_size=batch_size, max_length=512, max_examples=None, progress_bar=False)
    if kind_of(name) == "text":
        # Our text probe scores every token after the first; lm-eval's rolling log-likelihood
        # scores every token after its prefix token (BOS): give ours that token first.
        bos = tok.convert_ids_to_tokens(lm.prefix_token_id)
        rows = [{"text": bos + r["text"]} for r in rows]
    runner = ProbeRunner({name: ProbeSet.build(name, rows, settings)}, settings)
    runner.prepare(tok)
    return runner


def lm_eval_call(lm: Any, name: str, requests: list[Any]) -> Any:
    if kind_of(name) == "text":
        return lm.loglikelihood_rolling(requests, disable_tqdm=True)
    return lm.loglikelihood(requests, disable_tqdm=True)


def run_workload(
    name: str, rows: list[dict[str, Any]], model: Any, tok: Any, lm: Any, args: argparse.Namespace
) -> dict:
    kind = kind_of(name)
    runner = probe_runner(name, rows, tok, lm, args.batch_size)
    seqs = runner.sequences(name)
    # Warm-ups: the first 16 rows through the same code paths.
    small = probe_runner(name, rows[:16], tok, lm, args.batch_size)
    small_requests = lm_eval_requests(kind, rows[:16])
    if kind == "text":
        want = [[lm.prefix_token_id] + lm.tok_encode(r["text"]) for r in rows]
        assert [list(s.ids) for s in seqs] == want, "text rows tokenise differently from lm-eval's rolling windows"
    elif name == "mc_single":
        assert all(len(s.ids) - s.start == 1 for s in seqs), "a choice is more than one token"
    requests = lm_eval_requests(kind, rows)

    counter = FlopCounter(model)

    def ours() -> Any:
        with counter.count("probe_runner"):
            return runner.run(model)[name]

    def theirs() -> Any:
        with counter.count("lm_eval_hflm"):
            return lm_eval_call(lm, name, requests)

    warmup = {"probe_runner": lambda: small.run(model), "lm_eval_hflm": lambda: lm_eval_call(lm, name, small_requests)}
    repeats = args.repeats or REPEATS[name]
    timed = interleaved({"probe_runner": ours, "lm_eval_hflm": theirs}, repeats, args.device, warmup=warmup)
    result, lm_out = timed["probe_runner"]["last"], timed["lm_eval_hflm"]["last"]

    # Scores: per sequence (lm-eval's in request order), and the aggregate accuracy.
    scores = runner.last_scores
    if kind == "text":
        theirs_by = {(i, 0): float(lm_out[i]) for i in range(len(rows))}
        acc = None
    else:
        keys = [(i, j) for i, r in enumerate(rows) for j in range(len(r["choices"]))]
        theirs_by = {key: float(out[0]) for key, out in zip(keys, lm_out)}
        correct = 0
        for i, r in enumerate(rows):
            lls = [theirs_by[(i, j)] for j in range(len(r["choices"]))]
            correct += max(range(len(lls)), key=lambda j: (lls[j], -j)) == r["answer"]
        acc = {"probe_runner": result.score, "lm_eval_hflm": correct / len(rows)}
    n_scored = {(s.example, s.choice): len(s.ids) - s.start for s in seqs}
    diffs = {key: abs(scores[(name, *key)] - v) for key, v in theirs_by.items()}
    worst = max(diffs.values())
    # lm-eval sums fp32 token log-probabilities (fp32 log-softmax over padded batches): on a
    # 10-60-token continuation it is up to ~4e-4 off an fp64 sum, while ours stays within
    # ~3e-5 (see the reference columns). The check is 1e-4 per scored token (1e-4 for one).
    limit = {key: TOLERANCE * n_scored[key] for key in diffs}
    agree = all(diffs[k] <= limit[k] for k in diffs) and (acc is None or acc["probe_runner"] == acc["lm_eval_hflm"])
    reference = reference_check(model, seqs[: args.reference], args.device)
    ref_ours = max((abs(scores[(name, s.example, s.choice)] - v) for s, v in reference), default=None)
    ref_theirs = max((abs(theirs_by[(s.example, s.choice)] - v) for s, v in reference), default=None)
    t_ours, t_theirs = timed["probe_runner"]["median_s"], timed["lm_eval_hflm"]["median_s"]
    ratio = paired_ratio(timed, "lm_eval_hflm", "probe_runner")
    tokens = sum(len(s.ids) for s in seqs)
    return {
        "workload": name,
        "repeats": repeats,
        "rows": len(rows),
        "sequences": len(seqs),
        "tokens": tokens,
        "mean_choice_tokens": statistics.mean(len(s.ids) - s.start for s in seqs) if kind != "text" else None,
        "mean_context_tokens": statistics.mean(s.start for s in seqs) if kind != "text" else None,
        "probe_runner_s": t_ours,
        "lm_eval_hflm_s": t_theirs,
        "times_s": {k: v["times_s"] for k, v in timed.items()},
        "cpu_times_s": {k: v["cpu_s"] for k, v in timed.items()},
        "speedup": ratio,
        "forward_work": counter.last,
        "flop_ratio": counter.last["lm_eval_hflm"]["flops"] / counter.last["probe_runner"]["flops"],
        "speedup_cpu_time": paired_ratio(timed, "lm_eval_hflm", "probe_runner", "cpu_s"),
        "target_speedup": TARGETS[name],
        "meets_target": ratio >= TARGETS[name],
        "max_abs_loglik_diff": worst,
        "tolerance": "1e-4" if name == "mc_single" else "1e-4 per scored token",
        "scores_agree": agree,
        "reference_sequences": len(reference),
        "max_abs_diff_vs_fp64_reference": {"probe_runner": ref_ours, "lm_eval_hflm": ref_theirs},
        "accuracy": acc,
        "forwards": len(runner._batches(__import__("arena_callbacks").distributed.DistContext())),
    }


class FlopCounter:
    """Model forwards of one call: tokens through the body, positions through the vocabulary
    projection, and their FLOPs (2 per weight per token; attention scores not counted).

    lm-eval calls the model without ``logits_to_keep`` (logits at every position, padding
    included); ProbeRunner passes a row × position mask or a count of last positions.
    """

    def __init__(self, model: Any) -> None:
        head = model.get_output_embeddings().weight
        embed = model.get_input_embeddings().weight
        total = sum(p.numel() for p in model.parameters())  # tied weights are counted once
        self.body = total - embed.numel() - (0 if head is embed else head.numel())
        self.head = head.numel()
        self.model = model
        self.last: dict[str, dict[str, float]] = {}

    @contextlib.contextmanager
    def count(self, name: str) -> Iterator[None]:
        work = {"forwards": 0, "tokens": 0, "logit_positions": 0}

        def hook(module: Any, args: Any, kwargs: dict[str, Any]) -> None:
            ids = kwargs.get("input_ids", args[0] if args else None)
            rows, width = ids.shape
            keep = kwargs.get("logits_to_keep")
            if keep is None or (isinstance(keep, int) and keep == 0):
                positions = rows * width
            elif isinstance(keep, int):
                positions = rows * keep
            else:
                positions = int(keep.sum())
            work["forwards"] += 1
            work["tokens"] += rows * width
            work["logit_positions"] += positions

        handle = self.model.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()
        work["flops"] = 2.0 * (self.body * work["tokens"] + self.head * work["logit_positions"])
        self.last[name] = work


def reference_check(model: Any, seqs: list[Any], device: str) -> list[tuple[Any, float]]:
    """Summed log-probabilities of a few sequences from one unpadded forward each, fp64 softmax."""
    import torch

    out = []
    with torch.no_grad():
        for s in seqs:
            logits = model(input_ids=torch.tensor([s.ids], device=device)).logits[0].double()
            lp = torch.log_softmax(logits[s.start - 1 : len(s.ids) - 1], -1)
            out.append((s, float(lp.gather(-1, torch.tensor(s.ids[s.start :], device=device)[:, None]).sum())))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=128, help="rows per workload")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=None,
                    help="timed repetitions of each variant after a warm-up (default: mc_single 7, mc_multi 3, text 5)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (0: leave as is)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--workloads", default="mc_single,mc_multi,text")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--reference", type=int, default=8, help="sequences also scored by an unpadded fp64-softmax forward"
    )
    ap.add_argument("--model", default=MODEL, help="model spec for load_model_and_tokenizer (built-in name or folder)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    set_threads(args.threads)

    import logging

    from lm_eval.models.huggingface import HFLM

    from arena_callbacks.models import load_model_and_tokenizer

    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    model, tok = load_model_and_tokenizer(args.model, progress=False)
    model = model.to(args.device).eval()
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=args.batch_size, device=args.device)
    results = []
    for name in args.workloads.split(","):
        rows = BUILDERS[name](args.rows, args.seed)
        r = run_workload(name, rows, model, tok, lm, args)
        results.append(r)
        print(
            f"{name:<10} ProbeRunner {r['probe_runner_s']:7.2f} s   lm-eval {r['lm_eval_hflm_s']:7.2f} s   "
            f"speedup {r['speedup']:.2f}x (target {r['target_speedup']}x, FLOP ratio {r['flop_ratio']:.2f}x)   "
            f"max |Δ loglik| {r['max_abs_loglik_diff']:.1e}"
            f"   accuracy {r['accuracy']}",
            flush=True,
        )
    report = {
        "benchmark": "probe_throughput",
        "model": model_label(args.model),
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "machine": machine(args.device),
        "results": results,
    }
    path = write_json(
        "probe_throughput" if args.device == "cpu" else f"probe_throughput_{args.device}", report, args.out
    )
    print(f"written to {path}")
    return 0 if all(r["scores_agree"] for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
