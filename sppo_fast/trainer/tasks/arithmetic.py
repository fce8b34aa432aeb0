"""Multi-step integer arithmetic, generated from a seed, small enough for a char-level model to learn.

Prompt: an expression and a newline, e.g. ``"3+5*2\\n"``. Solution: one line per operation in the
order a person evaluates it (precedence and parentheses respected), then the answer line::

    5*2=10
    3+10=13
    #### 13

Difficulty levels:

1. two operands ``a op b``, 0..20, ``+ - *``: one step (the held-out split are unseen facts);
2. three operands 1..9 with precedence (``3+5*2``): two steps, every fact also occurs in training,
   the held-out split are unseen compositions;
3. four operands 1..9, any bracketing (``(3+5)*2-4``): three steps; the trainer's default, because a
   small model cannot do three operations in one go (a bare answer is rarely right) but can do each
   step, so working it out is what RL has to discover.

Every step stays "easy": no negative values, no value above 200, factors at most 12. Splits are
decided by a stable hash of the prompt, so train and test never share a prompt.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from fractions import Fraction

from . import Example, LeveledTask, check_count, check_split, draw_examples, held_out
from .verify import ANSWER_MARKER, final_answer_reward, format_number

# A leaf is an int; an operation is (op, left, right).
Node = int | tuple
PRECEDENCE = {"+": 1, "-": 1, "*": 2, "/": 2}



def apply(op: str, left: Fraction, right: Fraction) -> Fraction:
    if op == "+":
        return left + right
    if op == "-":
        return left - right
    if op == "*":
        return left * right
    if op == "/":
        return Fraction(left) / right
    raise ValueError(f"op must be one of + - * /, got {op!r}")


def walk(node: Node) -> tuple[Fraction, list[tuple[str, Fraction, Fraction, Fraction]]]:
    """The value of the tree and its operations ``(op, left, right, result)`` in evaluation order
    (operands before the operation that uses them), in one post-order pass."""
    if isinstance(node, int):
        return Fraction(node), []
    op, left, right = node
    left_value, left_ops = walk(left)
    right_value, right_ops = walk(right)
    value = apply(op, left_value, right_value)
    return value, left_ops + right_ops + [(op, left_value, right_value, value)]


def evaluate(node: Node) -> Fraction:
    return walk(node)[0]


def operations(node: Node) -> list[tuple[str, Fraction, Fraction, Fraction]]:
    return walk(node)[1]


def render(node: Node) -> str:
    """The expression with just the parentheses needed for it to parse back into the same tree."""
    if isinstance(node, int):
        return str(node)
    op, left, right = node
    left_text, right_text = render(left), render(right)
    if not isinstance(left, int) and PRECEDENCE[left[0]] < PRECEDENCE[op]:
        left_text = f"({left_text})"
    if not isinstance(right, int) and PRECEDENCE[right[0]] <= PRECEDENCE[op]:
        right_text = f"({right_text})"
    return f"{left_text}{op}{right_text}"


def worked_steps(node: Node) -> list[str]:
    """One ``"a op b=c"`` line per operation, in evaluation order."""
    return [f"{format_number(left)}{op}{format_number(right)}={format_number(result)}"
            for op, left, right, result in operations(node)]


def flat_tree(numbers: list[int], ops: list[str]) -> Node:
    """The tree of ``n0 op0 n1 op1 n2 ...`` under the usual precedence, left-associative."""
    terms: list[Node] = [numbers[0]]
    additive: list[str] = []
    for op, number in zip(ops, numbers[1:]):
        if PRECEDENCE[op] == 2:
            terms[-1] = (op, terms[-1], number)
        else:
            additive.append(op)
            terms.append(number)
    tree = terms[0]
    for op, term in zip(additive, terms[1:]):
        tree = (op, tree, term)
    return tree


def random_tree(rng: random.Random, leaves: list[Node], ops: str) -> Node:
    """A uniformly random bracketing of ``leaves`` (in order) with random operations."""
    if len(leaves) == 1:
        return leaves[0]
    cut = rng.randrange(1, len(leaves))
    return (rng.choice(ops), random_tree(rng, leaves[:cut], ops), random_tree(rng, leaves[cut:], ops))


def solution_text(steps: list[str], answer: str) -> str:
    return "".join(line + "\n" for line in steps) + f"{ANSWER_MARKER} {answer}"


@dataclass(frozen=True)
class Level:
    operands: int
    low: int
    high: int
    any_bracketing: bool


LEVELS = {1: Level(2, 0, 20, False), 2: Level(3, 1, 9, False), 3: Level(4, 1, 9, True)}
MAX_VALUE = 200
MAX_FACTOR = 12


def is_easy(tree: Node) -> bool:
    for op, left, right, result in operations(tree):
        if result < 0 or result > MAX_VALUE or result.denominator != 1:
            return False
        if op == "*" and max(left, right) > MAX_FACTOR:
            return False
    return True


class ArithmeticTask(LeveledTask):
    """Seeded multi-step arithmetic; see the module docstring for the format and the levels."""

    kind, levels = "arithmetic", LEVELS

    def __init__(self, difficulty: int = 2, test_fraction: float = 0.1):
        super().__init__(difficulty, test_fraction)

    def sample_tree(self, rng: random.Random) -> Node:
        level = self.level
        while True:
            numbers = [rng.randint(level.low, level.high) for _ in range(level.operands)]
            if level.any_bracketing:
                tree = random_tree(rng, numbers, "+-*")
            else:
                tree = flat_tree(numbers, [rng.choice("+-*") for _ in range(level.operands - 1)])
            if is_easy(tree):
                return tree

    def make_example(self, tree: Node) -> Example:
        answer = format_number(evaluate(tree))
        return Example(prompt=render(tree) + "\n", answer=answer,
                       solution=solution_text(worked_steps(tree), answer))

    def is_test(self, example: Example) -> bool:
        return held_out(example.prompt, self.test_fraction, salt="arithmetic")

    def examples(self, split: str, n: int, seed: int = 0) -> list[Example]:
        check_split(split)
        check_count(n)
        rng = random.Random(f"{self.name}:{split}:{seed}")
        return draw_examples(lambda r: self.make_example(self.sample_tree(r)), self.is_test, split, n, rng)

    def reward(self, response: str, example: Example) -> float:
        return final_answer_reward(response, example.answer)
