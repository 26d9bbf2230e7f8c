"""Baselines of the built-in capability sets on SmolLM2-135M-Instruct (or another model).

For each set in ``arena_callbacks.capabilities.CAPABILITIES`` and each seed: build the rows
(``build_capability(name, n=..., seed=..., tokenizer=...)``), pass them through
``ProbeSet.build`` and score them with ``ProbeRunner`` on the CPU in fp32, exactly as the
monitor does at step 0. Rows with a category field (``category`` / ``operation`` /
``instruction``) are also scored per category; the set's overall figures are combined from
those parts (NLL weighted by tokens, score by examples, as ``ProbeRunner`` would).

Generative sets (``word_problems``, ``format_following``) are scored with their own probe
options (``capability_probe``): the model writes its answers greedily; recorded are the score,
``gen/length`` (tokens written per answer), ``gen/stopped`` (share of answers that ended on
their own) and a few of the answers.

Also recorded: token lengths of the rows under the model's tokenizer (generative sets: the
prompts), the resolve and load times of the model, wall time per set. Results go to
``benchmarks/results/capability_baselines.json`` and are printed as a table; ``--merge`` keeps
the other sets of an existing results file. ``--demo-cost`` also times, in turns on the same
machine state, one pass of the demo arena's probes (``examples/arena.py``: every teacher-forced
set at ``--demo-rows`` rows, ``examples/arena.yaml``'s probe settings) against one pass of each
generative set at that size.

    python benchmarks/capability_baselines.py                  # SmolLM2, seeds 0,1,2
    python benchmarks/capability_baselines.py --seeds 0 --n 32
    python benchmarks/capability_baselines.py --sets word_problems,format_following --n 32 --merge --demo-cost
    python benchmarks/capability_baselines.py --model /path/to/model-folder-or.gguf
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from arena_callbacks import MonitorConfig, Probe, ProbeRunner, ProbeSet, ProbeSettings  # noqa: E402
from arena_callbacks.capabilities import CAPABILITIES, build_capabilities, build_capability  # noqa: E402
from arena_callbacks.distributed import DistContext  # noqa: E402
from arena_callbacks.models import MARKER, load_model_and_tokenizer, resolve_model  # noqa: E402

CATEGORY_FIELDS = ("category", "operation", "instruction")


def _category(row: dict) -> str | None:
    for f in CATEGORY_FIELDS:
        if f in row:
            return str(row[f])
    return None


def _token_lengths(rows: list[dict], tokenizer, kind: str) -> list[int]:
    if kind == "text":
        texts = [r["text"] for r in rows]
    elif kind == "generate":
        texts = [r["prompt"] for r in rows]
    elif kind == "completion":
        texts = [r["prompt"] + r["completion"] for r in rows]
    else:
        texts = [r["context"] + c for r in rows for c in r["choices"]]
    return [len(tokenizer(t)["input_ids"]) for t in texts]


def score_set(name: str, rows: list[dict], model, tokenizer, settings: ProbeSettings) -> dict:
    """Score ``rows``, split by category when the rows have one; combined like ProbeRunner."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        groups[_category(r) or "all"].append(r)
    options = CAPABILITIES[name].options(tokenizer)  # generative sets: kind, scorer, max_new_tokens, stop
    probes = {f"{name}__{g}": ProbeSet.build(f"{name}__{g}", Probe(rs, **options) if options else rs, settings)
              for g, rs in sorted(groups.items())}
    runner = ProbeRunner(probes, settings)
    runner.prepare(tokenizer)
    t0 = time.perf_counter()
    results = runner.run(model, DistContext(), desc=name)
    seconds = time.perf_counter() - t0
    if options:
        return _generated(results, runner, probes, seconds)
    tokens = sum(r.tokens for r in results.values())
    examples = sum(r.examples for r in results.values())
    nll = sum(r.nll * r.tokens for r in results.values()) / tokens
    out = {"nll": nll, "examples": examples, "tokens": tokens, "seconds": seconds}
    if all(r.score is not None for r in results.values()):
        out["score"] = sum(r.score * r.examples for r in results.values()) / examples
    if len(results) > 1:
        out["by_category"] = {
            k.split("__", 1)[1]: {"examples": r.examples, "score": r.score, "nll": r.nll} for k, r in results.items()
        }
    return out


