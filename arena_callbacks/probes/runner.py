"""The probe runner: tokenise once, plan once per rank, run every pass with all ranks in step.

Examples are split across ranks, and every rank runs the same number of forwards so that
sharded models never see a rank-0-only forward. The ranks agree before each forward whether
any has failed, and a failure anywhere raises :class:`ProbeFailure` on every rank.
"""

from __future__ import annotations

import contextlib
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..config import ProbeSettings
from ..distributed import DistContext
from .data import ProbeSet
from .forward import Forwarder, Head, model_device, precision_context, without_mixed_precision_wrapper
from .generate import Generated, decode_batch, eos_ids
from .plan import Batch, BatchObserver, PlanOptions, pad_plan, plan_batches
from .scorers import make_scorer
from .scoring import GenRow, ProbeResult, ProbeSums, Scores, probe_result, row_values, sums_of
from .tokenize import Seq, tokenize_probe


@dataclass(frozen=True)
class GenBatch:
    """Prompts of one generative probe decoded together (none: this rank idles along)."""

    probe: str
    seqs: tuple[Seq, ...] = ()


class ProbeFailure(RuntimeError):
    """A probe pass failed on at least one rank (raised on every rank alike)."""


@dataclass
class ProbeRunner:
    """Tokenises probe sets once and runs them on a model.

    Each pass runs forwards only: batches are planned once per rank and kept, multiple-choice
    rows with a shared context run that context once (with all choices in one tree row where
    the model takes a 4D attention mask; else the first choice in full and the others as
    continuations of its cached keys and values; from its last prediction alone when they are
    one token long), and the vocabulary projection is applied only at scored positions.
    ``options`` (keyword only) switches those ways of sharing and packing work; the defaults
    are what every run uses.

    Example:
        >>> runner = ProbeRunner({"general": general_set}, ProbeSettings())  # doctest: +SKIP
        >>> runner.prepare(tokenizer)                                      # doctest: +SKIP
        >>> results = runner.run(model)                                    # doctest: +SKIP

    Attributes:
        last_scores: After a scoring pass, the summed log-probability of every sequence this
            rank scored, by ``(probe, row index, choice)`` (choice 0 for text and completion).
        last_generations: After a pass with generative probes, the answer to every row this
            rank decoded, by ``(probe, row index)``; ``last_row_scores`` its score.
    """

    probes: dict[str, ProbeSet]
    settings: ProbeSettings
    options: PlanOptions = field(default_factory=PlanOptions, kw_only=True)
    last_scores: dict[tuple[str, int, int], float] = field(default_factory=dict, init=False, repr=False)
    last_generations: dict[tuple[str, int], Generated] = field(default_factory=dict, init=False, repr=False)
    last_row_scores: dict[tuple[str, int], float] = field(default_factory=dict, init=False, repr=False)
    _tokenizer: Any = field(default=None, init=False, repr=False)
    _seqs: dict[str, list[Seq]] = field(default_factory=dict, init=False, repr=False)
    _pad_id: int = field(default=0, init=False, repr=False)
    _plans: dict[Any, list[Batch]] = field(default_factory=dict, init=False, repr=False)

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
        self._seqs = {name: tokenize_probe(p, tokenizer, self.settings) for name, p in self.probes.items()}
        self._plans = {}
        self._tokenizer = tokenizer
        pad = getattr(tokenizer, "pad_token_id", None)
        if pad is None:
            pad = getattr(tokenizer, "eos_token_id", None)
        self._pad_id = int(pad) if pad is not None else 0

    def sequences(self, name: str) -> list[Seq]:
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
    ) -> list[Batch]:
        """This rank's forwards (see :func:`~.plan.plan_batches`), planned once and kept."""
        key = (ctx.rank, ctx.world_size, None if only is None else frozenset(only), share, pack, forward_only, tree,
               packed)
        if key not in self._plans:
            self._plans[key] = plan_batches(self._seqs, ctx, self.settings, self.options, only=only, share=share,
                                            pack=pack, forward_only=forward_only, tree=tree, packed=packed)
        return self._plans[key]

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
        # Every failure below is caught, never raised before the collectives: a rank that
        # raised early would leave the others waiting in them.
        fwd: Forwarder | None = None
        error: Exception | None = None
        try:
            fwd = Forwarder.for_model(model, self._pad_id)
            fwd.greedy = frozenset(i for i, n in enumerate(self._seqs) if self.probes[n].kind == "completion")
        except Exception as e:  # noqa: BLE001 - reported on every rank after the collectives
            error = e
        # The plan depends on the model only through whether it can continue from a cache,
        # which every rank decides alike (same model class).
        wanted = [n for n in self._seqs if only is None or n in only]
        forced = [n for n in wanted if self.probes[n].kind != "generate"]
        batches = self._batches(ctx, forced, share=fwd is not None and fwd.cache_arg is not None,
                                pack=fwd is not None and fwd.mask_format is not None, forward_only=forward_only)
        batches = pad_plan(batches, ctx.all_reduce_max(len(batches)), self._seqs)
        generative = [] if forward_only else [n for n in wanted if self.probes[n].kind == "generate"]
        gen_batches = self._gen_batches(ctx, generative) if generative else []
        if generative:
            gen_batches += [GenBatch(generative[0])] * (ctx.all_reduce_max(len(gen_batches)) - len(gen_batches))
        scores = Scores()
        gen: dict[str, dict[int, GenRow]] = {}
        if generative:
            self.last_generations, self.last_row_scores = {}, {}
        error = self._forwards(model, ctx, fwd, batches, scores, error, desc=desc, observer=observer,
                               forward_only=forward_only, context=context, gen_batches=gen_batches, gen=gen)
        if observer is not None:
            observer.before_batch(None, [])
        return self._reduce(ctx, scores, error, only=only, forward_only=forward_only, gen=gen)

    def _gen_batches(self, ctx: DistContext, names: list[str]) -> list[GenBatch]:
        """This rank's rows of each generative probe (row ``i`` on rank ``i % world_size``),
        longest prompts first, ``batch_size`` at a time."""
        out = []
        for name in names:
            mine = sorted((s for s in self._seqs[name] if s.example % ctx.world_size == ctx.rank),
                          key=lambda s: (-len(s.ids), s.example))
            bs = self.settings.batch_size
            out += [GenBatch(name, tuple(mine[k:k + bs])) for k in range(0, len(mine), bs)]
        return out

    def _forwards(
        self,
        model: torch.nn.Module,
        ctx: DistContext,
        fwd: Forwarder | None,
        batches: list[Batch],
        scores: Scores,
        error: Exception | None,
        *,
        desc: str,
        observer: BatchObserver | None,
        forward_only: bool,
        context: contextlib.AbstractContextManager[Any] | None,
        gen_batches: Sequence[GenBatch] = (),
        gen: dict[str, dict[int, GenRow]] | None = None,
    ) -> Exception | None:
        """Run ``batches``, then decode ``gen_batches`` into ``gen`` (all ranks alike), in eval mode,
        ``no_grad`` and the configured precision; returns the first error (``error`` if given),
        and stops at any rank's error."""
        names = list(self._seqs)
        was_training = model.training
        show_bar = ctx.is_main and (
            self.settings.progress_bar
            if self.settings.progress_bar is not None
            else len(batches) + len(gen_batches) > self.settings.progress_min_batches
        )
        model.eval()
        try:
            with contextlib.ExitStack() as stack:
                try:
                    stack.enter_context(torch.no_grad())
                    stack.enter_context(without_mixed_precision_wrapper(model))
                    stack.enter_context(precision_context(model_device(model), self.settings.precision))
                    if context is not None:
                        stack.enter_context(context)
                except Exception as e:  # noqa: BLE001 - reported on every rank
                    error = error or e
                head: Head | None = None
                bar = _progress([*batches, *gen_batches], show_bar, desc)
                for batch in bar:
                    if isinstance(batch, GenBatch):
                        head = None
                        if ctx.any(error is not None):
                            break
                        error = self._decode(ctx, fwd, batch, gen if gen is not None else {})
                        continue
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
                    except Exception as e:  # noqa: BLE001 - out of memory, a broken forward...: reported on every rank
                        error = e
                        head = None
                        if torch.cuda.is_available():
                            torch.cuda.empty_cache()
        finally:
            model.train(was_training)
        return error

    def _decode(self, ctx: DistContext, fwd: Forwarder | None, batch: GenBatch,
                gen: dict[str, dict[int, GenRow]]) -> Exception | None:
        """Decode one generative batch (every rank at once) and score its answers."""
        probe = self.probes[batch.probe]
        spec = probe.generation
        assert spec is not None and fwd is not None
        tok = self._tokenizer
        try:
            answers = decode_batch(fwd, [s.ids for s in batch.seqs], max_new_tokens=spec.max_new_tokens,
                                   eos=eos_ids(fwd.model, tok), stop=spec.stop,
                                   decode=lambda ids: tok.decode(ids, skip_special_tokens=True), ctx=ctx)
            score = make_scorer(spec.scorer)
            for s, a in zip(batch.seqs, answers):
                row = probe.rows[s.example]
                prompt = row.get("prompt") if isinstance(row.get("prompt"), str) else tok.decode(s.ids)
                value = float(score(prompt, a.text, row))
                self.last_generations[(batch.probe, s.example)] = a
                self.last_row_scores[(batch.probe, s.example)] = value
                gen.setdefault(batch.probe, {})[s.example] = GenRow(value, len(a.ids), a.stopped)
        except Exception as e:  # noqa: BLE001 - reported on every rank
            return e
        return None

    def _reduce(
        self, ctx: DistContext, scores: Scores, error: Exception | None, *, only: Collection[str] | None,
        forward_only: bool, gen: dict[str, dict[int, GenRow]] | None = None,
    ) -> dict[str, ProbeResult]:
        """Sum every probe over the ranks (the pass's single collective after the forwards) and
        raise :class:`ProbeFailure` on every rank if any failed."""
        names = list(self._seqs)
        # One extra row carries "this rank failed" so that a fault on one rank is known to all
        # after the single collective below, instead of leaving the others waiting.
        sums = torch.zeros(len(names) + 1, len(ProbeSums._fields), dtype=torch.float64)
        # Every row's (NLL, tokens, correct), in float64, zero where another rank scored it: the
        # same collective gathers them (each row is scored on one rank), for the paired errors.
        sizes = [len(self.probes[n].rows) for n in names]
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        rows = torch.zeros(sum(sizes), 3, dtype=torch.float64)
        per_seq = scores.results()
        if error is None and not forward_only:
            self.last_scores = {(names[p], ex, ch): v.logprob for (p, ex, ch), v in per_seq.items()}
            try:
                for p_idx, name in enumerate(names):
                    mine = (gen or {}).get(name)
                    values = row_values(self.probes[name], p_idx, per_seq, mine)
                    # (torch.tensor of Python floats is float32: the local sums are rounded to it.)
                    sums[p_idx] = torch.tensor(list(sums_of(values, mine)))
                    for ex, value in values.items():
                        rows[starts[p_idx] + ex] = torch.tensor(value, dtype=torch.float64)
            except Exception as e:  # noqa: BLE001 - reported on every rank
                error = e
        if error is not None:
            sums[-1, 0] = 1.0
        flat = ctx.all_reduce_sum(torch.cat([sums.flatten(), rows.flatten()]))
        total, rows = flat[: sums.numel()].view_as(sums), flat[sums.numel():].view_as(rows)
        if total[-1, 0] > 0:
            where = f"{error!r}" if error is not None else "another rank failed"
            raise ProbeFailure(f"probe pass failed on {int(total[-1, 0])} rank(s): {where}") from error
        return {
            name: probe_result(name, self.probes[name].kind, ProbeSums(*total[p_idx].tolist()),
                               tuple(map(tuple, rows[starts[p_idx]: starts[p_idx] + sizes[p_idx]].tolist())))
            for p_idx, name in enumerate(names)
            if not (forward_only or (only is not None and name not in only))
        }


def _progress(items: list[Any], show: bool, desc: str) -> Iterator[Any]:
    if not show:
        yield from items
        return
    from tqdm.auto import tqdm

    yield from tqdm(items, desc=desc, unit="batch", leave=False, dynamic_ncols=True)
