"""Capability probes: loading, validation, tokenisation and the batched probe pass.

Three kinds (DESIGN.md §2), told apart by their fields unless named explicitly:

* ``text``: ``{"text": ...}``: mean token negative log-likelihood.
* ``multiple_choice``: ``{"context"|"question": ..., "choices": [...], "answer"|"label": i}``:
  log-likelihood ranking of the choices, accuracy; NLL of the correct choice.
* ``completion``: ``{"prompt": ..., "completion": ...}``: teacher-forced exact match of the
  answer span (every answer token is the greedy prediction) and answer NLL.

Rows are tokenised once (:meth:`ProbeRunner.prepare`) and planned into length-sorted batches
once per rank; each pass only runs forwards. A multiple-choice row whose choices share a
context runs that context once: with all its choices in one tree row where the model takes a
4D attention mask, else its first choice in full and the others as continuations of the
cached keys and values (one-token choices need no forward of their own). With a 4D mask,
short sequences also share rows, each attending to itself. The vocabulary projection is
applied only at scored positions. Examples are split across ranks, and every
rank runs the same number of forwards so that sharded models never see a rank-0-only forward.
"""

from __future__ import annotations

import bisect
import contextlib
import copy
import functools
import inspect
import json
import logging
import math
import random
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import torch

from ..config import ProbeSettings
from ..distributed import DistContext
from ..exceptions import ProbeDataError

__all__ = ["Probe", "ProbeFailure", "ProbeKind", "ProbeResult", "ProbeRunner", "ProbeSet", "load_rows"]

logger = logging.getLogger(__name__)

ProbeKind = Literal["text", "multiple_choice", "completion"]
KINDS: tuple[str, ...] = ("text", "multiple_choice", "completion")
_CONTEXT_FIELDS = ("context", "question")
_ANSWER_FIELDS = ("answer", "label")


@dataclass(frozen=True)
class Probe:
    """A probe set with explicit options, for when field-based inference is not enough.

    Args:
        data: A ``datasets.Dataset``, a list of dicts, or a path to a JSONL (or JSON list) file.
        kind: ``text``, ``multiple_choice`` or ``completion``; inferred from the fields if ``None``.
        signal: What ``retention/<name>`` follows for scored kinds: ``score`` (accuracy or exact
            match relative to baseline) or ``nll`` (``exp(-ΔNLL)``). Text probes always use NLL.

    Example:
        >>> Probe([{"prompt": "2+2=", "completion": "4"}], signal="nll").kind is None
        True
    """

    data: Any
    kind: ProbeKind | None = None
    signal: Literal["score", "nll"] = "score"


def load_rows(data: Any, name: str) -> list[dict[str, Any]]:
    """Rows of a probe as plain dicts, from a Dataset, a list of dicts or a JSON(L) path."""
    if isinstance(data, (str, Path)):
        path = Path(data)
        if not path.is_file():
            raise ProbeDataError(f"probe {name!r}: file not found: {path}")
        text = path.read_text(encoding="utf-8")
        if path.suffix.lower() == ".json":
            rows = json.loads(text)
            if not isinstance(rows, list):
                raise ProbeDataError(f"probe {name!r}: {path} must hold a JSON list of objects")
        else:
            rows = []
            for lineno, line in enumerate(text.splitlines(), start=1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ProbeDataError(f"probe {name!r}: {path} line {lineno} is not valid JSON: {e.msg}") from None
    elif hasattr(data, "to_list") and hasattr(data, "column_names"):  # datasets.Dataset
        rows = data.to_list()
    elif isinstance(data, Sequence) and not isinstance(data, (str, bytes)):
        rows = list(data)
    else:
        raise ProbeDataError(
            f"probe {name!r}: expected a datasets.Dataset, a list of dicts or a path to a JSONL file, "
            f"got {type(data).__name__}"
        )
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise ProbeDataError(f"probe {name!r}, row {i}: expected a dict, got {type(row).__name__}")
    return [dict(r) for r in rows]


def _infer_kind(rows: list[dict[str, Any]], name: str) -> str:
    first = rows[0]
    if "choices" in first:
        return "multiple_choice"
    if "prompt" in first and "completion" in first:
        return "completion"
    if "text" in first:
        return "text"
    raise ProbeDataError(
        f"probe {name!r}, row 0: cannot tell the probe kind from fields {sorted(first)}; expected 'text' "
        "(text), 'context'/'question' + 'choices' + 'answer' (multiple_choice) or 'prompt' + 'completion' "
        "(completion), or pass Probe(data, kind=...)"
    )


def _first_field(row: dict[str, Any], names: Sequence[str]) -> tuple[str | None, Any]:
    # None counts as absent: a datasets.Dataset fills columns a row lacks with None.
    for n in names:
        if row.get(n) is not None:
            return n, row[n]
    return None, None


@dataclass
class ProbeSet:
    """A validated probe: its name, kind, signal and the rows it will use."""

    name: str
    kind: str
    rows: list[dict[str, Any]]
    row_ids: list[int]
    signal: str = "score"

    @classmethod
    def build(cls, name: str, data: Any, settings: ProbeSettings) -> ProbeSet:
        """Load, sample (seeded, ``max_examples``) and validate a probe's rows."""
        if not isinstance(name, str) or not name or "/" in name or name != name.strip():
            raise ProbeDataError(f"probe name {name!r}: use a non-empty name without '/' or surrounding spaces")
        kind, signal = None, "score"
        if isinstance(data, Probe):
            kind, signal, data = data.kind, data.signal, data.data
        if kind is not None and kind not in KINDS:
            raise ProbeDataError(f"probe {name!r}: kind {kind!r} is not one of {list(KINDS)}")
        if signal not in ("score", "nll"):
            raise ProbeDataError(f"probe {name!r}: signal {signal!r} is not one of ['score', 'nll']")
        rows = load_rows(data, name)
        if not rows:
            raise ProbeDataError(f"probe {name!r}: the probe set is empty; give it at least one row")
        kind = kind or _infer_kind(rows, name)
        ids = list(range(len(rows)))
        if settings.max_examples is not None and len(rows) > settings.max_examples:
            ids = sorted(random.Random(settings.seed).sample(ids, settings.max_examples))
        chosen = [rows[i] for i in ids]
        for i, row in zip(ids, chosen):
            _validate_row(name, kind, i, row)
        return cls(name=name, kind=kind, rows=chosen, row_ids=ids, signal="nll" if kind == "text" else signal)

    @property
    def scored(self) -> bool:
        return self.kind != "text"


def _present(row: dict[str, Any]) -> list[str]:
    return sorted(k for k, v in row.items() if v is not None)


def _validate_row(name: str, kind: str, i: int, row: dict[str, Any]) -> None:
    def fail(msg: str) -> None:
        raise ProbeDataError(f"probe {name!r} ({kind}), row {i}: {msg}")

    def need_text(field_name: str | None, value: Any, what: str) -> None:
        if field_name is None:
            fail(f"missing field {what}; fields present: {_present(row)}")
        if not isinstance(value, str) or not value.strip():
            fail(f"field {field_name!r} must be a non-empty string, got {value!r:.60}")

    if kind == "text":
        need_text(*_first_field(row, ["text"]), "'text'")
    elif kind == "completion":
        need_text(*_first_field(row, ["prompt"]), "'prompt'")
        need_text(*_first_field(row, ["completion"]), "'completion'")
    else:
        f_ctx, ctx = _first_field(row, _CONTEXT_FIELDS)
        need_text(f_ctx, ctx, "'context' (or 'question')")
        choices = row.get("choices")
        if not isinstance(choices, (list, tuple)) or len(choices) < 2:
            fail(f"field 'choices' must be a list of at least 2 strings, got {choices!r:.80}")
        for j, c in enumerate(choices):
            if not isinstance(c, str) or not c.strip():
                fail(f"choices[{j}] must be a non-empty string, got {c!r:.60}")
        f_ans, ans = _first_field(row, _ANSWER_FIELDS)
        if f_ans is None:
            fail(f"missing field 'answer' (or 'label'), the index of the correct choice; fields present: {_present(row)}")
        if isinstance(ans, bool) or not isinstance(ans, int):
            fail(f"field {f_ans!r} must be an integer index into 'choices', got {ans!r}")
        if not 0 <= ans < len(choices):
            fail(f"field {f_ans!r} = {ans} is out of range for {len(choices)} choices (valid: 0..{len(choices) - 1})")


# --------------------------------------------------------------------------------------
# Tokenisation
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Seq:
    """One tokenised sequence; positions ``[start, len)`` are scored (predicted from the left)."""

    ids: tuple[int, ...]
    start: int
    example: int  # index within the probe's rows
    choice: int  # choice index for multiple choice, 0 otherwise


def _encode(tokenizer: Any, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], int]:
    """Token ids of context+continuation and where the continuation starts.

    Trailing spaces of the context move to the continuation, and the continuation is read off
    the whole encoding (as lm-evaluation-harness does), so merges across the boundary are kept.
    """
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = _encode(tokenizer, context + continuation, special=True)
    ctx = _encode(tokenizer, context, special=True)
    if whole[: len(ctx)] != ctx or len(whole) == len(ctx):
        # The boundary merged; fall back to separate encodings.
        whole = ctx + _encode(tokenizer, continuation, special=False)
    return whole, len(ctx)