def _generated(results: dict, runner: ProbeRunner, probes: dict[str, ProbeSet], seconds: float) -> dict:
    """A generative set's figures, combined over its categories by rows, and a few answers."""
    examples = sum(r.examples for r in results.values())
    out = {"examples": examples, "seconds": seconds,
           "score": sum(r.score * r.examples for r in results.values()) / examples,
           "gen_length": sum(r.gen_length * r.examples for r in results.values()) / examples,
           "stopped": sum(r.stopped * r.examples for r in results.values()) / examples,
           "by_category": {k.split("__", 1)[1]: {"examples": r.examples, "score": r.score,
                                                   "gen_length": r.gen_length, "stopped": r.stopped}
                           for k, r in results.items()}}
    samples = []
    for key, probe in probes.items():
        for i, row in enumerate(probe.rows[:3]):
            g = runner.last_generations[(key, i)]
            samples.append({"category": key.split("__", 1)[1], "asked": _asked(row["prompt"]), "reply": g.text,
                            "stopped": g.stopped, "score": runner.last_row_scores[(key, i)]})
    out["samples"] = samples
    return out


def _asked(prompt: str) -> str:
    """The last user turn of a chat-rendered prompt (the plain format's too)."""
    for start, end in (("<|im_start|>user\n", "<|im_end|>"), ("User: ", "\nAssistant:")):
        if start in prompt:
            return prompt.rsplit(start, 1)[1].split(end, 1)[0]
    return prompt[-200:]


