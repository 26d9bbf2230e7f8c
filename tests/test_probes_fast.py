"""The probe runner's fast paths give the plain numbers.

Multiple-choice rows whose choices share a context run it once: the first choice in full, the
later ones as continuations of its cached keys and values (or, one token long, from its last
prediction alone); logits are computed only at scored positions. Every sequence's summed
log-probability must equal an unpadded one-sequence forward with full logits (float64
log-softmax), with padding, odd lengths, several batch sizes and ranks.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import pytest
import torch
from helpers import corpus, make_model, sampled_activations

import arena_callbacks.probes.forward as probe_forward
from arena_callbacks import ProbeRunner, ProbeSet, ProbeSettings
from arena_callbacks.capture import ActivationCapture, resolve_modules
from arena_callbacks.distributed import DistContext
from arena_callbacks.probes import PlanOptions
from arena_callbacks.probes.forward import Forwarder
from arena_callbacks.probes.plan import pack_rows, pack_width, shared_prefix, tree_width
from arena_callbacks.probes.tokenize import Seq

# Contexts of 28-44 tokens, above the sharing threshold.
CONTEXTS = [" ".join(corpus(2, seed=i)) for i in range(7)]
ENDINGS = [" runs.", " sings into the river and the sea.", " is", " one two three four five six seven.", " a dog"]
# Two to four choices per row, of 1 to 9 tokens, the answer anywhere.
MULTI = [
    {"context": c, "choices": [ENDINGS[(i + j) % len(ENDINGS)] for j in range(2 + i % 3)], "answer": i % 2}
    for i, c in enumerate(CONTEXTS)
]
ONE_TOKEN = [" the", " model", " green", " fish", " and"]  # one token each after a context (checked below)
SINGLE = [{"question": c, "choices": ONE_TOKEN[: 2 + i % 4], "label": i % 2} for i, c in enumerate(CONTEXTS)]
SHORT = [{"context": "the cat", "choices": [" runs.", " sings into the river.", " is"], "answer": 0}]
# Passages of 3 to 60 words: several of the short ones fit in a row as long as the longest.
VARIED = [
    {"text": " ".join(" ".join(corpus(6, seed=i)).split()[:n])}
    for i, n in enumerate([60, 3, 5, 8, 12, 4, 20, 30, 6, 45, 3])
]
COMPLETION = [{"prompt": " ".join(corpus(1, seed=i)), "completion": " " + " ".join(corpus(1, seed=i + 1)).split()[0]}
              for i in range(5)]


MIN_SHARED_PREFIX = PlanOptions().min_shared_prefix


def build(tokenizer, settings=None, options=None, **probes) -> ProbeRunner:
    settings = settings or ProbeSettings(batch_size=3)
    r = ProbeRunner({n: ProbeSet.build(n, d, settings) for n, d in probes.items()}, settings,
                    options=options or PlanOptions())
    r.prepare(tokenizer)
    return r


def reference(model, runner: ProbeRunner) -> dict[tuple[str, int, int], float]:
    """Summed log-probability of every sequence: one unpadded forward each, float64 log-softmax."""
    out = {}
    with torch.no_grad():
        for name in runner.probes:
            for s in runner.sequences(name):
                logits = model(input_ids=torch.tensor([s.ids])).logits[0].double()
                lp = torch.log_softmax(logits[s.start - 1 : len(s.ids) - 1], -1)
                out[(name, s.example, s.choice)] = lp.gather(-1, torch.tensor(s.ids[s.start :])[:, None]).sum().item()
    return out


def assert_scores_close(got: dict, want: dict, tol: float = 1e-5) -> None:
    assert set(got) == set(want)
    worst = max(abs(got[k] - want[k]) for k in want)
    assert worst <= tol, f"largest |log-likelihood difference| {worst:.2e}"


def real_tokens(kwargs) -> list[int]:
    """Tokens each row of a forward attends to: cached context and real inputs (not padding)."""
    mask = kwargs["attention_mask"]
    if mask.dim() == 2:
        return [int(n) for n in mask.sum(-1)]
    allowed = mask[:, 0] if mask.dtype == torch.bool else mask[:, 0] == 0  # 4D: boolean or additive
    q = kwargs["input_ids"].shape[1]
    if allowed.shape[-1] == q:  # no cache (tree rows): padding sees only itself and nobody sees it
        off = allowed & ~torch.eye(q, dtype=torch.bool)
        return [int(n) for n in (off.any(-1) | off.any(-2)).sum(-1)]
    context = allowed[:, :, : allowed.shape[-1] - q].any(1).sum(-1)  # cached positions anyone sees
    inputs = allowed[:, :, : allowed.shape[-1] - q].any(-1).sum(-1)  # queries that see the context
    return [int(a + b) for a, b in zip(context, inputs)]


def count_forwards(model) -> tuple[list[list[int]], object]:
    """Real tokens of the rows of every forward (see real_tokens); returns (record, hook handle)."""
    seen: list[list[int]] = []

    def hook(module, args, kwargs):
        seen.append(real_tokens(kwargs))

    return seen, model.register_forward_pre_hook(hook, with_kwargs=True)


def test_one_token_choices_are_one_token(tokenizer):
    r = build(tokenizer, mc=SINGLE)
    assert all(len(s.ids) - s.start == 1 for s in r.sequences("mc"))
    assert all(shared_prefix([s for s in r.sequences("mc") if s.example == i]) >= MIN_SHARED_PREFIX
               for i in range(len(SINGLE)))


_REFERENCES: dict[str, dict] = {}


@pytest.fixture(params=["tree", "continuation"])
def shared_path(request) -> str:
    """Both ways a shared context runs once: tree rows (default with 4D masks) and cached
    continuations (see ``options``)."""
    return request.param


@pytest.fixture(params=[True, False], ids=["packed", "one-per-row"])
def packing(request) -> bool:
    """Both row layouts of a full forward: several units per row (default with 4D masks) and one."""
    return request.param


def options(shared_path: str = "tree", packing: bool = True) -> PlanOptions:
    """The plan options of a shared path and a row layout (the defaults: tree rows, packed)."""
    return PlanOptions(tree_rows=shared_path == "tree", pack_rows=packing)


@pytest.mark.parametrize("kind, batch_size", [("llama", 2), ("llama", 16), ("gpt2", 3)])
def test_shared_contexts_give_the_unpadded_log_likelihoods(tokenizer, kind, batch_size, shared_path, packing):
    model = make_model(vocab_size=len(tokenizer), kind=kind)
    r = build(tokenizer, ProbeSettings(batch_size=batch_size), options(shared_path, packing), mc=MULTI, one=SINGLE,
              text=[{"text": c} for c in CONTEXTS])
    plan = r._batches(DistContext())
    if shared_path == "tree":
        assert any(b.trees for b in plan) and not any(b.conts for b in plan), "the tree path was not taken"
    else:
        assert any(b.conts for b in plan), "no continuation forward: the shared path was not taken"
    # Full forwards carry one row per multiple-choice example, not one per choice.
    full_rows = sum(len(b.seqs) for b in plan if not b.conts and b.probe in (0, 1))
    assert full_rows == len(MULTI) + len(SINGLE)
    results = r.run(model)
    if kind not in _REFERENCES:  # the same seeded model and rows for every batch size
        _REFERENCES[kind] = reference(model, r)
    assert_scores_close(r.last_scores, _REFERENCES[kind])
    # A continuation forward holds no more than its full forward: at most batch_size rows
    # (packs of continuations), none longer than that forward's longest sequence.
    full = None
    for b in plan:
        if not b.packs:
            full = b
            assert b.n_rows <= batch_size
            continue
        assert len(b.packs) <= batch_size
        assert max(pack_width(pk) for pk in b.packs) <= max(len(s.ids) for s in full.seqs)
    # The aggregate follows from the same numbers.
    for name, rows in (("mc", MULTI), ("one", SINGLE)):
        correct = sum(
            max(range(len(row["choices"])), key=lambda j: (r.last_scores[(name, i, j)], -j))
            == row.get("answer", row.get("label"))
            for i, row in enumerate(rows)
        )
        assert results[name].score == correct / len(rows)


def test_shared_and_plain_paths_agree(tokenizer, model):
    shared = build(tokenizer, ProbeSettings(batch_size=4), mc=MULTI, one=SINGLE)
    a = shared.run(model)
    plain = build(tokenizer, ProbeSettings(batch_size=4), PlanOptions(min_shared_prefix=10**9), mc=MULTI, one=SINGLE)
    assert not any(b.conts for b in plain._batches(DistContext()))
    b = plain.run(model)
    for k in a:
        assert a[k].score == b[k].score and a[k].tokens == b[k].tokens and a[k].examples == b[k].examples
        assert a[k].nll == pytest.approx(b[k].nll, rel=1e-6)
    assert_scores_close(shared.last_scores, plain.last_scores)


def test_one_token_choices_run_one_forward_per_batch_of_questions(tokenizer, model):
    r = build(tokenizer, ProbeSettings(batch_size=3), one=SINGLE)
    seen, handle = count_forwards(model)
    r.run(model)
    handle.remove()
    assert len(seen) == math.ceil(len(SINGLE) / 3)  # no continuation forwards at all
    lengths = sorted(n for batch in seen for n in batch)
    assert lengths == sorted(len(s.ids) - 1 for s in r.sequences("one") if s.choice == 0)  # the last is only a target
    assert_scores_close(r.last_scores, reference(model, r))


def run_multi_counting(tokenizer, model, opts=None):
    """MULTI in one batch of 16: (runner, real tokens per row of each forward, sequences, shared prefix per row)."""
    r = build(tokenizer, ProbeSettings(batch_size=16), opts, mc=MULTI)
    seen, handle = count_forwards(model)
    r.run(model)
    handle.remove()
    seqs = r.sequences("mc")
    prefix = {i: shared_prefix([s for s in seqs if s.example == i]) for i in range(len(MULTI))}
    return r, seen, seqs, prefix


@pytest.mark.parametrize("packed", [True, False])
def test_continuation_forwards_carry_only_the_tokens_after_the_context(tokenizer, model, monkeypatch, packed):
    if not packed:  # an attention implementation that takes no 4D mask: one continuation per row
        for_model = Forwarder.for_model
        monkeypatch.setattr(Forwarder, "for_model", classmethod(
            lambda cls, *a: dataclasses.replace(for_model(*a), mask_format=None)))
    r, seen, seqs, prefix = run_multi_counting(tokenizer, model, options("continuation"))
    first, conts = seen[0], seen[1:]
    assert len(conts) == 1  # 7 rows, one batch: one continuation forward
    assert sorted(first) == sorted(len(s.ids) - 1 for s in seqs if s.choice == 0)
    # Later choices: the cached context (prefix positions) plus their own tokens but the last;
    # packed, one row per context holds all of them.
    rest = {i: [len(s.ids) - 1 - prefix[i] for s in seqs if s.example == i and s.choice > 0] for i in prefix}
    if packed:
        want = sorted(prefix[i] + sum(n) for i, n in rest.items() if sum(n))
    else:
        want = sorted(prefix[i] + k for i, n in rest.items() for k in n if k)
    assert sorted(conts[0]) == want
    assert_scores_close(r.last_scores, reference(model, r))


def test_tree_rows_run_context_and_choices_in_one_forward(tokenizer, model):
    r, seen, seqs, prefix = run_multi_counting(tokenizer, model)
    assert len(seen) == 1  # 7 rows, one batch, no continuation forward
    # Each row: the first choice in full, and every other choice's tokens after the context but its last.
    want = [
        len(s.ids) - 1 + sum(len(j.ids) - 1 - prefix[s.example] for j in seqs if j.example == s.example and j.choice)
        for s in seqs
        if s.choice == 0
    ]
    assert sorted(seen[0]) == sorted(want)
    assert_scores_close(r.last_scores, reference(model, r))


def test_tree_rows_longer_than_max_length_take_the_continuation_path(tokenizer, model):
    seqs = build(tokenizer, mc=MULTI).sequences("mc")
    prefix = {i: shared_prefix([s for s in seqs if s.example == i]) for i in range(len(MULTI))}
    tree = {i: tree_width(next(s for s in seqs if s.example == i and s.choice == 0), prefix[i],
                          [s for s in seqs if s.example == i and s.choice]) for i in prefix}
    cap = sorted(tree.values())[3]  # some trees fit, the others do not
    longest = max(len(s.ids) for s in seqs)
    r = build(tokenizer, ProbeSettings(batch_size=4, max_length=max(cap, longest)), mc=MULTI)
    plan = r._batches(DistContext())
    in_trees = {b.seqs[row].example for b in plan for row in b.trees}
    assert in_trees == {i for i, n in tree.items() if n <= max(cap, longest)} and len(in_trees) < len(MULTI)
    assert any(b.conts for b in plan)  # the rest continue from a cached context, some in mixed batches
    r.run(model)
    assert_scores_close(r.last_scores, reference(model, r))


def test_eager_attention_takes_an_additive_packed_mask(tokenizer, shared_path):
    from transformers import LlamaForCausalLM

    cfg = make_model(vocab_size=len(tokenizer)).config
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    assert Forwarder.for_model(model, 0).mask_format == "additive"
    r = build(tokenizer, ProbeSettings(batch_size=4), options(shared_path), mc=MULTI)
    r.run(model)
    assert_scores_close(r.last_scores, reference(model, r))


def packed_runner(tokenizer, batch_size: int, opts: PlanOptions | None = None) -> ProbeRunner:
    return build(tokenizer, ProbeSettings(batch_size=batch_size), opts, text=VARIED, short=SHORT, mc=MULTI,
                 done=COMPLETION)


@pytest.mark.parametrize("kind, batch_size", [("llama", 2), ("llama", 16), ("gpt2", 3)])
def test_packed_rows_give_the_unpadded_log_likelihoods(tokenizer, kind, batch_size):
    model = make_model(vocab_size=len(tokenizer), kind=kind)
    r = packed_runner(tokenizer, batch_size)
    plan = r._batches(DistContext())
    assert any(b.packed for b in plan), "no row holds two units"
    for b in plan:
        assert b.n_rows <= batch_size
        units = [x for x in plan if x.probe == b.probe and not x.packs]
        assert max(b.row_lengths()) <= max(n for x in units for n in x.unit_lengths())  # no row longer than a unit
    # Every sequence is scored once, and as an unpadded forward scores it.
    seen, handle = count_forwards(model)
    results = r.run(model)
    handle.remove()
    assert len(seen) == len(plan)
    assert_scores_close(r.last_scores, reference(model, r))
    # Fewer forwards than one unit per row, and the same results.
    plain = packed_runner(tokenizer, batch_size, PlanOptions(pack_rows=False))
    assert len(plan) < len(plain._batches(DistContext(), packed=False)) or batch_size == 16
    want = plain.run(model)
    for name, res in results.items():
        assert (res.score, res.examples, res.tokens) == (want[name].score, want[name].examples, want[name].tokens)
        assert res.nll == pytest.approx(want[name].nll, rel=1e-6)


def test_pack_rows_best_fit_longest_first():
    seqs = [Seq(tuple(range(n)), 1, i, 0) for i, n in enumerate([10, 7, 6, 4, 3, 3, 2, 1])]
    rows = pack_rows(seqs, lambda s: len(s.ids), solo={4})
    assert sorted(s.example for row in rows for s in row) == list(range(8))  # each unit once
    fills = [sum(len(s.ids) for s in row) for row in rows]
    assert max(fills) == 10 and fills == sorted(fills, reverse=True)
    assert [s.example for s in next(row for row in rows if any(s.example == 4 for s in row))] == [4]  # alone
    # Best fit: 6 + 4, 7 + 3 (example 5; 4 is solo), and 2 + 1 in a new row.
    assert sorted(sorted(s.example for s in row) for row in rows) == [[0], [1, 5], [2, 3], [4], [6, 7]]
    assert pack_rows([], len, ()) == []
    # Many units of random lengths: within 5% of the fewest rows possible, none over the longest.
    rng = __import__("random").Random(0)
    many = sorted((Seq(tuple(range(rng.randint(10, 256))), 1, i, 0) for i in range(2000)), key=lambda s: -len(s.ids))
    rows = pack_rows(many, lambda s: len(s.ids), ())
    assert sorted(s.example for row in rows for s in row) == list(range(2000))
    assert max(sum(len(s.ids) for s in row) for row in rows) <= len(many[0].ids)
    assert len(rows) <= 1.05 * math.ceil(sum(len(s.ids) for s in many) / len(many[0].ids))


def test_short_contexts_run_whole_sequences(tokenizer, model):
    r = build(tokenizer, mc=SHORT)
    assert shared_prefix(r.sequences("mc")) < MIN_SHARED_PREFIX
    seen, handle = count_forwards(model)
    r.run(model)
    handle.remove()
    assert sorted(n for batch in seen for n in batch) == sorted(len(s.ids) - 1 for s in r.sequences("mc"))
    assert_scores_close(r.last_scores, reference(model, r))


def test_truncated_rows_that_share_no_prefix(tokenizer, model):
    long_ctx = " ".join(corpus(6, seed=3))
    rows = [{"context": long_ctx, "choices": [" one", " two three four five six seven eight nine"], "answer": 0}]
    s = ProbeSettings(batch_size=2, max_length=40, truncate=True)
    r = build(tokenizer, s, mc=rows, multi=MULTI[:2])
    seqs = r.sequences("mc")
    assert max(len(q.ids) for q in seqs) == 40 and seqs[0].ids[:5] != seqs[1].ids[:5]  # cut by different amounts
    r.run(model)
    assert_scores_close(r.last_scores, reference(model, r))


def test_unusable_cache_falls_back_to_whole_sequences_in_as_many_forwards(tokenizer, model, monkeypatch):
    r = build(tokenizer, ProbeSettings(batch_size=3), options("continuation"), mc=MULTI)
    n_plan = len(r._batches(DistContext()))
    monkeypatch.setattr(probe_forward, "_cache_fits", lambda *a: False)
    seen, handle = count_forwards(model)
    r.run(model)
    handle.remove()
    assert len(seen) == n_plan
    assert_scores_close(r.last_scores, reference(model, r))


class _Plain(torch.nn.Module):
    """A model without ``logits_to_keep`` (all logits) whose cache argument is ``past_key_values``."""

    def __init__(self, inner: torch.nn.Module, cache: bool = True):
        super().__init__()
        self.inner = inner
        if not cache:
            self.forward = self._forward_no_cache

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=None):
        out = self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         cache=past_key_values, use_cache=use_cache)
        return {"logits": out.logits, "past_key_values": out.cache}

    def _forward_no_cache(self, input_ids, attention_mask=None, position_ids=None, use_cache=None):
        return {
            "logits": self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
        }


@pytest.mark.parametrize("variant", ["logits_to_keep as last positions", "all logits", "no cache"])
def test_models_without_masked_logits_or_cache(tokenizer, model, monkeypatch, variant):
    r = build(tokenizer, ProbeSettings(batch_size=3), mc=MULTI, one=SINGLE, text=[{"text": c} for c in CONTEXTS])
    want = reference(model, r)
    target = model
    if variant == "logits_to_keep as last positions":
        monkeypatch.setattr(probe_forward, "_mask_keep_supported", lambda: False)
    else:
        target = _Plain(model, cache=variant != "no cache")
    fwd = Forwarder.for_model(target, 0)
    assert fwd.keep == {"logits_to_keep as last positions": "tail"}.get(variant, "none")
    assert (fwd.cache_arg is None) == (variant == "no cache")
    r.run(target)
    assert_scores_close(r.last_scores, want)


def test_forward_only_runs_each_shared_context_once(tokenizer, model):
    r = build(tokenizer, ProbeSettings(batch_size=3), mc=MULTI, short=SHORT)
    plan = r._batches(DistContext(), forward_only=True)
    assert not any(b.conts for b in plan)
    rows = [(b.probe, s.example, s.choice) for b in plan for s in b.seqs]
    assert sorted(rows) == sorted([(0, i, 0) for i in range(len(MULTI))] + [(1, 0, j) for j in range(3)])
    seen, handle = count_forwards(model)
    assert r.run(model, forward_only=True) == {}
    handle.remove()
    assert len(seen) == len(plan)


def test_capture_on_a_shared_multiple_choice_probe_equals_direct_outputs(tokenizer, model, shared_path):
    """Geometry rides on choice 0 of each row, which runs in full: capture is unchanged."""
    r = build(tokenizer, ProbeSettings(batch_size=3), options(shared_path), mc=MULTI)
    plan = r._batches(DistContext())
    assert any(b.trees for b in plan) if shared_path == "tree" else any(b.conts for b in plan)
    mods = resolve_modules(model, ["layers.1.mlp.down_proj", "final_norm"])
    keys = ActivationCapture.sample_tokens({"mc": r.sequences("mc")}, 50, seed=0)
    cap = ActivationCapture(mods, keys)
    with cap.hooks():
        r.run(model, observer=cap)
    got = cap.collect(DistContext())
    want = sampled_activations(model, mods, r.sequences("mc"), keys)
    for n in mods:
        assert got[n].shape == (50, 32)
        torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("forward_only", [False, True])
def test_capture_on_packed_rows_equals_direct_outputs(tokenizer, model, forward_only):
    """Sampled tokens of sequences that share a row with others (and of trees) are found where they sit."""
    r = build(tokenizer, ProbeSettings(batch_size=3), text=VARIED, mc=MULTI)
    assert any(b.packed for b in r._batches(DistContext(), forward_only=forward_only))
    mods = resolve_modules(model, ["layers.1.mlp.down_proj", "final_norm"])
    for probe in ("text", "mc"):
        keys = ActivationCapture.sample_tokens({probe: r.sequences(probe)}, 60, seed=1)
        cap = ActivationCapture(mods, keys)
        with cap.hooks():
            r.run(model, observer=cap, only=[probe], forward_only=forward_only)
        got = cap.collect(DistContext())
        want = sampled_activations(model, mods, r.sequences(probe), keys)
        for n in mods:
            assert got[n].shape == (60, 32)
            torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-5)


def test_peft_model_continues_from_the_cache_with_and_without_adapters(tokenizer, model, shared_path):
    peft = pytest.importorskip("peft")
    r = build(tokenizer, ProbeSettings(batch_size=4), options(shared_path), mc=MULTI)
    base = reference(model, r)
    pm = peft.get_peft_model(
        make_model(vocab_size=len(tokenizer)), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    )
    assert Forwarder.for_model(pm, 0).cache_arg is not None
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.add_(0.3 * torch.randn_like(p))
    r.run(pm)
    moved = dict(r.last_scores)
    assert_scores_close(moved, reference(pm, r))
    assert max(abs(moved[k] - base[k]) for k in base) > 1e-3  # the adapter changed the numbers
    r.run(pm, context=pm.disable_adapter())
    assert_scores_close(r.last_scores, base)


@dataclass(frozen=True)
class _TwoRanks(DistContext):
    """One rank of two, simulated in one process: the reductions return what both ranks would agree on."""

    forwards: int = 0

    def all_reduce_max(self, value: int) -> int:
        return max(value, self.forwards)

    def all_reduce_sum(self, values: torch.Tensor) -> torch.Tensor:
        return values.detach().to("cpu", torch.float64)

    def any(self, flag: bool) -> bool:
        return bool(flag)


def test_ranks_split_rows_and_run_as_many_forwards(tokenizer, model, shared_path):
    r = build(tokenizer, ProbeSettings(batch_size=3), options(shared_path), mc=MULTI, one=SINGLE)
    plans = [r._batches(DistContext(rank=k, world_size=2)) for k in range(2)]
    n_total = max(len(p) for p in plans)
    assert len(plans[0]) > len(plans[1])  # uneven: rank 1 replays filler forwards
    merged = {}
    for k in range(2):
        seen, handle = count_forwards(model)
        r.run(model, _TwoRanks(rank=k, world_size=2, forwards=n_total))
        handle.remove()
        assert len(seen) == n_total
        assert {ex % 2 for (_, ex, _) in r.last_scores} == {k}  # only this rank's rows, all their choices
        merged.update(r.last_scores)
    assert_scores_close(merged, reference(model, r))


def test_two_process_gloo_group_with_shared_contexts(tokenizer, model, tmp_path):
    """Real ranks: each runs as many forwards as the busiest, scores only its rows, and the
    all-reduced results equal one process's."""
    import json
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    tests = Path(__file__).resolve().parent
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
           "PYTHONPATH": os.pathsep.join([str(tests.parent), os.environ.get("PYTHONPATH", "")])}
    script = str(tests / "dist_scripts" / "shared_prefix_worker.py")
    procs = [
        subprocess.Popen(
            [sys.executable, script, str(tmp_path)],
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for r in range(2)
    ]
    try:
        outs = [p.communicate(timeout=180)[0].decode(errors="replace") for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outs)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    single = build(tokenizer, ProbeSettings(batch_size=3), mc=MULTI, one=SINGLE)
    want = single.run(model)
    assert ranks[0]["planned"] != ranks[1]["planned"]  # uneven: one rank ran filler forwards
    for rank in ranks:
        assert rank["forwards"] == max(r["planned"] for r in ranks)
        assert {ex % 2 for _, ex, _, _ in rank["scores"]} == {rank["rank"]}
        for name, (nll, score, examples, tokens) in rank["results"].items():
            assert (score, examples, tokens) == (want[name].score, want[name].examples, want[name].tokens)
            assert nll == pytest.approx(want[name].nll, rel=1e-6)
    merged = {(p, ex, ch): v for rank in ranks for p, ex, ch, v in rank["scores"]}
    assert_scores_close(merged, single.last_scores)