def _tokenize_probe(probe: ProbeSet, tokenizer: Any, settings: ProbeSettings) -> list[_Seq]:
    seqs: list[_Seq] = []
    limit = settings.max_length

    def too_long(i: int, n: int) -> None:
        raise ProbeDataError(
            f"probe {probe.name!r} ({probe.kind}), row {probe.row_ids[i]}: {n} tokens, longer than "
            f"probe.max_length={limit}; raise max_length, shorten the row, or set probe.truncate=true"
        )

    for i, row in enumerate(probe.rows):
        if probe.kind == "text":
            ids = _encode(tokenizer, row["text"], special=True)
            if len(ids) > limit:
                if not settings.truncate:
                    too_long(i, len(ids))
                ids = ids[:limit]
            if len(ids) < 2:
                raise ProbeDataError(
                    f"probe {probe.name!r} (text), row {probe.row_ids[i]}: tokenises to {len(ids)} token(s); "
                    "at least 2 are needed to score a next-token prediction"
                )
            seqs.append(_Seq(tuple(ids), 1, i, 0))
            continue
        if probe.kind == "completion":
            pairs = [(row["prompt"], row["completion"])]
        else:
            _, ctx = _first_field(row, _CONTEXT_FIELDS)
            pairs = [(ctx, c) for c in row["choices"]]
        for j, (ctx, cont) in enumerate(pairs):
            ids, start = _encode_pair(tokenizer, ctx, cont)
            if start == 0:  # nothing before the first scored token: score from position 1
                start = 1
            if len(ids) > limit:
                if not settings.truncate or len(ids) - start >= limit:
                    too_long(i, len(ids))
                cut = len(ids) - limit
                ids, start = ids[cut:], start - cut
            seqs.append(_Seq(tuple(ids), max(start, 1), i, j))
    return seqs


# --------------------------------------------------------------------------------------
# The probe pass
# --------------------------------------------------------------------------------------

# A multiple-choice row whose choices share at least this many leading tokens runs that
# context once (see _Batch). Shorter contexts run in full with every choice: the saving is a
# few tokens per choice, and a forward that carries whole sequences is the simpler one to read
# in hooks and logs.
_MIN_SHARED_PREFIX = 8

# Run a shared context and all its choices in one tree row (see _Batch) where the model takes
# a 4D attention mask; off, they take the cached-continuation path (tests cover both).
_TREE_ROWS = True

# Put several short sequences (or tree rows) in one row of a full forward where the model takes a
# 4D attention mask, each attending to itself only, in rows no longer than the probe's longest
# sequence (see _Batch); off, one per row (tests cover both).
_PACK_ROWS = True


class BatchObserver(Protocol):
    """Told, before each probe forward, which probe and sequences it carries, and where.

    ``placed`` holds ``(row, end, sequence)``: token ``t`` of the sequence sits at position
    ``end + t - len(ids)`` of ``row``, counted from the row's end (negative). Every token but the
    last is fed (the last is only a target, so ``end`` ≤ 1); rows are right-aligned, a row may
    hold several sequences, and a tree row holds other choices' tokens before its first
    choice's sequence. ``probe`` is ``None`` for forwards whose rows the
    observer should ignore: filler batches, continuation forwards (the later choices of a
    multiple-choice row whose context is shared carry only the tokens after it; that context
    ran in full, with the row's first choice, in an earlier forward), and once after the pass,
    to reset.
    """

    def before_batch(self, probe: str | None, placed: Sequence[tuple[int, int, _Seq]]) -> None: ...


class ProbeFailure(RuntimeError):
    """A probe pass failed on at least one rank (raised on every rank alike)."""


