"""Tokenisation: each probe row becomes one :class:`Seq` per scored sequence (one per choice)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..config import ProbeSettings
from ..exceptions import ProbeDataError
from .data import CONTEXT_FIELDS, ProbeSet, first_field, is_conversation


@dataclass(frozen=True)
class Seq:
    """One tokenised sequence; positions ``[start, len)`` are scored (predicted from the left)."""

    ids: tuple[int, ...]
    start: int
    example: int  # index within the probe's rows
    choice: int  # choice index for multiple choice, 0 otherwise


def encode(tokenizer: Any, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def encode_pair(tokenizer: Any, context: str, continuation: str, special: bool = True) -> tuple[list[int], int]:
    """Token ids of context+continuation and where the continuation starts.

    Trailing spaces of the context move to the continuation, and the continuation is read off
    the whole encoding (as lm-evaluation-harness does), so merges across the boundary are kept.
    ``special``: let the tokenizer add its special tokens (BOS); off for chat-templated text,
    which carries its own.
    """
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = encode(tokenizer, context + continuation, special=special)
    ctx = encode(tokenizer, context, special=special)
    if whole[: len(ctx)] != ctx or len(whole) == len(ctx):
        # The boundary merged; fall back to separate encodings.
        whole = ctx + encode(tokenizer, continuation, special=False)
    return whole, len(ctx)


def tokenize_probe(probe: ProbeSet, tokenizer: Any, settings: ProbeSettings) -> list[Seq]:
    """Every row's sequences in row order: one for a text or completion row, one per choice (in
    order) for a multiple-choice row. Rows longer than ``max_length`` raise unless truncated."""
    seqs: list[Seq] = []
    for i, row in enumerate(probe.rows):
        chat = is_conversation(row.get("messages")) or is_conversation(row.get("prompt"))
        if probe.kind == "text":
            text = _render(probe, i, tokenizer, row["messages"]) if chat else row["text"]
            seqs.append(_text_seq(probe, i, text, tokenizer, settings, special=not chat))
            continue
        if probe.kind == "generate":
            seqs.append(_prompt_seq(probe, i, row, tokenizer, settings))
            continue
        if chat:
            pairs = [_chat_pair(probe, i, row, tokenizer)]
        elif probe.kind == "completion":
            pairs = [(row["prompt"], row["completion"])]
        else:
            _, ctx = first_field(row, CONTEXT_FIELDS)
            pairs = [(ctx, c) for c in row["choices"]]
        seqs += [_pair_seq(probe, i, j, ctx, cont, tokenizer, settings, special=not chat)
                 for j, (ctx, cont) in enumerate(pairs)]
    return seqs


def _render(probe: ProbeSet, i: int, tokenizer: Any, messages: list[Any], generation_prompt: bool = False) -> str:
    """Messages as the tokenizer's chat template writes them."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise ProbeDataError(f"probe {probe.name!r} ({probe.kind}), row {probe.row_ids[i]}: conversational rows "
                             "need a tokenizer with a chat template (tokenizer.chat_template is None)")
    return tokenizer.apply_chat_template([dict(m) for m in messages], tokenize=False,
                                         add_generation_prompt=generation_prompt)


def _chat_pair(probe: ProbeSet, i: int, row: dict[str, Any], tokenizer: Any) -> tuple[str, str]:
    """(prompt, answer) text of a conversational completion row: the prompt ends with the
    template's generation prompt; the answer is the rest of the whole conversation's rendering."""
    if is_conversation(row.get("messages")):
        prompt, whole = row["messages"][:-1], row["messages"]
    else:  # TRL's conversational prompt/completion
        prompt, whole = row["prompt"], [*row["prompt"], *row["completion"]]
    context = _render(probe, i, tokenizer, prompt, generation_prompt=True)
    full = _render(probe, i, tokenizer, whole)
    if not full.startswith(context) or len(full) == len(context):
        raise ProbeDataError(f"probe {probe.name!r} ({probe.kind}), row {probe.row_ids[i]}: the chat template "
                             "does not render the conversation as its prompt followed by the answer")
    return context, full[len(context):]


def _prompt_seq(probe: ProbeSet, i: int, row: dict[str, Any], tokenizer: Any, settings: ProbeSettings) -> Seq:
    """A generative row's prompt (chat rows with the template's generation prompt); nothing is
    scored (``start`` is its length). Prompt and answer must fit in ``max_length`` together; a
    long prompt loses its beginning when truncated."""
    assert probe.generation is not None
    chat = is_conversation(row.get("messages"))
    text = _render(probe, i, tokenizer, row["messages"], generation_prompt=True) if chat else row["prompt"]
    ids = encode(tokenizer, text, special=not chat)
    room = settings.max_length - probe.generation.max_new_tokens
    if len(ids) > room:
        if not settings.truncate or room < 1:
            raise ProbeDataError(
                f"probe {probe.name!r} (generate), row {probe.row_ids[i]}: a {len(ids)}-token prompt and "
                f"max_new_tokens={probe.generation.max_new_tokens} exceed probe.max_length={settings.max_length}; "
                "raise max_length, lower max_new_tokens, shorten the prompt, or set probe.truncate=true"
            )
        ids = ids[len(ids) - room:]
    return Seq(tuple(ids), len(ids), i, 0)


def _too_long(probe: ProbeSet, i: int, n: int, limit: int) -> ProbeDataError:
    return ProbeDataError(
        f"probe {probe.name!r} ({probe.kind}), row {probe.row_ids[i]}: {n} tokens, longer than "
        f"probe.max_length={limit}; raise max_length, shorten the row, or set probe.truncate=true"
    )


def _text_seq(probe: ProbeSet, i: int, text: str, tokenizer: Any, settings: ProbeSettings,
              special: bool = True) -> Seq:
    """A text row: every token but the first is scored; a long row keeps its beginning when truncated."""
    limit = settings.max_length
    ids = encode(tokenizer, text, special=special)
    if len(ids) > limit:
        if not settings.truncate:
            raise _too_long(probe, i, len(ids), limit)
        ids = ids[:limit]
    if len(ids) < 2:
        raise ProbeDataError(
            f"probe {probe.name!r} (text), row {probe.row_ids[i]}: tokenises to {len(ids)} token(s); "
            "at least 2 are needed to score a next-token prediction"
        )
    return Seq(tuple(ids), 1, i, 0)


def _pair_seq(
    probe: ProbeSet, i: int, j: int, ctx: str, cont: str, tokenizer: Any, settings: ProbeSettings,
    special: bool = True,
) -> Seq:
    """Context + continuation ``j`` of row ``i``, the continuation scored; a long one loses the
    beginning of its context when truncated (never a scored token)."""
    limit = settings.max_length
    ids, start = encode_pair(tokenizer, ctx, cont, special=special)
    if start == 0:  # nothing before the first scored token: score from position 1
        start = 1
    if len(ids) > limit:
        if not settings.truncate or len(ids) - start >= limit:
            raise _too_long(probe, i, len(ids), limit)
        cut = len(ids) - limit
        ids, start = ids[cut:], start - cut
    return Seq(tuple(ids), max(start, 1), i, j)
