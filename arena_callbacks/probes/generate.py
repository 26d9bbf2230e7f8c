"""Greedy decoding for generative probes: batched, KV-cached, every rank in step.

A batch of prompts is left-padded and run once in full (the prefill); then one token per row
per step is fed on the cached keys and values, positions counted from each row's first real
token, exactly as ``model.generate(do_sample=False)`` does. A row ends on an end-of-sequence
token or when its text holds a stop string (both count as *stopped on its own*), or after
``max_new_tokens``. Finished rows leave the batch (their cache rows are dropped), so a batch
costs what its longest answers cost, not ``rows x max_new_tokens``.

Under a process group every decode step is a forward on every rank: before each step the ranks
agree (one small all-reduce) whether any of them still has a row going, and a rank with none
left runs a one-token forward of a padding token, so sharded models (FSDP, ZeRO-3) never wait.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..distributed import DistContext
from .forward import Forwarder, _output_cache

__all__ = ["Generated", "cut_at_stop", "decode_batch", "eos_ids"]


@dataclass(frozen=True)
class Generated:
    """One row's answer.

    Attributes:
        ids: The generated tokens (an end-of-sequence token that ended it left out).
        text: Their text, cut before the first stop string.
        stopped: Ended on its own (end of sequence or a stop string), not by ``max_new_tokens``.
    """

    ids: tuple[int, ...]
    text: str
    stopped: bool


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """``text`` before the earliest stop string, and whether one was found.

    Example:
        >>> cut_at_stop("42\\n\\nQ: next", ["\\n\\n", "Q:"])
        ('42', True)
    """
    cuts = [i for s in stop if s and (i := text.find(s)) >= 0]
    return (text[: min(cuts)], True) if cuts else (text, False)


def eos_ids(model: torch.nn.Module, tokenizer: Any) -> frozenset[int]:
    """End-of-sequence ids: the model's generation config's (as ``generate`` uses), else the tokenizer's."""
    ids: set[int] = set()
    config = getattr(model, "generation_config", None)
    value = getattr(config, "eos_token_id", None) if config is not None else None
    if value is None:
        value = getattr(tokenizer, "eos_token_id", None)
    if isinstance(value, int):
        ids.add(value)
    elif value is not None:
        ids.update(int(v) for v in value)
    return frozenset(ids)


def _agree(ctx: DistContext, active: bool, failed: bool) -> tuple[bool, bool]:
    """(any rank still decoding, any rank failed): one collective."""
    if not ctx.active:
        return active, failed
    flags = ctx.max_floats([float(active), float(failed)])
    return flags[0] > 0, flags[1] > 0


