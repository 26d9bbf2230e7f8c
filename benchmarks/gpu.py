"""The GPU variant: probe throughput and training overhead on a CUDA device.

Runs ``probe_throughput.py`` and ``overhead.py`` (SmolLM2 setup) with ``--device cuda`` and
writes ``benchmarks/results/probe_throughput_cuda.json`` and ``overhead_cuda.json``, which
``run_all.py --report-only`` adds to ``RESULTS.md`` as ``(cuda)`` rows. Torch threads are left
as they are. Same checks as on the CPU: scores agree with lm-eval's HFLM (per-choice
log-likelihood within 1e-4, accuracy equal), ratios from interleaved repetitions.

    python benchmarks/gpu.py                # both, default sizes
    python benchmarks/gpu.py --quick        # 64 rows, 1 repetition, 20 training steps
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", default="probe_throughput,overhead")
    args = ap.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("no CUDA device: the GPU benchmarks need one (torch.cuda.is_available() is False)")
        return 2
    import overhead
    import probe_throughput

    rc = 0
    if "probe_throughput" in args.only:
        extra = ["--rows", "64", "--repeats", "1"] if args.quick else []
        rc |= probe_throughput.main(["--device", "cuda", "--threads", "0", *extra])
    if "overhead" in args.only:
        extra = ["--steps", "20", "--repeats", "1"] if args.quick else []
        rc |= overhead.main(["--device", "cuda", "--threads", "0", "--setups", "smollm2", *extra])
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
