"""Generations worth looking at: a few answers per generative probe at each probe step.

A score says that answers changed; the answers say how (rambling, a lost format, no end). At
each probe step the monitor keeps ``probe.samples`` generations per generative probe, always
the same rows (drawn once with ``probe.seed``), and writes them beside the baseline's answers
to the same prompts: to ``generations.jsonl`` in the monitor's folder (one line per probe and
step) and, with TensorBoard on, as a table under ``arena/generations/<probe>``.

Rows are split across ranks, so every rank sends its answers to the chosen rows (one
collective); rank 0 writes. On resume the baseline's answers are read back from the file.

Example:
    >>> rows = sample_rows(10, 3, seed=0)
    >>> rows == sample_rows(10, 3, seed=0), len(rows)
    (True, 3)
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch.distributed as dist

from .distributed import DistContext
from .probes import ProbeRunner
from .sinks import Sink

__all__ = ["GenerationSamples", "sample_rows", "samples_table"]

logger = logging.getLogger("arena_callbacks")


def sample_rows(n_rows: int, k: int, seed: int) -> list[int]:
    """``k`` row indices of ``n_rows``, the same for a seed (sorted)."""
    return sorted(random.Random(seed).sample(range(n_rows), min(k, n_rows)))


def samples_table(step: int, samples: Sequence[Mapping[str, Any]]) -> str:
    """A Markdown table: prompt, the baseline's answer, this step's answer, score and whether it stopped."""

    def cell(text: Any) -> str:
        return str(text).replace("|", "\\|").replace("\n", "⏎")[:300]

    lines = [f"| row | prompt | baseline | step {step} | score | stopped |", "| --- | --- | --- | --- | --- | --- |"]
    for s in samples:
        lines.append(f"| {s['row']} | {cell(s['prompt'])} | {cell(s.get('baseline', ''))} | {cell(s['generation'])} "
                     f"| {s['score']:g} | {'yes' if s['stopped'] else 'no'} |")
    return "\n".join(lines)


class GenerationSamples:
    """The chosen rows of each generative probe, the baseline's answers, and the writing.

    Args:
        runner: The monitor's probe runner (its probes, settings and last answers).
        path: ``generations.jsonl``, written by the main rank (``None`` on other ranks).
    """

    def __init__(self, runner: ProbeRunner, path: Path | None) -> None:
        k, seed = runner.settings.samples, runner.settings.seed
        self.runner = runner
        self.path = path
        self.rows = {n: sample_rows(len(p.rows), k, seed) for n, p in runner.probes.items()
                     if p.kind == "generate" and k > 0}
        self.baseline: dict[tuple[str, int], str] = {}

    @property
    def active(self) -> bool:
        return bool(self.rows)

    def _local(self) -> list[dict[str, Any]]:
        out = []
        for name, rows in self.rows.items():
            probe = self.runner.probes[name]
            for r in rows:
                g = self.runner.last_generations.get((name, r))
                if g is None:  # another rank's row
                    continue
                row = probe.rows[r]
                prompt = row.get("prompt") if isinstance(row.get("prompt"), str) else row.get("messages", "")
                scored = self.runner.last_row_scores.get((name, r), float("nan"))
                out.append({"probe": name, "row": probe.row_ids[r], "index": r, "prompt": prompt,
                            "generation": g.text, "score": scored, "stopped": g.stopped})
        return out

    def after_pass(self, ctx: DistContext, step: int, sinks: Sequence[Sink], *, baseline: bool = False) -> None:
        """Collect this pass's answers to the chosen rows (every rank calls it) and write them."""
        if not self.active:
            return
        mine = self._local()
        if ctx.active:
            parts: list[Any] = [None] * ctx.world_size
            dist.all_gather_object(parts, mine)
            mine = [s for part in parts for s in (part or [])]
        if not ctx.is_main:
            return
        if baseline:
            self.baseline = {(s["probe"], s["index"]): s["generation"] for s in mine}
        for name in self.rows:
            samples = sorted((s for s in mine if s["probe"] == name), key=lambda s: s["index"])
            for s in samples:
                s["baseline"] = self.baseline.get((name, s["index"]), "")
            self._write({"step": step, "probe": name, "baseline": baseline,
                         "samples": [{k: v for k, v in s.items() if k not in ("probe", "index")} for s in samples]})
            for sink in sinks:
                sink.text(f"arena/generations/{name}", samples_table(step, samples), step)

    def _write(self, record: dict[str, Any]) -> None:
        if self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
        except OSError as e:
            logger.warning("arena-callbacks: could not write generation samples to %s (%s)", self.path, e)

    def restore(self) -> None:
        """The baseline's answers from ``generations.jsonl`` (a resumed run)."""
        if self.path is None or not self.path.is_file():
            return
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            name = record.get("probe")
            if record.get("baseline") and name in self.rows:
                ids = self.runner.probes[name].row_ids
                by_row = {ids[i]: i for i in self.rows[name]}
                for s in record.get("samples", []):
                    if s.get("row") in by_row:
                        self.baseline[(name, by_row[s["row"]])] = s["generation"]

    def start(self, fresh: bool) -> None:
        """A new run starts the file afresh; a resumed one appends and takes the baseline back."""
        if self.path is None or not self.active:
            return
        if fresh:
            try:
                self.path.unlink(missing_ok=True)
            except OSError as e:
                logger.warning("arena-callbacks: could not remove the old %s (%s)", self.path, e)
        else:
            self.restore()