@dataclass(frozen=True)
class ProbeResult:
    """Aggregated result of one probe over all ranks.

    Attributes:
        nll: Mean negative log-likelihood per scored token (text: all tokens; multiple choice:
            the correct choice; completion: the answer span).
        score: Accuracy or exact match in [0, 1]; ``None`` for text probes.
        examples: Rows scored.
        tokens: Tokens the NLL averages over.
    """

    name: str
    kind: str
    nll: float
    score: float | None
    examples: int
    tokens: int


# Per-probe sums that are all-reduced: nll_sum, tokens, correct, examples.
_N_SUMS = 4

_Key = tuple[int, int, int]  # (probe index, example, choice)


@dataclass(frozen=True)
class _Cont:
    """A sequence scored as the continuation of a shared context.

    The context (positions ``0 .. prefix - 1``) ran in row ``row`` of the full forward before,
    whose keys and values are reused; this forward feeds positions ``prefix .. len - 2``.
    """

    seq: _Seq
    row: int
    prefix: int


@dataclass
class _Batch:
    """One forward pass of the plan.

    A *full* forward (``packs`` empty) carries whole sequences, left-padded. Some of its rows may
    be the first choice of a multiple-choice row whose choices share a context (``shared``:
    ``(row, prefix length, the other choices)``): the first choice is scored there, the others
    get the prediction at the end of the context from that row, and those with more tokens run
    as continuations in the forward(s) right after, on the cached context.

    Where the model takes a 4D attention mask, a shared context usually runs as a *tree row*
    instead (``trees``): the context, the first choice and the other choices' own tokens in one
    row of the full forward, each choice attending to the context and to itself, with its own
    positions; no cache and no continuation forward. Rows whose tree would be longer than
    ``max_length`` take the cached-continuation path.

    With a 4D mask a full forward's row may also hold several *units* (a sequence, or a tree:
    ``rows`` gives each unit's row), one after the other, the last ending at the row's end; each
    attends to itself only and has its own positions. A row is never longer than the probe's
    longest unit, so a packed forward is no larger than the longest unpacked one. Units whose
    shared context is continued from the cache keep a row of their own.

    A *continuation* forward has one row per pack: continuations of one context, placed one
    after the other in the row, each attending to the context and to itself only (a packed
    row needs a 4D attention mask; without one, every pack holds a single continuation).
    """

    probe: int
    seqs: list[_Seq]
    dummy: bool = False
    shared: list[tuple[int, int, tuple[_Seq, ...]]] = field(default_factory=list)
    packs: list[list[_Cont]] = field(default_factory=list)
    cache: bool = False  # a full forward whose context cache the next forward(s) continue
    # Trees: unit (index into seqs) -> (prefix, other choices). The unit holds the other
    # choices' tokens after the shared context, then the first choice in full; a 4D mask lets
    # each choice see the context and itself only.
    trees: dict[int, tuple[int, tuple[_Seq, ...]]] = field(default_factory=dict)
    rows: list[int] = field(default_factory=list)  # each unit's row (empty: unit i in row i)

    @property
    def conts(self) -> list[_Cont]:
        return [c for pack in self.packs for c in pack]

    @property
    def packed(self) -> bool:
        return len(set(self.rows)) < len(self.rows)

    def row_of(self, u: int) -> int:
        return self.rows[u] if self.rows else u

    @property
    def n_rows(self) -> int:
        return self.rows[-1] + 1 if self.rows else len(self.seqs)

    def unit_lengths(self) -> list[int]:
        """Tokens each unit feeds (see :func:`_fed_length`)."""
        return [_fed_length(s, self.trees.get(u)) for u, s in enumerate(self.seqs)]

    def row_lengths(self) -> list[int]:
        """Tokens in each row of a full forward."""
        fill = [0] * self.n_rows
        for u, n in enumerate(self.unit_lengths()):
            fill[self.row_of(u)] += n
        return fill

    def placed(self) -> list[tuple[int, int, _Seq]]:
        """``(row, end, sequence)`` per unit (see :class:`BatchObserver`)."""
        after = [0] * self.n_rows  # tokens of the units after this one in its row
        out: list[tuple[int, int, _Seq]] = []
        for u, n in reversed(list(enumerate(self.unit_lengths()))):
            r = self.row_of(u)
            out.append((r, 1 - after[r], self.seqs[u]))  # its unfed last token would sit one further
            after[r] += n
        return out[::-1]


def _shared_prefix(group: Sequence[_Seq]) -> int:
    """Leading tokens every sequence of ``group`` shares, up to the first scored token of any."""
    first = group[0].ids
    n = min(s.start for s in group)
    for s in group[1:]:
        i = 0
        limit = min(n, len(s.ids))
        while i < limit and s.ids[i] == first[i]:
            i += 1
        n = i
    return n


def _tree_width(head: _Seq, prefix: int, rest: Sequence[_Seq]) -> int:
    """Length of a tree row: the first choice in full, then each other choice's tokens after the context but its last."""
    return len(head.ids) + sum(len(j.ids) - 1 - prefix for j in rest)


def _fed_length(s: _Seq, tree: tuple[int, tuple[_Seq, ...]] | None) -> int:
    """Tokens a unit feeds: its sequence but the last token, which is only a target (and, for a
    tree, ``(prefix, other choices)``, the other choices' tokens)."""
    return (_tree_width(s, *tree) if tree is not None else len(s.ids)) - 1


def _pack_rows(units: Sequence[_Seq], length: Callable[[_Seq], int], solo: Collection[int]) -> list[list[_Seq]]:
    """Units sorted longest first into rows no longer than the first (best fit: the open row with
    the least room that takes it); units of examples in ``solo`` get a row of their own. Rows
    come out fullest first."""
    if not units:
        return []
    width, shortest = length(units[0]), length(units[-1])
    rows: list[list[_Seq]] = []
    fill: list[int] = []
    rooms: list[tuple[int, int]] = []  # (room left, row) of rows that may take the shortest unit, sorted
    for s in units:
        n = length(s)
        k = bisect.bisect_left(rooms, (n, -1)) if s.example not in solo else len(rooms)
        if k < len(rooms):
            i = rooms.pop(k)[1]
        else:
            i = len(rows)
            rows.append([])
            fill.append(0)
        rows[i].append(s)
        fill[i] += n
        if s.example not in solo and width - fill[i] >= shortest:
            bisect.insort(rooms, (width - fill[i], i))
    order = sorted(range(len(rows)), key=lambda i: -fill[i])
    return [rows[i] for i in order]


