"""Planning a probe pass: which sequences each forward carries, and how (pure functions).

A plan is a list of :class:`Batch`: full forwards, each followed by the continuation forwards
of the shared contexts it leaves in its cache. It depends on the tokenised sequences, the rank,
the settings (batch size, ``max_length``), the :class:`PlanOptions` and on what the model can
take (a KV cache, a 4D attention mask); it holds no tensors and runs nothing.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

from ..config import ProbeSettings
from ..distributed import DistContext
from .tokenize import Seq


@dataclass(frozen=True)
class PlanOptions:
    """How a probe pass may share and pack work; the defaults are what every run uses.

    Attributes:
        tree_rows: Run a shared context and all its choices in one tree row (see :class:`Batch`)
            where the model takes a 4D attention mask; off, they take the cached-continuation path.
        pack_rows: Put several short sequences (or tree rows) in one row of a full forward where
            the model takes a 4D attention mask, each attending to itself only, in rows no longer
            than the probe's longest sequence (see :class:`Batch`); off, one per row.
        min_shared_prefix: A multiple-choice row whose choices share at least this many leading
            tokens runs that context once. Shorter contexts run in full with every choice: the
            saving is a few tokens per choice, and a forward that carries whole sequences is the
            simpler one to read in hooks and logs.
    """

    tree_rows: bool = True
    pack_rows: bool = True
    min_shared_prefix: int = 8


class Shared(NamedTuple):
    """A shared context of a multiple-choice row: its length in tokens and the choices after the
    first (whose sequence runs in full and carries the context)."""

    prefix: int
    rest: tuple[Seq, ...]


class Placed(NamedTuple):
    """Where a unit's sequence sits in a forward (see :class:`BatchObserver`)."""

    row: int
    end: int
    seq: Seq


class BatchObserver(Protocol):
    """Told, before each probe forward, which probe and sequences it carries, and where.

    ``placed`` holds :class:`Placed` ``(row, end, seq)``: token ``t`` of the sequence sits at
    position ``end + t - len(ids)`` of ``row``, counted from the row's end (negative). Every
    token but the last is fed (the last is only a target, so ``end`` ≤ 1); rows are
    right-aligned, a row may hold several sequences, and a tree row holds other choices' tokens
    before its first choice's sequence. ``probe`` is ``None`` for forwards whose rows the
    observer should ignore: filler batches, continuation forwards (the later choices of a
    multiple-choice row whose context is shared carry only the tokens after it; that context
    ran in full, with the row's first choice, in an earlier forward), and once after the pass,
    to reset.
    """

    def before_batch(self, probe: str | None, placed: Sequence[Placed]) -> None: ...


@dataclass(frozen=True)
class Cont:
    """A sequence scored as the continuation of a shared context.

    The context (positions ``0 .. prefix - 1``) ran in row ``row`` of the full forward before,
    whose keys and values are reused; this forward feeds positions ``prefix .. len - 2``.
    """

    seq: Seq
    row: int
    prefix: int


@dataclass
class Batch:
    """One forward pass of the plan.

    A *full* forward (``packs`` empty) carries whole sequences, left-padded. Some of its rows may
    be the first choice of a multiple-choice row whose choices share a context (``shared``: unit
    -> :class:`Shared`): the first choice is scored there, the others get the prediction at the
    end of the context from that row, and those with more tokens run as continuations in the
    forward(s) right after, on the cached context.

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
    seqs: list[Seq]
    dummy: bool = False
    shared: dict[int, Shared] = field(default_factory=dict)  # unit (index into seqs) -> its shared context
    packs: list[list[Cont]] = field(default_factory=list)
    cache: bool = False  # a full forward whose context cache the next forward(s) continue
    # Trees: unit (index into seqs) -> its shared context. The unit holds the other
    # choices' tokens after the shared context, then the first choice in full; a 4D mask lets
    # each choice see the context and itself only.
    trees: dict[int, Shared] = field(default_factory=dict)
    rows: list[int] = field(default_factory=list)  # each unit's row (empty: unit i in row i)

    @property
    def conts(self) -> list[Cont]:
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
        """Tokens each unit feeds (see :func:`fed_length`)."""
        return [fed_length(s, self.trees.get(u)) for u, s in enumerate(self.seqs)]

    def row_lengths(self) -> list[int]:
        """Tokens in each row of a full forward."""
        fill = [0] * self.n_rows
        for u, n in enumerate(self.unit_lengths()):
            fill[self.row_of(u)] += n
        return fill

    def placed(self) -> list[Placed]:
        """Where each unit's sequence sits (see :class:`BatchObserver`)."""
        after = [0] * self.n_rows  # tokens of the units after this one in its row
        out: list[Placed] = []
        for u, n in reversed(list(enumerate(self.unit_lengths()))):
            r = self.row_of(u)
            out.append(Placed(r, 1 - after[r], self.seqs[u]))  # its unfed last token would sit one further
            after[r] += n
        return out[::-1]


