"""`sppo-fast compare`: bad input refused before anything runs, a tiny real comparison (two algorithms x
two seeds in subprocesses, one of them made to crash), and the aggregation and time-to-reach arithmetic
on hand-made curves."""

from __future__ import annotations

import json
import math
import os

import pytest

from sppo_fast.trainer import compare as cmp

# Tiny runs: hidden 32, 2 layers, difficulty 1, 2 RL steps, no warm start: seconds each.
TINY = ["warm_start=false", "hidden_size=32", "num_layers=2", "num_heads=2", "critic_hidden_size=16",
        "critic_layers=1", "critic_heads=2", "max_new_tokens=8", "eval_examples=4", "eval_every=1",
        "task_difficulty=1", "mini_batches=1", "critic_warmup_steps=0"]


@pytest.mark.parametrize("algos, seeds, message", [
    (["sppo", "nope"], [0], "unknown 'nope'"),
    ([], [0], "at least one algorithm"),
    (["sppo"], [], "at least one seed"),
    (["sppo", "sppo"], [0], "each algorithm once"),
    (["sppo"], [1, 1], "each seed once"),
])
def test_bad_algorithms_or_seeds_are_refused_before_anything_runs(tmp_path, algos, seeds, message):
    out = tmp_path / "cmp"
    with pytest.raises(ValueError, match=message):
        cmp.compare(algos, seeds, str(out), steps=1, prompts_per_step=2, jobs=1, log=lambda m: None)
    assert not out.exists(), "nothing may run (or be written) for bad input"


@pytest.mark.parametrize("override, message", [
    ("lr", "key=value"), ("nope.lr=1", "unknown algorithm 'nope'"), ("seed=3", "not a settable field"),
    ("grpo.learning_rate=1", "not a settable field"), ("lr=fast", "lr: expected a number >= 0, got 'fast'"),
    ("warm_start=maybe", "warm_start: expected true or false"), ("steps=0", "steps: expected an integer >= 1"),
])
def test_bad_overrides_are_refused(tmp_path, override, message):
    with pytest.raises(ValueError, match=message):
        cmp.compare(["sppo"], [0], str(tmp_path / "cmp"), overrides=[override], log=lambda m: None)
    assert not (tmp_path / "cmp").exists()


def test_an_unknown_time_axis_is_refused(tmp_path):
    with pytest.raises(ValueError, match="time_axis"):
        cmp.compare(["sppo"], [0], str(tmp_path / "cmp"), time_axis="gpu", log=lambda m: None)
    assert not (tmp_path / "cmp").exists()


def test_an_invalid_run_config_names_the_run(tmp_path):
    with pytest.raises(ValueError, match="grpo seed 0: hidden_size .* multiple of num_heads"):
        cmp.compare(["sppo", "grpo"], [0], str(tmp_path / "cmp"), overrides=["grpo.hidden_size=30"],
                    log=lambda m: None)
    with pytest.raises(ValueError, match="--set grpo.temperature=0: temperature: expected a number > 0"):
        cmp.compare(["sppo", "grpo"], [0], str(tmp_path / "cmp"), overrides=["grpo.temperature=0"],
                    log=lambda m: None)
    assert not (tmp_path / "cmp").exists()


@pytest.mark.parametrize("argv, message", [
    (["--algos", "sppo,ppo2"], "unknown 'ppo2'"), (["--seeds", ""], "at least one seed"),
    (["--seeds", "1,x"], "comma-separated integers"), (["--set", "lr=abc"], "--set lr=abc: lr: expected a number"),
    (["--jobs", "two"], "--jobs"), (["--reuse", "--overwrite"], "give one of them"),
])
def test_cli_exits_with_one_line_on_bad_input(tmp_path, capsys, argv, message):
    assert cmp.main([*argv, "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sppo-fast compare: error: ") and message in err, err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "x").exists()


def test_same_prompts_per_step_and_each_algorithm_its_settings(tmp_path):
    configs = cmp.run_configs(["sppo", "grpo"], [0, 1], str(tmp_path), steps=3, prompts_per_step=16,
                              common={"lr": 1e-3}, per_algo={"grpo": {"lr": 5e-4}, "sppo": {"steps": 9}})
    assert [(c.algo, c.seed) for c in configs] == [("sppo", 0), ("grpo", 0), ("sppo", 1), ("grpo", 1)]
    assert {c.algo: c.prompts_per_step for c in configs} == {"sppo": 16, "grpo": 16}
    assert {c.algo: c.group_size for c in configs} == {"sppo": 1, "grpo": 8}
    assert {c.algo: c.lr for c in configs} == {"sppo": 1e-3, "grpo": 5e-4}
    assert len({c.out for c in configs}) == 4
    assert {c.algo: c.steps for c in configs} == {"sppo": 9, "grpo": 3}  # one algorithm's --set wins