def _cont_width(c: _Cont) -> int:
    return len(c.seq.ids) - 1 - c.prefix  # the last token is only a target


def _pack_width(pack: Sequence[_Cont]) -> int:
    return sum(_cont_width(c) for c in pack)


def _pack(conts: Sequence[_Cont], cap: int) -> list[list[_Cont]]:
    """Continuations of the same context row, in choice order, into rows of at most ``cap`` tokens."""
    packs: list[list[_Cont]] = []
    open_: dict[int, list[_Cont]] = {}  # context row -> the pack being filled
    for c in conts:
        cur = open_.get(c.row)
        if cur is None or _pack_width(cur) + _cont_width(c) > cap:
            cur = open_[c.row] = []
            packs.append(cur)
        cur.append(c)
    return packs


@dataclass
class ProbeRunner:
    """Tokenises probe sets once and runs them on a model.

    Each pass runs forwards only: batches are planned once per rank and kept, multiple-choice
    rows with a shared context run that context once (with all choices in one tree row where
    the model takes a 4D attention mask; else the first choice in full and the others as
    continuations of its cached keys and values; from its last prediction alone when they are
    one token long), and the vocabulary projection is applied only at scored positions.

    Example:
        >>> runner = ProbeRunner({"general": general_set}, ProbeSettings())  # doctest: +SKIP
        >>> runner.prepare(tokenizer)                                      # doctest: +SKIP
        >>> results = runner.run(model)                                    # doctest: +SKIP

    Attributes:
        last_scores: After a scoring pass, the summed log-probability of every sequence this
            rank scored, by ``(probe, row index, choice)`` (choice 0 for text and completion).
    """

    probes: dict[str, ProbeSet]
    settings: ProbeSettings
    last_scores: dict[tuple[str, int, int], float] = field(default_factory=dict, init=False, repr=False)
    _seqs: dict[str, list[_Seq]] = field(default_factory=dict, init=False, repr=False)
    _pad_id: int = field(default=0, init=False, repr=False)
    _plans: dict[Any, list[_Batch]] = field(default_factory=dict, init=False, repr=False)

    @property
    def prepared(self) -> bool:
        return bool(self._seqs)

    def prepare(self, tokenizer: Any) -> None:
        """Tokenise every probe; rows longer than ``max_length`` are reported here."""
        tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # processors wrap a tokenizer
        if tokenizer is None or not callable(tokenizer):
            raise ValueError(
                "tokenizer: the trainer has no processing_class and none was passed; "
                "pass ForgettingMonitor(..., tokenizer=...)"
            )
        self._seqs = {name: _tokenize_probe(p, tokenizer, self.settings) for name, p in self.probes.items()}
        self._plans = {}
        pad = getattr(tokenizer, "pad_token_id", None)
        if pad is None:
            pad = getattr(tokenizer, "eos_token_id", None)
        self._pad_id = int(pad) if pad is not None else 0

    def sequences(self, name: str) -> list[_Seq]:
        """The tokenised sequences of one probe (after :meth:`prepare`)."""
        return self._seqs[name]

    def _batches(
        self,
        ctx: DistContext,
        only: Collection[str] | None = None,
        *,
        share: bool = True,
        pack: bool = True,
        forward_only: bool = False,
        tree: bool | None = None,
        packed: bool | None = None,
    ) -> list[_Batch]:
        """This rank's forwards: rows ``i`` with ``i % world_size == rank``, all choices of a row together.

        Full forwards hold sequences sorted by length; each is followed by the continuation
        forwards of its shared contexts (none when ``forward_only``: observers see the shared
        context and first choice in the full forward, and nothing is scored). ``pack`` puts the
        continuations of one context in one row, up to the longest sequence of its full forward.
        ``tree`` (default: ``pack``, both need a 4D attention mask) runs a shared context and all
        its choices in one tree row where it fits in ``max_length``; ``packed`` (default:
        ``pack``) puts several units in one row of a full forward.
        """
        tree = pack and _TREE_ROWS if tree is None else tree
        packed = pack and _PACK_ROWS if packed is None else packed
        key = (ctx.rank, ctx.world_size, None if only is None else frozenset(only), share, pack, forward_only, tree,
               packed)
        if key not in self._plans:
            self._plans[key] = self._plan(ctx, only, share, pack, forward_only, tree, packed)
        return self._plans[key]

    def _plan(
        self, ctx: DistContext, only: Collection[str] | None, share: bool, pack: bool, forward_only: bool, tree: bool,
        packed: bool,
    ) -> list[_Batch]:
        bs = self.settings.batch_size
        batches: list[_Batch] = []
        for p_idx, (name, seqs) in enumerate(self._seqs.items()):
            if only is not None and name not in only:
                continue
            groups: dict[int, list[_Seq]] = {}
            for s in seqs:
                if s.example % ctx.world_size == ctx.rank:
                    groups.setdefault(s.example, []).append(s)
            full: list[_Seq] = []
            rest_of: dict[int, tuple[int, tuple[_Seq, ...]]] = {}  # example -> (prefix, other choices)
            tree_of: dict[int, tuple[int, tuple[_Seq, ...]]] = {}  # the same, run as a tree row
            for ex, group in groups.items():
                prefix = _shared_prefix(group) if share and len(group) > 1 else 0
                if prefix >= _MIN_SHARED_PREFIX:
                    head, *rest = sorted(group, key=lambda s: s.choice)
                    full.append(head)
                    n = _tree_width(head, prefix, rest)
                    # (One-token choices need no tree: the context's last prediction scores them.)
                    if tree and not forward_only and len(head.ids) < n <= self.settings.max_length:
                        tree_of[ex] = (prefix, tuple(rest))
                    else:
                        rest_of[ex] = (prefix, tuple(rest))
                else:
                    full.extend(group)
            def unit_length(s: _Seq) -> int:
                return _fed_length(s, tree_of.get(s.example))

            full.sort(key=lambda s: (-unit_length(s), s.example, s.choice))  # batch by length
            rows = _pack_rows(full, unit_length, rest_of) if packed else [[s] for s in full]
            for k in range(0, len(rows), bs):
                chunk = rows[k : k + bs]
                batch = _Batch(p_idx, [s for row in chunk for s in row],
                               rows=[i for i, row in enumerate(chunk) for _ in row] if packed else [])
                conts: list[_Cont] = []
                for u, s in enumerate(batch.seqs):
                    if s.example in tree_of:  # its first choice, the only one in `full`
                        batch.trees[u] = tree_of[s.example]
                    elif s.example in rest_of:  # alone in its row
                        prefix, rest = rest_of[s.example]
                        batch.shared.append((u, prefix, rest))
                        conts += [_Cont(j, batch.row_of(u), prefix) for j in rest if len(j.ids) - 1 > prefix]
                batches.append(batch)
                if forward_only or not conts:
                    continue
                batch.cache = True
                # A continuation forward holds no more than its full forward: at most batch_size
                # rows, none longer than the full forward's longest sequence.
                packs = _pack(conts, max(len(s.ids) for s in batch.seqs)) if pack else [[c] for c in conts]
                packs.sort(key=lambda pk: (-_pack_width(pk), pk[0].seq.example, pk[0].seq.choice))
                for m in range(0, len(packs), bs):
                    chunk = packs[m : m + bs]
                    batches.append(_Batch(p_idx, [c.seq for pk in chunk for c in pk], packs=chunk))
        return batches

    def run(
        self,
        model: torch.nn.Module,
        ctx: DistContext | None = None,
        *,
        desc: str = "probes",
        observer: BatchObserver | None = None,
        only: Collection[str] | None = None,
        forward_only: bool = False,
        context: contextlib.AbstractContextManager[Any] | None = None,
    ) -> dict[str, ProbeResult]:
        """Score every probe on ``model``: eval mode, ``no_grad``, configured precision.

        ``observer`` is told which sequences each forward carries (activation capture rides on
        these forwards); ``only`` restricts the pass to some probes; ``forward_only`` runs the
        forwards without scoring (results are then empty); ``context`` is entered around the
        pass (e.g. a PEFT model's ``disable_adapter()``).

        All ranks must call this together. The model's train/eval mode is restored. A failure on
        any rank raises :class:`ProbeFailure` on every rank; the ranks agree before each forward,
        so a failure outside the forward never leaves a sharded model's ranks waiting. A fault
        *inside* a sharded forward, between its own collectives, is beyond reach: only the
        process-group timeout ends it.
        """
        if not self.prepared:
            raise RuntimeError("ProbeRunner.run called before prepare(tokenizer)")
        ctx = ctx or DistContext()
        model = getattr(model, "module", model)  # DDP/DataParallel wrappers
        error: Exception | None = None
        # Every failure below is caught, never raised before the collectives: a rank that
        # raised early would leave the others waiting in them.
        fwd: _Forwarder | None = None
        try:
            fwd = _Forwarder.for_model(model, self._pad_id)
            fwd.greedy = frozenset(i for i, n in enumerate(self._seqs) if self.probes[n].kind == "completion")
        except Exception as e:
            error = e
        # The plan depends on the model only through whether it can continue from a cache,
        # which every rank decides alike (same model class).
        batches = list(self._batches(ctx, only, share=fwd is not None and fwd.cache_arg is not None,
                                     pack=fwd is not None and fwd.mask_format is not None, forward_only=forward_only))
        n_total = ctx.all_reduce_max(len(batches))
        # Ranks with fewer forwards replay one of theirs (or any sequence) so that every rank
        # runs the same number of forwards; the results of those are discarded.
        filler = (_Batch(0, batches[0].seqs, dummy=True, rows=batches[0].rows) if batches
                  else _Batch(0, [next(s for seqs in self._seqs.values() for s in seqs)], dummy=True))
        names = list(self._seqs)
        batches += [filler] * (n_total - len(batches))

        # One extra row carries "this rank failed" so that a fault on one rank is known to all
        # after the single collective below, instead of leaving the others waiting.
        sums = torch.zeros(len(self._seqs) + 1, _N_SUMS, dtype=torch.float64)
        scores = _Scores()
        was_training = model.training
        show_bar = ctx.is_main and (
            self.settings.progress_bar
            if self.settings.progress_bar is not None
            else n_total > self.settings.progress_min_batches
        )
        model.eval()
        try:
            with contextlib.ExitStack() as stack:
                try:
                    stack.enter_context(torch.no_grad())
                    stack.enter_context(_without_mixed_precision_wrapper(model))
                    stack.enter_context(_precision(_model_device(model), self.settings.precision))
                    if context is not None:
                        stack.enter_context(context)
                except Exception as e:
                    error = error or e
                head: _Head | None = None
                for batch in _progress(batches, show_bar, desc):
                    # Agree before each forward: a rank that failed (say, out of memory in the
                    # log-softmax after its forward) must not leave a sharded model's other
                    # ranks waiting inside the next forward's collectives.
                    if ctx.any(error is not None):
                        break
                    try:
                        assert fwd is not None
                        if batch.packs:
                            head = fwd.continuation(batch, head, scores, observer, names[batch.probe])
                        else:
                            if observer is not None:
                                observer.before_batch(None if batch.dummy else names[batch.probe], batch.placed())
                            head = None  # free the previous context cache before this forward
                            head = fwd.full(batch, scores, score=not (batch.dummy or forward_only))
                    except Exception as e:  # out of memory, a broken forward...: reported on every rank
                        error = e
                        head = None
                        if torch.cuda.is_available():
                            torch.cuda.empty_cache()
        finally:
            model.train(was_training)

        if observer is not None:
            observer.before_batch(None, [])
        kinds = [self.probes[n].kind for n in self._seqs]
        per_seq = scores.results()
        if error is None and not forward_only:
            self.last_scores = {(names[p], ex, ch): v[3] for (p, ex, ch), v in per_seq.items()}
            try:
                for p_idx, name in enumerate(self._seqs):
                    sums[p_idx] = torch.tensor(_local_sums(self.probes[name], kinds[p_idx], p_idx, per_seq))
            except Exception as e:
                error = e
        if error is not None:
            sums[-1, 0] = 1.0
        total = ctx.all_reduce_sum(sums)
        if total[-1, 0] > 0:
            where = f"{error!r}" if error is not None else "another rank failed"
            raise ProbeFailure(f"probe pass failed on {int(total[-1, 0])} rank(s): {where}") from error
        results: dict[str, ProbeResult] = {}
        for p_idx, name in enumerate(self._seqs):
            if forward_only or (only is not None and name not in only):
                continue
            nll_sum, tokens, correct, examples = total[p_idx].tolist()
            kind = kinds[p_idx]
            results[name] = ProbeResult(
                name=name,
                kind=kind,
                nll=nll_sum / tokens if tokens else math.nan,
                score=None if kind == "text" else (correct / examples if examples else math.nan),
                examples=int(examples),
                tokens=int(tokens),
            )
        return results


