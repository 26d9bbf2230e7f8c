"""Where a probe pass spends its time on a GPU: the model's bare forward against ProbeRunner and lm-eval.

On a GPU a 135M-parameter model at batch 16 is bound by launching kernels from Python, not by
arithmetic, so the number of forwards and the host-side work around each decide the time.
This script measures, for one workload (default ``text``):

* the bare forward (``model(input_ids, attention_mask)``) at the shape of the workload's
  widest batch, with all logits and with ``logits_to_keep=1``: the floor per forward;
* one ProbeRunner pass and one lm-eval ``HFLM`` call, timed and under ``torch.profiler``
  (the top operators by host time are written out).

    python benchmarks/gpu_profile.py --model DIR --out benchmarks/results/gpu_profile.txt
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, interleaved, model_label, sync  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--workload", default="text", choices=["text", "mc_single", "mc_multi"])
    ap.add_argument("--rows", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=str(RESULTS / "gpu_profile.txt"))
    args = ap.parse_args(argv)

    import logging

    import probe_throughput as pt
    import torch
    from lm_eval.models.huggingface import HFLM
    from torch.profiler import ProfilerActivity, profile

    from arena_callbacks.distributed import DistContext
    from arena_callbacks.models import load_model_and_tokenizer

    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    dev = args.device
    model, tok = load_model_and_tokenizer(args.model, progress=False)
    model = model.to(dev).eval()
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=args.batch_size, device=dev)
    rows = pt.BUILDERS[args.workload](args.rows, 0)
    runner = pt.probe_runner(args.workload, rows, tok, lm, args.batch_size)
    plan = runner._batches(DistContext())
    widest = max(plan, key=lambda b: b.n_rows * max(b.row_lengths()))
    shape = (widest.n_rows, max(widest.row_lengths()))
    requests = pt.lm_eval_requests(pt.kind_of(args.workload), rows)

    def call() -> None:
        pt.lm_eval_call(lm, args.workload, requests)

    ids = torch.randint(0, tok.vocab_size, shape, device=dev)
    mask = torch.ones(shape, dtype=torch.long, device=dev)
    lines = [
        f"model: {model_label(args.model)}; device: {torch.cuda.get_device_name(0) if dev == 'cuda' else dev}; "
        f"workload {args.workload}, {len(rows)} rows, batch {args.batch_size}; ProbeRunner plan: {len(plan)} forwards"
    ]
    with torch.no_grad():
        bare = interleaved({"all": lambda: model(input_ids=ids, attention_mask=mask),
                            "last": lambda: model(input_ids=ids, attention_mask=mask, logits_to_keep=1)},
                           args.reps * 4, dev)
    full, last = bare["all"]["median_s"], bare["last"]["median_s"]
    lines.append(f"bare forward at {shape}: all logits {full * 1e3:.1f} ms, logits_to_keep=1 {last * 1e3:.1f} ms")
    passes = interleaved({"ours": lambda: runner.run(model), "theirs": call}, args.reps, dev)
    ours, theirs = passes["ours"]["median_s"], passes["theirs"]["median_s"]
    lines.append(f"ProbeRunner pass {ours * 1e3:.0f} ms ({ours / len(plan) * 1e3:.1f} ms per forward); "
                 f"lm-eval {theirs * 1e3:.0f} ms; ratio {theirs / ours:.2f}x")
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev == "cuda" else [])
    for name, fn in (("ProbeRunner", lambda: runner.run(model)), ("lm-eval HFLM", call)):
        with profile(activities=acts) as prof:
            fn()
            sync(dev)
        lines.append(f"\n=== {name}: top operators by host (self CPU) time")
        lines.append(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=48))
    text = "\n".join(lines)
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