def shared_prefix(group: Sequence[Seq]) -> int:
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


def tree_width(head: Seq, prefix: int, rest: Sequence[Seq]) -> int:
    """Length of a tree row: the first choice in full, then each other choice's tokens after the
    context but its last."""
    return len(head.ids) + sum(len(j.ids) - 1 - prefix for j in rest)


def fed_length(s: Seq, tree: Shared | None) -> int:
    """Tokens a unit feeds: its sequence but the last token, which is only a target (and, for a
    tree, the other choices' tokens)."""
    return (tree_width(s, *tree) if tree is not None else len(s.ids)) - 1


def pack_rows(units: Sequence[Seq], length: Callable[[Seq], int], solo: Collection[int]) -> list[list[Seq]]:
    """Units sorted longest first into rows no longer than the first (best fit: the open row with
    the least room that takes it); units of examples in ``solo`` get a row of their own. Rows
    come out fullest first."""
    if not units:
        return []
    width, shortest = length(units[0]), length(units[-1])
    rows: list[list[Seq]] = []
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


def cont_width(c: Cont) -> int:
    return len(c.seq.ids) - 1 - c.prefix  # the last token is only a target


def pack_width(pack: Sequence[Cont]) -> int:
    return sum(cont_width(c) for c in pack)


def pack_conts(conts: Sequence[Cont], cap: int) -> list[list[Cont]]:
    """Continuations of the same context row, in choice order, into rows of at most ``cap`` tokens."""
    packs: list[list[Cont]] = []
    open_: dict[int, list[Cont]] = {}  # context row -> the pack being filled
    for c in conts:
        cur = open_.get(c.row)
        if cur is None or pack_width(cur) + cont_width(c) > cap:
            cur = open_[c.row] = []
            packs.append(cur)
        cur.append(c)
    return packs


@dataclass
class _Units:
    """One probe's sequences on this rank as units of full forwards: ``full`` (sorted longest
    first), and the examples whose shared context runs once, as a tree row (``trees``) or
    continued from the cache (``cached``, each unit alone in its row)."""

    full: list[Seq] = field(default_factory=list)
    trees: dict[int, Shared] = field(default_factory=dict)  # example -> its shared context
    cached: dict[int, Shared] = field(default_factory=dict)

    def length(self, s: Seq) -> int:
        return fed_length(s, self.trees.get(s.example))