def test_tiny_comparison_keeps_the_other_runs_when_one_crashes(tmp_path):
    """sppo and rloo, seed 0, side by side; rloo is given a --model directory that does not exist, which
    fails inside the run (the config itself is valid): it is reported failed with its error while the
    sppo run finishes and is aggregated."""
    out = tmp_path / "cmp"
    missing = tmp_path / "no-such-model"
    result = cmp.compare(["sppo", "rloo"], [0], str(out), steps=2, prompts_per_step=2, jobs=2,
                         overrides=TINY + [f"rloo.model={missing}", "rloo.samples_per_prompt=2",
                                           f"cache_dir={tmp_path / 'cache'}"],
                         reference="sppo", log=lambda m: None)
    by = {(r["algo"], r["seed"]): r for r in result["runs"]}
    assert by[("sppo", 0)]["status"] == "ok"
    failed = by[("rloo", 0)]
    assert failed["status"] == "failed" and failed["returncode"] != 0
    assert "no-such-model" in failed["error"] or "Error" in failed["error"], failed["error"]
    sppo = result["aggregate"]["algorithms"]["sppo"]
    assert sppo["runs"] == 1 and sppo["failed"] == 0
    assert sppo["rollouts"][0] == 2 * 2  # 2 steps x 2 prompts x 1 sample
    assert result["aggregate"]["algorithms"]["rloo"]["runs"] == 0
    curve = by[("sppo", 0)]["curve"]
    assert [p["step"] for p in curve] == [0, 1, 2]
    assert curve[0]["rl_seconds"] == 0 and curve[-1]["rl_seconds"] > 0 and curve[-1]["rl_cpu_seconds"] > 0
    table = (out / "compare.md").read_text()
    assert "| sppo | 1 | 1 ok |" in table and "0 ok, 1 failed" in table and "Failed runs" in table
    saved = json.loads((out / "compare.json").read_text())
    assert len(saved["runs"]) == 2
    assert (out / "accuracy_vs_time.png").stat().st_size > 1000

    # --reuse keeps the finished sppo run (same config) and tries the failed rloo run again
    again = cmp.compare(["sppo", "rloo"], [0], str(out), steps=2, prompts_per_step=2, jobs=2, reuse=True,
                        overrides=TINY + [f"rloo.model={missing}", "rloo.samples_per_prompt=2",
                                          f"cache_dir={tmp_path / 'cache'}"], reference="sppo", log=lambda m: None)
    by_again = {r["algo"]: r for r in again["runs"]}
    assert by_again["sppo"].get("reused") and by_again["sppo"]["summary"] == by[("sppo", 0)]["summary"]
    assert by_again["rloo"]["status"] == "failed" and not by_again["rloo"].get("reused")


def _record(algo, seed, curve, before=0.1):
    # CPU time: half the wall-clock, as on a machine shared with one other job
    pts = [{"step": i, "rl_seconds": t, "rl_cpu_seconds": t / 2, "accuracy": a} for i, (t, a) in enumerate(curve)]
    summary = {"eval_accuracy_before": before, "eval_accuracy_after": curve[-1][1], "wall_seconds": 10.0 + seed,
               "steps": len(curve) - 1, "rollouts_per_step": 8 if algo == "grpo" else 1,
               "samples_per_prompt": 8 if algo == "grpo" else 1}
    return {"algo": algo, "seed": seed, "status": "ok", "summary": summary, "curve": pts, "run_dir": "x"}


def test_aggregate_means_and_time_to_reach_the_reference():
    records = [
        _record("grpo", 0, [(0, 0.1), (30, 0.3), (60, 0.4)]),
        _record("grpo", 1, [(0, 0.1), (30, 0.2), (60, 0.6)]),            # grpo final mean 0.5, 60 s
        _record("sppo", 0, [(0, 0.1), (5, 0.45), (10, 0.5), (20, 0.7)]),  # reaches 0.5 at 10 s
        _record("sppo", 1, [(0, 0.1), (10, 0.3), (20, 0.49)]),            # never reaches 0.5
        {"algo": "sppo", "seed": 2, "status": "failed", "error": "boom", "run_dir": "y"},
    ]
    agg = cmp.aggregate(records, ["sppo", "grpo"], "grpo")
    assert agg["reference_final_accuracy"] == pytest.approx(0.5)
    g, s = agg["algorithms"]["grpo"], agg["algorithms"]["sppo"]
    assert g["final_accuracy"][0] == pytest.approx(0.5)
    assert g["final_accuracy"][1] == pytest.approx(math.sqrt(0.02))
    assert g["rl_seconds"][0] == 60 and g["rollouts"][0] == 16
    assert (s["runs"], s["failed"]) == (2, 1)
    assert s["gain"][0] == pytest.approx((0.6 + 0.39) / 2)
    # per seed, against grpo's run of the same seed (finals 0.4 and 0.6)
    assert s["time_to_reference"]["per_run"] == [5, None]
    # the mean curve (0.1, 0.275, 0.4, 0.595 at 0, 5, 10, 20 s) reaches grpo's mean final 0.5 at 20 s
    assert s["time_to_reference"]["mean_curve"] == 20
    assert s["time_to_reference"]["fraction_of_reference_time"] == pytest.approx(20 / 60)
    assert g["time_to_reference"]["per_run"] == [60, 60] and g["time_to_reference"]["mean_curve"] == 60
    assert cmp.time_to_reach([], 0.1) is None
    cpu = cmp.aggregate(records, ["sppo", "grpo"], "grpo", time_key="rl_cpu_seconds")["algorithms"]["sppo"]
    assert cpu["time_to_reference"]["per_run"] == [2.5, None] and cpu["rl_cpu_seconds"][0] == 10
    assert cpu["time_to_reference"]["fraction_of_reference_time"] == pytest.approx(10 / 30)
    assert cmp.mean_curve([]) == []


