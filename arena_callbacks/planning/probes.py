"""The probe pass of a plan: the real rows, tokenised and planned by the monitor's own code.

The probe rows of the monitor file are tokenised with the real tokenizer when one is at hand
(the model folder's, or ``--tokenizer``), and each rank's forwards come from the real planner
(:func:`~arena_callbacks.probes.plan.plan_batches`), with the sharing and packing the model's
attention allows (:class:`~arena_callbacks.probes.forward.Forwarder` decides it on the meta
model as it does on the real one). Counted per rank: forwards, positions fed (the padded
rectangle the model computes, ``rows × width``), real tokens, scored positions, attention
pairs; and the forward FLOPs from them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..config import MonitorConfig
from ..distributed import DistContext
from ..probes import ProbeRunner, ProbeSet
from ..probes.forward import Forwarder
from ..probes.plan import Batch, pack_width, pad_plan

__all__ = ["ApproxTokenizer", "PassCounts", "count_batches", "pass_counts", "probe_runner"]


class ApproxTokenizer:
    """A stand-in when no tokenizer is at hand: one token per 4 characters (a common rate of
    English BPE), ids from the text so shared contexts still share tokens; no chat template."""

    chat_template = None
    pad_token_id = 0
    eos_token_id = 0
    name_or_path = "approximate: 4 characters per token"

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        ids = [1] if add_special_tokens else []
        ids += [sum(map(ord, text[i: i + 4])) % 32000 + 2 for i in range(0, len(text), 4)]
        return {"input_ids": ids}


@dataclass
class PassCounts:
    """One rank's share of a probe pass (or of the geometry reference pass)."""

    forwards: int = 0
    positions: int = 0  # rows × width summed over forwards: what the model computes
    tokens: int = 0  # real (non-padding) tokens fed
    scored: int = 0  # positions whose logits are computed
    attention_pairs: int = 0  # query × key pairs per layer (rows × width × keys)
    largest_forward: int = 0  # positions of the largest forward
    decode_steps: int = 0  # generative probes: one-token forwards after the prefills, at most
    per_forward: list[tuple[int, int, int]] = field(default_factory=list)  # (positions, scored, attention pairs)

    def flops(self, body: int, head: int, layers: int, attention_width: int) -> float:
        """``2·body·positions + 2·head·scored + 4·layers·attention_width·attention_pairs``."""
        return 2.0 * body * self.positions + 2.0 * head * self.scored + 4.0 * layers * attention_width * \
            self.attention_pairs

    def forward_flops(self, body: int, head: int, layers: int, attention_width: int) -> list[float]:
        """The FLOPs of each forward (the same formula, forward by forward)."""
        return [2.0 * body * n + 2.0 * head * k + 4.0 * layers * attention_width * a for n, k, a in self.per_forward]

    def as_dict(self) -> dict[str, int]:
        return {k: v for k, v in asdict(self).items() if k != "per_forward"}


def probe_runner(config: MonitorConfig, probes: dict[str, Any], target: Any, tokenizer: Any) -> ProbeRunner:
    """The monitor's runner over the file's probes (as the engine builds it), tokenised."""
    from ..measurements import TARGET

    sets = {name: ProbeSet.build(name, data, config.probe) for name, data in probes.items()}
    if target is not None:
        sets[TARGET] = ProbeSet.build(TARGET, target, config.probe)
    runner = ProbeRunner(sets, config.probe)
    runner.prepare(tokenizer)
    return runner


