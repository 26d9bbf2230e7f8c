"""Baselines of the built-in capability sets on SmolLM2-135M-Instruct (or another model).

For each set in ``arena_callbacks.capabilities.CAPABILITIES`` and each seed: build the rows
(``build_capability(name, n=..., seed=..., tokenizer=...)``), pass them through
``ProbeSet.build`` and score them with ``ProbeRunner`` on the CPU in fp32, exactly as the
monitor does at step 0. Rows with a category field (``category`` / ``operation`` /
``instruction``) are also scored per category; the set's overall figures are combined from
those parts (NLL weighted by tokens, score by examples, as ``ProbeRunner`` would).

Also recorded: token lengths of the rows under the model's tokenizer, the resolve and load
times of the model, wall time per set. Results go to
``benchmarks/results/capability_baselines.json`` and are printed as a table.

    python benchmarks/capability_baselines.py                  # SmolLM2, seeds 0,1,2
    python benchmarks/capability_baselines.py --seeds 0 --n 32
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

from arena_callbacks import ProbeRunner, ProbeSet, ProbeSettings  # noqa: E402
from arena_callbacks.capabilities import CAPABILITIES, build_capability  # noqa: E402
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
    probes = {f"{name}__{g}": ProbeSet.build(f"{name}__{g}", rs, settings) for g, rs in sorted(groups.items())}
    runner = ProbeRunner(probes, settings)
    runner.prepare(tokenizer)
    t0 = time.perf_counter()
    results = runner.run(model, DistContext(), desc=name)
    seconds = time.perf_counter() - t0
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct", help="model spec for arena_callbacks.models")
    ap.add_argument("--sets", default=",".join(CAPABILITIES), help="comma-separated capability names")
    ap.add_argument("--n", type=int, default=None, help="rows per set (default: each set's default_size)")
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "capability_baselines.json"))
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
            print(f"  {name} seed {seed}: nll {r['nll']:.3f}" + (f" score {r['score']:.3f}" if "score" in r else "")
                  + f" ({r['examples']} rows, {r['seconds']:.1f} s)", flush=True)
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
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")

    print(f"\nmodel {args.model}: resolve {resolve_s:.1f} s, load {load_s:.1f} s; seeds {seeds}")
    print(f"{'set':24} {'kind':16} {'n':>4} {'tok max':>7} {'NLL':>6} {'score':>13} {'s/pass':>7}")
    for name, e in sets.items():
        score = f"{e['score_mean']:.3f} ({e['score_min']:.2f}-{e['score_max']:.2f})" if "score_mean" in e else "-"
        print(f"{name:24} {e['kind']:16} {e['n']:>4} {e['tokens_per_row']['max']:>7} {e['nll_mean']:>6.3f} "
              f"{score:>13} {e['seconds_mean']:>7.1f}")
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
