"""Bad input to `sppo-fast train` and `sppo-fast compare` (issue 20): each mistake exits 2 with one line
`sppo-fast train: error: ...` naming the field or file, no traceback, and nothing written or overwritten;
the same classes of bad value are then tried on every field of the config table. In process (the CLI's
`train_main`), with tiny models where a run is needed, so the file takes seconds."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest
from test_trainer import TINY as TRAINER_TINY  # noqa: E402  (tests/ is on the path)

from sppo_fast.trainer import compare as cmp
from sppo_fast.trainer.cli import config_from_args, train_main, train_parser
from sppo_fast.trainer.config import (
    TASK_LEVELS,
    TrainConfig,
    UserError,
    describe_field,
    field_types,
    optional_fields,
)

TINY = dict(TRAINER_TINY, steps=1)


def flags(**values) -> list[str]:
    out = []
    for k, v in values.items():
        out += [f"--{k}", str(v).lower() if isinstance(v, bool) else str(v)]
    return out


def tiny_flags(tmp_path, **kw) -> list[str]:
    return flags(**{**TINY, "out": str(tmp_path / "run"), "cache_dir": str(tmp_path / "cache"), **kw})


def user_error(capsys, argv, *needles, prog=train_main, name="sppo-fast train") -> str:
    """Run the command in process: exit code 2, exactly one line on stderr naming every needle, no
    traceback. Returns the line."""
    rc = prog(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2, (rc, err)
    assert len(lines) == 1, err
    assert lines[0].startswith(f"{name}: error: "), lines[0]
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def snapshot(path) -> dict:
    """Every file under `path` with its bytes (to show nothing was written or overwritten)."""
    out = {}
    for root, _, files in os.walk(path):
        for name in files:
            full = os.path.join(root, name)
            with open(full, "rb") as f:
                out[os.path.relpath(full, path)] = f.read()
    return out


@pytest.fixture
def finished_run(tmp_path):
    """A finished 1-step tiny run (config.json, metrics.jsonl, summary.json, checkpoint/)."""
    assert train_main(tiny_flags(tmp_path)) == 0
    return tmp_path / "run"


# --- the findings of issue 20, one test each ------------------------------------------------------------

def test_out_holding_a_finished_run_is_refused_and_kept(tmp_path, capsys, finished_run):
    before = snapshot(finished_run)
    assert {"summary.json", "metrics.jsonl", "config.json", "checkpoint/policy.safetensors"} <= set(before)
    capsys.readouterr()
    line = user_error(capsys, tiny_flags(tmp_path, lr=1e-3), "out:", "finished run", "--resume", "--overwrite")
    assert str(finished_run) in line
    assert snapshot(finished_run) == before, "nothing may be overwritten"


def test_out_holding_a_started_run_is_refused(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(dataclasses.asdict(TrainConfig(**TINY))))
    (run / "metrics.jsonl").write_text('{"step": 0, "eval_accuracy": 0.5}\n')
    before = snapshot(run)
    user_error(capsys, tiny_flags(tmp_path), "started run", "--resume", "--overwrite")
    assert snapshot(run) == before


def test_overwrite_replaces_the_run(tmp_path, capsys, finished_run):
    (finished_run / "accuracy.png").write_bytes(b"old plot")
    (finished_run / "notes.txt").write_text("mine")  # not a run file: kept
    assert train_main(tiny_flags(tmp_path, steps=2, save_every=0) + ["--overwrite"]) == 0
    summary = json.loads((finished_run / "summary.json").read_text())
    assert summary["steps"] == 2
    rows = [json.loads(x) for x in (finished_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert (finished_run / "notes.txt").read_text() == "mine"
    assert (finished_run / "accuracy.png").read_bytes() != b"old plot"


def test_overwrite_with_bad_input_deletes_nothing(tmp_path, capsys, finished_run):
    before = snapshot(finished_run)
    capsys.readouterr()
    user_error(capsys, tiny_flags(tmp_path, task="jsonl", task_path=tmp_path / "missing.jsonl", task_difficulty=0)
               + ["--overwrite"], "task_path:", "missing.jsonl")
    assert snapshot(finished_run) == before


def test_resume_and_overwrite_together_are_refused(tmp_path, capsys, finished_run):
    capsys.readouterr()
    user_error(capsys, ["--resume", str(finished_run), "--overwrite"], "--resume", "--overwrite")


def test_negative_sft_steps(tmp_path, capsys):
    user_error(capsys, tiny_flags(tmp_path, warm_start=True, sft_steps=-5), "sft_steps:", "integer >= 1", "-5")
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()


def test_eval_every_zero(tmp_path, capsys):
    user_error(capsys, tiny_flags(tmp_path, warm_start=True, eval_every=0), "eval_every:", "integer >= 1")
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()


def test_yaml_lr_that_is_not_a_number(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text('lr: "abc"\n')
    user_error(capsys, ["--config", str(path), "--out", str(tmp_path / "run")], "lr:", "a number", "'abc'")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("text, expected", [('"false"', False), ("false", False), ('"true"', True),
                                            ("no", False), ('"off"', False), ("1", True)])
def test_yaml_warm_start_string_false_means_false(tmp_path, text, expected):
    path = tmp_path / "c.yaml"
    path.write_text(f"warm_start: {text}\n")
    cfg, _ = config_from_args(["--config", str(path)])
    assert cfg.warm_start is expected


def test_yaml_warm_start_that_is_not_a_boolean(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text('warm_start: "sometimes"\n')
    user_error(capsys, ["--config", str(path)], "warm_start:", "true or false", "sometimes")


def test_device_tpu_is_refused(tmp_path, capsys):
    user_error(capsys, tiny_flags(tmp_path, device="tpu"), "device:", "auto, cpu, cuda", "tpu")
    assert not (tmp_path / "run").exists()


def test_device_cuda_without_a_gpu(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    user_error(capsys, tiny_flags(tmp_path, device="cuda"), "device:", "cuda", "--device cpu")
    assert not (tmp_path / "run").exists()


def test_compare_set_with_a_bad_value(tmp_path, capsys):
    user_error(capsys, ["--set", "lr=abc", "--out", str(tmp_path / "cmp")], "--set lr=abc", "lr:", "a number",
               prog=cmp.main, name="sppo-fast compare")
    user_error(capsys, ["--set", "grpo.warm_start=perhaps", "--out", str(tmp_path / "cmp")], "warm_start:",
               "true or false", prog=cmp.main, name="sppo-fast compare")
    assert not (tmp_path / "cmp").exists()


def test_compare_out_holding_a_comparison_is_refused(tmp_path, capsys):
    out = tmp_path / "cmp"
    (out / "runs" / "sppo-seed0").mkdir(parents=True)
    (out / "compare.md").write_text("# an earlier comparison\n")
    before = snapshot(out)
    user_error(capsys, ["--algos", "sppo", "--seeds", "0", "--out", str(out)], "out:", "--reuse", "--overwrite",
               prog=cmp.main, name="sppo-fast compare")
    assert snapshot(out) == before


def test_model_directory_that_does_not_exist(tmp_path, capsys):
    missing = tmp_path / "no-such-model"
    user_error(capsys, tiny_flags(tmp_path, model=missing), "model:", str(missing), "does not exist",
               "never downloads")
    assert not missing.exists() and not (tmp_path / "run").exists()


def test_empty_model_directory_says_what_a_model_directory_needs(tmp_path, capsys):
    empty = tmp_path / "empty-model"
    empty.mkdir()
    user_error(capsys, tiny_flags(tmp_path, model=empty), "model:", "config.json", "weights", "tokenizer")
    (empty / "config.json").write_text("{}")
    line = user_error(capsys, tiny_flags(tmp_path, model=empty), "model:", "lacks weights, tokenizer files")
    assert "lacks config.json" not in line
    assert os.listdir(empty) == ["config.json"] and not (tmp_path / "run").exists()


def test_model_directory_with_a_broken_config(tmp_path, capsys):
    from sppo_fast.trainer.tokenizer import build_tokenizer

    model = tmp_path / "broken-model"
    build_tokenizer().save_pretrained(model)
    (model / "config.json").write_text("{not json")
    (model / "model.safetensors").write_bytes(b"")
    user_error(capsys, tiny_flags(tmp_path, model=model), "model:", "cannot load", str(model))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("make, needles", [
    (lambda p: None, ("cannot read", "missing.yaml")),
    (lambda p: p.write_text("steps: [1, 2\n"), ("not valid YAML", "line")),
    (lambda p: p.write_text("- 1\n- 2\n"), ("expected a mapping",)),
    (lambda p: p.write_text("bogus_field: 3\n"), ("unknown field", "bogus_field")),
    (lambda p: p.write_bytes(b"\xff\xfe\x00steps"), ("cannot read",)),
], ids=["missing", "invalid-yaml", "not-a-mapping", "unknown-field", "not-text"])
def test_config_file_errors(tmp_path, capsys, make, needles):
    path = tmp_path / "missing.yaml"
    make(path)
    user_error(capsys, ["--config", str(path), "--out", str(tmp_path / "run")], *needles)
    assert not (tmp_path / "run").exists()


def test_invalid_json_config_file(tmp_path, capsys):
    path = tmp_path / "c.json"
    path.write_text('{"steps": 3,}')
    user_error(capsys, ["--config", str(path)], "config:", "not valid JSON", "line 1")


@pytest.mark.parametrize("content, needles", [
    (None, ("task_path:", "No such file")),
    ("", ("task_path:", "no examples")),
    ('{"prompt": "1+1", "answer": "2"}\n{"prompt": "2+2", \n', ("task_path:", ":2:", "not valid JSON")),
    ('{"prompt": "1+1"}\n', ("task_path:", ":1:", "missing 'answer'")),
    ('[1, 2]\n', ("task_path:", "expected a JSON object")),
    ('{"prompt": ["a"], "answer": "2"}\n', ("task_path:", "'prompt' must be a string")),
    ('{"prompt": "1+1", "answer": ""}\n', ("task_path:", "empty answer")),
], ids=["missing", "empty", "bad-json", "no-answer", "not-an-object", "prompt-not-text", "empty-answer"])
def test_every_jsonl_task_error(tmp_path, capsys, content, needles):
    path = tmp_path / "data.jsonl"
    if content is not None:
        path.write_text(content)
    user_error(capsys, tiny_flags(tmp_path, task="jsonl", task_path=path, task_difficulty=0), *needles)
    assert not (tmp_path / "run").exists()


def test_jsonl_task_needs_its_path_and_only_it_reads_one(tmp_path, capsys):
    user_error(capsys, tiny_flags(tmp_path, task="jsonl", task_difficulty=0), "task_path:", "--task jsonl")
    user_error(capsys, tiny_flags(tmp_path, task_path=tmp_path / "x.jsonl"), "task_path:", "only read by")


def test_resume_of_a_directory_that_does_not_exist_creates_nothing(tmp_path, capsys):
    missing = tmp_path / "nope"
    user_error(capsys, ["--resume", str(missing)], "resume:", str(missing), "does not exist")
    assert not missing.exists()
    user_error(capsys, ["--resume", "--out", str(missing)], "resume:", "does not exist")
    assert not missing.exists()


def test_resume_errors(tmp_path, capsys):
    user_error(capsys, ["--resume"], "resume:", "RUN_DIR")
    (tmp_path / "empty").mkdir()
    user_error(capsys, ["--resume", str(tmp_path / "empty")], "resume:", "no config.json")
    assert os.listdir(tmp_path / "empty") == []
    (tmp_path / "file").write_text("x")
    user_error(capsys, ["--resume", str(tmp_path / "file")], "resume:", "not a directory")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{oops")
    user_error(capsys, ["--resume", str(bad)], "resume:", "config.json", "damaged")


def test_resume_with_another_out_is_refused(tmp_path, capsys, finished_run):
    capsys.readouterr()
    user_error(capsys, ["--resume", str(finished_run), "--out", str(tmp_path / "other")], "resume:", "--out")
    assert not (tmp_path / "other").exists()


@pytest.mark.parametrize("name", ["state.pt", "policy.safetensors", "critic.safetensors"])
def test_truncated_checkpoint_file_is_named_and_called_damaged(tmp_path, capsys, finished_run, name):
    path = finished_run / "checkpoint" / name
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    before = snapshot(finished_run)
    capsys.readouterr()
    user_error(capsys, ["--resume", str(finished_run), "--steps", "3"], "resume:", name, "damaged")
    assert snapshot(finished_run) == before


def test_missing_checkpoint_state_is_damaged_not_a_fresh_start(tmp_path, capsys, finished_run):
    os.remove(finished_run / "checkpoint" / "state.pt")
    before = snapshot(finished_run)
    capsys.readouterr()
    user_error(capsys, ["--resume", str(finished_run), "--steps", "3"], "resume:", "state.pt", "damaged")
    assert snapshot(finished_run) == before


def test_resume_with_changed_model_fields_names_the_mismatch(tmp_path, capsys, finished_run):
    before = snapshot(finished_run)
    capsys.readouterr()
    user_error(capsys, ["--resume", str(finished_run), "--steps", "3", "--hidden_size", "64"], "resume:",
               "policy.safetensors", "does not fit", "(32, 32) saved, (64, 64) now")
    assert snapshot(finished_run) == before


def test_unwritable_out(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    user_error(capsys, tiny_flags(tmp_path, out=blocker / "run"), "out:", "cannot write", str(blocker / "run"))
    user_error(capsys, tiny_flags(tmp_path, out=blocker), "out:", "not a directory")
    assert blocker.read_text() == "x"


def test_unwritable_warm_start_cache(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    user_error(capsys, tiny_flags(tmp_path, warm_start=True, sft_steps=2, cache_dir=blocker / "cache"),
               "cache_dir:", "cannot write", str(blocker / "cache"))
    assert blocker.read_text() == "x" and not (tmp_path / "run").exists()


def test_resume_with_another_algo_is_refused(tmp_path, capsys, finished_run):
    before = snapshot(finished_run)
    capsys.readouterr()
    user_error(capsys, ["--resume", str(finished_run), "--algo", "grpo", "--samples_per_prompt", "2"],
               "resume:", "sppo run", "--algo grpo")
    assert snapshot(finished_run) == before
    config = tmp_path / "c.yaml"
    config.write_text("algo: rloo\n")
    user_error(capsys, ["--resume", str(finished_run), "--config", str(config)], "resume:", "rloo")
    assert snapshot(finished_run) == before


@pytest.mark.parametrize("argv, needle", [
    (["--bogus", "1"], "unrecognized arguments: --bogus"), (["--steps"], "--steps"),
    (["--resume", "a", "b"], "unrecognized arguments"),
])
def test_argparse_errors_are_one_line(capsys, argv, needle):
    user_error(capsys, argv, needle, "--help")


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(UserError, match="sft_steps"):
        train_main(tiny_flags(tmp_path, sft_steps=-5) + ["--debug"])


def test_the_installed_command_prints_one_line_and_exits_2(tmp_path):
    """The real entry point in a fresh process: exit status 2 and one line on stderr, no traceback."""
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "sppo_fast.cli", "train", "--sft_steps", "-5", "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "sppo-fast train: error: sft_steps: expected an integer >= 1, got '-5'"]
    assert proc.stdout == "" and not out.exists()


# --- the same classes of bad value on every field of the table -------------------------------------------

FIELDS = [f.name for f in dataclasses.fields(TrainConfig)]
TYPES = field_types()
OPTIONAL = optional_fields()
META = {f.name: f.metadata for f in dataclasses.fields(TrainConfig)}


def bad_values(name) -> list:
    """(label, text) of values the field must refuse: the wrong type, out of its range, non-finite."""
    tp, m = TYPES[name], META[name]
    if "choices" in m:
        return [("not-a-choice", "no-such-" + name), ("wrong-case", m["choices"][0].upper() + "X")]
    if tp is bool:
        return [("not-a-bool", "maybe"), ("number", "2")]
    if tp is str:
        return [("empty-path", "")]
    out = [("not-a-number", "abc"), ("words", "ten")]
    if tp is int:
        out.append(("fraction", "1.5"))
    else:
        out += [("nan", "nan"), ("inf", "inf")]
    if "min" in m:
        out.append(("below-min", str(m["min"] - 1)))
    if "gt" in m:
        out.append(("at-exclusive-min", str(m["gt"])))
    if "max" in m:
        out.append(("above-max", str(m["max"] + 1)))
    if name not in OPTIONAL:
        out.append(("none", "none") if tp in (int, float) else ("none", None))
    return [v for v in out if v[1] is not None]


CASES = [(name, label, text) for name in FIELDS for label, text in bad_values(name)]


def test_every_field_has_cases_and_a_description_in_help():
    assert {name for name, _, _ in CASES} == set(FIELDS)
    help_text = " ".join(train_parser().format_help().split())
    for name in FIELDS:
        assert " ".join(describe_field(name).split()) in help_text, name


@pytest.mark.parametrize("name, label, text", CASES, ids=[f"{n}-{lab}" for n, lab, _ in CASES])
def test_every_field_refuses_bad_values_as_a_flag(tmp_path, capsys, name, label, text):
    argv = [f"--{name}", text] + ([] if name == "out" else ["--out", str(tmp_path / "run")])
    line = user_error(capsys, argv, f"{name}:", describe_field(name))
    assert "Traceback" not in line
    assert not (tmp_path / "run").exists()


def yaml_bad_values(name) -> list:
    """Values a YAML/JSON file can hold that flags cannot: a list, a mapping, a boolean for a number, a number
    for a string, null for a field without None."""
    tp = TYPES[name]
    out = [("list", [1, 2]), ("mapping", {"a": 1})]
    if tp in (int, float):
        out.append(("bool", True))
    if tp is str:
        out.append(("number", 5))
    if tp is bool:
        out.append(("float", 0.5))
    if name not in OPTIONAL:
        out.append(("null", None))
    return out


YAML_CASES = [(name, label, value) for name in FIELDS for label, value in yaml_bad_values(name)]


@pytest.mark.parametrize("name, label, value", YAML_CASES, ids=[f"{n}-{lab}" for n, lab, _ in YAML_CASES])
def test_every_field_refuses_bad_values_in_a_config_file(tmp_path, capsys, name, label, value):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({name: value}))
    argv = ["--config", str(path)] + ([] if name == "out" else ["--out", str(tmp_path / "run")])
    user_error(capsys, argv, f"{name}:", describe_field(name))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name", FIELDS)
def test_every_field_accepts_its_default_written_as_text(name):
    """The other side of the refusals: the table parses what it prints (`none` for None)."""
    default = dataclasses.fields(TrainConfig)[FIELDS.index(name)].default
    text = "none" if default is None else (str(default).lower() if isinstance(default, bool) else str(default))
    cfg, _ = config_from_args([f"--{name}", text])
    assert getattr(cfg, name) == getattr(TrainConfig(), name)


def test_task_levels_are_the_tasks_own():
    from sppo_fast.trainer.tasks import arithmetic, long_arithmetic

    assert TASK_LEVELS == {"arithmetic": tuple(sorted(arithmetic.LEVELS)),
                           "long_arithmetic": tuple(sorted(long_arithmetic.LEVELS))}


def test_library_resume_with_another_algo_is_refused(tmp_path, finished_run):
    """train(cfg, resume=True) itself checks the run's algorithm (not only the command line)."""
    from sppo_fast.trainer.loop import train

    before = snapshot(finished_run)
    cfg = TrainConfig(**{**TINY, "algo": "rloo", "samples_per_prompt": 2, "out": str(finished_run),
                         "cache_dir": str(tmp_path / "cache")})
    with pytest.raises(UserError, match="is a sppo run; algo rloo"):
        train(cfg, resume=True)
    with pytest.raises(UserError, match="already holds a finished run"):
        train(cfg)
    assert snapshot(finished_run) == before