def test_markdown_and_plot_from_a_result(tmp_path):
    records = [_record("grpo", 0, [(0, 0.1), (60, 0.4)]), _record("sppo", 0, [(0, 0.1), (5, 0.5)]),
               {"algo": "sppo", "seed": 1, "status": "failed", "error": "RuntimeError: x|y", "run_dir": str(tmp_path)}]
    result = {"out_dir": str(tmp_path), "runs": records, "aggregate": cmp.aggregate(records, ["sppo", "grpo"], "grpo"),
              "settings": {"algos": ["sppo", "grpo"], "seeds": [0, 1], "prompts_per_step": 4, "jobs": 2,
                           "steps_note": "sppo 1 steps", "eval_examples": 4, "cpu": "cpu", "cores": 2,
                           "per_algo_settings": {"sppo": {}, "grpo": {}}}}
    table = cmp.markdown(result)
    assert "5 s = 0.08x grpo's; per seed (vs grpo's same seed): 5 |" in table
    assert "`RuntimeError: x/y`" in table
    path = cmp.plot(result, os.path.join(tmp_path, "p.png"))
    assert os.path.getsize(path) > 1000
    assert cmp._interpolate([{"rl_seconds": 0, "accuracy": 0.1}, {"rl_seconds": 5, "accuracy": 0.5}],
                            [0, 4.9, 5, 9]) == [0.1, 0.1, 0.5, 0.5]


def test_an_interrupted_comparison_stops_its_runs(tmp_path):
    """`_stop_live` (called when compare() is interrupted) ends every run in flight."""
    import signal
    import threading
    import time

    result = {}
    worker = threading.Thread(target=lambda: result.update(
        rc=cmp._launch(["-c", "import time; time.sleep(120)"], str(tmp_path / "log"))[0]))
    worker.start()
    deadline = time.time() + 30
    while not cmp._LIVE and time.time() < deadline:
        time.sleep(0.05)
    cmp._stop_live()
    worker.join(30)
    assert not worker.is_alive() and result["rc"] == -signal.SIGTERM
    assert not cmp._LIVE


def test_an_interrupted_warm_start_child_keeps_its_progress(tmp_path, monkeypatch):
    """`_stop_live` sends SIGTERM to the warm-start child of an interrupted comparison: it saves its progress
    beside the cache entry and exits 143; the next warm start continues from there."""
    import signal

    from sppo_fast.trainer import warmstart

    values = dict(hidden_size=32, num_layers=2, num_heads=2, critic_hidden_size=16, critic_layers=1,
                  critic_heads=2, max_new_tokens=8, eval_examples=4, task_difficulty=1, sft_steps=4,
                  sft_batch_size=4, sft_examples=16, progress=False, threads=1, cache_dir=str(tmp_path / "cache"),
                  out=str(tmp_path / "run"))
    path = tmp_path / "seed0.json"
    path.write_text(json.dumps(cmp.TrainConfig(**values).to_dict()))
    real, calls = warmstart.sft_loss, []

    def loss_then_sigterm(*args):
        out = real(*args)
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    monkeypatch.setattr(warmstart, "sft_loss", loss_then_sigterm)
    assert cmp.warm_start_only(str(path)) == 128 + signal.SIGTERM
    cache = tmp_path / "cache" / "warmstart"
    assert len(list(cache.glob("*.partial"))) == 1 and not list(cache.glob("*.safetensors"))
    assert cmp.warm_start_only(str(path)) == 0
    assert len(calls) == 4, "the second warm start did the remaining 2 of 4 steps"
    assert len(list(cache.glob("*.safetensors"))) == 1 and not list(cache.glob("*.partial"))
