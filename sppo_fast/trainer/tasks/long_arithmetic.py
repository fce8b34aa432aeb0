"""Long worked solutions: the remainder of ``n`` divided by ``k``, found by subtracting ``k`` step by step.

Prompt ``"23 mod 5\\n"``. Solution: one line per subtraction, then the answer line::

    23-5=18
    18-5=13
    13-5=8
    8-5=3
    #### 3

Each step needs only the line before it and ``k`` (copy the last result, subtract one digit, borrow),
which a small character-level model learns, while the number of steps, ``n // k``, sets the length: the
response, not the prompt, dominates the cost of an RL step, as in long chain-of-thought.

Difficulty sets the number of steps (``k`` is 2..9, ``n = steps * k + remainder``), at 6 to 12 tokens
a step with the char tokenizer (solution lengths measured on 200 draws, min / mean / max):

1. 10 to 40 steps: 77 / 224 / 384 tokens;
2. 40 to 160 steps: 342 / 994 / 1,659 tokens;
3. 160 to 640 steps: 1,610 / 4,482 / 7,365 tokens.

The reward is the final answer only (``#### r``), read by the bounded parser of :mod:`.verify`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from . import Example, LeveledTask, check_count, check_split, draw_examples, held_out
from .verify import ANSWER_MARKER, final_answer_reward


@dataclass(frozen=True)
class Level:
    min_steps: int
    max_steps: int


LEVELS = {1: Level(10, 40), 2: Level(40, 160), 3: Level(160, 640)}
DIVISORS = range(2, 10)


def worked_steps(n: int, k: int) -> list[str]:
    """``"a-k=b"`` while the value is at least ``k``."""
    lines = []
    while n >= k:
        lines.append(f"{n}-{k}={n - k}")
        n -= k
    return lines


def solution_text(n: int, k: int) -> str:
    return "".join(line + "\n" for line in worked_steps(n, k)) + f"{ANSWER_MARKER} {n % k}"


class LongArithmeticTask(LeveledTask):
    """Seeded ``n mod k`` by repeated subtraction; see the module docstring for the format and levels."""

    kind, levels = "long_arithmetic", LEVELS

    def __init__(self, difficulty: int = 1, test_fraction: float = 0.1):
        super().__init__(difficulty, test_fraction)

    def make_example(self, n: int, k: int) -> Example:
        return Example(prompt=f"{n} mod {k}\n", answer=str(n % k), solution=solution_text(n, k))

    def sample(self, rng: random.Random) -> Example:
        k = rng.choice(DIVISORS)
        steps = rng.randint(self.level.min_steps, self.level.max_steps)
        return self.make_example(steps * k + rng.randrange(k), k)

    def is_test(self, example: Example) -> bool:
        return held_out(example.prompt, self.test_fraction, salt="long_arithmetic")

    def examples(self, split: str, n: int, seed: int = 0) -> list[Example]:
        check_split(split)
        check_count(n)
        rng = random.Random(f"{self.name}:{split}:{seed}")
        return draw_examples(self.sample, self.is_test, split, n, rng)

    def reward(self, response: str, example: Example) -> float:
        return final_answer_reward(response, example.answer)
