"""Memory: peak RSS of a short SmolLM2 LoRA Trainer run with the monitor against without it.

Each run is its own subprocess, so the peaks are separate: SmolLM2-135M-Instruct (fp32, CPU)
with a LoRA r=16 adapter on ``q_proj``/``v_proj``, ``transformers.Trainer`` for a few steps at
batch 8 (pydoc passages, 64 tokens), and in the monitored runs a ``ForgettingMonitor`` with
the built-in ``general_text`` and ``world_knowledge`` probes (32 rows each), probing every 4
steps. Variants: ``plain`` (no monitor), ``monitor`` (defaults), ``monitor+geometry``
(``geometry.reference: cache``, the reference activations kept from the baseline).

Two peaks per run: ``ru_maxrss`` over the whole process (model loading included), and the
peak during training only (Linux ``VmHWM``, reset after loading via ``/proc/self/clear_refs``).
Target: monitored peak ≤ 1.05 × plain peak + the geometry cache the run reports.

Rewind snapshots: the bytes of one kept trainable state (``rewind.capture_state``) for the
LoRA model and for full finetuning, and where ``rewind.storage: auto`` keeps it (memory up to
``rewind.max_memory_mb``, else disk); ``path``/``layerwise`` modes keep two such states.

    python benchmarks/memory.py
    python benchmarks/memory.py --steps 4
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, machine, set_threads, write_json  # noqa: E402

MODEL = "smollm2-135m-instruct"
TARGET = 1.05
VARIANTS = ("plain", "monitor", "monitor+geometry")


def _vm(field: str) -> float:
    """A ``/proc/self/status`` memory field in MB (0 where unavailable)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def train_data(tok: Any, n: int) -> list[dict[str, Any]]:
    from arena_callbacks.capabilities import text_passages

    texts = list(text_passages("train"))[:n]
    return [tok(t, truncation=True, max_length=64) for t in texts]


def child(variant: str, steps: int, threads: int) -> dict[str, Any]:
    set_threads(threads)
    import peft
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    from arena_callbacks import ForgettingMonitor
    from arena_callbacks.capabilities import build_capabilities
    from arena_callbacks.models import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(MODEL, progress=False)
    model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"]))
    data = train_data(tok, 8 * steps)
    after_load = {"rss_mb": _vm("VmRSS"), "peak_mb": _vm("VmHWM")}
    reset = _reset_peak()
    callbacks = []
    monitor = None
    with tempfile.TemporaryDirectory() as out:
        if variant != "plain":
            config: dict[str, Any] = {
                "cadence": {"every_n_steps": 4},
                "probe": {"batch_size": 16, "max_length": 128, "max_examples": 32},
                "logging": {"output_dir": os.path.join(out, "arena")},
            }
            if variant == "monitor+geometry":
                config["geometry"] = {"enabled": True, "reference": "cache"}
            probes = build_capabilities(["general_text", "world_knowledge"], n=32)
            monitor = ForgettingMonitor(config, probes=probes, tokenizer=tok)
            callbacks.append(monitor)
        args = TrainingArguments(output_dir=out, max_steps=steps, per_device_train_batch_size=8, learning_rate=2e-3,
                                 report_to=[], save_strategy="no", logging_steps=10**6, use_cpu=True, seed=0,
                                 disable_tqdm=True)
        trainer = Trainer(model=model, args=args, train_dataset=data, processing_class=tok,
                          data_collator=DataCollatorForLanguageModeling(tok, mlm=False), callbacks=callbacks)
        t = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - t
    geometry_cache_mb = 0.0
    if monitor is not None and monitor.geometry is not None:
        geometry_cache_mb = float(monitor.geometry.cache_mb)
    return {
        "variant": variant,
        "steps": steps,
        "train_seconds": seconds,
        "probes": len(monitor.history) if monitor is not None else 0,
        "after_load": after_load,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "train_peak_rss_mb": _vm("VmHWM") if reset else None,
        "geometry_cache_mb": geometry_cache_mb,
    }


def snapshots() -> dict[str, Any]:
    """Bytes of one kept trainable state, LoRA against full finetuning, and where ``auto`` puts it."""
    import peft

    from arena_callbacks.config import RewindConfig
    from arena_callbacks.models import load_model_and_tokenizer
    from arena_callbacks.rewind import capture_state, state_bytes

    cfg = RewindConfig()
    model, _ = load_model_and_tokenizer(MODEL, progress=False)
    full_mb = state_bytes(capture_state(model)) / 2**20
    lora = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"]))
    lora_mb = state_bytes(capture_state(lora)) / 2**20

    def where(mb: float) -> str:
        return "memory" if cfg.storage == "memory" or (cfg.storage == "auto" and mb <= cfg.max_memory_mb) else "disk"

    return {
        "max_memory_mb": cfg.max_memory_mb,
        "storage": cfg.storage,
        "lora_r16_q_v": {"state_mb": lora_mb, "auto_storage": where(lora_mb), "path_mode_mb": 2 * lora_mb},
        "full_finetuning": {"state_mb": full_mb, "auto_storage": where(full_mb), "path_mode_mb": 2 * full_mb},
        "ratio_full_over_lora": full_mb / lora_mb,
    }


def run_child(variant: str, steps: int, threads: int) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", variant, "--steps", str(steps),
           "--threads", str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"{variant} run failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.steps, args.threads)))
        return 0
    runs = {v: run_child(v, args.steps, args.threads) for v in VARIANTS}
    plain = runs["plain"]
    checks = {}
    for v in VARIANTS[1:]:
        r = runs[v]
        for key in ("peak_rss_mb", "train_peak_rss_mb"):
            if r[key] is None or plain[key] is None:
                continue
            allowed = TARGET * plain[key] + r["geometry_cache_mb"]
            checks[f"{v}/{key}"] = {"ratio": r[key] / plain[key], "allowed_mb": allowed, "measured_mb": r[key],
                                    "meets_target": r[key] <= allowed}
    report = {"benchmark": "memory", "model": MODEL, "target": f"peak ≤ {TARGET} × plain + geometry cache",
              "machine": machine(), "runs": runs, "checks": checks, "rewind_snapshots": snapshots()}
    path = write_json("memory", report, args.out)
    for v, r in runs.items():
        print(
            f"{v:<17} peak RSS {r['peak_rss_mb']:7.0f} MB, "
            f"during training {r['train_peak_rss_mb'] or float('nan'):7.0f} MB"
            f" ({r['probes']} probe passes, geometry cache {r['geometry_cache_mb']:.1f} MB)"
        )
    for k, c in checks.items():
        print(f"{k:<38} {c['ratio']:.3f}x  ({c['measured_mb']:.0f} MB, allowed {c['allowed_mb']:.0f} MB)  "
              f"{'PASS' if c['meets_target'] else 'FAIL'}")
    s = report["rewind_snapshots"]
    print(f"rewind state: LoRA {s['lora_r16_q_v']['state_mb']:.2f} MB ({s['lora_r16_q_v']['auto_storage']}), "
          f"full finetuning {s['full_finetuning']['state_mb']:.0f} MB ({s['full_finetuning']['auto_storage']}); "
          f"written to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
