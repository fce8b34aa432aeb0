"""Tasks with verifiable rewards for the bundled trainer.

A task hands out :class:`Example` s (prompt, reference answer, worked solution) for a ``"train"`` or
``"test"`` split and scores a response with a reward of 0.0 or 1.0. Rewards come from parsers in
:mod:`.verify` and :mod:`.countdown`; no model output is ever evaluated as code.

Solution format, shared by every bundled task: reasoning lines, each ending in ``"\\n"``, then a final
answer line ``#### <answer>`` with no trailing newline (the trainer appends EOS after it). With a
newline as the segment boundary, each reasoning step is one SSPO segment and the answer line plus EOS
is the last one.
"""

from __future__ import annotations

import queue
import threading
import zlib
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

SPLITS = ("train", "test")


@dataclass(frozen=True)
class Example:
    """One problem. The policy sees ``prompt`` verbatim (it already ends with its cue, a newline)."""

    prompt: str
    answer: str  # the reference final answer, canonical string (countdown: one expression that works)
    solution: str  # reasoning lines ending in "\n", then "#### <answer>" (no trailing newline)


@runtime_checkable
class Task(Protocol):
    name: str

    def examples(self, split: str, n: int, seed: int = 0) -> list[Example]:
        """``n`` examples of ``split`` ("train" or "test"); the splits are disjoint; same seed, same list."""
        ...

    def reward(self, response: str, example: Example) -> float:
        """1.0 if ``response`` solves ``example`` else 0.0; parses, never evaluates."""
        ...


class LeveledTask:
    """The part the bundled generated tasks share: a difficulty level, a held-out fraction and a name."""

    kind = ""  # the name's prefix
    levels: dict = {}

    def __init__(self, difficulty: int, test_fraction: float):
        if difficulty not in self.levels:
            raise ValueError(f"difficulty must be one of {sorted(self.levels)}, got {difficulty!r}")
        if not 0.0 < test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
        self.difficulty, self.test_fraction = difficulty, test_fraction
        self.level = self.levels[difficulty]
        self.name = f"{self.kind}-{difficulty}"


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return split


def check_count(n: int) -> int:
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    return n


def held_out(key: str, test_fraction: float, salt: str = "") -> bool:
    """Whether ``key`` belongs to the test split: a stable hash, independent of any seed, so the
    splits are disjoint whatever seeds the caller uses for sampling."""
    bucket = zlib.crc32(f"{salt}\x00{key}".encode()) % 10_000
    return bucket < round(test_fraction * 10_000)


# After this many consecutive draws of an already used prompt, a split's pool is deemed exhausted and
# repeats are allowed (small pools, e.g. arithmetic difficulty 1, asked for many examples).
REPEAT_AFTER = 200


def draw_examples(sample, is_test, split: str, n: int, rng) -> list[Example]:
    """``n`` examples from ``sample(rng)`` that fall in ``split`` (``is_test(example)`` says which),
    distinct prompts while the split's pool lasts."""
    out: list[Example] = []
    seen: set[str] = set()
    repeats = 0
    while len(out) < n:
        example = sample(rng)
        if is_test(example) != (split == "test"):
            continue
        if example.prompt in seen and repeats < REPEAT_AFTER:
            repeats += 1
            continue
        seen.add(example.prompt)
        out.append(example)
        if repeats < REPEAT_AFTER:
            repeats = 0
    return out


def get_task(name: str, **options) -> Task:
    """``"arithmetic"`` (difficulty=1..3, test_fraction), ``"countdown"`` (difficulty=1..2,
    test_fraction), ``"long_arithmetic"`` (difficulty=1..3, test_fraction), ``"jsonl"`` (path=...,
    test_path=... or test_fraction=...)."""
    from .arithmetic import ArithmeticTask
    from .countdown import CountdownTask
    from .jsonl import JsonlTask
    from .long_arithmetic import LongArithmeticTask

    factories = {"arithmetic": ArithmeticTask, "countdown": CountdownTask, "jsonl": JsonlTask,
                 "long_arithmetic": LongArithmeticTask}
    if name not in factories:
        raise ValueError(f"name must be one of {sorted(factories)}, got {name!r}")
    return factories[name](**options)


# --- scoring with a safety net ---------------------------------------------------------------------
#
# Verifiers are our own bounded parsers, so a timeout should never happen; this is the safety net.
# Python cannot kill a thread, and signal.alarm only works on the main thread of the main
# interpreter (the trainer may score from a worker thread). So: one *daemon* worker thread scores the
# batch in order and posts each result on its own queue; the caller waits at most ``timeout_s`` for
# each result. When a wait times out, that response gets reward 0 and is counted, the stuck worker
# is abandoned (a daemon thread never blocks interpreter exit, unlike ThreadPoolExecutor workers,
# which are joined at exit), and a fresh worker carries on with the next response. Cost per batch:
# one thread start plus one queue hand-off per response (tens of microseconds), not a thread per
# response and not a process. A truly stuck verifier keeps burning CPU in the background; that is the
# price of not using processes, acceptable for a net that should never catch anything.


def _score_from(task: Task, responses, examples, start: int, results: queue.Queue) -> None:
    for i in range(start, len(responses)):
        try:
            results.put((i, task.reward(responses[i], examples[i]), None))
        except BaseException as error:  # noqa: BLE001 - any verifier failure is reward 0, counted
            results.put((i, None, error))


def _start_worker(task, responses, examples, start: int) -> queue.Queue:
    results: queue.Queue = queue.Queue()
    worker = threading.Thread(target=_score_from, args=(task, responses, examples, start, results),
                              name="sppo-fast-verifier", daemon=True)
    worker.start()
    return results


def _as_reward(value) -> float | None:
    """Rewards must be exactly 0 or 1; anything else (None, NaN, 0.5, a string) is a verifier error."""
    try:
        reward = float(value)
    except (TypeError, ValueError):
        return None
    return reward if reward in (0.0, 1.0) else None


def score_responses(task: Task, responses: list[str], examples: list[Example],
                    timeout_s: float = 1.0) -> tuple[list[float], dict[str, int]]:
    """Rewards (0.0 or 1.0) for ``responses[i]`` against ``examples[i]``, and counts
    ``{"verifier_errors": ..., "verifier_timeouts": ...}``. A verifier that raises, returns something
    other than 0 or 1, or runs past ``timeout_s`` gives reward 0 and is counted."""
    if len(responses) != len(examples):
        raise ValueError(f"responses and examples must have the same length, "
                         f"got {len(responses)} and {len(examples)}")
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}")
    responses, examples = list(responses), list(examples)
    rewards = [0.0] * len(responses)
    counts = {"verifier_errors": 0, "verifier_timeouts": 0}
    results = _start_worker(task, responses, examples, 0) if responses else None
    for i in range(len(responses)):
        try:
            index, value, error = results.get(timeout=timeout_s)
        except queue.Empty:
            counts["verifier_timeouts"] += 1
            results = _start_worker(task, responses, examples, i + 1)
            continue
        assert index == i, "a worker posts its results in order"
        reward = None if error is not None else _as_reward(value)
        if reward is None:
            counts["verifier_errors"] += 1
        else:
            rewards[i] = reward
    return rewards, counts


__all__ = ["Example", "Task", "get_task", "score_responses", "SPLITS"]
