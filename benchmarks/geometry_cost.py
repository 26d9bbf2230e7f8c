"""Cost of the geometry metrics relative to the probe pass they ride on, and the cache memory.

Measures side by side, in one process and on the same probe tokens:

* ``probe``: the scoring pass alone (``ProbeRunner.run``),
* ``probe+capture``: the same pass with the forward hooks keeping the sampled rows,
* ``metrics``: gathering the rows and computing all six metrics for every tracked module,

for a tiny model and a SmolLM2-135M-shaped Llama (random weights: cost depends on the shapes,
not the values). The target in the issue: geometry (capture + metrics) ≤ 10% of the probe pass.
Results go to ``benchmarks/results/geometry_cost.json`` and are printed as a table.

    python benchmarks/geometry_cost.py            # both sizes
    python benchmarks/geometry_cost.py --quick    # tiny model only
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from arena_callbacks import ProbeRunner, ProbeSet, ProbeSettings  # noqa: E402
from arena_callbacks.capture import GeometryTracker  # noqa: E402
from arena_callbacks.config import GeometryConfig  # noqa: E402
from arena_callbacks.distributed import DistContext  # noqa: E402
from helpers import corpus, make_tokenizer  # noqa: E402

SIZES = {
    "tiny": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
    "smollm2-135m-shape": dict(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3
    ),
}


def build(size: str, vocab: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    vocab_size = vocab if size == "tiny" else 49152
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab_size, max_position_embeddings=512, **SIZES[size])).eval()


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench(size: str, tokens: int, repeats: int) -> dict:
    tok = make_tokenizer()
    model = build(size, len(tok))
    settings = ProbeSettings(batch_size=16, max_length=128, max_examples=32, truncate=True)
    texts = [" ".join(corpus(6, seed=i)) for i in range(32)]  # ~60-token passages
    runner = ProbeRunner({"general": ProbeSet.build("general", [{"text": t} for t in texts], settings)}, settings)
    runner.prepare(tok)
    tracker = GeometryTracker(GeometryConfig(enabled=True, tokens_per_module=tokens, reference="cache"), runner)
    tracker.setup(model)
    ctx = DistContext()

    def probe_only() -> None:
        runner.run(model, ctx)

    def probe_capture() -> None:
        with tracker.capturing() as cap:
            runner.run(model, ctx, observer=cap)

    probe_capture()
    tracker.measure(model, ctx, baseline=True)  # fills the cache

    def metrics_only() -> None:
        tracker.measure(model, ctx, baseline=False)

    t_probe = timed(probe_only, repeats)
    t_capture = timed(probe_capture, repeats)
    t_metrics = timed(metrics_only, repeats)
    overhead = (t_capture - t_probe) + t_metrics
    n_tokens = sum(len(s.ids) for s in runner.sequences("general"))
    return {
        "size": size,
        "modules": tracker.module_names,
        "hidden": SIZES[size]["hidden_size"],
        "probe_tokens": n_tokens,
        "sampled_tokens": tracker.capture.n_tokens if tracker.capture else 0,
        "probe_s": t_probe,
        "probe_with_capture_s": t_capture,
        "metrics_s": t_metrics,
        "geometry_overhead_ratio": overhead / t_probe,
        "target_ratio": 0.10,
        "meets_target": overhead / t_probe <= 0.10,
        "cache_mb_bf16": tracker.cache_mb,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny model only")
    ap.add_argument("--tokens", type=int, default=1024, help="geometry.tokens_per_module")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "geometry_cost.json"))
    args = ap.parse_args()
    sizes = ["tiny"] if args.quick else list(SIZES)
    rows = [bench(s, args.tokens, args.repeats) for s in sizes]
    report = {
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "device": "cpu"},
        "results": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"{'size':<20} {'probe s':>8} {'+capture s':>10} {'metrics s':>9} {'overhead':>9} {'cache MB':>9}")
    for r in rows:
        print(f"{r['size']:<20} {r['probe_s']:>8.3f} {r['probe_with_capture_s']:>10.3f} {r['metrics_s']:>9.3f} "
              f"{r['geometry_overhead_ratio']:>8.1%} {r['cache_mb_bf16']:>9.2f}")
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