def count_batches(batches: list[Batch], fwd: Forwarder, scored: bool = True) -> PassCounts:
    """What ``batches`` feed the model, laid out by the forwarder's own code: full forwards as
    right-aligned rows of the widest row's width, continuation forwards one row per pack on their
    context's cache; scored positions as its logits mask keeps them."""
    from ..probes.forward import Head, _full_requests, _layout, _position_mask

    c = PassCounts()
    head: Head | None = None
    for b in batches:
        if b.packs:
            assert head is not None
            widths = [pack_width(pk) for pk in b.packs]
            keys = {id(x): (b.probe, x.seq.example, x.seq.choice) for pk in b.packs for x in pk}
            ids, _, _, req = fwd._continuation_inputs(b.packs, widths, keys, head)
            rows, width = ids.shape
            n_keys = head.width + width
            c.tokens += sum(widths)
            c.scored += int(_position_mask(ids.shape, req).sum())
        else:
            lay = _layout(b)
            rows, width = len(lay.fill), lay.width
            n_keys = width
            c.tokens += sum(lay.fill)
            if scored and not b.dummy:
                inputs = fwd._full_inputs(b, lay)
                c.scored += int(_position_mask(inputs.input_ids.shape, _full_requests(b, lay, inputs.segments)).sum())
            else:
                c.scored += rows  # logits_to_keep=1 where nothing is scored
            head = Head(None, lay.width, [lay.width - f for f in lay.fill])
        scored_here = c.scored - sum(k for _, k, _ in c.per_forward)
        c.per_forward.append((rows * width, scored_here, rows * width * n_keys))
        c.forwards += 1
        c.positions += rows * width
        c.attention_pairs += rows * width * n_keys
        c.largest_forward = max(c.largest_forward, rows * width)
    return c


def count_decoding(c: PassCounts, batches: list[Any], n_total: int, runner: ProbeRunner) -> None:
    """Add generative probes' decoding to ``c``, at most: each batch's prefill (its prompts,
    left-padded to the longest) and ``max_new_tokens - 1`` one-token steps of every row (answers
    that stop early cost less); a rank short of batches idles along with one-token forwards."""
    for b in [*batches, *[None] * (n_total - len(batches))]:
        if b is None or not b.seqs:
            steps = max(p.generation.max_new_tokens for p in runner.probes.values() if p.kind == "generate")
            c.per_forward += [(1, 1, 1)] * steps
            c.forwards += steps
            c.positions += steps
            c.scored += steps
            c.attention_pairs += steps
            continue
        rows, width = len(b.seqs), max(len(s.ids) for s in b.seqs)
        new = runner.probes[b.probe].generation.max_new_tokens
        work = [(rows * width, rows, rows * width * width)] + [(rows, rows, rows * (width + t)) for t in range(1, new)]
        c.per_forward += work
        c.forwards += len(work)
        c.positions += sum(w[0] for w in work)
        c.tokens += sum(len(s.ids) for s in b.seqs) + rows * (new - 1)
        c.scored += sum(w[1] for w in work)
        c.attention_pairs += sum(w[2] for w in work)
        c.largest_forward = max(c.largest_forward, rows * width)
        c.decode_steps += new - 1


def pass_counts(runner: ProbeRunner, model: torch.nn.Module, world_size: int,
                geometry_probes: list[str] | None, reference_pass: bool) -> dict[str, Any]:
    """Per-rank counts of a probe pass on ``model`` (meta is enough) over ``world_size`` ranks.

    Returns ``{"ranks": [PassCounts...], "slowest": rank, "reference": [PassCounts...] | None,
    "share", "pack"}``: every rank runs as many forwards as the busiest (fillers), as the runner does.
    """
    fwd = Forwarder.for_model(model, 0)
    share, pack = fwd.cache_arg is not None, fwd.mask_format is not None
    forced = [n for n, p in runner.probes.items() if p.kind != "generate"]
    generative = [n for n, p in runner.probes.items() if p.kind == "generate"]
    plans = [runner._batches(DistContext(rank=r, world_size=world_size), forced, share=share, pack=pack)
             for r in range(world_size)]
    n_total = max(len(p) for p in plans)
    seqs = {n: runner.sequences(n) for n in runner.probes}
    ranks = [count_batches(pad_plan(p, n_total, seqs), fwd) for p in plans]
    if generative:
        decodes = [runner._gen_batches(DistContext(rank=r, world_size=world_size), generative)
                   for r in range(world_size)]
        n_gen = max(len(d) for d in decodes)
        for counts, mine in zip(ranks, decodes):
            count_decoding(counts, mine, n_gen, runner)
    reference = None
    if reference_pass and geometry_probes:
        refs = [runner._batches(DistContext(rank=r, world_size=world_size), geometry_probes, share=share,
                                pack=pack, forward_only=True) for r in range(world_size)]
        n_ref = max(len(p) for p in refs)
        reference = [count_batches(pad_plan(p, n_ref, seqs), fwd, scored=False) for p in refs]
    slowest = max(range(world_size), key=lambda r: (ranks[r].positions, ranks[r].attention_pairs))
    return {"ranks": ranks, "slowest": slowest, "reference": reference, "share": share, "pack": pack}
