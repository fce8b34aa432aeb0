"""Problems from JSON Lines files: one ``{"prompt": ..., "answer": ...}`` object per line.

``question`` is accepted for ``prompt`` (GSM8K's own files). The reference answer is taken from the
``answer`` field: the text after its last ``####`` (GSM8K: the field holds the worked solution and
``#### 72``), else the content of its last ``\\boxed{}``, else the whole field. The worked solution is
the ``solution`` field when present, else the ``answer`` field when it holds reasoning and a ``####``
line, else just ``#### <answer>``. A prompt that does not end in a newline gets one, so the response
starts on its own line like the bundled tasks.

Splits: ``test_path`` gives the test split (train prompts that also occur in it are dropped); without
it a stable hash of the prompt sends ``test_fraction`` of the rows to the test split.
"""

from __future__ import annotations

import json
import os
import random

from . import Example, check_count, check_split, held_out
from .verify import ANSWER_MARKER, extract_boxed, extract_marked, final_answer_reward


def reference_answer(answer_field: str) -> str:
    for extract in (extract_marked, extract_boxed):
        found = extract(answer_field)
        if found is not None:
            return found
    return answer_field.strip()


def _text_field(row: dict, keys: tuple[str, ...], where: str) -> str:
    for key in keys:
        if key in row:
            value = row[key]
            if isinstance(value, bool) or not isinstance(value, (str, int, float)):
                raise ValueError(f"{where}: {key!r} must be a string or a number, got {type(value).__name__}")
            return str(value)
    raise ValueError(f"{where}: missing {' or '.join(map(repr, keys))}")


def example_from_row(row: dict, where: str = "row") -> Example:
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
    prompt = _text_field(row, ("prompt", "question"), where)
    answer_field = _text_field(row, ("answer",), where)
    answer = reference_answer(answer_field)
    if not answer:
        raise ValueError(f"{where}: empty answer")
    if "solution" in row:
        solution = _text_field(row, ("solution",), where).rstrip()
    elif extract_marked(answer_field) is not None:
        solution = answer_field.rstrip()
    else:
        solution = f"{ANSWER_MARKER} {answer}"
    if not prompt.endswith("\n"):
        prompt += "\n"
    return Example(prompt=prompt, answer=answer, solution=solution)


def load_jsonl(path: str | os.PathLike) -> list[Example]:
    """Every non-blank line of ``path`` as an Example; ValueError naming the line on bad input."""
    examples = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{where}: not valid JSON ({error.msg})") from None
            examples.append(example_from_row(row, where))
    if not examples:
        raise ValueError(f"path {path} holds no examples")
    return examples


class JsonlTask:
    def __init__(self, path: str | os.PathLike, test_path: str | os.PathLike | None = None,
                 test_fraction: float = 0.1, name: str | None = None):
        rows = load_jsonl(path)
        if test_path is not None:
            test = load_jsonl(test_path)
            test_prompts = {example.prompt for example in test}
            train = [example for example in rows if example.prompt not in test_prompts]
        else:
            if not 0.0 < test_fraction < 1.0:
                raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
            test = [example for example in rows if held_out(example.prompt, test_fraction, salt="jsonl")]
            train = [example for example in rows if not held_out(example.prompt, test_fraction, salt="jsonl")]
        self.pools = {"train": train, "test": test}
        self.name = name or f"jsonl:{os.path.basename(os.fspath(path))}"

    def examples(self, split: str, n: int, seed: int = 0) -> list[Example]:
        """``n`` examples drawn without replacement from a seeded shuffle; reshuffled passes if ``n``
        exceeds the split's size."""
        pool = self.pools[check_split(split)]
        check_count(n)
        if n and not pool:
            raise ValueError(f"split {split!r} of task {self.name} is empty")
        rng = random.Random(f"{self.name}:{split}:{seed}")
        out: list[Example] = []
        while len(out) < n:
            order = pool[:]
            rng.shuffle(order)
            out.extend(order[: n - len(out)])
        return out

    def reward(self, response: str, example: Example) -> float:
        return final_answer_reward(response, example.answer)
