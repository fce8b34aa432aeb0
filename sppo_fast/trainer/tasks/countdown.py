"""Countdown: combine the given numbers with + - * / (each at most once) to reach the target.

Prompt: the numbers and the target, e.g. ``"3 5 2 -> 13\\n"``. Solution: one line per operation,
then the expression on the answer line::

    5*2=10
    3+10=13
    #### 3+5*2

The reward parses the expression on the response's ``####`` line (or, without one, its last non-empty
line) with the bounded recursive-descent parser of :mod:`.verify` (exact rationals, no eval), and
gives 1.0 when the numbers it uses are a sub-multiset of the given ones and its value is the target.

Difficulty 1: three numbers 1..9, target up to 100; difficulty 2: four numbers 1..12, target up to 200.
The reference solution uses every number; intermediate values are positive integers.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import dataclass
from fractions import Fraction

from . import Example, LeveledTask, check_count, check_split, draw_examples, held_out
from .arithmetic import Node, apply, render, solution_text, worked_steps
from .verify import ExpressionError, extract_marked, format_number, parse_expression

_PROMPT = re.compile(r"((?:[0-9]+ )+)-> ([0-9]+)\n")


@dataclass(frozen=True)
class Level:
    count: int
    high: int
    max_target: int


LEVELS = {1: Level(3, 9, 100), 2: Level(4, 12, 200)}
MAX_INTERMEDIATE = 1000


def parse_prompt(prompt: str) -> tuple[list[int], int]:
    """The numbers and the target of a countdown prompt (ValueError if it is not one)."""
    match = _PROMPT.fullmatch(prompt)
    if match is None:
        raise ValueError(f"prompt is not a countdown prompt: {prompt[:80]!r}")
    return [int(x) for x in match.group(1).split()], int(match.group(2))


def final_expression(response: str) -> str | None:
    marked = extract_marked(response)
    if marked is not None:
        return marked
    lines = [line for line in response[-4096:].split("\n") if line.strip()]
    return lines[-1].strip() if lines else None


def countdown_reward(response: str, numbers: list[int], target: int) -> float:
    expression = final_expression(response) if isinstance(response, str) else None
    if expression is None:
        return 0.0
    try:
        value, used = parse_expression(expression)
    except ExpressionError:
        return 0.0
    if Counter(used) - Counter(numbers):  # some number used more often than given
        return 0.0
    return 1.0 if value == target else 0.0


def allowed_ops(left: Fraction, right: Fraction) -> list[str]:
    """The operations that keep an intermediate value a positive integer no larger than
    MAX_INTERMEDIATE (exact division only). When none does, ``+``: the value then exceeds every
    target and the sampler rejects the tree."""
    ops = [op for op in "+*" if apply(op, left, right) <= MAX_INTERMEDIATE]
    if left > right:
        ops.append("-")
    if left % right == 0:
        ops.append("/")
    return ops or ["+"]


def random_clean_tree(rng: random.Random, leaves: list[int]) -> tuple[Node, Fraction]:
    """A random bracketing of ``leaves`` whose operations are drawn among those that keep every
    intermediate value clean (built bottom-up, so no rejection is needed for the operations)."""
    if len(leaves) == 1:
        return leaves[0], Fraction(leaves[0])
    cut = rng.randrange(1, len(leaves))
    left, left_value = random_clean_tree(rng, leaves[:cut])
    right, right_value = random_clean_tree(rng, leaves[cut:])
    op = rng.choice(allowed_ops(left_value, right_value))
    return (op, left, right), apply(op, left_value, right_value)


class CountdownTask(LeveledTask):
    kind, levels = "countdown", LEVELS

    def __init__(self, difficulty: int = 1, test_fraction: float = 0.1):
        super().__init__(difficulty, test_fraction)

    def sample(self, rng: random.Random) -> Example:
        level = self.level
        while True:
            numbers = [rng.randint(1, level.high) for _ in range(level.count)]
            tree, value = random_clean_tree(rng, numbers)
            if value <= level.max_target:
                break
        shown = numbers[:]
        rng.shuffle(shown)
        target = format_number(value)
        expression = render(tree)
        return Example(prompt=f"{' '.join(map(str, shown))} -> {target}\n", answer=expression,
                       solution=solution_text(worked_steps(tree), expression))

    def examples(self, split: str, n: int, seed: int = 0) -> list[Example]:
        check_split(split)
        check_count(n)
        rng = random.Random(f"{self.name}:{split}:{seed}")
        return draw_examples(self.sample, self.is_test, split, n, rng)

    def is_test(self, example: Example) -> bool:
        # Keyed by the problem, not the prompt text: the same numbers in another order are the same
        # problem and must not sit on both sides of the split.
        numbers, target = parse_prompt(example.prompt)
        return held_out(f"{sorted(numbers)}->{target}", self.test_fraction, salt="countdown")

    def reward(self, response: str, example: Example) -> float:
        numbers, target = parse_prompt(example.prompt)
        return countdown_reward(response, numbers, target)
