"""Shared pieces of the benchmark scripts: machine description, interleaved timing, JSON output.

Timings on a shared machine are noisy, so every ratio a script reports comes from variants
measured side by side in one process: repetitions alternate between the variants (ABBA order)
and each variant's median is taken.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

# On a shared CPU, OpenMP threads that spin while waiting for a descheduled peer made a
# 2-thread SmolLM2 forward 4x slower than 1 thread here; passive waiting removes that. It must
# be set before torch loads its OpenMP runtime (the scripts import torch after this module).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
for _p in (str(ROOT), str(ROOT / "tests")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

PACKAGES = ("torch", "transformers", "peft", "trl", "accelerate", "lm-eval", "arena-callbacks")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: str = "cpu") -> dict[str, Any]:
    """What the numbers were measured on."""
    import torch

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "device": device,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "packages": {},
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    for name in PACKAGES:
        try:
            info["packages"][name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            info["packages"][name] = None
    return info


RANDOM_INIT_MARKER = "random_init.json"


def model_label(spec: str) -> str:
    """The model's name for a report; a folder made by ``gpu.py --init-from`` says it has random weights."""
    marker = Path(spec) / RANDOM_INIT_MARKER
    if marker.is_file():
        info = json.loads(marker.read_text())
        return f"{info['architecture_of']} architecture, random weights (seed {info['seed']})"
    return spec


def sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def interleaved(variants: dict[str, Callable[[], Any]], repeats: int, device: str = "cpu",
                warmup: bool | dict[str, Callable[[], Any]] = True) -> dict[str, dict[str, Any]]:
    """Time each variant ``repeats`` times, alternating the order (ABBA...), after one warm-up each.

    ``warmup``: ``True`` runs each variant once untimed first; a dict gives cheaper warm-up
    callables per variant (a smaller workload through the same code); ``False`` skips it.

    Returns ``{name: {"median_s", "times_s", "cpu_s", "last"}}``: wall-clock times, process CPU
    times (both threads) and the variant's last return value. Compare variants with
    :func:`paired_ratio`, which divides times measured next to each other.
    """
    names = list(variants)
    times: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    last: dict[str, Any] = {}
    if warmup:
        for n in names:
            last[n] = (warmup[n] if isinstance(warmup, dict) else variants[n])()
    for rep in range(repeats):
        order = names if rep % 2 == 0 else names[::-1]
        for n in order:
            sync(device)
            t, c = time.perf_counter(), time.process_time()
            last[n] = variants[n]()
            sync(device)
            times[n].append(time.perf_counter() - t)
            cpu[n].append(time.process_time() - c)
    return {n: {"median_s": statistics.median(times[n]), "times_s": times[n], "cpu_s": cpu[n], "last": last.get(n)}
            for n in names}


def paired_ratio(timed: dict[str, dict[str, Any]], num: str, den: str, key: str = "times_s") -> float:
    """Median over repetitions of ``num``'s time / ``den``'s time in the same repetition.

    The two runs of a repetition are adjacent in time, so they share the machine's load; the
    median of their ratios is steadier than a ratio of medians on a shared machine.
    """
    return statistics.median(a / b for a, b in zip(timed[num][key], timed[den][key]))


def write_json(name: str, data: dict[str, Any], out: str | os.PathLike[str] | None = None) -> Path:
    path = Path(out) if out else RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=_jsonable) + "\n")
    return path


def _jsonable(x: Any) -> Any:
    if isinstance(x, Path):
        return str(x)
    if hasattr(x, "item"):
        return x.item()
    return repr(x)


def set_threads(n: int | None) -> None:
    import torch

    if n:
        torch.set_num_threads(n)


def check(value: float, target: float, higher_is_better: bool) -> bool:
    return value >= target if higher_is_better else value <= target