def _local_sums(
    probe: ProbeSet, kind: str, p_idx: int, per_seq: dict[tuple[int, int, int], tuple[float, int, bool, float]]
) -> list[float]:
    nll_sum = tokens = correct = examples = 0.0
    mine = sorted({ex for (p, ex, _) in per_seq if p == p_idx})
    for ex in mine:
        if kind == "text":
            nll, n, _, _ = per_seq[(p_idx, ex, 0)]
            nll_sum, tokens = nll_sum + nll, tokens + n
        elif kind == "completion":
            nll, n, exact, _ = per_seq[(p_idx, ex, 0)]
            nll_sum, tokens, correct = nll_sum + nll, tokens + n, correct + float(exact)
        else:
            row = probe.rows[ex]
            _, answer = _first_field(row, _ANSWER_FIELDS)
            logprobs = [per_seq[(p_idx, ex, j)][3] for j in range(len(row["choices"]))]
            pred = max(range(len(logprobs)), key=lambda j: (logprobs[j], -j))  # ties: first choice
            nll, n, _, _ = per_seq[(p_idx, ex, answer)]
            nll_sum, tokens, correct = nll_sum + nll, tokens + n, correct + float(pred == answer)
        examples += 1
    return [nll_sum, tokens, correct, examples]


# --------------------------------------------------------------------------------------
# Forwards and scoring
# --------------------------------------------------------------------------------------


