"""Run every benchmark and write ``benchmarks/RESULTS.md``: each ratio against its target.

Each script runs in its own process with its defaults (a few minutes each on two CPU cores)
and writes its JSON under ``benchmarks/results/``; this script then reads those files and
writes the report: the machine (CPU model, cores, threads, load), package versions, date, and
PASS/FAIL per target.

    python benchmarks/run_all.py                 # run everything, then write RESULTS.md
    python benchmarks/run_all.py --only memory   # run some, report from all JSON files present
    python benchmarks/run_all.py --report-only   # only rewrite RESULTS.md from the JSON files

The GPU variant (``benchmarks/gpu.py``) writes ``*_cuda.json`` files, reported here when present.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, ROOT, machine  # noqa: E402

BENCH = ROOT / "benchmarks"
SCRIPTS = ("probe_throughput", "generate_speed", "geometry_spectra", "spectra_scale", "memory", "scaling", "overhead",
           "plan_check")


def load(name: str) -> dict[str, Any] | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("PASS" if ok else "**FAIL**")


# --------------------------------------------------------------------------------------
# Rows of the summary table: (benchmark, measure, value, target, verdict)
# --------------------------------------------------------------------------------------


def throughput_rows(data: dict[str, Any], suffix: str = "") -> list[tuple[str, ...]]:
    labels = {"mc_single": "4-way MC, single-token choices", "mc_multi": "4-way MC, 10-20-token endings",
              "text": "text log-likelihood (rolling)"}
    rows = []
    for r in data["results"]:
        rows.append((f"probe_throughput{suffix}", f"{labels[r['workload']]}: lm-eval time / ProbeRunner time",
                     f"{r['speedup']:.2f}x ({r['lm_eval_hflm_s']:.1f} s / {r['probe_runner_s']:.1f} s)"
                     + (f"; FLOP ratio {r['flop_ratio']:.2f}x" if "flop_ratio" in r else ""),
                     f"≥ {r['target_speedup']}x, never < 1x", verdict(r["meets_target"])))
        acc = r.get("accuracy")
        same = f", accuracy {acc['probe_runner']:.3f} = {acc['lm_eval_hflm']:.3f}" if acc else ""
        rows.append(
            (
                f"probe_throughput{suffix}",
                f"{labels[r['workload']]}: scores agree",
                f"max |Δ log-lik| {r['max_abs_loglik_diff']:.1e}{same}",
                r["tolerance"],
                verdict(r["scores_agree"]),
            )
        )
    return rows


def geometry_rows(data: dict[str, Any]) -> list[tuple[str, ...]]:
    g, s = data["geometry"], data["spectra"]
    c = g["cache_mode"]
    return [
        ("geometry_spectra", "geometry metrics time / probe pass time", f"{c['metrics_over_probe']:.1%} "
         f"({c['metrics_s']:.3f} s / {c['probe_s']:.2f} s)", "≤ 10%", verdict(g["meets_target"])),
        ("geometry_spectra", "geometry total (capture + metrics) / probe pass, cache mode",
         f"{c['geometry_overhead_ratio']:.1%}", "(info)", "n/a"),
        ("geometry_spectra", "geometry total with the reference pass, LoRA (disable_adapter)",
         f"{g['disable_adapter_mode']['geometry_overhead_ratio']:.0%}", "(info: a second, logits-free forward)", "n/a"),
        ("geometry_spectra", f"LoRA spectra from factors vs dense ΔW, k=0 ({s['layers']} layers)",
         f"{s['k0']['speedup']:.1f}x ({s['k0']['dense_s']:.2f} s / {s['k0']['factors_s']:.3f} s)", "≥ 10x",
         verdict(s["k0"]["meets_target"])),
        ("geometry_spectra", "same with intruders (k=10: both take an SVD of W_ft)", f"{s['k10']['speedup']:.2f}x",
         "(info)", "n/a"),
    ]


def spectra_scale_rows(data: dict[str, Any]) -> list[tuple[str, ...]]:
    s = data["smollm2"]
    rows = [
        ("spectra_scale", f"SmolLM2 + LoRA r{s['rank']} on all {s['layers']} linears: a spectra pass with W0's SVDs "
         f"(the first, cold) / the probe pass ({len(s['probe_sets'])} shipped sets, {s['probe_rows']} rows each)",
         f"{s['cold_over_probe']:.2f} ({s['fast_cold_s']:.1f} s / {s['probe_s']:.1f} s)",
         f"≤ {s['target_cold_over_probe']:g}", verdict(s["meets_target"])),
        ("spectra_scale", "the same, every later pass (cache warm) / the probe pass",
         f"{s['warm_over_probe']:.2f} ({s['fast_warm_s']:.2f} s)", "(info)", "n/a"),
        ("spectra_scale", "the cold pass / a one-set probe pass (general_text, 64 rows)",
         f"{s['cold_over_probe_one']:.2f} ({s['probe_one_s']:.1f} s)", "(info)", "n/a"),
    ]
    if "reference_cold_s" in s:
        worst = max(s["max_rel_diff"].values())
        rows += [
            ("spectra_scale", "before (float64 full SVDs on the host) / after, cold and warm",
             f"{s['speedup_cold']:.1f}x ({s['reference_cold_s']:.0f} s / {s['fast_cold_s']:.1f} s), "
             f"{s['speedup_warm']:.0f}x ({s['reference_warm_s']:.0f} s / {s['fast_warm_s']:.2f} s)", "(info)", "n/a"),
            ("spectra_scale", "after vs before: intruder counts equal; largest relative difference of the others",
             f"{s['intruders_equal']} ({s['intruders_total']['fast']:.0f} intruders; with B ×10 and ×100 on "
             f"{s['intruders_x10']['layers']} layers {s['intruders_x10']['fast']:.0f} and "
             f"{s['intruders_x100']['fast']:.0f}); {worst:.1e}",
             "equal; ≤ 1e-3", verdict(s["intruders_equal"] and worst <= 1e-3)),
        ]
    b = data.get("llama2_7b")
    if b:
        rows.append(("spectra_scale", f"Llama-2-7B ({b['layers']} linears) on this CPU, from single-layer timings",
                     f"W0 SVDs once {b['model_w0_svd_fp32_s'] / 60:.0f} min "
                     f"({b['model_w0_svd_flop'] / 1e12:.0f} TFLOP); per LoRA pass {b['model_lora_pass_s']:.0f} s; "
                     f"W0 cache {b['model_cache_bytes_fp32'] / 2**30:.0f} GiB",
                     "(info: see NOTES)", "n/a"))
    return rows


def memory_rows(data: dict[str, Any]) -> list[tuple[str, ...]]:
    rows = []
    for k, c in data["checks"].items():
        rows.append(
            (
                "memory",
                f"peak RSS {k.replace('/', ': ')} vs plain",
                f"{c['ratio']:.3f}x ({c['measured_mb']:.0f} MB)",
                f"≤ {c['allowed_mb']:.0f} MB (1.05x + cache)",
                verdict(c["meets_target"]),
            )
        )
    s = data["rewind_snapshots"]
    rows.append(("memory", "rewind state, LoRA r16 (q,v) / full finetuning",
                 f"{s['lora_r16_q_v']['state_mb']:.2f} MB ({s['lora_r16_q_v']['auto_storage']}) / "
                 f"{s['full_finetuning']['state_mb']:.0f} MB ({s['full_finetuning']['auto_storage']})",
                 f"auto: memory ≤ {s['max_memory_mb']:.0f} MB", "n/a"))
    return rows


def generate_speed_rows(data: dict[str, Any]) -> list[tuple[str, ...]]:
    labels = {"arithmetic": "lm-eval generate_until, short answers (arena_arithmetic_gen, prefill-bound)",
              "continue": "lm-eval generate_until, answers of 1-48 tokens (continuations)"}
    rows = []
    for r in data["results"]:
        same = "equal" if r["answers_equal"] else "DIFFER"
        answers = f"; answers {same}, {r['answer_tokens_mean']:.1f} tokens mean, {r['answer_tokens_max']} max"
        rows.append(("generate_speed", f"{labels.get(r['workload'], r['workload'])}: HFLM.generate_until time / "
                     "generative probe time",
                     f"{r['speedup']:.2f}x ({r['lm_eval_hflm_s']:.1f} s / {r['probe_s']:.1f} s){answers}",
                     f"never < 1x, aim ≥ {r['target_speedup']}x",
                     verdict(r["answers_equal"] and r["never_slower"])
                     + ("" if r["meets_target"] else f" (under the {r['target_speedup']}x aim)")))
    return rows


def plan_check_rows(data: dict[str, Any]) -> list[tuple[str, ...]]:
    rows = []
    tol = f"within {data['tolerance']:.0%}"
    for name, r in data["results"].items():
        reps = r["repeats"]
        probe = ", ".join(f"{x['plan']['probe_seconds']:.3g}/{statistics.median(x['real']['probe_seconds']):.3g} s"
                          for x in reps)
        interval = ", ".join(f"{x['plan']['interval']}/{x['real']['interval']:.0f}" for x in reps)
        step = ", ".join(f"{x['plan']['step_seconds']:.3g}/{x['real']['step_seconds']:.3g} s" for x in reps)
        ok = abs(r["probe_ratio"] - 1) <= data["tolerance"]
        rows += [
            ("plan_check", f"{name}: planned / measured probe pass (cpu plan, then the run)",
             f"{r['probe_ratio']:.2f} ({probe})", tol, verdict(ok)),
            ("plan_check", f"{name}: planned / measured probe interval (overhead_budget {r['budget']:g})",
             f"{r['interval_ratio']:.2f} ({interval} steps)", tol,
             verdict(abs(r["interval_ratio"] - 1) <= data["tolerance"])),
            ("plan_check", f"{name}: planned / measured training step", f"{r['step_ratio']:.2f} ({step})", "(info)",
             "n/a"),
        ]
    return rows


def overhead_rows(data: dict[str, Any], suffix: str = "") -> list[tuple[str, ...]]:
    rows = []
    for setup, r in data["results"].items():
        for v, x in r["variants"].items():
            base = sorted(x["baseline_seconds"])[len(x["baseline_seconds"]) // 2]
            pairs = len(r["plain_times_s"])
            rows.append(
                (
                    f"overhead{suffix}",
                    f"{setup}, {r['steps']} steps, {v}: (monitored − baseline − plain) / plain",
                    f"{x['overhead_excluding_baseline']:+.1%} wall, median of {pairs} pairs "
                    f"{_pair_range(x['seconds'], x['baseline_seconds'], r['plain_times_s'])}, "
                    f"{x.get('overhead_excluding_baseline_cpu', float('nan')):+.1%} CPU time (baseline pass "
                    f"{base:.1f} s once; probes at steps {x['probe_steps']}; FLOPs floor {x['flops_floor']:.2%})",
                    f"≤ {x['budget']:.0%}",
                    verdict(x["meets_target"]),
                )
            )
            if "in_steps_per_pair" in x:
                rows.append(
                    (
                        f"overhead{suffix}",
                        f"{setup}, {v}: the same excess, split into the optimizer steps' own time "
                        "and the time around them (per pair, over plain)",
                        f"in the steps {x['in_steps']:+.1%} {_range(x['in_steps_per_pair'])}, around them "
                        f"{x['outside_steps']:+.1%} {_range(x['outside_steps_per_pair'])}",
                        "(info: the probes run around the steps)",
                        "n/a",
                    )
                )
            share = x.get("monitor_share")
            if share is not None:
                rows.append(
                    (
                        f"overhead{suffix}",
                        f"{setup}, {v}: the monitor's own share of wall time after the baseline",
                        f"{share:.1%}",
                        f"≤ {x['budget']:.0%}",
                        verdict(share <= x["budget"]),
                    )
                )
    return rows


def _pair_range(monitored: list[float], baseline: list[float], plain: list[float]) -> str:
    from overhead import excess_per_pair

    return _range(excess_per_pair(monitored, baseline, plain))


def _range(values: list[float]) -> str:
    v = sorted(values)
    return f"(from {v[0]:+.1%} to {v[-1]:+.1%})" if len(v) > 1 else ""


def scaling_rows(data: dict[str, Any]) -> list[tuple[str, ...]]:
    return [("scaling", "probe time and cache MB vs rows, length, modules", "see the table below", "(info)", "n/a")]


# --------------------------------------------------------------------------------------


def table(rows: list[tuple[str, ...]], header: tuple[str, ...]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def details(name: str, data: dict[str, Any]) -> str:
    if name == "probe_throughput":
        rows = [(r["workload"], r["rows"], r["sequences"], r["tokens"], r["forwards"], f"{r['probe_runner_s']:.2f}",
                 f"{r['lm_eval_hflm_s']:.2f}", f"{r['speedup']:.2f}x", f"{r['speedup_cpu_time']:.2f}x",
                 f"{r['max_abs_diff_vs_fp64_reference']['probe_runner']:.1e} / "
                 f"{r['max_abs_diff_vs_fp64_reference']['lm_eval_hflm']:.1e}")
                for r in data["results"]]
        return table(rows, ("workload", "rows", "sequences", "tokens", "our forwards", "ProbeRunner s", "lm-eval s",
                            "speedup (wall)", "speedup (CPU time)", "|Δ| vs fp64 reference: ours / lm-eval"))
    if name == "scaling":
        rows = [
            (
                r["rows"],
                r["length"],
                r["modules"] or "-",
                f"{r['probe_s']:.2f}" if "probe_s" in r else "-",
                f"{r['probe_with_capture_s']:.2f}" if "probe_with_capture_s" in r else "-",
                f"{r['metrics_s']:.3f}" if "metrics_s" in r else "-",
                f"{r['cache_mb']:.2f}" if "cache_mb" in r else "-",
            )
            for r in data["table"]
        ]
        return table(
            rows, ("rows", "tokens per row", "modules", "probe s", "probe + capture s", "metrics s", "cache MB")
        )
    if name == "memory":
        rows = [
            (
                v,
                f"{r['peak_rss_mb']:.0f}",
                f"{r['train_peak_rss_mb']:.0f}" if r["train_peak_rss_mb"] else "-",
                r["probes"],
                f"{r['geometry_cache_mb']:.1f}",
                f"{r['train_seconds']:.1f}",
            )
            for v, r in data["runs"].items()
        ]
        return table(rows, ("run", "peak RSS MB (process)", "peak RSS MB (training only)", "probe passes",
                            "geometry cache MB", "train s"))
    return ""


def gpu_line(cuda: dict[str, Any]) -> str:
    """Where the ``(cuda)`` rows were measured: card, date, packages, model, and the GPU check's verdict."""
    data = next(d for d in cuda.values() if d)
    m = data["machine"]
    pk = ", ".join(f"{k} {v}" for k, v in m["packages"].items() if v and k != "arena-callbacks")
    line = (
        f"the `(cuda)` rows, measured on an {m.get('gpu', 'unknown GPU')} on {m['date'][:10]} ({m['cpu_cores']} CPU "
        f"cores; {pk}); model: {data.get('model', 'smollm2-135m-instruct')}"
    )
    check = load("gpu_check")
    if check:
        ok = sum(r["ok"] for r in check["checks"] if r.get("limit") is not None)
        n = sum(1 for r in check["checks"] if r.get("limit") is not None)
        line += f"; `gpu_check.py` (bf16/CUDA paths of probes, geometry, rewind, Trainer): {ok}/{n} checks passed"
    return line