def plan_batches(
    seqs: Mapping[str, Sequence[Seq]],
    ctx: DistContext,
    settings: ProbeSettings,
    options: PlanOptions,
    *,
    only: Collection[str] | None = None,
    share: bool = True,
    pack: bool = True,
    forward_only: bool = False,
    tree: bool | None = None,
    packed: bool | None = None,
) -> list[Batch]:
    """This rank's forwards: rows ``i`` with ``i % world_size == rank``, all choices of a row together.

    Full forwards hold sequences sorted by length; each is followed by the continuation
    forwards of its shared contexts (none when ``forward_only``: observers see the shared
    context and first choice in the full forward, and nothing is scored). ``share`` (the model
    can continue from a cache) lets a shared context run once. ``pack`` puts the continuations
    of one context in one row, up to the longest sequence of its full forward. ``tree``
    (default: ``pack`` and ``options.tree_rows``, both need a 4D attention mask) runs a shared
    context and all its choices in one tree row where it fits in ``max_length``; ``packed``
    (default: ``pack`` and ``options.pack_rows``) puts several units in one row of a full forward.
    """
    tree = pack and options.tree_rows if tree is None else tree
    packed = pack and options.pack_rows if packed is None else packed
    bs = settings.batch_size
    batches: list[Batch] = []
    for p_idx, (name, probe_seqs) in enumerate(seqs.items()):
        if only is not None and name not in only:
            continue
        groups: dict[int, list[Seq]] = {}
        for s in probe_seqs:
            if s.example % ctx.world_size == ctx.rank:
                groups.setdefault(s.example, []).append(s)
        units = _units(groups, settings.max_length, options.min_shared_prefix, share=share,
                       tree=tree and not forward_only)
        rows = pack_rows(units.full, units.length, units.cached) if packed else [[s] for s in units.full]
        for k in range(0, len(rows), bs):
            batches += _forwards(p_idx, rows[k : k + bs], units, bs, packed=packed, pack=pack,
                                 forward_only=forward_only)
    return batches


def _units(groups: Mapping[int, list[Seq]], max_length: int, min_shared: int, *, share: bool, tree: bool) -> _Units:
    """Each example's sequences as units: all of them, or (a context shared by at least
    ``min_shared`` tokens) the first choice alone, carrying the context for the others."""
    units = _Units()
    for ex, group in groups.items():
        prefix = shared_prefix(group) if share and len(group) > 1 else 0
        if prefix >= min_shared:
            head, *rest = sorted(group, key=lambda s: s.choice)
            units.full.append(head)
            n = tree_width(head, prefix, rest)
            # (One-token choices need no tree: the context's last prediction scores them.)
            if tree and len(head.ids) < n <= max_length:
                units.trees[ex] = Shared(prefix, tuple(rest))
            else:
                units.cached[ex] = Shared(prefix, tuple(rest))
        else:
            units.full.extend(group)
    units.full.sort(key=lambda s: (-units.length(s), s.example, s.choice))  # batch by length
    return units


def _forwards(
    p_idx: int, chunk: list[list[Seq]], units: _Units, bs: int, *, packed: bool, pack: bool, forward_only: bool
) -> list[Batch]:
    """The full forward of ``chunk`` (rows of units), then the continuation forwards of the shared
    contexts it leaves in its cache."""
    batch = Batch(p_idx, [s for row in chunk for s in row],
                  rows=[i for i, row in enumerate(chunk) for _ in row] if packed else [])
    conts: list[Cont] = []
    for u, s in enumerate(batch.seqs):
        if s.example in units.trees:  # its first choice, the only one in `full`
            batch.trees[u] = units.trees[s.example]
        elif s.example in units.cached:  # alone in its row
            shared = batch.shared[u] = units.cached[s.example]
            conts += [Cont(j, batch.row_of(u), shared.prefix) for j in shared.rest if len(j.ids) - 1 > shared.prefix]
    if forward_only or not conts:
        return [batch]
    batch.cache = True
    # A continuation forward holds no more than its full forward: at most batch_size rows,
    # none longer than the full forward's longest sequence.
    packs = pack_conts(conts, max(len(s.ids) for s in batch.seqs)) if pack else [[c] for c in conts]
    packs.sort(key=lambda pk: (-pack_width(pk), pk[0].seq.example, pk[0].seq.choice))
    out = [batch]
    for m in range(0, len(packs), bs):
        part = packs[m : m + bs]
        out.append(Batch(p_idx, [c.seq for pk in part for c in pk], packs=part))
    return out


def pad_plan(batches: Sequence[Batch], n_total: int, seqs: Mapping[str, Sequence[Seq]]) -> list[Batch]:
    """``batches`` and filler forwards up to ``n_total``, so that every rank runs the same number of
    forwards (sharded models need every rank in each): a rank with fewer replays one of its own
    (or any sequence, with none), and the results of those are discarded."""
    filler = (Batch(0, batches[0].seqs, dummy=True, rows=batches[0].rows) if batches
              else Batch(0, [next(s for probe_seqs in seqs.values() for s in probe_seqs)], dummy=True))
    return [*batches, *[filler] * (n_total - len(batches))]