class _Scores:
    """Per-sequence sums (log-probability, tokens, all greedy-correct) filled batch by batch.

    A later choice's prediction at the end of a shared context comes from the full forward and
    is held as *pending* until its continuation is scored (it is dropped if the continuation
    has to run in full instead).
    """

    def __init__(self) -> None:
        self._acc: dict[_Key, list[Any]] = {}
        self.pending: dict[_Key, tuple[float, int, bool]] = {}

    def add(self, key: _Key, lp: float, n: int, greedy: bool, *, pending: bool = False) -> None:
        if pending:
            self.pending[key] = (lp, n, greedy)
            return
        acc = self._acc.setdefault(key, [0.0, 0, True])
        acc[0] += lp
        acc[1] += n
        acc[2] = acc[2] and greedy

    def settle(self, key: _Key, keep: bool) -> None:
        held = self.pending.pop(key, None)
        if held is not None and keep:
            self.add(key, *held)

    def results(self) -> dict[_Key, tuple[float, int, bool, float]]:
        """``(NLL sum, tokens, all greedy-correct, log-probability sum)`` per sequence."""
        return {k: (-lp, n, greedy, lp) for k, (lp, n, greedy) in self._acc.items()}


@dataclass
class _Requests:
    """Scored positions of one forward: target token at (row, position), summed per key."""

    rows: list[int] = field(default_factory=list)
    pos: list[int] = field(default_factory=list)
    targets: list[int] = field(default_factory=list)
    seg: list[int] = field(default_factory=list)
    keys: list[_Key] = field(default_factory=list)
    pending: list[bool] = field(default_factory=list)

    def span(self, key: _Key, row: int, positions: range, targets: Sequence[int], *, pending: bool = False) -> None:
        """Score ``targets`` from the predictions at ``positions`` of ``row``."""
        k = len(self.keys)
        self.keys.append(key)
        self.pending.append(pending)
        for q, t in zip(positions, targets):
            self.rows.append(row)
            self.pos.append(q)
            self.targets.append(t)
            self.seg.append(k)


@dataclass
class _Head:
    """The context cache of a full forward, for the continuation forwards after it."""

    cache: Any
    width: int
    pads: list[int]


