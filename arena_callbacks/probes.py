"""Capability probes: loading, validation, tokenisation and the batched probe pass.

Three kinds (DESIGN.md §2), told apart by their fields unless named explicitly:

* ``text``: ``{"text": ...}``: mean token negative log-likelihood.
* ``multiple_choice``: ``{"context"|"question": ..., "choices": [...], "answer"|"label": i}``:
  log-likelihood ranking of the choices, accuracy; NLL of the correct choice.
* ``completion``: ``{"prompt": ..., "completion": ...}``: teacher-forced exact match of the
  answer span (every answer token is the greedy prediction) and answer NLL.

Rows are tokenised once (:meth:`ProbeRunner.prepare`); each pass only runs forwards. Examples
are split across ranks, and every rank runs the same number of batches so that sharded
models never see a rank-0-only forward.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import math
import random
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
import torch.nn.functional as F

from .config import ProbeSettings
from .distributed import DistContext
from .exceptions import ProbeDataError

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


class BatchObserver(Protocol):
    """Told, before each probe forward, which probe and sequences it carries.

    ``probe`` is ``None`` for filler batches (and once after the pass, to reset).
    """

    def before_batch(self, probe: str | None, seqs: Sequence[_Seq]) -> None: ...


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


@dataclass
class _Batch:
    probe: int
    seqs: list[_Seq]
    dummy: bool = False


@dataclass
class ProbeRunner:
    """Tokenises probe sets once and runs them on a model.

    Example:
        >>> runner = ProbeRunner({"general": general_set}, ProbeSettings())  # doctest: +SKIP
        >>> runner.prepare(tokenizer)                                      # doctest: +SKIP
        >>> results = runner.run(model)                                    # doctest: +SKIP
    """

    probes: dict[str, ProbeSet]
    settings: ProbeSettings
    _seqs: dict[str, list[_Seq]] = field(default_factory=dict, init=False, repr=False)
    _pad_id: int = field(default=0, init=False, repr=False)

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
        pad = getattr(tokenizer, "pad_token_id", None)
        if pad is None:
            pad = getattr(tokenizer, "eos_token_id", None)
        self._pad_id = int(pad) if pad is not None else 0

    def sequences(self, name: str) -> list[_Seq]:
        """The tokenised sequences of one probe (after :meth:`prepare`)."""
        return self._seqs[name]

    def _batches(self, ctx: DistContext, only: Collection[str] | None = None) -> list[_Batch]:
        batches: list[_Batch] = []
        for p_idx, (name, seqs) in enumerate(self._seqs.items()):
            if only is not None and name not in only:
                continue
            mine = [s for s in seqs if s.example % ctx.world_size == ctx.rank]
            mine.sort(key=lambda s: (-len(s.ids), s.example, s.choice))  # batch by length
            bs = self.settings.batch_size
            batches.extend(_Batch(p_idx, mine[k : k + bs]) for k in range(0, len(mine), bs))
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
        batches = self._batches(ctx, only)
        n_total = ctx.all_reduce_max(len(batches))
        # Ranks with fewer batches replay one of theirs (or any sequence) so that every rank
        # runs the same number of forwards; the results of those are discarded.
        filler = batches[0].seqs if batches else [next(s for seqs in self._seqs.values() for s in seqs)]
        names = list(self._seqs)
        batches += [_Batch(0, filler, dummy=True) for _ in range(n_total - len(batches))]

        # One extra row carries "this rank failed" so that a fault on one rank is known to all
        # after the single collective below, instead of leaving the others waiting.
        sums = torch.zeros(len(self._seqs) + 1, _N_SUMS, dtype=torch.float64)
        error: Exception | None = None
        per_seq: dict[tuple[int, int, int], tuple[float, int, bool, float]] = {}
        device = _model_device(model)
        was_training = model.training
        show_bar = ctx.is_main and (
            self.settings.progress_bar
            if self.settings.progress_bar is not None
            else n_total > self.settings.progress_min_batches
        )
        # Every failure below is caught, never raised before the collectives: a rank that
        # raised early would leave the others waiting in them.
        flags = (False, False)
        try:
            flags = (_accepts(model, "position_ids"), _accepts(model, "logits_to_keep"))
        except Exception as e:
            error = e
        model.eval()
        try:
            with contextlib.ExitStack() as stack:
                try:
                    stack.enter_context(torch.no_grad())
                    stack.enter_context(_without_mixed_precision_wrapper(model))
                    stack.enter_context(_precision(device, self.settings.precision))
                    if context is not None:
                        stack.enter_context(context)
                except Exception as e:
                    error = error or e
                for batch in _progress(batches, show_bar, desc):
                    # Agree before each forward: a rank that failed (say, out of memory in the
                    # log-softmax after its forward) must not leave a sharded model's other
                    # ranks waiting inside the next forward's collectives.
                    if ctx.any(error is not None):
                        break
                    try:
                        if observer is not None:
                            observer.before_batch(None if batch.dummy else names[batch.probe], batch.seqs)
                        out = _score_batch(model, batch.seqs, device, self._pad_id, *flags, forward_only=forward_only)
                    except Exception as e:  # out of memory, a broken forward...: reported on every rank
                        error = e
                        if torch.cuda.is_available():
                            torch.cuda.empty_cache()
                        continue
                    if batch.dummy or forward_only:
                        continue
                    for s, o in zip(batch.seqs, out):
                        per_seq[(batch.probe, s.example, s.choice)] = o
        finally:
            model.train(was_training)

        if observer is not None:
            observer.before_batch(None, [])
        kinds = [self.probes[n].kind for n in self._seqs]
        if error is None and not forward_only:
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


def _score_batch(
    model: torch.nn.Module,
    seqs: list[_Seq],
    device: torch.device,
    pad_id: int,
    pass_positions: bool,
    keep_supported: bool,
    forward_only: bool = False,
) -> list[tuple[float, int, bool, float]]:
    """For each sequence: (sum NLL of scored tokens, their count, all greedy-correct, sum logprob).

    Left padding with explicit position ids puts every scored token in the last ``keep``
    positions, so the vocabulary projection runs only there when the model supports
    ``logits_to_keep``.
    """
    width = max(len(s.ids) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):
        input_ids[r, width - len(s.ids) :] = torch.tensor(s.ids)
        mask[r, width - len(s.ids) :] = 1
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    keep = max(len(s.ids) - s.start + 1 for s in seqs)  # positions start-1 .. len-1 of the longest span
    if forward_only:
        keep = 1
    kwargs: dict[str, Any] = {"input_ids": input_ids.to(device), "attention_mask": mask.to(device), "use_cache": False}
    if pass_positions:
        kwargs["position_ids"] = position_ids.to(device)
    if keep_supported:
        kwargs["logits_to_keep"] = keep
    out = model(**kwargs)
    if forward_only:
        return []
    logits = out["logits"] if isinstance(out, Mapping) else out[0]
    if not keep_supported:
        logits = logits[:, -keep:, :]
    logits = logits.float()
    # logits[:, k] predicts token at absolute position width - keep + k + 1.
    offset = width - keep
    results = []
    for r, s in enumerate(seqs):
        pad = width - len(s.ids)
        first = pad + s.start  # absolute position of the first scored token
        targets = input_ids[r, first:].to(logits.device)
        rows = logits[r, first - 1 - offset : width - 1 - offset]
        logp = F.log_softmax(rows, dim=-1)
        tok_lp = logp.gather(-1, targets[:, None]).squeeze(-1).double()
        greedy = bool((rows.argmax(-1) == targets).all().item())
        lp_sum = float(tok_lp.sum().item())
        results.append((-lp_sum, int(targets.numel()), greedy, lp_sum))
    return results


def _model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _accepts(model: torch.nn.Module, name: str) -> bool:
    """Whether the model's (base) forward takes ``name``. PEFT wrappers pass kwargs through."""
    get_base = getattr(model, "get_base_model", None)
    target = get_base() if callable(get_base) else model
    return name in inspect.signature(target.forward).parameters


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
