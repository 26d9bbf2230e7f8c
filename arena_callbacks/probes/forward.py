"""Forwards: running a planned :class:`~.plan.Batch` on a model and scoring its logits.

A full forward lays its units out right-aligned in their rows (a 2D padding mask, or a 4D mask
where rows are packed or hold trees); a continuation forward feeds the tokens after a shared
context on the full forward's cached keys and values. Logits are asked for only at scored
positions where the model allows it (``logits_to_keep``).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from .plan import Batch, BatchObserver, Cont, cont_width, pack_width, tree_width
from .scoring import Key, Scores


@dataclass
class _Requests:
    """Scored positions of one forward: target token at (row, position), summed per key."""

    rows: list[int] = field(default_factory=list)
    pos: list[int] = field(default_factory=list)
    targets: list[int] = field(default_factory=list)
    seg: list[int] = field(default_factory=list)
    keys: list[Key] = field(default_factory=list)
    pending: list[bool] = field(default_factory=list)

    def span(self, key: Key, row: int, positions: range | Sequence[int], targets: Sequence[int], *,
             pending: bool = False) -> None:
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
class Head:
    """The context cache of a full forward, for the continuation forwards after it."""

    cache: Any
    width: int
    pads: list[int]


class _Layout(NamedTuple):
    """Where a full forward's units sit: each unit's row and first column, the row width, and the
    tokens in each row."""

    row: list[int]
    at: list[int]
    width: int
    fill: list[int]


class _Inputs(NamedTuple):
    input_ids: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor
    segments: dict[tuple[int, int], int]  # (unit, choice) -> first column of a tree choice's tokens


@dataclass
class Forwarder:
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
    def for_model(cls, model: torch.nn.Module, pad_id: int) -> Forwarder:
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
        return cls(model, pad_id, model_device(model), "position_ids" in params, keep, cache_arg,
                   mask_format if cache_arg is not None else None)

    def full(self, batch: Batch, scores: Scores, *, score: bool) -> Head | None:
        """Run a full forward; score it unless ``score`` is false (filler and forward-only
        batches); return its context cache when continuation forwards follow."""
        lay = _layout(batch)
        inputs = self._full_inputs(batch, lay)
        kwargs: dict[str, Any] = {"attention_mask": inputs.attention_mask}
        if self.positions:
            kwargs["position_ids"] = inputs.position_ids
        want_cache = score and batch.cache and self.cache_arg is not None
        if not score:
            self._forward(inputs.input_ids, kwargs, None, use_cache=False)
            return None
        req = _full_requests(batch, lay, inputs.segments)
        keep = _position_mask(inputs.input_ids.shape, req)
        out = self._forward(inputs.input_ids, kwargs, keep, use_cache=want_cache)
        self._score(out, keep, req, scores)
        if not want_cache:
            return None
        # A unit continued from the cache is alone in its row: its context starts the row's content.
        return Head(_output_cache(out, self.cache_arg), lay.width, [lay.width - f for f in lay.fill])

    def _full_inputs(self, batch: Batch, lay: _Layout) -> _Inputs:
        """Token ids, positions and attention mask of a full forward."""
        seqs, trees = batch.seqs, batch.trees  # (no trees in filler or forward-only batches)
        row, at, width, n_rows = lay.row, lay.at, lay.width, len(lay.fill)
        input_ids = torch.full((n_rows, width), self.pad_id, dtype=torch.long)
        position_ids = torch.zeros((n_rows, width), dtype=torch.long)
        for u, s in enumerate(seqs):
            input_ids[row[u], at[u] : at[u] + len(s.ids) - 1] = torch.tensor(s.ids[:-1])
            position_ids[row[u], at[u] : at[u] + len(s.ids) - 1] = torch.arange(len(s.ids) - 1)
        segments: dict[tuple[int, int], int] = {}
        if not (trees or batch.packed):
            mask = (torch.arange(width) >= width - torch.tensor(lay.fill)[:, None]).long()
            return _Inputs(input_ids, position_ids, mask, segments)
        # Each unit sees itself only; a tree's other choices sit before its first choice, at
        # the positions after the context, and see the context and themselves.
        allowed = torch.zeros((n_rows, width, width), dtype=torch.bool)
        for u, s in enumerate(seqs):
            r, a, n = row[u], at[u], len(s.ids) - 1
            allowed[r, a : a + n, a : a + n] = torch.ones(n, n, dtype=torch.bool).tril()
        for u, (prefix, rest) in trees.items():
            r, q = row[u], at[u] - tree_width(seqs[u], prefix, rest) + len(seqs[u].ids)
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
        return _Inputs(input_ids, position_ids, _mask_4d(allowed, self.mask_format), segments)

    def continuation(
        self, batch: Batch, head: Head | None, scores: Scores, observer: BatchObserver | None, probe: str
    ) -> Head | None:
        """Run a continuation forward on ``head``'s cache (or, with no usable cache, its
        sequences in full); the head stays for the next continuation forward."""
        packs = batch.packs
        widths = [pack_width(pk) for pk in packs]
        width = max(widths)
        keys = {id(c): (batch.probe, c.seq.example, c.seq.choice) for pk in packs for c in pk}
        if head is None or not _cache_fits(head.cache, head.width, head.width + width):
            # No usable cache (a model whose cache is not a plain per-layer key/value store):
            # the same number of forwards, with these sequences in full.
            for k in keys.values():
                scores.settle(k, keep=False)
            rerun = Batch(batch.probe, batch.seqs)
            if observer is not None:
                observer.before_batch(probe, rerun.placed())
            self.full(rerun, scores, score=True)
            return head
        if observer is not None:
            observer.before_batch(None, [])
        input_ids, position_ids, mask, req = self._continuation_inputs(packs, widths, keys, head)
        cache = _select_rows(head.cache, torch.tensor([pk[0].row for pk in packs]).to(self.device))
        kwargs = {"attention_mask": mask, "position_ids": position_ids, self.cache_arg: cache}
        keep = _position_mask(input_ids.shape, req)
        out = self._forward(input_ids, kwargs, keep, use_cache=True)
        for k in keys.values():
            scores.settle(k, keep=True)
        self._score(out, keep, req, scores)
        return head

    def _continuation_inputs(
        self, packs: list[list[Cont]], widths: list[int], keys: dict[int, Key], head: Head
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, _Requests]:
        """Token ids, positions, attention mask (over cache + row) and scored positions of a
        continuation forward: one row per pack, left-padded."""
        n_rows, width = len(packs), max(widths)
        total = head.width + width
        input_ids = torch.full((n_rows, width), self.pad_id, dtype=torch.long)
        position_ids = torch.zeros((n_rows, width), dtype=torch.long)
        # Row i sees its context (the head row's first `prefix` tokens, not the first choice
        # after them) and, per continuation, its own tokens causally.
        allowed = torch.zeros((n_rows, width, total), dtype=torch.bool)
        req = _Requests()
        for i, pk in enumerate(packs):
            ctx_start, prefix = head.pads[pk[0].row], pk[0].prefix
            q = width - widths[i]  # left padding
            for c in pk:
                n, ids = cont_width(c), c.seq.ids
                input_ids[i, q : q + n] = torch.tensor(ids[prefix : prefix + n])
                position_ids[i, q : q + n] = torch.arange(prefix, prefix + n)
                allowed[i, q : q + n, ctx_start : ctx_start + prefix] = True
                allowed[i, q : q + n, head.width + q : head.width + q + n] = torch.ones(n, n, dtype=torch.bool).tril()
                first = max(c.seq.start - 1, prefix)
                req.span(keys[id(c)], i, range(q + first - prefix, q + n), ids[first + 1 :])
                q += n
        if any(len(pk) > 1 for pk in packs):
            mask: torch.Tensor = _mask_4d(allowed, self.mask_format, offset=head.width)
        else:  # one continuation per row: a 2D padding mask over context + row says it all
            mask = allowed.any(1).long()
        return input_ids, position_ids, mask, req

    def _forward(
        self, input_ids: torch.Tensor, kwargs: dict[str, Any], keep: torch.Tensor | None, use_cache: bool
    ) -> Any:
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

    def _score(self, out: Any, keep: torch.Tensor, req: _Requests, scores: Scores) -> None:
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


def _layout(batch: Batch) -> _Layout:
    fill = batch.row_lengths()
    width = max(fill)
    placed = batch.placed()
    # Each unit feeds its sequence but the last token (only a target) at the end of its
    # place in the row; a tree's other choices precede the first choice's sequence.
    return _Layout([p.row for p in placed], [width + p.end - len(p.seq.ids) for p in placed], width, fill)


def _full_requests(batch: Batch, lay: _Layout, segments: dict[tuple[int, int], int]) -> _Requests:
    """Scored positions of a full forward: every unit's sequence, a tree's other choices, and the
    one token after a cached shared context of the choices continued from it."""
    row, at = lay.row, lay.at
    req = _Requests()
    for u, s in enumerate(batch.seqs):
        req.span((batch.probe, s.example, s.choice), row[u], range(at[u] + s.start - 1, at[u] + len(s.ids) - 1),
                 s.ids[s.start :])
    for u, (prefix, rest) in batch.trees.items():
        for j in rest:
            # Token k is predicted at the column of token k - 1: the context's last, or the choice's own.
            cols = [at[u] + prefix - 1 if k == prefix else segments[(u, j.choice)] + k - 1 - prefix
                    for k in range(j.start, len(j.ids))]
            req.span((batch.probe, j.example, j.choice), row[u], cols, j.ids[j.start :])
    for u, (prefix, rest) in batch.shared.items():
        # Every choice's prediction at the end of the shared context is this unit's.
        for j in rest:
            if j.start == prefix:
                req.span((batch.probe, j.example, j.choice), row[u], range(at[u] + prefix - 1, at[u] + prefix),
                         j.ids[prefix : prefix + 1], pending=len(j.ids) - 1 > prefix)
    return req


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
    except Exception:  # noqa: BLE001 - any failure (an older transformers...) means no mask support
        return False


def model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@contextlib.contextmanager
def without_mixed_precision_wrapper(model: torch.nn.Module) -> Iterator[None]:
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


def precision_context(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    """Autocast as configured; ``fp32``/``auto`` switch off any ambient (trainer) autocast."""
    device_type = device.type if device.type in ("cuda", "cpu", "xpu", "mps") else "cpu"
    if precision in _DTYPES:
        return torch.autocast(device_type=device_type, dtype=_DTYPES[precision], enabled=True)
    return torch.autocast(device_type=device_type, enabled=False)
