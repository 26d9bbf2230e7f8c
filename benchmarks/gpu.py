"""The GPU variant: probe throughput and training overhead on a CUDA device.

Runs ``probe_throughput.py`` and ``overhead.py`` (SmolLM2 setup) with ``--device cuda`` and
writes ``benchmarks/results/probe_throughput_cuda.json`` and ``overhead_cuda.json``, which
``run_all.py --report-only`` adds to ``RESULTS.md`` as ``(cuda)`` rows. Torch threads are left
as they are. Same checks as on the CPU: scores agree with lm-eval's HFLM (per-choice
log-likelihood within 1e-4, accuracy equal), ratios from interleaved repetitions.

    python benchmarks/gpu.py                # both, default sizes
    python benchmarks/gpu.py --quick        # 64 rows, 1 repetition, 20 training steps
    python benchmarks/gpu.py --init-from DIR  # SmolLM2's config and tokenizer in DIR, random weights

``--init-from`` is for a GPU machine that cannot reach the checkpoint (a lent machine with no
network, where 64 MiB travel with the code and SmolLM2's weights are 269 MB): the model is built
from ``DIR/config.json`` with seeded random weights, saved with DIR's tokenizer to a temporary
folder, and both benchmarks load it from there. Times depend on the shapes, not the weights; the
reports name the model "… architecture, random weights".
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RANDOM_INIT_MARKER  # noqa: E402

MODEL = "smollm2-135m-instruct"


def random_init_model(source: Path, out: Path, seed: int = 0) -> Path:
    """Save a model with ``source``'s config and tokenizer and seeded random weights to ``out``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if not (source / "config.json").is_file():
        raise SystemExit(
            f"--init-from {source}: no config.json there (copy a model folder's config and tokenizer files)"
        )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(source), dtype=torch.float32)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(source).save_pretrained(out)
    (out / RANDOM_INIT_MARKER).write_text(json.dumps({"architecture_of": source.name, "seed": seed}) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", default="probe_throughput,overhead")
    ap.add_argument("--model", default=MODEL, help="model spec (built-in name or folder)")
    ap.add_argument("--init-from", type=Path, default=None,
                    help="folder with a config.json and tokenizer: benchmark that architecture with random weights")
    ap.add_argument("--rows", type=int, default=None, help="probe_throughput rows per workload (default 128)")
    args = ap.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("no CUDA device: the GPU benchmarks need one (torch.cuda.is_available() is False)")
        return 2
    import overhead
    import probe_throughput

    with tempfile.TemporaryDirectory() as tmp:
        model = str(random_init_model(args.init_from, Path(tmp) / "model")) if args.init_from else args.model
        rc = 0
        if "probe_throughput" in args.only:
            extra = ["--rows", "64", "--repeats", "1"] if args.quick else []
            if args.rows:
                extra += ["--rows", str(args.rows)]
            rc |= probe_throughput.main(["--device", "cuda", "--threads", "0", "--model", model, *extra])
        if "overhead" in args.only:
            extra = ["--steps", "20", "--repeats", "1"] if args.quick else ["--repeats", "3"]
            rc |= overhead.main(["--device", "cuda", "--threads", "0", "--setups", "smollm2", "--model", model, *extra])
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
