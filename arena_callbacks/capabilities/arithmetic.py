"""The ``arithmetic`` set: generated sums and products of one-digit numbers."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .registry import Row

__all__ = ["ARITHMETIC_SHOTS"]

# A fixed few-shot prefix sets the answer format; its problems are never asked.
ARITHMETIC_SHOTS: tuple[tuple[int, str, int], ...] = ((3, "+", 4), (9, "-", 5), (2, "x", 6))
_OPS: dict[str, Callable[[int, int], int]] = {"+": lambda a, b: a + b, "-": lambda a, b: a - b,
                                              "x": lambda a, b: a * b}


def _arithmetic_problems() -> list[tuple[int, str, int]]:
    """Every problem the set draws from: sums and products of two one-digit numbers.

    Subtraction is left out: SmolLM2-135M gets a third of one-digit differences right and
    almost none with a borrow, too little to watch for forgetting.
    """
    shots = set(ARITHMETIC_SHOTS)
    problems = [(a, op, b) for op in ("+", "x") for a in range(1, 10) for b in range(1, 10)]
    return [p for p in problems if p not in shots]


def _build_arithmetic(rng: random.Random, n: int, tokenizer: Any) -> list[Row]:
    prefix = "".join(f"{a} {op} {b} = {_OPS[op](a, b)}\n" for a, op, b in ARITHMETIC_SHOTS)
    return [
        {"prompt": f"{prefix}{a} {op} {b} =", "completion": f" {_OPS[op](a, b)}", "operation": op}
        for a, op, b in rng.sample(_arithmetic_problems(), n)
    ]