def demo_cost(model, tokenizer, rows: int, repeats: int) -> dict:
    """One pass of the demo arena's probes (every teacher-forced set, as ``examples/arena.py`` builds
    them, with ``examples/arena.yaml``'s probe settings) against one pass of each generative set,
    timed in turns so that both see the same machine load; medians of ``repeats``."""
    settings = MonitorConfig.from_file(ROOT / "examples" / "arena.yaml").probe.model_copy(
        update={"progress_bar": False})
    names = [n for n, c in CAPABILITIES.items() if not c.generative]
    gen = [n for n, c in CAPABILITIES.items() if c.generative]
    runners = {"demo_probes": build_capabilities(names, n=rows, tokenizer=tokenizer)}
    runners.update({n: build_capabilities([n], n=rows, tokenizer=tokenizer) for n in gen})
    # Prompts longer than max_length - max_new_tokens lose their beginning in the demo (truncate).
    cut = {n: sum(len(tokenizer(r["prompt"])["input_ids"]) > settings.max_length - runners[n][n].max_new_tokens
                  for r in runners[n][n].data) for n in gen}
    for key, data in runners.items():
        runners[key] = ProbeRunner({n: ProbeSet.build(n, d, settings) for n, d in data.items()}, settings)
        runners[key].prepare(tokenizer)
    times: dict[str, list[float]] = defaultdict(list)
    for _ in range(repeats):
        for key, runner in runners.items():
            t0 = time.perf_counter()
            runner.run(model, DistContext())
            times[key].append(time.perf_counter() - t0)
            print(f"  demo cost: {key} {times[key][-1]:.1f} s", flush=True)
    median = {k: statistics.median(v) for k, v in times.items()}
    return {"rows": rows, "repeats": repeats, "settings": settings.model_dump(), "sets": names,
            "times_s": dict(times), "median_s": median,
            "ratio_to_demo_probes": {n: median[n] / median["demo_probes"] for n in gen},
            "generative_prompts_truncated": cut}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct", help="model spec for arena_callbacks.models")
    ap.add_argument("--sets", default=",".join(CAPABILITIES), help="comma-separated capability names")
    ap.add_argument("--n", type=int, default=None, help="rows per set (default: each set's default_size)")
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "capability_baselines.json"))
    ap.add_argument("--merge", action="store_true", help="keep the other sets of an existing results file")
    ap.add_argument("--demo-cost", action="store_true", help="also time the demo's probe pass against each "
                    "generative set's")
    ap.add_argument("--demo-rows", type=int, default=24, help="rows per set for --demo-cost (the demo's default)")
    ap.add_argument("--demo-repeats", type=int, default=2)
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    path = resolve_model(args.model)
    resolve_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    model, tokenizer = load_model_and_tokenizer(path, dtype=torch.float32)
    load_s = time.perf_counter() - t0
    settings = ProbeSettings(batch_size=args.batch_size, max_examples=None, max_length=256, precision="fp32",
                             progress_bar=False)
    seeds = [int(s) for s in args.seeds.split(",")]
    names = [s.strip() for s in args.sets.split(",") if s.strip()]

    sets: dict[str, dict] = {}
    for name in names:
        cap = CAPABILITIES[name]
        runs = {}
        lengths: list[int] = []
        for seed in seeds:
            rows = build_capability(name, n=args.n, seed=seed, tokenizer=tokenizer)
            lengths += _token_lengths(rows, tokenizer, cap.kind)
            runs[str(seed)] = score_set(name, rows, model, tokenizer, settings)
            r = runs[str(seed)]
            nll = (f"nll {r['nll']:.3f}" if "nll" in r
                   else f"gen/length {r['gen_length']:.1f} stopped {r['stopped']:.2f}")
            print(f"  {name} seed {seed}: {nll}" + (f" score {r['score']:.3f}" if "score" in r else "")
                  + f" ({r['examples']} rows, {r['seconds']:.1f} s)", flush=True)
        if cap.generative:
            scores = [r["score"] for r in runs.values()]
            opts = cap.options(tokenizer)
            sets[name] = {
                "kind": cap.kind, "n": runs[str(seeds[0])]["examples"], "description": cap.description,
                "provenance": cap.provenance, "license": cap.license, "available": cap.available(),
                "scorer": getattr(opts["scorer"], "__qualname__", opts["scorer"]),
                "max_new_tokens": opts["max_new_tokens"], "stop": opts["stop"],
                "prompt_tokens": {"max": max(lengths), "mean": round(statistics.fmean(lengths), 1)},
                "score_mean": statistics.fmean(scores), "score_min": min(scores), "score_max": max(scores),
                "gen_length_mean": statistics.fmean(r["gen_length"] for r in runs.values()),
                "stopped_mean": statistics.fmean(r["stopped"] for r in runs.values()),
                "seconds_mean": statistics.fmean(r["seconds"] for r in runs.values()),
                "by_category_mean": {c: statistics.fmean(r["by_category"][c]["score"] for r in runs.values())
                                     for c in runs[str(seeds[0])]["by_category"]},
                "runs": runs,
            }
            continue
        entry = {
            "kind": cap.kind,
            "n": runs[str(seeds[0])]["examples"],
            "description": cap.description,
            "provenance": cap.provenance,
            "license": cap.license,
            "available": cap.available(),
            "tokens_per_row": {"max": max(lengths), "mean": round(statistics.fmean(lengths), 1)},
            # Tokens the forwards of one pass carry (every choice of a multiple-choice row): the
            # stable measure of cost; wall times depend on what else the machine runs.
            "forward_tokens_per_pass": round(sum(lengths) / len(seeds)),
            "nll_mean": statistics.fmean(r["nll"] for r in runs.values()),
            "seconds_mean": statistics.fmean(r["seconds"] for r in runs.values()),
            "runs": runs,
        }
        if cap.kind != "text":
            scores = [r["score"] for r in runs.values()]
            entry["score_mean"] = statistics.fmean(scores)
            entry["score_min"], entry["score_max"] = min(scores), max(scores)
        if cap.kind == "multiple_choice":
            entry["chance"] = 0.25
        sets[name] = entry

    extra = {}
    if args.demo_cost:
        extra["demo_cost"] = demo_cost(model, tokenizer, args.demo_rows, args.demo_repeats)
    out = Path(args.out)
    if args.merge and out.is_file():
        old = json.loads(out.read_text())
        sets = {**old.get("sets", {}), **sets}
        extra = {**{k: old[k] for k in ("demo_cost",) if k in old}, **extra}

    info = None
    marker = Path(path) / MARKER
    if marker.is_file():
        info = json.loads(marker.read_text())
    import transformers

    result = {
        "model": args.model,
        "model_folder": str(path),
        "model_info": info,
        "resolve_seconds": resolve_s,
        "load_seconds": load_s,
        "seeds": seeds,
        "settings": settings.model_dump(),
        "threads": args.threads,
        "machine": {"python": platform.python_version(), "torch": torch.__version__,
                    "transformers": transformers.__version__, "cpu": platform.processor() or platform.machine(),
                    "cores": os.cpu_count()},
        "sets": sets,
        **extra,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")

    print(f"\nmodel {args.model}: resolve {resolve_s:.1f} s, load {load_s:.1f} s; seeds {seeds}")
    print(f"{'set':24} {'kind':16} {'n':>4} {'tok max':>7} {'NLL':>6} {'score':>13} {'s/pass':>7}")
    for name, e in sets.items():
        score = f"{e['score_mean']:.3f} ({e['score_min']:.2f}-{e['score_max']:.2f})" if "score_mean" in e else "-"
        tokens = e.get("tokens_per_row", e.get("prompt_tokens"))["max"]
        nll = f"{e['nll_mean']:>6.3f}" if "nll_mean" in e else f"{'-':>6}"
        print(f"{name:24} {e['kind']:16} {e['n']:>4} {tokens:>7} {nll} {score:>13} {e['seconds_mean']:>7.1f}"
              + (f"  gen/length {e['gen_length_mean']:.1f}, gen/stopped {e['stopped_mean']:.2f}"
                 if "gen_length_mean" in e else ""))
    if "demo_cost" in extra:
        d = extra["demo_cost"]
        print(f"demo cost ({d['rows']} rows): " + ", ".join(f"{k} {v:.1f} s" for k, v in d["median_s"].items()))
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
