"""Tasks, verifiers, reward scoring and the local tokenizer of the bundled trainer."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from fractions import Fraction

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sppo_fast.trainer.tasks import Example, Task, get_task, score_responses
from sppo_fast.trainer.tasks.countdown import countdown_reward, parse_prompt
from sppo_fast.trainer.tasks.jsonl import JsonlTask, load_jsonl
from sppo_fast.trainer.tasks.verify import (
    ExpressionError,
    answers_match,
    extract_boxed,
    extract_final_answer,
    final_answer_reward,
    parse_expression,
    parse_number,
)

BUNDLED = [("arithmetic", {"difficulty": 1}), ("arithmetic", {"difficulty": 2}),
           ("arithmetic", {"difficulty": 3}), ("countdown", {"difficulty": 1}),
           ("countdown", {"difficulty": 2})]
BUNDLED_IDS = [f"{name}-{options['difficulty']}" for name, options in BUNDLED]

HOSTILE = [
    "",
    " ",
    "\n\n\n",
    "####",
    "#### ",
    "\\boxed{",
    "\\boxed{}",
    "\\boxed{\\boxed{\\boxed{",
    "#### " + "9" * 10_000,
    "9" * 10_000,
    "#### -" + "9" * 65,
    "#### 1e999999",
    "#### 1e5",
    "#### 10**10**10",
    "#### 9**9**9**9",
    "#### __import__('os').system('rm -rf /')",
    "__import__('os').system('rm -rf /')",
    "#### eval('1+1')",
    "#### (lambda: 13)()",
    "#### " + "(" * 10_000,
    "#### " + "(" * 5_000 + "1" + ")" * 5_000,
    "(" * 100_000,
    "#### " + "1+" * 50_000 + "1",
    "#### ١٣",  # Arabic-Indic digits
    "#### ¹³",
    "#### １３",  # full-width digits
    "#### NaN",
    "#### nan",
    "#### inf",
    "#### -inf",
    "#### Infinity",
    "#### 13/0",
    "#### 0/0",
    "#### \\frac{1}{0}",
    "answer: " + "{" * 1000,
    "#### \x00\x01\x02",
    "#### 13" * 100_000,  # 700 kB on one line: judged on its tail, cheaply
    "\ud800",  # lone surrogate
]


_settings = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def task_of(name, options) -> Task:
    return get_task(name, **options)


# --- bundled tasks: determinism, splits, levels, self-consistency -----------------------------------


@pytest.mark.parametrize(("name", "options"), BUNDLED, ids=BUNDLED_IDS)
def test_examples_are_deterministic_and_seeded(name, options):
    task = task_of(name, options)
    assert task.examples("train", 50, seed=3) == task_of(name, options).examples("train", 50, seed=3)
    assert task.examples("train", 50, seed=3) != task.examples("train", 50, seed=4)
    assert task.examples("train", 20, seed=3) == task.examples("train", 50, seed=3)[:20]
    assert task.examples("test", 0) == []


@pytest.mark.parametrize(("name", "options"), BUNDLED, ids=BUNDLED_IDS)
def test_splits_are_disjoint_whatever_the_seeds(name, options):
    task = task_of(name, options)
    train = {e.prompt for seed in (0, 1) for e in task.examples("train", 1500, seed=seed)}
    test = {e.prompt for seed in (0, 7) for e in task.examples("test", 150, seed=seed)}
    assert train and test
    assert not train & test
    if name == "countdown":  # the same numbers in another order are the same problem
        def problems(prompts):
            return {(tuple(sorted(parse_prompt(p)[0])), parse_prompt(p)[1]) for p in prompts}

        assert not problems(train) & problems(test)


@pytest.mark.parametrize(("name", "options"), BUNDLED, ids=BUNDLED_IDS)
def test_own_solutions_earn_reward_one_and_wrong_answers_zero(name, options):
    task = task_of(name, options)
    examples = task.examples("train", 300) + task.examples("test", 100)
    rewards, counts = score_responses(task, [e.solution for e in examples], examples)
    assert rewards == [1.0] * len(examples)
    assert counts == {"verifier_errors": 0, "verifier_timeouts": 0}
    for example in examples[:100]:
        assert example.solution.endswith(example.answer) and not example.solution.endswith("\n")
        assert example.prompt.endswith("\n") and "\n" not in example.prompt[:-1]
        lines = example.solution.split("\n")
        assert lines[-1] == f"#### {example.answer}"
        assert task.reward(example.solution.rsplit("####", 1)[0] + "#### 1000", example) == 0.0
        assert task.reward(example.solution.rsplit("\n", 1)[0], example) == 0.0  # no answer line


@pytest.mark.parametrize(("name", "options"), BUNDLED, ids=BUNDLED_IDS)
def test_reasoning_lines_are_correct_operations(name, options):
    task = task_of(name, options)
    for example in task.examples("train", 200):
        *steps, _ = example.solution.split("\n")
        for step in steps:
            left, right = step.split("=")
            value, used = parse_expression(left)
            assert len(used) == 2 and value == Fraction(int(right)), step


@pytest.mark.parametrize("difficulty", [1, 2, 3])
def test_arithmetic_levels(difficulty):
    task = get_task("arithmetic", difficulty=difficulty)
    examples = task.examples("train", 400)
    for example in examples:
        value, used = parse_expression(example.prompt)  # an independent parse of the prompt
        assert value == int(example.answer) and 0 <= value <= 200
        assert len(used) == difficulty + 1
        assert example.solution.count("\n") == difficulty  # one reasoning line per operation
    if difficulty == 2:  # the precedence cases both occur
        assert any(e.prompt.index("*") > 1 for e in examples if "*" in e.prompt and "+" in e.prompt)
    if difficulty == 3:
        assert any("(" in e.prompt for e in examples)
    assert task.name == f"arithmetic-{difficulty}"


def test_arithmetic_solution_follows_precedence():
    task = get_task("arithmetic", difficulty=2)
    example = task.make_example(("+", 3, ("*", 5, 2)))
    assert example == Example(prompt="3+5*2\n", answer="13", solution="5*2=10\n3+10=13\n#### 13")
    example = task.make_example(("*", ("-", 9, 4), 2))
    assert example.prompt == "(9-4)*2\n" and example.solution == "9-4=5\n5*2=10\n#### 10"


_TREES = st.recursive(st.integers(0, 60), lambda sub: st.tuples(st.sampled_from("+-*/"), sub, sub),
                      max_leaves=8)


@_settings
@given(_TREES)
def test_render_parses_back_to_the_same_value(tree):
    from sppo_fast.trainer.tasks.arithmetic import operations, render, walk

    try:
        value, ops = walk(tree)
    except ZeroDivisionError:
        return
    parsed, used = parse_expression(render(tree))
    assert parsed == value and len(used) == len(ops) + 1
    assert [op for op, *_ in ops] == [op for op, *_ in operations(tree)]


@pytest.mark.parametrize("difficulty", [1, 2])
def test_countdown_reference_uses_every_number(difficulty):
    task = get_task("countdown", difficulty=difficulty)
    for example in task.examples("train", 200):
        numbers, target = parse_prompt(example.prompt)
        value, used = parse_expression(example.answer)
        assert value == target and Counter(used) == Counter(numbers)
        assert len(numbers) == difficulty + 2


def test_countdown_reward_rules():
    numbers, target = [3, 5, 2], 13
    assert countdown_reward("#### 3+5*2", numbers, target) == 1.0
    assert countdown_reward("5*2=10\n3+10=13\n#### (2*5)+3", numbers, target) == 1.0
    assert countdown_reward("thinking\n 5*2+3 \n", numbers, target) == 1.0  # last line, no marker
    assert countdown_reward("#### 5+5+3", numbers, target) == 0.0  # 5 used twice
    assert countdown_reward("#### 13", numbers, target) == 0.0  # a number not given
    assert countdown_reward("#### 3+5+2", numbers, target) == 0.0  # wrong value
    assert countdown_reward("#### 3+5*2=13", numbers, target) == 0.0  # not an expression
    assert countdown_reward("#### -3+5*2", numbers, target) == 0.0  # no unary operators
    assert countdown_reward("#### 6/4*2", [6, 4, 2], 3) == 1.0  # exact rationals
    assert countdown_reward("#### 2/(4-4)", [2, 4, 4], 0) == 0.0  # division by zero
    assert countdown_reward("#### 3+5", numbers, 8) == 1.0  # each number at most once


@pytest.mark.parametrize("bad", [{"difficulty": 0}, {"difficulty": 4}, {"test_fraction": 0.0},
                                 {"test_fraction": 1.0}])
def test_bad_task_options_raise(bad):
    with pytest.raises(ValueError):
        get_task("arithmetic", **bad)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="name"):
        get_task("chess")
    task = get_task("arithmetic")
    with pytest.raises(ValueError, match="split"):
        task.examples("validation", 3)
    with pytest.raises(ValueError, match="n must"):
        task.examples("train", -1)
    with pytest.raises(ValueError, match="same length"):
        score_responses(task, ["a"], [])
    with pytest.raises(ValueError, match="timeout_s"):
        score_responses(task, [], [], timeout_s=0)


def test_small_pool_allows_repeats_once_exhausted():
    task = get_task("arithmetic", difficulty=1)
    test = task.examples("test", 300)
    assert len(test) == 300 and len({e.prompt for e in test}) < 300


# --- verifiers --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [
    ("a\n#### 42", "42"), ("#### 1\n#### 2\n", "2"), ("#### 7 \nmore text", "7"),
    ("so \\boxed{3/4}.", "3/4"), ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("\\boxed{1} then \\boxed{2}", "2"), ("Answer: 12", "12"), ("the answer is 5\n", "5"),
    ("#### 9\n\\boxed{8}", "9"), ("nothing here", None), ("\\boxed{12", None), ("", None),
])
def test_extract_final_answer(text, expected):
    assert extract_final_answer(text) == expected


def test_extract_boxed_handles_nesting():
    assert extract_boxed("x \\boxed{a{b{c}}d} y") == "a{b{c}}d"


@pytest.mark.parametrize(("text", "value"), [
    ("42", 42), ("+42", 42), (" -7 ", -7), ("1,234", 1234), ("1,234,567.50", Fraction(123456750, 100)),
    ("13.0", 13), ("13.", 13), ("0.5", Fraction(1, 2)), (".5", Fraction(1, 2)), ("3/4", Fraction(3, 4)),
    ("6/8", Fraction(3, 4)), ("\\frac{3}{4}", Fraction(3, 4)), ("-\\dfrac{1}{2}", Fraction(-1, 2)),
    ("$18", 18), ("$13$", 13), ("\\boxed{5}", 5),
    ("1e5", None), ("nan", None), ("inf", None), ("1/0", None), ("1,23", None), ("12a", None),
    ("١٣", None), ("１３", None), ("9" * 65, None), ("9" * 64, int("9" * 64)), ("--1", None),
    ("", None), ("0x1F", None), ("1_000", None),
])
def test_parse_number(text, value):
    assert parse_number(text) == value


@pytest.mark.parametrize(("predicted", "reference", "match"), [
    ("13", "13", True), ("13.00", "13", True), ("+13", "13", True), ("1,300", "1300", True),
    ("0.75", "3/4", True), ("\\frac{3}{4}", "0.75", True), ("12", "13", False), ("13", "-13", False),
    ("0.3333333", "1/3", False), ("Paris", "paris", True), (" New  York ", "new york", True),
    ("13", "thirteen", False), ("", "13", False), (None, "13", False),
])
def test_answers_match(predicted, reference, match):
    assert answers_match(predicted, reference) is match


@pytest.mark.parametrize("response", HOSTILE, ids=range(len(HOSTILE)))
@pytest.mark.parametrize(("name", "options"), BUNDLED[1:4:2], ids=["arithmetic-2", "countdown-1"])
def test_hostile_responses_score_zero_without_raising(response, name, options):
    task = task_of(name, options)
    example = task.examples("train", 1)[0]
    assert task.reward(response, example) == 0.0
    rewards, counts = score_responses(task, [response], [example])
    assert rewards == [0.0] and counts == {"verifier_errors": 0, "verifier_timeouts": 0}


@pytest.mark.parametrize("response", HOSTILE, ids=range(len(HOSTILE)))
def test_hostile_responses_against_hostile_references(response):
    # Even a reference equal to the hostile text never gives 1 for a non-number and never raises.
    for reference in ("13", "9" * 10_000, "1e999999", "nan"):
        assert final_answer_reward(response, reference) in (0.0, 1.0)
    assert final_answer_reward(response, "9" * 10_000) == 0.0


def test_hostile_responses_are_cheap():
    task = get_task("countdown")
    example = task.examples("train", 1)[0]
    start = time.perf_counter()
    for response in HOSTILE:
        task.reward(response, example)
    assert time.perf_counter() - start < 2.0  # generous: about 10 ms in practice


@pytest.mark.parametrize("text", ["(" * 40 + "1" + ")" * 40, "1+" * 150 + "1", "9" * 65, "1 2", "()",
                                  "1+", "import os", "2**3", "1;2", "x"])
def test_parse_expression_rejects(text):
    with pytest.raises(ExpressionError):
        parse_expression(text)


def test_parse_expression_values():
    assert parse_expression("(3 + 5) * 2 - 4 / 8") == (Fraction(31, 2), [3, 5, 2, 4, 8])
    assert parse_expression("8-3-2")[0] == 3  # left-associative
    assert parse_expression("8/4/2")[0] == 1
    assert parse_expression("(" * 32 + "7" + ")" * 32)[0] == 7  # nesting up to the limit is fine


@_settings
@given(st.text(max_size=300))
def test_verifiers_on_random_text_never_raise(text):
    for reference in ("13", "3/4", "paris"):
        assert final_answer_reward(text, reference) in (0.0, 1.0)
        assert final_answer_reward("#### " + text, reference) in (0.0, 1.0)
    assert countdown_reward(text, [3, 5, 2], 13) in (0.0, 1.0)
    assert countdown_reward("#### " + text, [3, 5, 2], 13) in (0.0, 1.0)


_ARITH_TEXT = st.text(alphabet="0123456789+-*/() .,#\n\\boxed{}answer:", max_size=80)


@_settings
@given(_ARITH_TEXT)
def test_verifiers_on_arithmetic_like_text_never_raise(text):
    assert final_answer_reward(text, "13") in (0.0, 1.0)
    assert countdown_reward(text, [3, 5, 2], 13) in (0.0, 1.0)
    try:
        parse_expression(text)
    except ExpressionError:
        pass


@_settings
@given(st.integers(-10**30, 10**30), st.integers(1, 10**6))
def test_numbers_round_trip(numerator, denominator):
    value = Fraction(numerator, denominator)
    canonical = f"{value.numerator}/{value.denominator}"
    assert final_answer_reward(f"#### {numerator}/{denominator}", canonical) == 1.0
    assert final_answer_reward(f"#### {numerator:,}", str(numerator)) == 1.0
    assert final_answer_reward(f"#### {numerator + 1}", str(numerator)) == 0.0


# --- scoring helper: errors and timeouts are counted ------------------------------------------------


class ScriptedTask:
    """A task whose verifier does what the response says: raise, sleep, spin, or return a value."""

    name = "scripted"

    def examples(self, split, n, seed=0):
        return [Example(prompt="p\n", answer="1", solution="#### 1")] * n

    def reward(self, response, example):
        if response == "raise":
            raise RuntimeError("verifier bug")
        if response == "sleep":
            time.sleep(0.5)
        if response == "spin":  # a pure-Python loop: the timeout must still fire
            deadline = time.perf_counter() + 0.5
            while time.perf_counter() < deadline:
                pass
        if response == "half":
            return 0.5
        if response == "none":
            return None
        return 1.0 if response == "good" else 0.0


def test_score_responses_counts_errors_and_timeouts():
    task = ScriptedTask()
    responses = ["good", "raise", "sleep", "good", "spin", "bad", "half", "none", "good"]
    examples = task.examples("train", len(responses))
    start = time.perf_counter()
    rewards, counts = score_responses(task, responses, examples, timeout_s=0.05)
    assert time.perf_counter() - start < 0.45  # did not wait for the stuck verifiers
    assert rewards == [1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0]
    assert counts == {"verifier_errors": 3, "verifier_timeouts": 2}


def test_score_responses_from_a_worker_thread():
    task = ScriptedTask()
    out = {}

    def run():
        out["result"] = score_responses(task, ["good", "sleep", "good"], task.examples("train", 3),
                                        timeout_s=0.05)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(5)
    assert out["result"] == ([1.0, 0.0, 1.0], {"verifier_errors": 0, "verifier_timeouts": 1})


def test_score_responses_empty_batch():
    assert score_responses(ScriptedTask(), [], []) == ([], {"verifier_errors": 0, "verifier_timeouts": 0})


# --- JSONL ------------------------------------------------------------------------------------------


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


GSM8K_ROWS = [
    {"question": "Tom has 3 apples and buys 4 more. How many?", "answer": "3+4 = <<3+4=7>>7\n#### 7"},
    {"prompt": "What is 1,000 + 234?", "answer": "1000+234=1234\n#### 1,234"},
    {"prompt": "Half of 3/2?\n", "answer": "The result is \\boxed{\\frac{3}{4}}"},
    {"prompt": "Capital of France?", "answer": "Paris"},
    {"prompt": "Two times 21?", "answer": 42, "solution": "2*21=42\n#### 42"},
]


def test_jsonl_loading_and_answers(tmp_path):
    examples = load_jsonl(write_jsonl(tmp_path / "data.jsonl", GSM8K_ROWS))
    assert [e.answer for e in examples] == ["7", "1,234", "\\frac{3}{4}", "Paris", "42"]
    assert examples[0].prompt == "Tom has 3 apples and buys 4 more. How many?\n"
    assert examples[0].solution == "3+4 = <<3+4=7>>7\n#### 7"
    assert examples[2].prompt == "Half of 3/2?\n" and examples[2].solution == "#### \\frac{3}{4}"
    assert examples[4].solution == "2*21=42\n#### 42"
    task = JsonlTask(tmp_path / "data.jsonl", test_path=write_jsonl(tmp_path / "t.jsonl", GSM8K_ROWS[:1]))
    reward = task.reward
    assert reward("so\n#### 7", examples[0]) == 1.0 and reward("#### 8", examples[0]) == 0.0
    assert reward("#### 1234", examples[1]) == 1.0 and reward("\\boxed{1,234}", examples[1]) == 1.0
    assert reward("the answer is 0.75", examples[2]) == 1.0 and reward("\\boxed{3/5}", examples[2]) == 0.0
    assert reward("Answer: paris.", examples[3]) == 1.0 and reward("#### Lyon", examples[3]) == 0.0
    assert reward("#### 42.0", examples[4]) == 1.0


def test_jsonl_splits(tmp_path):
    rows = [{"prompt": f"q{i}", "answer": str(i)} for i in range(400)]
    task = get_task("jsonl", path=write_jsonl(tmp_path / "d.jsonl", rows), test_fraction=0.25)
    train, test = task.examples("train", 300, seed=1), task.examples("test", 100, seed=1)
    assert not {e.prompt for e in train} & {e.prompt for e in test}
    assert len(task.pools["train"]) + len(task.pools["test"]) == 400
    assert 60 < len(task.pools["test"]) < 140
    assert task.examples("train", 300, seed=1) == train != task.examples("train", 300, seed=2)
    assert len(task.examples("test", 1000)) == 1000  # reshuffled passes over a small split
    with_test = get_task("jsonl", path=tmp_path / "d.jsonl",
                         test_path=write_jsonl(tmp_path / "t.jsonl", rows[:10]))
    assert len(with_test.pools["train"]) == 390 and len(with_test.pools["test"]) == 10


@pytest.mark.parametrize(("content", "message"), [
    ("", "no examples"), ("{not json}\n", ":1: not valid JSON"), ('{"prompt": "x"}\n', "missing 'answer'"),
    ('{"answer": "1"}\n', "missing 'prompt'"), ('[1, 2]\n', "JSON object"),
    ('{"prompt": "x", "answer": [1]}\n', "'answer' must be"), ('{"prompt": "x", "answer": " "}\n', "empty"),
])
def test_jsonl_bad_input(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        load_jsonl(path)


# --- tokenizer --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    from sppo_fast.trainer.tokenizer import build_tokenizer

    return build_tokenizer()


def test_tokenizer_ids_are_fixed(tokenizer):
    assert len(tokenizer) == 100
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id,
            tokenizer.unk_token_id) == (0, 1, 2, 3)
    assert tokenizer.convert_tokens_to_ids(["\n", " ", "0", "~"]) == [4, 5, 5 + ord("0") - 32, 99]


def test_tokenizer_round_trip(tokenizer):
    task = get_task("arithmetic", difficulty=3)
    texts = [e.prompt + e.solution for e in task.examples("train", 20)]
    texts += ["".join(chr(c) for c in range(32, 127)) + "\n", "  a  b \n\n c ", "#### 13", ""]
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        assert ids[0] == tokenizer.bos_token_id and len(ids) == len(text) + 1  # one token per char
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
        assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text
    assert tokenizer("é\t", add_special_tokens=False)["input_ids"] == [3, 3]


def test_tokenizer_newline_is_one_boundary_token(tokenizer):
    import sppo_fast

    assert sppo_fast.newline_token_ids(tokenizer) == [tokenizer.convert_tokens_to_ids("\n")] == [4]


def test_tokenizer_save_and_load(tokenizer, tmp_path):
    from transformers import AutoTokenizer

    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "3+5*2\n5*2=10\n3+10=13\n#### 13"
    assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert loaded.decode(loaded(text)["input_ids"], skip_special_tokens=True) == text
    assert (loaded.eos_token_id, loaded.pad_token_id, loaded.padding_side) == (2, 0, "left")


def test_solution_lines_are_segments(tokenizer):
    import torch

    import sppo_fast

    example = get_task("arithmetic", difficulty=3).examples("train", 1)[0]
    ids = tokenizer(example.solution, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    tokens = torch.tensor([ids])
    segments = sppo_fast.segment_ids(tokens, sppo_fast.newline_token_ids(tokenizer))
    assert segments.max().item() == example.solution.count("\n")  # each step, then answer line + EOS
    assert segments[0, -1].item() == segments[0, -len("#### " + example.answer) - 1].item()
