"""Cost of activation geometry and weight spectra on SmolLM2-135M, against the probe pass.

Geometry (real SmolLM2-135M, 64 built-in ``general_text`` rows (the default
``probe.max_examples``), batch 16, the ``auto`` modules, 1024 sampled tokens), timed side by side
in one process (interleaved repetitions, medians):

* ``probe``: the scoring pass alone (``ProbeRunner.run``);
* ``probe+capture``: the same pass with the capture hooks on;
* ``metrics``: gathering the captured rows and computing all six metrics for every module
  (``reference: cache``, the plain-model mode).

Reported: ``metrics / probe`` (target ≤ 10%), the whole geometry overhead
``(capture − probe + metrics) / probe``, and for a LoRA model (``reference: disable_adapter``)
the reference pass, which is a second, logits-free forward over the geometry probes by design.

Spectra (SmolLM2-135M with a LoRA r=16 adapter on ``q_proj``, ``v_proj``, ``down_proj``: 90
layers, B set to random values): the per-step metrics from the factors
(:func:`~arena_callbacks.spectra.lowrank_update_metrics`) against the same metrics from the
dense ``ΔW`` (:func:`~arena_callbacks.spectra.dense_update_metrics`), both with the pretrained
SVDs cached, without intruders (``k = 0``, target ≥ 10× faster) and with them (``k = 10``:
both pay an SVD of ``W_ft``). The one-time pretrained SVD cache is reported apart.

    python benchmarks/geometry_spectra.py
    python benchmarks/geometry_spectra.py --repeats 1 --layers 30
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import interleaved, machine, paired_ratio, set_threads, write_json  # noqa: E402

MODEL = "smollm2-135m-instruct"
GEOMETRY_TARGET = 0.10  # metrics / probe pass
SPECTRA_TARGET = 10.0  # dense time / factor time


def geometry(model: Any, tok: Any, args: argparse.Namespace) -> dict[str, Any]:
    import peft

    from arena_callbacks import ProbeRunner, ProbeSet, ProbeSettings
    from arena_callbacks.capabilities import build_capability
    from arena_callbacks.capture import GeometryTracker
    from arena_callbacks.config import GeometryConfig
    from arena_callbacks.distributed import DistContext

    settings = ProbeSettings(batch_size=16, max_length=128, max_examples=None, progress_bar=False)
    rows = build_capability("general_text", n=args.rows, seed=0)
    runner = ProbeRunner({"general": ProbeSet.build("general", rows, settings)}, settings)
    runner.prepare(tok)
    ctx = DistContext()
    out: dict[str, Any] = {"rows": len(rows), "probe_tokens": sum(len(s.ids) for s in runner.sequences("general"))}

    tracker = GeometryTracker(GeometryConfig(enabled=True, tokens_per_module=args.tokens, reference="cache"), runner)
    tracker.setup(model)

    def probe() -> None:
        runner.run(model, ctx)

    def probe_capture() -> None:
        with tracker.capturing() as cap:
            runner.run(model, ctx, observer=cap)

    def metrics() -> None:
        tracker.measure(model, ctx, baseline=False)

    probe_capture()
    tracker.measure(model, ctx, baseline=True)  # fills the reference cache
    # metrics() reads the rows of the last capture (the one above before the first repetition);
    # all three side by side, so that the ratios do not move with the machine's speed.
    timed = interleaved({"probe": probe, "probe+capture": probe_capture, "metrics": metrics}, args.repeats)
    t_metrics = timed["metrics"]
    t_probe = timed["probe"]["median_s"]
    capture_extra = paired_ratio(timed, "probe+capture", "probe") - 1.0
    out["cache_mode"] = {
        "modules": tracker.module_names,
        "sampled_tokens": tracker.capture.n_tokens if tracker.capture else 0,
        "probe_s": t_probe,
        "probe_with_capture_s": timed["probe+capture"]["median_s"],
        "metrics_s": t_metrics["median_s"],
        "times_s": {"probe": timed["probe"]["times_s"], "probe+capture": timed["probe+capture"]["times_s"],
                    "metrics": t_metrics["times_s"]},
        "metrics_over_probe": paired_ratio(timed, "metrics", "probe"),
        "capture_over_probe": capture_extra,
        "geometry_overhead_ratio": capture_extra + paired_ratio(timed, "metrics", "probe"),
        "cache_mb": tracker.cache_mb,
    }

    # LoRA: the pretrained side comes from a second, logits-free pass with the adapter off.
    lora = peft.get_peft_model(model, peft.LoraConfig(r=16, target_modules=["q_proj", "v_proj", "down_proj"]))
    lt = GeometryTracker(
        GeometryConfig(enabled=True, tokens_per_module=args.tokens, reference="disable_adapter"), runner
    )
    lt.setup(lora)

    def lora_probe() -> None:
        runner.run(lora, ctx)

    def lora_geometry() -> None:
        with lt.capturing() as cap:
            runner.run(lora, ctx, observer=cap)
        lt.measure(lora, ctx, baseline=False)

    t = interleaved({"probe": lora_probe, "probe+geometry": lora_geometry}, args.repeats)
    out["disable_adapter_mode"] = {
        "probe_s": t["probe"]["median_s"],
        "probe_with_geometry_s": t["probe+geometry"]["median_s"],
        "times_s": {k: v["times_s"] for k, v in t.items()},
        "geometry_overhead_ratio": paired_ratio(t, "probe+geometry", "probe") - 1.0,
        "note": "includes the reference pass (a forward over the geometry probes with the adapter off)",
    }
    lora.unload()
    return out


def spectra(model: Any, args: argparse.Namespace) -> dict[str, Any]:
    import peft
    import torch

    from arena_callbacks.spectra import (
        LowRankUpdate,
        dense_update_metrics,
        layer_updates,
        lowrank_update_metrics,
        pretrained_svd,
    )

    lora = peft.get_peft_model(
        model, peft.LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj", "down_proj"])
    )
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.01)
    updates = [(n, u) for n, u in layer_updates(lora) if isinstance(u, LowRankUpdate)][: args.layers]
    t = time.perf_counter()
    svds = {n: pretrained_svd(u.w0) for n, u in updates}
    svd_cache_s = time.perf_counter() - t
    # Float64 CPU copies, made once, as spectra.py works on them.
    mats = [(n, u.w0.double(), u.b.double(), u.a.double(), u.scaling) for n, u in updates]

    def factors(k: int) -> Any:
        return lambda: [lowrank_update_metrics(w0, b, a, s, k=k, w0_svd=svds[n]) for n, w0, b, a, s in mats]

    def dense(k: int) -> Any:
        return lambda: [dense_update_metrics(w0, w0 + s * (b @ a), k=k, w0_svd=svds[n]) for n, w0, b, a, s in mats]

    out: dict[str, Any] = {"layers": len(mats), "rank": 16, "pretrained_svd_cache_s": svd_cache_s,
                           "shapes": sorted({tuple(m[1].shape) for m in mats})}
    for k in (0, 10):
        timed = interleaved({"factors": factors(k), "dense": dense(k)}, args.repeats)
        f, d = timed["factors"]["last"], timed["dense"]["last"]
        worst = max(abs(a[m] - b[m]) / max(1e-12, abs(b[m])) for a, b in zip(f, d) for m in a if m != "intruders")
        out[f"k{k}"] = {
            "factors_s": timed["factors"]["median_s"],
            "dense_s": timed["dense"]["median_s"],
            "times_s": {n: v["times_s"] for n, v in timed.items()},
            "speedup": paired_ratio(timed, "dense", "factors"),
            "max_rel_diff": worst,
            "intruders_equal": all(a["intruders"] == b["intruders"] for a, b in zip(f, d)),
        }
    out["k0"]["target_speedup"] = SPECTRA_TARGET
    out["k0"]["meets_target"] = out["k0"]["speedup"] >= SPECTRA_TARGET
    lora.unload()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=64, help="general_text probe rows (64: the default probe.max_examples)")
    ap.add_argument("--tokens", type=int, default=1024, help="geometry.tokens_per_module")
    ap.add_argument("--layers", type=int, default=90, help="LoRA layers measured by spectra")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    set_threads(args.threads)
    from arena_callbacks.models import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(MODEL, progress=False)
    geo = geometry(model, tok, args)
    spec = spectra(model, args)
    c = geo["cache_mode"]
    geo["metrics_over_probe_target"] = GEOMETRY_TARGET
    geo["meets_target"] = c["metrics_over_probe"] <= GEOMETRY_TARGET
    report = {"benchmark": "geometry_spectra", "model": MODEL, "machine": machine(), "geometry": geo, "spectra": spec}
    path = write_json("geometry_spectra", report, args.out)
    print(
        f"geometry: probe {c['probe_s']:.2f} s, metrics {c['metrics_s']:.3f} s = {c['metrics_over_probe']:.1%} of the "
        f"probe (target ≤ {GEOMETRY_TARGET:.0%}); capture +{c['capture_over_probe']:.1%}; "
        f"cache {c['cache_mb']:.2f} MB; "
        f"LoRA with its reference pass +{geo['disable_adapter_mode']['geometry_overhead_ratio']:.0%}"
    )
    for k in (0, 10):
        s = spec[f"k{k}"]
        print(f"spectra k={k}: factors {s['factors_s']:.3f} s, dense {s['dense_s']:.3f} s, {s['speedup']:.1f}x "
              f"({spec['layers']} layers; max rel diff {s['max_rel_diff']:.1e})")
    print(f"one-time pretrained SVD cache: {spec['pretrained_svd_cache_s']:.1f} s; written to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
