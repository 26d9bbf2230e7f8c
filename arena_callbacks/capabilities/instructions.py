"""The ``instruction_following`` set: verifiable instructions in the model's chat format."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .registry import Row

__all__: list[str] = []


_SUBJECTS = ("The cat", "My friend", "The teacher", "A small dog", "The old man", "Our neighbor", "The girl",
             "The farmer")
_VERBS = ("likes", "paints", "sells", "finds", "cleans", "buys", "draws", "carries")
_OBJECTS = ("red apples", "the blue door", "a wooden chair", "green boxes", "the new car", "warm bread",
            "old books", "a small boat")
_WORDS = ("apple", "river", "garden", "window", "orange", "pencil", "yellow", "silver", "planet", "forest",
          "rabbit", "candle", "bridge", "summer", "guitar", "castle", "tiger", "flower", "ocean", "basket")


def _instruction_pool() -> list[tuple[str, str, str]]:
    """(family, instruction, exact reply)."""
    pool = []
    for s in _SUBJECTS:
        for v in _VERBS:
            for o in _OBJECTS:
                sentence = f"{s} {v} {o}."
                pool.append(("repeat", f"Repeat exactly: {sentence}", sentence))
    for w in _WORDS:
        pool.append(("only_word", f"Reply with only the word {w}.", w))
        pool.append(("uppercase", f"Write the word {w} in capital letters.", w.upper()))
    return pool


# One worked example per family, shown as an earlier chat turn; never a question itself.
_DEMOS: dict[str, tuple[str, str]] = {
    "repeat": ("Repeat exactly: The boy reads a long letter.", "The boy reads a long letter."),
    "only_word": ("Reply with only the word table.", "table"),
    "uppercase": ("Write the word table in capital letters.", "TABLE"),
}


def _end_of_turn(tokenizer: Any) -> str:
    """What the chat template writes after an assistant reply (e.g. ``<|im_end|>``), stripped."""
    marker = "\x00REPLY\x00"
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}], tokenize=False
    )
    return text.split(marker, 1)[1].strip() if marker in text else ""


def _chat_prompt(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    turns = [f"{'User' if m['role'] == 'user' else 'Assistant'}: {m['content']}\n" for m in messages]
    return "".join(turns) + "Assistant:"


def _build_instruction_following(rng: random.Random, n: int, tokenizer: Any) -> list[Row]:
    chat = tokenizer is not None and bool(getattr(tokenizer, "chat_template", None))
    end = _end_of_turn(tokenizer) if chat else ""
    rows = []
    for family, instruction, reply in _sample_balanced(rng, _instruction_pool(), n):
        demo_q, demo_a = _DEMOS[family]
        messages = [{"role": "user", "content": demo_q}, {"role": "assistant", "content": demo_a},
                    {"role": "user", "content": instruction}]
        prompt = _chat_prompt(tokenizer, messages)
        completion = reply + end if chat else f" {reply}\n"
        rows.append({"prompt": prompt, "completion": completion, "instruction": family})
    return rows


def _sample_balanced(rng: random.Random, pool: Sequence[tuple[str, str, str]], n: int) -> list[tuple[str, str, str]]:
    """``n`` items, as even across families as their sizes allow, in a seeded order."""
    families: dict[str, list[tuple[str, str, str]]] = {}
    for item in pool:
        families.setdefault(item[0], []).append(item)
    for items in families.values():
        rng.shuffle(items)
    chosen: list[tuple[str, str, str]] = []
    while len(chosen) < n:
        for items in families.values():
            if items and len(chosen) < n:
                chosen.append(items.pop())
    rng.shuffle(chosen)
    return chosen
