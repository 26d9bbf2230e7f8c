"""GPU check: the monitor on CUDA in bf16 agrees with fp32 within stated tolerances.

    python benchmarks/gpu_check.py                       # SmolLM2-135M if cached/obtainable, else the tiny test model
    python benchmarks/gpu_check.py --model tiny --out benchmarks/results/gpu_check.json

Checks (each prints a row and lands in the JSON; exit status 1 if any fails):

1. Probes: NLL per probe under ``probe.precision`` ``bf16`` (autocast) and ``auto`` on bf16
   weights, against ``fp32``: relative NLL difference ≤ 2e-2; accuracy / exact match within
   one row (|Δ| ≤ 1/n).
2. Geometry: Procrustes, CKA and Gram keys of a perturbed LoRA model against its
   ``disable_adapter()`` reference, bf16 probes vs fp32: |Δ| ≤ 0.05·|fp32 value| + 0.01 (bf16
   rounding of the activations alone leaves a residual of order 1e-2).
3. Rewind: ``α = 0`` on the path gives the pretrained logits exactly in fp32 (difference 0)
   and within 1e-6 (max |Δ logit| / max |logit|) of the bf16 pretrained model with bf16
   weights; a kept state restores bit-exactly on the GPU. (How far bf16 weights alone move
   the logits from fp32 is recorded as an ``info`` row: 2% of the largest logit on SmolLM2's
   architecture with random weights, H100.)
4. Trainer: a few steps of a LoRA finetune with ``bf16=True`` and the monitor attached; the
   monitor's baseline (``probe.precision: fp32``) equals a plain fp32 pass to 1e-5 relative.

Needs a CUDA device; on a machine without one it says so and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

NLL_REL = 2e-2
GEOM_TOL = 5e-2
GEOM_ABS = 1e-2
LOGIT_REL_BF16 = 1e-6
TRAINER_REL = 1e-5


def load(model_name: str):
    if model_name == "tiny":
        from helpers import make_tokenizer, pretrained_model

        return pretrained_model(), make_tokenizer(), "tiny"
    from arena_callbacks.models import load_model_and_tokenizer

    try:
        model, tok = load_model_and_tokenizer(model_name)
        return model, tok, model_name
    except Exception as e:  # noqa: BLE001 - fall back to what is always there
        print(f"could not load {model_name} ({e}); using the tiny test model", file=sys.stderr)
        return load("tiny")


def probe_sets(tok):
    from arena_callbacks import ProbeSet, ProbeSettings

    try:
        from arena_callbacks.capabilities import build_capabilities

        data = build_capabilities(n=32, tokenizer=tok)
    except Exception:  # noqa: BLE001 - the capability builders are optional here
        from helpers import corpus

        data = {
            "general": [{"text": s} for s in corpus(32, seed=3)],
            "facts": [{"context": "one two", "choices": [" three", " dog"], "answer": 0}] * 8,
        }
    settings = ProbeSettings(batch_size=16, max_length=256, truncate=True, max_examples=32)
    return {n: ProbeSet.build(n, rows, settings) for n, rows in data.items()}


def runner(sets, precision):
    from arena_callbacks import ProbeRunner, ProbeSettings

    r = ProbeRunner(sets, ProbeSettings(batch_size=16, max_length=256, truncate=True, max_examples=32,
                                        precision=precision))
    return r


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu_check.json"))
    p.add_argument("--device", default="cuda", help="cuda (the check); cpu only dry-runs the script's logic")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; run this on a GPU machine (or --device cpu for a dry run)",
              file=sys.stderr)
        return 2
    dev = torch.device(args.device)
    rows: list[dict] = []

    def check(name, value, limit, ok):
        rows.append({"check": name, "value": value, "limit": limit, "ok": bool(ok)})
        print(f"{'PASS' if ok else 'FAIL'}  {name:<55} {value:.3g} (limit {limit})")

    model, tok, label = load(args.model)
    model = model.to(dev).eval()
    sets = probe_sets(tok)
    from arena_callbacks.distributed import DistContext

    ctx = DistContext()
    r32, r16 = runner(sets, "fp32"), runner(sets, "bf16")
    for r in (r32, r16):
        r.prepare(tok)
    t = time.perf_counter()
    fp32 = r32.run(model, ctx)
    t32 = time.perf_counter() - t
    t = time.perf_counter()
    bf16 = r16.run(model, ctx)
    t16 = time.perf_counter() - t
    model_bf16 = type(model)(model.config).to(dev)
    model_bf16.load_state_dict(model.state_dict())
    model_bf16 = model_bf16.to(torch.bfloat16).eval()
    rauto = runner(sets, "auto")
    rauto.prepare(tok)
    auto = rauto.run(model_bf16, ctx)
    for name, ref in fp32.items():
        for tag, res in (("bf16 autocast", bf16[name]), ("bf16 weights", auto[name])):
            rel = abs(res.nll - ref.nll) / max(abs(ref.nll), 1e-9)
            check(f"probe {name}: NLL {tag} vs fp32 (rel)", rel, NLL_REL, rel <= NLL_REL)
            if ref.score is not None:
                d = abs(res.score - ref.score)
                check(f"probe {name}: score {tag} vs fp32 (abs)", d, 1 / ref.examples, d <= 1 / ref.examples + 1e-12)

    # Geometry on a perturbed LoRA model (reference: disable_adapter).
    import peft

    from arena_callbacks.capture import GeometryTracker
    from arena_callbacks.config import GeometryConfig

    lora = peft.get_peft_model(model, peft.LoraConfig(r=8, target_modules="all-linear")).to(dev)
    g = torch.Generator(device="cpu").manual_seed(0)
    with torch.no_grad():
        for _name, prm in lora.named_parameters():
            if prm.requires_grad:
                prm.copy_((0.02 * torch.randn(prm.shape, generator=g)).to(dev))
    geo = {}
    for prec, r in (("fp32", r32), ("bf16", r16)):
        tracker = GeometryTracker(GeometryConfig(enabled=True, tokens_per_module=512), r)
        tracker.setup(lora)
        with tracker.capturing() as cap:
            r.run(lora, ctx, observer=cap)
        geo[prec] = tracker.measure(lora, ctx, baseline=True)
    for k, ref in geo["fp32"].items():
        if not k.endswith("/mean") or not any(m in k for m in ("procrustes", "cka", "gram")):
            continue
        d = abs(geo["bf16"][k] - ref)
        limit = GEOM_TOL * abs(ref) + GEOM_ABS
        check(f"geometry {k}: bf16 vs fp32 (abs; fp32 {ref:.3g})", d, round(limit, 4), d <= limit)

    # Rewind: α = 0 is the pretrained model; kept states restore exactly.
    from arena_callbacks.rewind import capture_state, interpolate, load_state, path_rules

    ids = torch.tensor([tok("The quick brown fox jumps over the lazy dog. 2 + 2 =")["input_ids"]], device=dev)
    with torch.no_grad(), lora.disable_adapter():
        base_logits = lora(input_ids=ids).logits.float()
    theta1 = capture_state(lora)
    theta0 = {k: (torch.zeros_like(v) if "lora_B" in k else v.clone()) for k, v in theta1.items()}
    load_state(lora, interpolate(theta0, theta1, 0.0, path_rules(theta0)))
    with torch.no_grad():
        zero_logits = lora(input_ids=ids).logits.float()
    diff = float((zero_logits - base_logits).abs().max())
    check("rewind α=0 logits vs pretrained, fp32 (max |Δ|)", diff, 0.0, diff == 0.0)
    load_state(lora, theta1)
    exact = all(torch.equal(capture_state(lora)[k], theta1[k]) for k in theta1)
    check("rewind: kept state restored bit-exactly on the GPU", 0.0 if exact else 1.0, 0.0, exact)
    lora16 = lora.to(torch.bfloat16)
    with torch.no_grad(), lora16.disable_adapter():
        base16 = lora16(input_ids=ids).logits.float()
    theta1_16 = capture_state(lora16)
    theta0_16 = {k: (torch.zeros_like(v) if "lora_B" in k else v.clone()) for k, v in theta1_16.items()}
    load_state(lora16, interpolate(theta0_16, theta1_16, 0.0, path_rules(theta0_16)))
    with torch.no_grad():
        z16 = lora16(input_ids=ids).logits.float()
    # α = 0 in bf16 is the bf16 pretrained model: B = 0 adds an exact zero to each layer's output.
    rel = float((z16 - base16).abs().max() / base16.abs().max())
    check("rewind α=0 logits vs pretrained, bf16 weights (rel)", rel, LOGIT_REL_BF16, rel <= LOGIT_REL_BF16)
    # For the record: what bf16 weights alone move the logits (30 layers of bf16 rounding).
    rel32 = float((base16 - base_logits).abs().max() / base_logits.abs().max())
    rows.append({"check": "info: bf16 vs fp32 pretrained logits (rel, max)", "value": rel32, "limit": None, "ok": True})
    print(f"INFO  {'bf16 vs fp32 pretrained logits (rel, max)':<55} {rel32:.3g}")

    # A short bf16 Trainer run with the monitor.
    import tempfile

    from transformers import Trainer, TrainingArguments

    from arena_callbacks import ForgettingMonitor

    model2, tok2, _ = load(label)
    if tok2.pad_token is None:
        tok2.pad_token = tok2.eos_token
    lm = peft.get_peft_model(model2.to(dev), peft.LoraConfig(r=8, target_modules="all-linear"))
    probes = {n: s.rows for n, s in sets.items()}
    mon = ForgettingMonitor({"cadence": {"every_n_steps": 2}, "probe": {"batch_size": 16, "max_length": 256,
                             "truncate": True}, "logging": {"tensorboard": False}}, probes=probes)
    data = [tok2("def add(a, b):\n    return a + b\n") for _ in range(64)]
    from transformers import DataCollatorForLanguageModeling

    with tempfile.TemporaryDirectory() as d:
        Trainer(model=lm, args=TrainingArguments(output_dir=d, max_steps=4, per_device_train_batch_size=8,
                                                 bf16=True, report_to=[], save_strategy="no",
                                                 use_cpu=dev.type == "cpu"),
                train_dataset=data, processing_class=tok2,
                data_collator=DataCollatorForLanguageModeling(tok2, mlm=False), callbacks=[mon]).train()
    base_nll = {n: r.nll for n, r in fp32.items()}
    worst = max(abs(mon.history.snapshots[0].metrics[f"nll/{n}"] - v) / abs(v) for n, v in base_nll.items())
    check("Trainer bf16=True: monitor baseline vs plain fp32 pass (rel)", worst, TRAINER_REL, worst <= TRAINER_REL)

    result = {
        "device": torch.cuda.get_device_name(0) if dev.type == "cuda" else f"{dev.type} (dry run)",
        "model": label,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
        "probe_seconds": {"fp32": t32, "bf16_autocast": t16},
        "checks": rows,
        "passed": all(r["ok"] for r in rows),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"\n{sum(r['ok'] for r in rows)}/{len(rows)} checks passed on {result['device']}; wrote {args.out}")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
