"""Scaling: probe time and geometry cache size against probe rows, sequence length and tracked modules.

SmolLM2-135M-Instruct on the CPU (batch 16, fp32), text probes cut from pydoc prose to an exact
token length (``probe.truncate``), geometry in ``reference: cache`` mode with 1024 sampled tokens
per module. One factor varies at a time around rows = 32, length = 64, modules = ``auto`` (4):

* rows ∈ {16, 32, 64}, length ∈ {32, 64, 128}: probe pass time (median of interleaved runs);
* modules ∈ {4, 8, 16}: probe pass with capture, metrics time, and the reference cache in MB
  (``tokens × modules × hidden × 2`` bytes in bf16: it grows with modules and the token sample,
  not with rows once the rows hold more tokens than the sample).

    python benchmarks/scaling.py
    python benchmarks/scaling.py --model tiny     # the test model, seconds
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import interleaved, machine, set_threads, write_json  # noqa: E402

MODULES = {
    4: ["auto"],
    8: ["auto", "layers.{2,12,18,22}.mlp.down_proj"],
    16: ["auto", "layers.{2,8,12,18,22,28}.mlp.down_proj", "layers.{3,9,20,27,29}.self_attn.o_proj",
         "layers.{0}.mlp.down_proj"],
}


def load(name: str) -> tuple[Any, Any, list[str]]:
    if name == "tiny":
        from helpers import corpus, make_tokenizer, pretrained_model

        modules = {
            4: ["auto"],
            8: ["auto", "layers.0.self_attn.o_proj", "layers.{0,1}.mlp.up_proj", "layers.1.input_layernorm"],
            16: ["*proj"],
        }
        MODULES.update(modules)
        return pretrained_model(), make_tokenizer(), [" ".join(corpus(40, seed=i)) for i in range(80)]
    from arena_callbacks.capabilities import text_passages
    from arena_callbacks.models import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer("smollm2-135m-instruct", progress=False)
    # 64 windows of 144 tokens (evenly spaced, overlapping where the prose runs short), decoded
    # to text: each tokenises back to at least the 128 tokens of the longest setting.
    ids = tok(" ".join(text_passages("train") + text_passages("probe")))["input_ids"]
    stride = (len(ids) - 144) // 63
    return model, tok, [tok.decode(ids[i * stride : i * stride + 144]) for i in range(64)]


def runner_for(tok: Any, texts: list[str], rows: int, length: int) -> Any:
    from arena_callbacks import ProbeRunner, ProbeSet, ProbeSettings

    settings = ProbeSettings(batch_size=16, max_length=length, max_examples=None, truncate=True, progress_bar=False)
    runner = ProbeRunner(
        {"general": ProbeSet.build("general", [{"text": t} for t in texts[:rows]], settings)}, settings
    )
    runner.prepare(tok)
    assert all(len(s.ids) == length for s in runner.sequences("general")), "a text is shorter than the length asked"
    return runner


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["smollm2", "tiny"], default="smollm2")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    set_threads(args.threads)
    from arena_callbacks.capture import GeometryTracker
    from arena_callbacks.config import GeometryConfig
    from arena_callbacks.distributed import DistContext

    model, tok, texts = load(args.model)
    ctx = DistContext()
    table: list[dict[str, Any]] = []
    # Rows and length: the probe pass alone. The configurations alternate per repetition.
    grid = [(r, 64) for r in (16, 32, 64)] + [(32, n) for n in (32, 128)]
    runners = {(r, n): runner_for(tok, texts, r, n) for r, n in grid}
    timed = interleaved({k: lambda k=k: runners[k].run(model, ctx) for k in grid}, args.repeats)
    for (r, n), t in timed.items():
        table.append({"rows": r, "length": n, "modules": 0, "probe_s": t["median_s"],
                      "tokens": r * n, "ms_per_token": 1000 * t["median_s"] / (r * n)})
    # Modules: capture and metrics on rows = 32, length = 64.
    runner = runners[(32, 64)]
    for _label, patterns in MODULES.items():
        tracker = GeometryTracker(GeometryConfig(enabled=True, modules=patterns, tokens_per_module=args.tokens,
                                                 reference="cache"), runner)
        tracker.setup(model)

        def capture(tracker: Any = tracker) -> None:
            with tracker.capturing() as cap:
                runner.run(model, ctx, observer=cap)

        capture()
        tracker.measure(model, ctx, baseline=True)
        t_capture = interleaved({"capture": capture}, args.repeats)["capture"]["median_s"]
        capture()

        def metrics(tracker: Any = tracker) -> None:
            tracker.measure(model, ctx, baseline=False)

        t_metrics = interleaved({"metrics": metrics}, args.repeats)["metrics"]["median_s"]
        table.append(
            {
                "rows": 32,
                "length": 64,
                "modules": len(tracker.module_names),
                "module_names": tracker.module_names,
                "probe_with_capture_s": t_capture,
                "metrics_s": t_metrics,
                "cache_mb": tracker.cache_mb,
                "sampled_tokens": tracker.capture.n_tokens if tracker.capture else 0,
            }
        )
    report = {"benchmark": "scaling", "model": args.model, "machine": machine(), "tokens_per_module": args.tokens,
              "table": table}
    path = write_json("scaling" if args.model == "smollm2" else f"scaling_{args.model}", report, args.out)
    print(
        f"{'rows':>5} {'length':>6} {'modules':>7} {'probe s':>8} {'+capture s':>10} {'metrics s':>9} {'cache MB':>8}"
    )
    for row in table:
        print(f"{row['rows']:>5} {row['length']:>6} {row['modules']:>7} {row.get('probe_s', float('nan')):>8.2f} "
              f"{row.get('probe_with_capture_s', float('nan')):>10.2f} {row.get('metrics_s', float('nan')):>9.3f} "
              f"{row.get('cache_mb', float('nan')):>8.2f}")
    print(f"written to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