@dataclass
class _Forwarder:
    """Runs planned forwards on one model and scores them.

    ``keep``: how logits are limited to scored positions: ``mask`` (``logits_to_keep`` as a
    boolean row × position mask: transformers ≥ 5), ``tail`` (``logits_to_keep`` as the number of
    last positions), or ``none`` (all logits). ``cache_arg``: the forward's cache argument
    (``cache`` or ``past_key_values``), ``None`` when the model cannot continue from one.
    ``mask_format``: how a 4D attention mask is passed to this model's attention (``bool`` for
    SDPA, ``additive`` for eager), ``None`` where it takes none (flash, flex attention...).
    """

    model: torch.nn.Module
    pad_id: int
    device: torch.device
    positions: bool
    keep: str
    cache_arg: str | None
    mask_format: str | None = None
    greedy: frozenset[int] = frozenset()  # probes whose score needs the greedy check (completion)

    @classmethod
    def for_model(cls, model: torch.nn.Module, pad_id: int) -> _Forwarder:
        get_base = getattr(model, "get_base_model", None)  # PEFT wrappers pass kwargs through
        target = get_base() if callable(get_base) else model
        params = inspect.signature(target.forward).parameters
        keep = "none"
        if "logits_to_keep" in params:
            keep = "mask" if _transformers_model(target) and _mask_keep_supported() else "tail"
        cache_arg = next((a for a in ("cache", "past_key_values") if a in params), None)
        if "position_ids" not in params or getattr(target, "_is_stateful", False):
            cache_arg = None  # continuations need explicit positions and an attention (KV) cache
        # transformers' attention functions take a ready 4D mask as given: SDPA a boolean one,
        # eager an additive one; other implementations (flash, flex) need their own formats.
        impl = getattr(getattr(target, "config", None), "_attn_implementation", None)
        mask_format = {"sdpa": "bool", "eager": "additive"}.get(impl) if _transformers_model(target) else None
        return cls(model, pad_id, _model_device(model), "position_ids" in params, keep, cache_arg,
                   mask_format if cache_arg is not None else None)

    def full(self, batch: _Batch, scores: _Scores, *, score: bool) -> _Head | None:
        seqs, trees = batch.seqs, batch.trees  # (no trees in filler or forward-only batches)
        fill = batch.row_lengths()
        width, n_rows = max(fill), len(fill)
        placed = batch.placed()
        # Each unit feeds its sequence but the last token (only a target) at the end of its
        # place in the row; a tree's other choices precede the first choice's sequence.
        at = [width + end - len(s.ids) for _, end, s in placed]  # first column of each sequence
        row = [r for r, _, _ in placed]
        input_ids = torch.full((n_rows, width), self.pad_id, dtype=torch.long)
        position_ids = torch.zeros((n_rows, width), dtype=torch.long)
        for u, s in enumerate(seqs):
            input_ids[row[u], at[u] : at[u] + len(s.ids) - 1] = torch.tensor(s.ids[:-1])
            position_ids[row[u], at[u] : at[u] + len(s.ids) - 1] = torch.arange(len(s.ids) - 1)
        kwargs: dict[str, Any] = {}
        segments: dict[tuple[int, int], int] = {}  # (unit, choice) -> first column of a tree choice's tokens
        if trees or batch.packed:
            # Each unit sees itself only; a tree's other choices sit before its first choice, at
            # the positions after the context, and see the context and themselves.
            allowed = torch.zeros((n_rows, width, width), dtype=torch.bool)
            for u, s in enumerate(seqs):
                r, a, n = row[u], at[u], len(s.ids) - 1
                allowed[r, a : a + n, a : a + n] = torch.ones(n, n, dtype=torch.bool).tril()
            for u, (prefix, rest) in trees.items():
                r, q = row[u], at[u] - _tree_width(seqs[u], prefix, rest) + len(seqs[u].ids)
                for j in rest:
                    n, ids = len(j.ids) - 1 - prefix, j.ids
                    if not n:
                        continue
                    input_ids[r, q : q + n] = torch.tensor(ids[prefix : prefix + n])
                    position_ids[r, q : q + n] = torch.arange(prefix, prefix + n)
                    allowed[r, q : q + n, at[u] : at[u] + prefix] = True
                    allowed[r, q : q + n, q : q + n] = torch.ones(n, n, dtype=torch.bool).tril()
                    segments[(u, j.choice)] = q
                    q += n
            kwargs["attention_mask"] = _mask_4d(allowed, self.mask_format)
        else:
            kwargs["attention_mask"] = (torch.arange(width) >= width - torch.tensor(fill)[:, None]).long()
        if self.positions:
            kwargs["position_ids"] = position_ids
        want_cache = score and batch.cache and self.cache_arg is not None
        if not score:
            self._forward(input_ids, kwargs, None, use_cache=False)
            return None
        req = _Requests()
        for u, s in enumerate(seqs):
            req.span((batch.probe, s.example, s.choice), row[u], range(at[u] + s.start - 1, at[u] + len(s.ids) - 1),
                     s.ids[s.start :])
        for u, (prefix, rest) in trees.items():
            for j in rest:
                # Token k is predicted at the column of token k - 1: the context's last, or the choice's own.
                cols = [at[u] + prefix - 1 if k == prefix else segments[(u, j.choice)] + k - 1 - prefix
                        for k in range(j.start, len(j.ids))]
                req.span((batch.probe, j.example, j.choice), row[u], cols, j.ids[j.start :])
        for u, prefix, rest in batch.shared:
            # Every choice's prediction at the end of the shared context is this unit's.
            for j in rest:
                if j.start == prefix:
                    req.span((batch.probe, j.example, j.choice), row[u], range(at[u] + prefix - 1, at[u] + prefix),
                             j.ids[prefix : prefix + 1], pending=len(j.ids) - 1 > prefix)
        keep = _position_mask(input_ids.shape, req)
        out = self._forward(input_ids, kwargs, keep, use_cache=want_cache)
        self._score(out, keep, req, scores)
        if not want_cache:
            return None
        # A unit continued from the cache is alone in its row: its context starts the row's content.
        return _Head(_output_cache(out, self.cache_arg), width, [width - f for f in fill])

    def continuation(
        self, batch: _Batch, head: _Head | None, scores: _Scores, observer: BatchObserver | None, probe: str
    ) -> _Head | None:
        packs = batch.packs
        widths = [_pack_width(pk) for pk in packs]
        width = max(widths)
        keys = {id(c): (batch.probe, c.seq.example, c.seq.choice) for pk in packs for c in pk}
        if head is None or not _cache_fits(head.cache, head.width, head.width + width):
            # No usable cache (a model whose cache is not a plain per-layer key/value store):
            # the same number of forwards, with these sequences in full.
            for k in keys.values():
                scores.settle(k, keep=False)
            rerun = _Batch(batch.probe, batch.seqs)
            if observer is not None:
                observer.before_batch(probe, rerun.placed())
            self.full(rerun, scores, score=True)
            return head
        if observer is not None:
            observer.before_batch(None, [])
        n_rows, total = len(packs), head.width + width
        input_ids = torch.full((n_rows, width), self.pad_id, dtype=torch.long)
        position_ids = torch.zeros((n_rows, width), dtype=torch.long)
        packed = any(len(pk) > 1 for pk in packs)
        # Row i sees its context (the head row's first `prefix` tokens, not the first choice
        # after them) and, per continuation, its own tokens causally.
        allowed = torch.zeros((n_rows, width, total), dtype=torch.bool)
        req = _Requests()
        for i, pk in enumerate(packs):
            ctx_start, prefix = head.pads[pk[0].row], pk[0].prefix
            q = width - widths[i]  # left padding
            for c in pk:
                n, ids = _cont_width(c), c.seq.ids
                input_ids[i, q : q + n] = torch.tensor(ids[prefix : prefix + n])
                position_ids[i, q : q + n] = torch.arange(prefix, prefix + n)
                allowed[i, q : q + n, ctx_start : ctx_start + prefix] = True
                allowed[i, q : q + n, head.width + q : head.width + q + n] = torch.ones(n, n, dtype=torch.bool).tril()
                first = max(c.seq.start - 1, prefix)
                req.span(keys[id(c)], i, range(q + first - prefix, q + n), ids[first + 1 :])
                q += n
        if packed:
            mask: torch.Tensor = _mask_4d(allowed, self.mask_format, offset=head.width)
        else:  # one continuation per row: a 2D padding mask over context + row says it all
            mask = allowed.any(1).long()
        rows = torch.tensor([pk[0].row for pk in packs])
        cache = _select_rows(head.cache, rows.to(self.device))
        kwargs = {"attention_mask": mask, "position_ids": position_ids, self.cache_arg: cache}
        keep = _position_mask(input_ids.shape, req)
        out = self._forward(input_ids, kwargs, keep, use_cache=True)
        for k in keys.values():
            scores.settle(k, keep=True)
        self._score(out, keep, req, scores)
        return head

    def _forward(self, input_ids: torch.Tensor, kwargs: dict[str, Any], keep: torch.Tensor | None, use_cache: bool) -> Any:
        """The model's forward; logits only where ``keep`` (row × position) is set, as far as it allows."""
        kwargs = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        kwargs["input_ids"] = input_ids.to(self.device)
        kwargs["use_cache"] = use_cache
        if self.keep != "none":
            if keep is None:
                kwargs["logits_to_keep"] = 1
            elif self.keep == "mask":
                kwargs["logits_to_keep"] = keep.to(self.device)
            else:
                kwargs["logits_to_keep"] = input_ids.shape[1] - int(keep.any(0).nonzero()[0])
        return self.model(**kwargs)

    def _score(self, out: Any, keep: torch.Tensor, req: _Requests, scores: _Scores) -> None:
        logits = out["logits"] if isinstance(out, Mapping) else out[0]
        shape = keep.shape
        n_keep = int(keep.sum())
        if logits.dim() == 3 and logits.shape[0] == 1 and logits.shape[1] == n_keep and shape[0] != 1:
            logits = logits[0]
        if logits.dim() == 3:  # all positions, or the last ones: pick the scored ones
            rows, pos = keep.nonzero(as_tuple=True)
            logits = logits[rows.to(logits.device), (pos - (shape[1] - logits.shape[1])).to(logits.device)]
        if logits.shape[0] != n_keep:
            raise RuntimeError(f"the model returned logits of shape {tuple(logits.shape)} for {n_keep} kept positions")
        # Index of each request's position among the kept ones (row-major order).
        index = torch.full((shape[0] * shape[1],), -1, dtype=torch.long)
        index[keep.flatten()] = torch.arange(n_keep)
        flat = torch.tensor(req.rows) * shape[1] + torch.tensor(req.pos)
        at = index[flat].to(logits.device)
        targets = torch.tensor(req.targets, device=logits.device)
        logits = logits.float()
        # log_softmax(x)[t] = x[t] - logsumexp(x), without a vocabulary-sized copy per position.
        lse = torch.logsumexp(logits, dim=-1)
        tok_lp = (logits[at, targets] - lse[at]).double().cpu()
        if req.keys and req.keys[0][0] in self.greedy:
            wrong = (logits.argmax(-1)[at] != targets).cpu()
        else:  # only exact match reads it: skip a pass over the logits
            wrong = torch.zeros(len(req.targets), dtype=torch.bool)
        seg = torch.tensor(req.seg)
        lp_sum = torch.zeros(len(req.keys), dtype=torch.float64).index_add_(0, seg, tok_lp)
        n = torch.bincount(seg, minlength=len(req.keys))
        n_wrong = torch.bincount(seg, weights=wrong.double(), minlength=len(req.keys))
        for k, key in enumerate(req.keys):
            scores.add(key, float(lp_sum[k]), int(n[k]), bool(n_wrong[k] == 0), pending=req.pending[k])


