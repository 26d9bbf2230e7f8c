"""Accelerators a plan can be made for: peak throughput, memory, and the efficiency assumed.

Peaks are the vendors' dense figures (no structured sparsity). A plan's seconds are FLOPs over
``peak × efficiency``; the efficiencies are assumptions, stated in every plan. ``cpu`` has no
table entry: its throughput is measured on this machine (a float32 matmul at the probe's own
shapes), and the probe pass and training step are timed on slices of the model itself
(:mod:`.calibrate`).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch

__all__ = ["ACCELERATORS", "EFFICIENCY", "HOST_FLOOR", "HOST_FP64_FLOPS", "Accelerator", "accelerator",
           "measure_cpu_flops"]


@dataclass(frozen=True)
class Accelerator:
    """Peak dense FLOP/s in bf16 (tensor cores) and fp32 (without TF32), and memory per device."""

    name: str
    bf16_flops: float
    fp32_flops: float
    memory_gb: float
    note: str

    def peak(self, dtype: str) -> float:
        return self.bf16_flops if dtype in ("bf16", "fp16") else self.fp32_flops

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


ACCELERATORS: dict[str, Accelerator] = {
    "h100": Accelerator("h100", 989e12, 67e12, 80, "NVIDIA H100 SXM 80 GB: 989 TFLOP/s bf16 dense, 67 fp32"),
    "h200": Accelerator("h200", 989e12, 67e12, 141, "NVIDIA H200 SXM 141 GB: 989 TFLOP/s bf16 dense, 67 fp32"),
    "a100": Accelerator("a100", 312e12, 19.5e12, 80, "NVIDIA A100 SXM 80 GB: 312 TFLOP/s bf16 dense, 19.5 fp32"),
    "l40s": Accelerator("l40s", 362e12, 91.6e12, 48, "NVIDIA L40S 48 GB: 362 TFLOP/s bf16 dense, 91.6 fp32"),
}

#: Share of peak assumed for each kind of work on a GPU: training steps (a typical model FLOP
#: utilisation), probe forwards (inference at a few thousand positions per forward), spectra
#: (SVDs and QRs run far below matmul peak).
EFFICIENCY = {"train": 0.40, "probe": 0.30, "spectra": 0.05}

#: Host-bound floors of eager PyTorch on a GPU, seconds per decoder layer: a probe forward
#: (kernel launches: SmolLM2's 30 layers took 41 ms per forward on an H100 whatever the batch,
#: benchmarks/results/gpu_profile_text.txt) and a training step (a LoRA step there: 0.16 s,
#: benchmarks/results/overhead_cuda.json). A forward costs at least ``layers × floor``.
HOST_FLOOR = {"forward": 1.3e-3, "train": 5.5e-3}

#: The host CPU's float64 rate assumed for the geometry metrics of a GPU run (they run on the
#: host): about what this project's 2-core CPU reaches on them (0.3 s for 1024 tokens × 576
#: features, 4.7 s × 4096; docs/plan.md). A ``cpu`` plan times them instead.
HOST_FP64_FLOPS = 15e9

CHOICES = (*ACCELERATORS, "cpu")


def accelerator(name: str) -> Accelerator | None:
    """The table entry for ``name`` (``None`` for ``cpu``, which is measured)."""
    key = name.strip().lower()
    if key == "cpu":
        return None
    if key not in ACCELERATORS:
        from .model import PlanError

        raise PlanError(f"--accelerator: {name!r} is not one of {list(CHOICES)}")
    return ACCELERATORS[key]


def measure_cpu_flops(m: int, k: int, n: int, dtype: torch.dtype = torch.float32, seconds: float = 0.3) -> float:
    """FLOP/s of an ``(m × k) @ (k × n)`` matmul on this CPU (best of repeats within ``seconds``)."""
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    a @ b  # warm-up
    best, start = float("inf"), time.perf_counter()
    while time.perf_counter() - start < seconds or best == float("inf"):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2.0 * m * k * n / best
