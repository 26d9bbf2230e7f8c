"""The ``format_following`` set (generative): questions with a format instruction, checked by rule.

Each row asks an everyday question and adds one instruction about the form of the reply; what
the rule needs travels in the row (``instruction``: the rule, ``words``: a count, ``word``: a
word), and :func:`follows_format` judges the reply by that rule alone, not by its content:

* ``word_count``: "Answer in exactly two words." (1 to 3 words; a word is a run of letters,
  digits, apostrophes or hyphens);
* ``uppercase``: "Reply in capital letters only." (letters, none lower case);
* ``lowercase``: "Reply in lowercase letters only." (letters, none upper case);
* ``avoid_word``: "Do not use the word "sun"." (the word never appears as a whole word, in any
  case);
* ``start_with``: "Start your reply with the word "Yes"." (the first word, in any case);
* ``number_only``: "Reply with a single number and nothing else." (digits, one optional decimal
  part and one optional final period; the number's value is not checked).

Each question follows one worked example of its rule as an earlier chat turn (its question is
never asked), in the tokenizer's chat template.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from .chat import demo_prompt, reply_stops
from .instructions import _sample_balanced

if TYPE_CHECKING:
    from .registry import Row

__all__ = ["RULES", "follows_format"]

MAX_NEW_TOKENS = 40
_WORD = re.compile(r"[A-Za-z0-9]+(?:['’-][A-Za-z0-9]+)*")
_NUMBER_ONLY = re.compile(r"-?\d+(?:\.\d+)?\.?")
_COUNT_WORDS = {1: "one word", 2: "two words", 3: "three words"}

# Open questions any rule but number_only can go with.
_QUESTIONS = (
    "What is your favorite fruit?", "What do people drink in the morning?", "What animal lives on a farm?",
    "What color is grass?", "What do you wear when it rains?", "What is a good name for a dog?",
    "Where do fish live?", "What is the weather like in summer?", "What do bees make?",
    "What can you see in the night sky?", "What do you use to write a letter?", "What is a popular sport?",
)
# (question, a word an answer would use): for avoid_word.
_AVOID = (
    ("Describe the sun in one sentence.", "hot"), ("Describe a cat in one sentence.", "cat"),
    ("Describe the ocean in one sentence.", "water"), ("Describe a tree in one sentence.", "green"),
    ("Describe snow in one sentence.", "cold"), ("Describe a car in one sentence.", "wheels"),
    ("Describe a book in one sentence.", "pages"), ("Describe an apple in one sentence.", "red"),
    ("Describe a city in one sentence.", "people"), ("Describe the moon in one sentence.", "night"),
)
_STARTS = ("Yes", "Well", "Sure", "Today")
# Questions with a number for an answer: for number_only.
_NUMERIC = (
    "How many legs does a dog have?", "How many days are in a week?", "How many wheels does a bicycle have?",
    "How many months are in a year?", "How many sides does a triangle have?", "How many hours are in a day?",
    "How many fingers are on one hand?", "How many minutes are in an hour?", "How many eyes does a person have?",
    "How many letters are in the word cat?", "How many seasons are in a year?", "How many legs does a spider have?",
)

# One worked example per rule, shown as an earlier chat turn; its question is never asked.
_DEMOS: dict[str, tuple[str, str]] = {
    "word_count": ("What is your favorite season? Answer in exactly two words.", "Probably autumn."),
    "uppercase": ("What is your favorite season? Reply in capital letters only.", "I LIKE AUTUMN BEST."),
    "lowercase": ("What is your favorite season? Reply in lowercase letters only.", "i like autumn best."),
    "avoid_word": ('Describe a house in one sentence. Do not use the word "roof".',
                   "A house is a building where a family lives."),
    "start_with": ('What is your favorite season? Start your reply with the word "Well".',
                   "Well, I like autumn best."),
    "number_only": ("How many legs does a cow have? Reply with a single number and nothing else.", "4"),
}


def _words(text: str) -> list[str]:
    return _WORD.findall(text)


def _word_count(generation: str, row: Mapping[str, Any]) -> bool:
    return len(_words(generation)) == int(row["words"])


def _uppercase(generation: str, row: Mapping[str, Any]) -> bool:
    return any(c.isalpha() for c in generation) and not any(c.islower() for c in generation)


def _lowercase(generation: str, row: Mapping[str, Any]) -> bool:
    return any(c.isalpha() for c in generation) and not any(c.isupper() for c in generation)


def _avoid_word(generation: str, row: Mapping[str, Any]) -> bool:
    words = _words(generation)
    return bool(words) and str(row["word"]).lower() not in {w.lower() for w in words}


def _start_with(generation: str, row: Mapping[str, Any]) -> bool:
    words = _words(generation)
    return bool(words) and words[0].lower() == str(row["word"]).lower()


def _number_only(generation: str, row: Mapping[str, Any]) -> bool:
    return _NUMBER_ONLY.fullmatch(generation.strip()) is not None


#: The rules, by the ``instruction`` field of a row: ``check(generation, row) -> bool``.
RULES: dict[str, Callable[[str, Mapping[str, Any]], bool]] = {
    "word_count": _word_count,
    "uppercase": _uppercase,
    "lowercase": _lowercase,
    "avoid_word": _avoid_word,
    "start_with": _start_with,
    "number_only": _number_only,
}


def follows_format(prompt: str, generation: str, row: Mapping[str, Any]) -> float:
    """1.0 when ``generation`` keeps the format rule its row names (``row["instruction"]``), else 0.0.

    A scorer of generative probes (``Probe(..., scorer=follows_format)``); it reads only the
    reply and the row's rule fields. An empty reply keeps no rule.

    Example:
        >>> follows_format("", "Red and blue.", {"instruction": "word_count", "words": 3})
        1.0
        >>> follows_format("", "I like the Sun.", {"instruction": "avoid_word", "word": "sun"})
        0.0
    """
    check = RULES.get(str(row.get("instruction")))
    if check is None:
        raise ValueError(f"follows_format: row has no known rule in 'instruction' (got {row.get('instruction')!r}; "
                         f"known: {sorted(RULES)})")
    return float(bool(generation.strip()) and check(generation.strip(), row))


def _format_pool() -> list[tuple[str, str, dict[str, Any]]]:
    """(rule, question with its instruction, the rule's fields): every row the set draws from."""
    pool: list[tuple[str, str, dict[str, Any]]] = []
    for q in _QUESTIONS:
        for count, words in _COUNT_WORDS.items():
            pool.append(("word_count", f"{q} Answer in exactly {words}.", {"words": count}))
        pool.append(("uppercase", f"{q} Reply in capital letters only.", {}))
        pool.append(("lowercase", f"{q} Reply in lowercase letters only.", {}))
        for word in _STARTS:
            pool.append(("start_with", f'{q} Start your reply with the word "{word}".', {"word": word}))
    for q, word in _AVOID:
        pool.append(("avoid_word", f'{q} Do not use the word "{word}".', {"word": word}))
    for q in _NUMERIC:
        pool.append(("number_only", f"{q} Reply with a single number and nothing else.", {}))
    return pool


def _build_format_following(rng: random.Random, n: int, tokenizer: Any) -> list[Row]:
    return [
        {"prompt": demo_prompt(tokenizer, _DEMOS[rule], question), "instruction": rule, **fields}
        for rule, question, fields in _sample_balanced(rng, _format_pool(), n)
    ]


def _format_options(tokenizer: Any) -> dict[str, Any]:
    """The probe options of the set (:class:`~arena_callbacks.probes.Probe`)."""
    return {"kind": "generate", "scorer": follows_format, "max_new_tokens": MAX_NEW_TOKENS,
            "stop": reply_stops(tokenizer)}