def decode_batch(
    fwd: Forwarder,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    eos: frozenset[int],
    stop: Sequence[str],
    decode: Callable[[list[int]], str],
    ctx: DistContext | None = None,
) -> list[Generated]:
    """Greedy answers to ``prompts`` (token ids; may be empty on a rank with nothing to do).

    ``fwd`` says how to call the model (its cache argument; a model without one recomputes the
    whole sequence each step). All ranks call it together for each batch index; errors are
    raised after the ranks agree.
    """
    ctx = ctx or DistContext()
    model, pad_id, device = fwd.model, fwd.pad_id, fwd.device
    step = _Stepper(fwd)
    n = len(prompts)
    out: list[list[int]] = [[] for _ in range(n)]
    result: list[Generated | None] = [None] * n
    error: Exception | None = None
    cache = mask = positions = nxt = None
    rows: list[int] = list(range(n))  # batch row -> prompt index, for rows still going
    try:
        if n:
            width = max(len(p) for p in prompts)
            ids = torch.full((n, width), pad_id, dtype=torch.long)
            mask = torch.zeros((n, width), dtype=torch.long)
            for i, p in enumerate(prompts):
                ids[i, width - len(p):] = torch.tensor(list(p), dtype=torch.long)
                mask[i, width - len(p):] = 1
            ids, mask = ids.to(device), mask.to(device)
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            cache, nxt = step.prefill(ids, mask, positions)
        else:
            _idle_forward(model, pad_id, device)
    except Exception as e:  # noqa: BLE001 - agreed on below, raised on every rank
        error, rows = e, []
    while True:  # each turn takes one token per going row, then runs one forward on every rank
        if error is None and rows:
            try:
                before = len(rows)
                rows, keep = _advance(rows, nxt, out, result, max_new_tokens, eos, stop, decode)
                if rows and len(rows) < before:  # finished rows leave the batch and its cache
                    index = torch.tensor(keep, device=device)
                    cache = step.select(cache, index)
                    mask, positions, nxt = mask[index], positions[index], nxt[index]
            except Exception as e:  # noqa: BLE001
                error, rows = e, []
        going, failed = _agree(ctx, bool(rows), error is not None)
        if failed or not going:
            break
        try:
            if rows:
                mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
                positions = torch.cat([positions, positions[:, -1:] + 1], dim=1)
                cache, nxt = step.next(cache, nxt, mask, positions)
            else:
                _idle_forward(model, pad_id, device)
        except Exception as e:  # noqa: BLE001
            error, rows = e, []
    if failed:  # agreed by the loop's last collective: every error is seen by one before the loop ends
        raise error if error is not None else RuntimeError("generation failed on another rank")
    for i in range(n):
        if result[i] is None:  # ran out of tokens
            text, _ = cut_at_stop(decode(out[i]), stop)
            result[i] = Generated(tuple(out[i]), text, False)
    return [r for r in result if r is not None]


def _advance(
    rows: list[int], nxt: torch.Tensor, out: list[list[int]], result: list[Generated | None],
    max_new_tokens: int, eos: frozenset[int], stop: Sequence[str], decode: Callable[[list[int]], str],
) -> tuple[list[int], list[int]]:
    """Append each going row's next token; returns the rows still going and their batch indices."""
    still, keep = [], []
    tokens = nxt.tolist()
    for b, i in enumerate(rows):
        t = int(tokens[b])
        if t in eos:
            result[i] = Generated(tuple(out[i]), cut_at_stop(decode(out[i]), stop)[0], True)
            continue
        out[i].append(t)
        if stop:
            text, hit = cut_at_stop(decode(out[i]), stop)
            if hit:
                result[i] = Generated(tuple(out[i]), text, True)
                continue
        if len(out[i]) >= max_new_tokens:
            continue  # finished by length; written at the end
        still.append(i)
        keep.append(b)
    return still, keep


class _Stepper:
    """The model calls of decoding: with a KV cache (the cached keys and values carry the
    prefix), or without one (the whole sequence again each step)."""

    def __init__(self, fwd: Forwarder) -> None:
        self.model, self.arg = fwd.model, fwd.cache_arg
        self.keep = {"logits_to_keep": 1} if fwd.keep != "none" else {}

    def _last(self, out: Any) -> torch.Tensor:
        return out.logits[:, -1].argmax(-1)

    def prefill(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> tuple[Any, torch.Tensor]:
        if self.arg is None:
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, **self.keep)
            return ids, self._last(out)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **self.keep)
        return _output_cache(out, self.arg), self._last(out)

    def next(
        self, cache: Any, nxt: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor
    ) -> tuple[Any, torch.Tensor]:
        if self.arg is None:  # ``cache`` is the token ids so far
            ids = torch.cat([cache, nxt[:, None]], dim=1)
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, **self.keep)
            return ids, self._last(out)
        out = self.model(input_ids=nxt[:, None], attention_mask=mask, position_ids=positions[:, -1:],
                         use_cache=True, **{self.arg: cache})
        return _output_cache(out, self.arg), self._last(out)

    def select(self, cache: Any, index: torch.Tensor) -> Any:
        if self.arg is None:
            return cache[index]
        cache.batch_select_indices(index)
        return cache


def _idle_forward(model: torch.nn.Module, pad_id: int, device: torch.device) -> None:
    """A one-token forward whose result is thrown away: this rank's part in a step of the others."""
    model(input_ids=torch.full((1, 1), pad_id, dtype=torch.long, device=device), use_cache=False)