def _mask_4d(allowed: torch.Tensor, mask_format: str | None, offset: int = 0) -> torch.Tensor:
    """``rows × queries × keys`` booleans as the model's 4D attention mask (``bool`` or ``additive``).

    A query that may see nothing (padding) sees itself, at key ``offset + query`` (after a cache
    of ``offset`` positions): an all-masked query row gives NaN.
    """
    empty = ~allowed.any(-1)
    allowed[:, :, offset:] |= torch.diag_embed(empty)
    mask = allowed[:, None]
    if mask_format == "additive":
        mask = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
    return mask


def _position_mask(shape: torch.Size, req: _Requests) -> torch.Tensor:
    keep = torch.zeros(tuple(shape), dtype=torch.bool)
    keep[torch.tensor(req.rows), torch.tensor(req.pos)] = True
    return keep


def _output_cache(out: Any, name: str | None) -> Any:
    if not isinstance(out, Mapping) or name is None:
        return None
    for key in (name, "cache", "past_key_values"):  # transformers 5 returns ``cache``, 4.x ``past_key_values``
        if out.get(key) is not None:
            return out[key]
    return None


def _cache_fits(cache: Any, width: int, total: int) -> bool:
    """Whether ``cache`` holds exactly ``width`` positions in every layer, none of them windowed away."""
    layers = getattr(cache, "layers", None)
    if not layers or not callable(getattr(layers[0], "batch_select_indices", None)):
        return False
    for layer in layers:
        keys = getattr(layer, "keys", None)
        if not getattr(layer, "is_initialized", True) or keys is None or keys.dim() != 4 or keys.shape[-2] != width:
            return False
        if getattr(layer, "is_sliding", False) and getattr(layer, "sliding_window", 0) <= total:
            return False
    return True


def _select_rows(cache: Any, rows: torch.Tensor) -> Any:
    """A new cache holding ``rows`` of ``cache`` (repeated as often as given); ``cache`` is kept."""
    new = copy.copy(cache)
    new.layers = [copy.copy(layer) for layer in cache.layers]
    for layer in new.layers:
        layer.batch_select_indices(rows)
    return new


def _transformers_model(model: torch.nn.Module) -> bool:
    return type(model).__module__.startswith("transformers.")


@functools.lru_cache(maxsize=1)
def _mask_keep_supported() -> bool:
    """Whether this transformers' ``logits_to_keep`` takes a boolean (batch, position) mask."""
    try:
        from transformers.modeling_utils import slice_logits_to_keep

        hidden = torch.zeros(2, 3, 1)
        keep = torch.tensor([[True, False, True], [False, False, True]])
        return tuple(slice_logits_to_keep(hidden, keep).shape) == (3, 1)
    except Exception:
        return False


def _model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@contextlib.contextmanager
def _without_mixed_precision_wrapper(model: torch.nn.Module) -> Iterator[None]:
    """Undo accelerate's autocast wrapper around ``model.forward`` for the probe pass.

    With ``bf16=True``/``fp16=True`` (TRL's default), accelerate replaces ``model.forward`` by
    an autocast-wrapped version and keeps the original as ``_original_forward``; an outer
    ``autocast(enabled=False)`` cannot switch that off. Swapping the attribute (not calling the
    original directly) keeps every module hook, which sharded models rely on.
    """
    original = model.__dict__.get("_original_forward")
    wrapped = model.__dict__.get("forward")
    if original is None or wrapped is None:
        yield
        return
    model.forward = original
    try:
        yield
    finally:
        model.forward = wrapped


def _precision(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    """Autocast as configured; ``fp32``/``auto`` switch off any ambient (trainer) autocast."""
    device_type = device.type if device.type in ("cuda", "cpu", "xpu", "mps") else "cpu"
    if precision in _DTYPES:
        return torch.autocast(device_type=device_type, dtype=_DTYPES[precision], enabled=True)
    return torch.autocast(device_type=device_type, enabled=False)


def _progress(items: list[_Batch], show: bool, desc: str) -> Iterator[_Batch]:
    if not show:
        yield from items
        return
    from tqdm.auto import tqdm

    yield from tqdm(items, desc=desc, unit="batch", leave=False, dynamic_ncols=True)
