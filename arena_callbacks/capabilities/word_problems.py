"""The ``word_problems`` set (generative): short arithmetic word problems, judged on the last number written.

Four families, one operation each on small whole numbers, every answer a whole number from 1 to 25:

* ``add``: "Mia has 4 apples and gets 3 more. How many apples does Mia have now?"
* ``subtract``: "... has 9 ... and gives 4 away. How many ... are left?"
* ``multiply``: "... has 3 bags with 4 ... in each bag. How many ... in all?"
* ``divide``: "... shares 12 ... equally among 3 friends. How many ... does each friend get?"

Each question ends with "Answer with the calculation." and follows one worked example of its
family as an earlier chat turn ("2 + 3 = 5"; never asked itself: the examples use a name the
questions do not), so an instruct model replies with a short calculation; the scorer is
``last_number`` ("Mia has 4 + 3 = 7 apples." counts as 7).

Two-operation problems ("has 3, gets 2 more, then gets 1 more") were left out: SmolLM2-135M
solved 1 of 8 and 0 of 16 of them (it adds two of the three numbers), too few to watch for
forgetting. Asking for "just the number" instead of the calculation halved its score (0.22
against 0.53 on the same kind of rows).
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any

from .chat import demo_prompt, reply_stops
from .instructions import _sample_balanced

if TYPE_CHECKING:
    from .registry import Row

__all__: list[str] = []

MAX_NEW_TOKENS = 28  # prompt (at most 98 SmolLM2 tokens) and answer fit in the demo arena's max_length 128
_ASK = "Answer with the calculation."
_NAMES = ("Mia", "Tom", "Anna", "Ben", "Lucy", "Omar", "Sara", "Leo", "Nina", "Jack", "Emma")  # 11: coprime to 7
_ITEMS = ("apples", "pencils", "books", "cookies", "stickers", "marbles", "cards")

# One worked example per family, shown as an earlier chat turn; "Sam" is never a question's name.
_DEMOS: dict[str, tuple[str, str]] = {
    "add": (f"Sam has 2 pens and gets 3 more. How many pens does Sam have now? {_ASK}", "2 + 3 = 5"),
    "subtract": (f"Sam has 9 pens and gives 3 away. How many pens are left? {_ASK}", "9 - 3 = 6"),
    "multiply": (f"Sam has 2 bags with 4 pens in each bag. How many pens in all? {_ASK}", "2 x 4 = 8"),
    "divide": (f"Sam shares 8 pens equally among 2 friends. How many pens does each friend get? {_ASK}",
               "8 / 2 = 4"),
}


def _question(family: str, name: str, item: str, nums: tuple[int, ...]) -> str:
    if family == "add":
        a, b = nums
        return f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?"
    if family == "subtract":
        a, b = nums
        return f"{name} has {a} {item} and gives {b} away. How many {item} are left?"
    if family == "multiply":
        a, b = nums
        return f"{name} has {a} bags with {b} {item} in each bag. How many {item} in all?"
    a, b = nums
    return f"{name} shares {a} {item} equally among {b} friends. How many {item} does each friend get?"


def _numbers() -> dict[str, list[tuple[tuple[int, ...], int]]]:
    """Per family, ``(numbers, answer)``: small operands, answers from 1 to 25."""
    return {
        "add": [((a, b), a + b) for a in range(2, 10) for b in range(2, 10)],
        "subtract": [((a, b), a - b) for a in range(4, 10) for b in range(1, a)],
        "multiply": [((a, b), a * b) for a in range(2, 6) for b in range(2, 6)],
        "divide": [((a * b, b), a) for a in range(2, 6) for b in range(2, 6)],
    }


def _word_problem_pool() -> list[tuple[str, str, int]]:
    """(family, question, answer): every problem the set draws from. Names and items rotate with
    the numbers (a fixed rule, no randomness), so every question is distinct."""
    pool, k = [], 0
    for family, items in _numbers().items():
        for nums, answer in items:
            name, item = _NAMES[k % len(_NAMES)], _ITEMS[k % len(_ITEMS)]
            pool.append((family, f"{_question(family, name, item, nums)} {_ASK}", answer))
            k += 1
    return pool


def _build_word_problems(rng: random.Random, n: int, tokenizer: Any) -> list[Row]:
    return [
        {"prompt": demo_prompt(tokenizer, _DEMOS[family], question), "answer": answer, "operation": family}
        for family, question, answer in _sample_balanced(rng, _word_problem_pool(), n)
    ]


def _word_problem_options(tokenizer: Any) -> dict[str, Any]:
    """The probe options of the set (:class:`~arena_callbacks.probes.Probe`)."""
    return {"kind": "generate", "scorer": "last_number", "max_new_tokens": MAX_NEW_TOKENS,
            "stop": reply_stops(tokenizer)}