def report() -> Path:
    found = {n: load(n) for n in SCRIPTS}
    cuda = {n: load(f"{n}_cuda") for n in ("probe_throughput", "overhead")}
    rows: list[tuple[str, ...]] = []
    if found["probe_throughput"]:
        rows += throughput_rows(found["probe_throughput"])
    if found["generate_speed"]:
        rows += generate_speed_rows(found["generate_speed"])
    if found["geometry_spectra"]:
        rows += geometry_rows(found["geometry_spectra"])
    if found["spectra_scale"]:
        rows += spectra_scale_rows(found["spectra_scale"])
    if found["memory"]:
        rows += memory_rows(found["memory"])
    if found["scaling"]:
        rows += scaling_rows(found["scaling"])
    if found["overhead"]:
        rows += overhead_rows(found["overhead"])
    if found["plan_check"]:
        rows += plan_check_rows(found["plan_check"])
    if cuda["probe_throughput"]:
        rows += throughput_rows(cuda["probe_throughput"], " (cuda)")
    if cuda["overhead"]:
        rows += overhead_rows(cuda["overhead"], " (cuda)")
    first = next((d for d in found.values() if d), None)
    m = (first or {}).get("machine") or machine()
    lines = [
        "# Benchmark results",
        "",
        f"Written by `python benchmarks/run_all.py` on {time.strftime('%Y-%m-%d')} (UTC times in each JSON file).",
        "",
        f"- Machine: {m['cpu']}, {m['cpu_cores']} cores, torch threads {m['torch_threads']}, {m['platform']}, "
        f"Python {m['python']}; load average at the start of the first benchmark {m.get('load_average')}",
        "- Packages: " + ", ".join(f"{k} {v}" for k, v in m["packages"].items() if v),
        "- GPU: " + (gpu_line(cuda) if any(cuda.values()) else
                     "none on this machine; `python benchmarks/gpu.py` runs the throughput and overhead benchmarks "
                     "with `--device cuda` on a CUDA machine (not run here)"),
        "- The machine is shared: every ratio is taken between variants timed side by side in one process, "
        "repetitions interleaved (ABBA), as the median of per-repetition ratios. Absolute seconds move with the load.",
        "",
        "## Targets",
        "",
        table(rows, ("benchmark", "measure", "value", "target", "verdict")),
        "",
    ]
    for name in ("probe_throughput", "memory", "scaling"):
        if found[name]:
            lines += [f"## {name}", "", details(name, found[name]), ""]
    notes = ROOT / "benchmarks" / "NOTES.md"
    if notes.is_file():
        lines += [notes.read_text().strip(), ""]
    path = BENCH / "RESULTS.md"
    path.write_text("\n".join(lines))
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default=",".join(SCRIPTS), help="benchmarks to run, comma-separated")
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args(argv)
    failed = []
    if not args.report_only:
        for name in args.only.split(","):
            print(f"== {name}", flush=True)
            t = time.perf_counter()
            rc = subprocess.call([sys.executable, str(BENCH / f"{name}.py")], cwd=ROOT)
            print(f"== {name}: exit {rc} after {time.perf_counter() - t:.0f} s", flush=True)
            if rc != 0:
                failed.append(name)
    path = report()
    print(f"written {path}" + (f"; failed: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
