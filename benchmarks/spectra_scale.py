"""Weight spectra at scale: the fast solver against the float64 reference, and against one probe pass.

SmolLM2-135M with LoRA r16 on every linear layer (210 layers, B set to trained-like random values),
measured side by side in one process:

* ``probe``: one probe pass of the monitor's default settings (``probe.max_examples`` 64,
  ``batch_size`` 8, ``max_length`` 256) over the five shipped capability sets, on the same LoRA
  model: the pass a SmolLM2 user of the shipped sets pays at every probe step;
* ``probe_one``: the same over ``general_text`` alone (64 rows), for scale;
* ``fast``: ``weight_spectra`` with the monitor's solver (``spectra`` defaults: float32, randomized top
  of the spectrum), *cold* (an empty cache: W0's SVDs are taken, as at the first spectra pass, so the
  baseline's cost is included) and *warm* (the cache filled, as every later pass);
* ``reference``: the float64 full-SVD method every spectra pass used before (cold and warm), once.

Reported: cold and warm fast pass over the probe pass (target: the cold pass ≤ 1 probe pass), the
speedup over the reference, and the agreement (largest relative difference per metric, intruder
counts equal). Then single decompositions of a 7B-sized layer (4096×11008 and 4096×4096) on this CPU,
and from them the cost of a Llama-2-7B spectra pass (224 such layers) on this machine, with the FLOP
and memory counts behind it.

    python benchmarks/spectra_scale.py
    python benchmarks/spectra_scale.py --repeats 1 --skip-reference --skip-7b   # quick look
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import interleaved, machine, paired_ratio, set_threads, write_json  # noqa: E402

MODEL = "smollm2-135m-instruct"
TARGET = 1.0  # cold fast spectra pass / probe pass
# Llama-2-7B's linear layers per block (d_out, d_in): q, k, v, o, gate, up, down; 32 blocks.
LLAMA7B = [(4096, 4096)] * 4 + [(11008, 4096)] * 2 + [(4096, 11008)]
BLOCKS7B = 32


def lora_model(args: argparse.Namespace) -> tuple[Any, Any]:
    import peft
    import torch

    from arena_callbacks.models import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(MODEL, progress=False)
    lora = peft.get_peft_model(model, peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank,
                                                      target_modules="all-linear"))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.01)
    return lora.eval(), tok


def smollm(args: argparse.Namespace) -> dict[str, Any]:
    from arena_callbacks import ProbeRunner, ProbeSet, ProbeSettings
    from arena_callbacks.capabilities import CAPABILITIES, build_capability
    from arena_callbacks.config import SpectraConfig
    from arena_callbacks.distributed import DistContext
    from arena_callbacks.spectra import EXACT, SPECTRAL_METRICS, spectra_layer_names, weight_spectra

    model, tok = lora_model(args)
    names = spectra_layer_names(model)
    settings = ProbeSettings(max_examples=args.rows, progress_bar=False)

    def runner_of(sets: list[str]) -> Any:
        probes = {n: ProbeSet.build(n, build_capability(n, tokenizer=tok), settings) for n in sets}
        runner = ProbeRunner(probes, settings)
        runner.prepare(tok)
        return runner

    forced = sorted(n for n, c in CAPABILITIES.items() if not c.generative)  # the teacher-forced sets, as measured
    every, one = runner_of(forced), runner_of(["general_text"])
    solver = SpectraConfig().solver()
    warm_cache: dict = {}
    weight_spectra(model, names=names, solver=solver, cache=warm_cache)

    def cold() -> Any:
        return weight_spectra(model, names=names, solver=solver, cache={})

    timed = interleaved({
        "probe": lambda: every.run(model, DistContext()),
        "probe_one": lambda: one.run(model, DistContext()),
        "fast_cold": cold,
        "fast_warm": lambda: weight_spectra(model, names=names, solver=solver, cache=warm_cache),
    }, args.repeats, warmup=False)
    fast = timed["fast_warm"]["last"]
    out: dict[str, Any] = {
        "layers": len(names), "rank": args.rank, "probe_rows": args.rows, "probe_sets": forced,
        "probe_one_s": timed["probe_one"]["median_s"],
        "cold_over_probe_one": paired_ratio(timed, "fast_cold", "probe_one"),
        "shapes": sorted({tuple(model.get_submodule(f"base_model.model.{n}").base_layer.weight.shape)
                          for n in names}),
        "times_s": {n: v["times_s"] for n, v in timed.items()},
        "probe_s": timed["probe"]["median_s"], "fast_cold_s": timed["fast_cold"]["median_s"],
        "fast_warm_s": timed["fast_warm"]["median_s"],
        "cold_over_probe": paired_ratio(timed, "fast_cold", "probe"),
        "warm_over_probe": paired_ratio(timed, "fast_warm", "probe"),
        "target_cold_over_probe": TARGET,
        "cache_mb": sum(t.numel() * t.element_size() for _, svd in warm_cache.values() for t in svd) / 2**20,
    }
    out["meets_target"] = out["cold_over_probe"] <= TARGET
    if not args.skip_reference:
        t = time.perf_counter()
        ref_cache: dict = {}
        ref = weight_spectra(model, names=names, solver=EXACT, cache=ref_cache)
        out["reference_cold_s"] = time.perf_counter() - t
        t = time.perf_counter()
        weight_spectra(model, names=names, solver=EXACT, cache=ref_cache)
        out["reference_warm_s"] = time.perf_counter() - t
        out["speedup_cold"] = out["reference_cold_s"] / out["fast_cold_s"]
        out["speedup_warm"] = out["reference_warm_s"] / out["fast_warm_s"]
        worst = {}
        for m in SPECTRAL_METRICS:
            if m == "intruders":
                continue
            worst[m] = max(abs(fast[n][m] - ref[n][m]) / max(abs(ref[n][m]), 1e-12) for n in names)
        out["max_rel_diff"] = worst
        out["intruders_equal"] = all(fast[n]["intruders"] == ref[n]["intruders"] for n in names)
        out["intruders_total"] = {"fast": sum(fast[n]["intruders"] for n in names),
                                  "reference": sum(ref[n]["intruders"] for n in names)}
        # A small update has no intruders; a 10x and a 100x larger one (every 5th layer) have some.
        import torch

        some = names[::5]
        for factor in (10, 100):
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if "lora_B" in name:
                        p.mul_(10)
            f = weight_spectra(model, names=some, solver=solver, cache=warm_cache)
            r = weight_spectra(model, names=some, solver=EXACT, cache=ref_cache)
            out[f"intruders_x{factor}"] = {"layers": len(some), "fast": sum(f[n]["intruders"] for n in some),
                                           "reference": sum(r[n]["intruders"] for n in some),
                                           "equal": all(f[n]["intruders"] == r[n]["intruders"] for n in some)}
        out["intruders_equal"] = out["intruders_equal"] and all(out[f"intruders_x{x}"]["equal"] for x in (10, 100))
    return out


def seven_b(args: argparse.Namespace) -> dict[str, Any]:
    """Single 7B-sized layers here, and a Llama-2-7B pass from them (float32, the monitor's solver)."""
    import torch

    from arena_callbacks.planning import spectra_layer_cost
    from arena_callbacks.spectra import FAST, PretrainedSVD, lowrank_update_metrics, top_singular

    out: dict[str, Any] = {"shapes": {}, "rank": args.rank}
    for d_out, d_in in sorted({(max(o, i), min(o, i)) for o, i in LLAMA7B}):  # a shape and its transpose cost alike
        g = torch.Generator().manual_seed(0)
        w = torch.randn(d_out, d_in, generator=g) / math.sqrt(d_in)
        b = torch.randn(d_out, args.rank, generator=g) * 0.01
        a = torch.randn(args.rank, d_in, generator=g) / math.sqrt(d_in)
        row: dict[str, Any] = {}
        t = time.perf_counter()
        u, sv, vh = torch.linalg.svd(w, full_matrices=False)  # W0: once per layer and run
        row["w0_svd_fp32_s"] = time.perf_counter() - t
        svd = PretrainedSVD(u, sv, vh.mT)
        t = time.perf_counter()
        lowrank_update_metrics(w, b, a, 2.0, k=10, w0_svd=svd, solver=FAST)  # every later LoRA pass
        row["lora_pass_s"] = time.perf_counter() - t
        t = time.perf_counter()
        top_singular(w + 2.0 * (b @ a), 10, FAST)  # a dense update's intruders (full finetuning, OFT)
        row["dense_top10_s"] = time.perf_counter() - t
        # The on-paper counts are the planner's (arena-callbacks plan uses the same function).
        cost = spectra_layer_cost(d_out, d_in, args.rank, k=10, power_iterations=FAST.power_iterations)
        row["w0_svd_flop"] = cost["w0_svd_flop"]  # Golub–Van Loan: thin SVD with U and V
        row["lora_pass_flop"] = cost["lora_pass_flop"]  # U0ᵀB and A V0 dominate
        row["dense_top10_flop"] = cost["dense_pass_flop"]
        row["cache_bytes_fp32"] = cost["cache_bytes"]
        out["shapes"][f"{d_out}x{d_in}"] = row
        del u, sv, vh, svd
    per_block = [out["shapes"][f"{max(o, i)}x{min(o, i)}"] for o, i in LLAMA7B]
    out["layers"] = len(LLAMA7B) * BLOCKS7B
    for key in ("w0_svd_fp32_s", "lora_pass_s", "dense_top10_s", "w0_svd_flop", "lora_pass_flop",
                "dense_top10_flop", "cache_bytes_fp32"):
        out[f"model_{key}"] = BLOCKS7B * sum(r[key] for r in per_block)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=64, help="probe rows (64: the default probe.max_examples)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-reference", action="store_true", help="skip the float64 reference (minutes)")
    ap.add_argument("--skip-7b", action="store_true", help="skip the single 7B-sized decompositions")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    set_threads(args.threads)
    report: dict[str, Any] = {"benchmark": "spectra_scale", "model": MODEL, "machine": machine(),
                              "smollm2": smollm(args)}
    s = report["smollm2"]
    print(f"SmolLM2 + LoRA r{s['rank']} on {s['layers']} layers: probe pass {s['probe_s']:.2f} s (five sets; one "
          f"set {s['probe_one_s']:.2f} s); fast spectra cold "
          f"{s['fast_cold_s']:.2f} s ({s['cold_over_probe']:.2f} probe passes, target ≤ {TARGET:g}), warm "
          f"{s['fast_warm_s']:.2f} s ({s['warm_over_probe']:.2f}); W0 cache {s['cache_mb']:.0f} MB", flush=True)
    if "reference_cold_s" in s:
        print(f"reference (float64, full SVDs): cold {s['reference_cold_s']:.1f} s, warm {s['reference_warm_s']:.1f} s"
              f" -> {s['speedup_cold']:.1f}x / {s['speedup_warm']:.1f}x faster; intruders equal: "
              f"{s['intruders_equal']} ({s['intruders_total']}); max rel diff {s['max_rel_diff']}", flush=True)
    if not args.skip_7b:
        report["llama2_7b"] = seven_b(args)
        b = report["llama2_7b"]
        print(f"Llama-2-7B ({b['layers']} layers) on this CPU: W0 SVDs once {b['model_w0_svd_fp32_s'] / 60:.0f} min "
              f"({b['model_w0_svd_flop'] / 1e12:.1f} TFLOP), then per LoRA pass {b['model_lora_pass_s']:.0f} s "
              f"({b['model_lora_pass_flop'] / 1e12:.2f} TFLOP), per dense pass {b['model_dense_top10_s']:.0f} s "
              f"({b['model_dense_top10_flop'] / 1e12:.1f} TFLOP); W0 cache "
              f"{b['model_cache_bytes_fp32'] / 2**30:.0f} GiB", flush=True)
    path = write_json("spectra_scale", report, args.out)
    print(f"written {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
