"""Scoring: per-sequence sums filled forward by forward, and per-probe results from them.

Every forward adds, per scored sequence, its summed log-probability, its token count and
whether every token was the greedy prediction (:class:`Scores`). After the pass each rank sums
its rows per probe (:func:`local_sums`), the sums are all-reduced, and :func:`probe_result`
turns them into a :class:`ProbeResult`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

from .data import ANSWER_FIELDS, ProbeSet, first_field

Key = tuple[int, int, int]  # (probe index, example, choice)


class SeqScore(NamedTuple):
    """One scored sequence."""

    nll: float  # summed negative log-likelihood of its scored tokens
    tokens: int  # scored tokens
    greedy: bool  # every scored token was the greedy (argmax) prediction
    logprob: float  # summed log-probability (``-nll``)


class ProbeSums(NamedTuple):
    """The per-probe sums all ranks add up (in this order, one row of a float64 tensor)."""

    nll_sum: float
    tokens: float
    correct: float
    examples: float
    gen_tokens: float = 0.0  # generative probes: tokens written
    stopped: float = 0.0  # generative probes: answers that ended on their own


class GenRow(NamedTuple):
    """One generative row: its score, the tokens written, and whether it ended on its own."""

    score: float
    tokens: int
    stopped: bool


class _Pending(NamedTuple):
    logprob: float
    tokens: int
    greedy: bool


class Scores:
    """Per-sequence sums (log-probability, tokens, all greedy-correct) filled batch by batch.

    A later choice's prediction at the end of a shared context comes from the full forward and
    is held as *pending* until its continuation is scored (it is dropped if the continuation
    has to run in full instead).
    """

    def __init__(self) -> None:
        self._acc: dict[Key, list[Any]] = {}  # [log-probability, tokens, all greedy]
        self.pending: dict[Key, _Pending] = {}

    def add(self, key: Key, lp: float, n: int, greedy: bool, *, pending: bool = False) -> None:
        if pending:
            self.pending[key] = _Pending(lp, n, greedy)
            return
        acc = self._acc.setdefault(key, [0.0, 0, True])
        acc[0] += lp
        acc[1] += n
        acc[2] = acc[2] and greedy

    def settle(self, key: Key, keep: bool) -> None:
        held = self.pending.pop(key, None)
        if held is not None and keep:
            self.add(key, *held)

    def results(self) -> dict[Key, SeqScore]:
        """The score of every sequence added."""
        return {k: SeqScore(-lp, n, greedy, lp) for k, (lp, n, greedy) in self._acc.items()}


@dataclass(frozen=True)
class ProbeResult:
    """Aggregated result of one probe over all ranks.

    Attributes:
        nll: Mean negative log-likelihood per scored token (text: all tokens; multiple choice:
            the correct choice; completion: the answer span).
        score: Accuracy or exact match in [0, 1]; ``None`` for text probes.
        examples: Rows scored.
        tokens: Tokens the NLL averages over.
        rows: Per row of the probe, in row order: ``(summed NLL, scored tokens, correct)``
            (gathered from every rank), for the paired standard errors of :mod:`arena_callbacks.stats`;
            empty where not kept.
        gen_length: Generative probes: mean tokens written per answer.
        stopped: Generative probes: the share of answers that ended on their own (end of
            sequence or a stop string) before ``max_new_tokens``.
    """

    name: str
    kind: str
    nll: float
    score: float | None
    examples: int
    tokens: int
    rows: tuple[tuple[float, float, float], ...] = ()
    gen_length: float | None = None
    stopped: float | None = None

    def __post_init__(self) -> None:  # rows read back from JSON are lists
        object.__setattr__(self, "rows", tuple(tuple(float(x) for x in r) for r in self.rows))


def row_values(
    probe: ProbeSet, p_idx: int, per_seq: Mapping[Key, SeqScore], gen: Mapping[int, GenRow] | None = None
) -> dict[int, tuple[float, int, float]]:
    """``(summed NLL, scored tokens, correct)`` of every row of probe ``p_idx`` this rank scored
    (generative rows, from ``gen``: ``(0, 0, score)``)."""
    kind = probe.kind
    out: dict[int, tuple[float, int, float]] = {}
    if kind == "generate":
        return {ex: (0.0, 0, float(g.score)) for ex, g in sorted((gen or {}).items())}
    for ex in sorted({ex for (p, ex, _) in per_seq if p == p_idx}):
        if kind == "text":
            seq = per_seq[(p_idx, ex, 0)]
            out[ex] = (seq.nll, seq.tokens, 0.0)
        elif kind == "completion":
            seq = per_seq[(p_idx, ex, 0)]
            out[ex] = (seq.nll, seq.tokens, float(seq.greedy))
        else:
            row = probe.rows[ex]
            _, answer = first_field(row, ANSWER_FIELDS)
            logprobs = [per_seq[(p_idx, ex, j)].logprob for j in range(len(row["choices"]))]
            pred = max(range(len(logprobs)), key=lambda j: (logprobs[j], -j))  # ties: first choice
            seq = per_seq[(p_idx, ex, answer)]
            out[ex] = (seq.nll, seq.tokens, float(pred == answer))
    return out


def sums_of(values: Mapping[int, tuple[float, int, float]], gen: Mapping[int, GenRow] | None = None) -> ProbeSums:
    """The sums of :func:`row_values`, in row order (and of the generative rows ``gen``)."""
    nll_sum = tokens = correct = examples = 0.0
    for nll, n, c in values.values():
        nll_sum, tokens, correct, examples = nll_sum + nll, tokens + n, correct + c, examples + 1
    gen = gen or {}
    return ProbeSums(nll_sum, tokens, correct, examples, float(sum(g.tokens for g in gen.values())),
                     float(sum(g.stopped for g in gen.values())))


def local_sums(probe: ProbeSet, p_idx: int, per_seq: Mapping[Key, SeqScore]) -> ProbeSums:
    """This rank's sums for probe ``p_idx``, over the rows it scored (in row order)."""
    return sums_of(row_values(probe, p_idx, per_seq))


def probe_result(
    name: str, kind: str, sums: ProbeSums, rows: tuple[tuple[float, float, float], ...] = ()
) -> ProbeResult:
    """A probe's result from its sums over all ranks (and its rows, when gathered)."""
    generative = kind == "generate" and sums.examples > 0
    return ProbeResult(
        name=name,
        kind=kind,
        nll=sums.nll_sum / sums.tokens if sums.tokens else math.nan,
        score=None if kind == "text" else (sums.correct / sums.examples if sums.examples else math.nan),
        examples=int(sums.examples),
        tokens=int(sums.tokens),
        rows=rows,
        gen_length=sums.gen_tokens / sums.examples if generative else None,
        stopped=sums.stopped / sums.examples if generative else None,
    )
