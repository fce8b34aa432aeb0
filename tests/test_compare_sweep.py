"""`sppo-fast compare --sweep`: equal tuning on tuning seeds, then each algorithm's best setting on fresh
seeds; the algorithms added for issue 19 (ReMax, and the ablations ppo_bce and sspo_noadapt); the per-step
traces kept for the clip-fraction and entropy plots. One tiny real sweep in subprocesses (seconds a run), the
rest on hand-made records."""

from __future__ import annotations

import json
import os

import pytest
import torch

from sppo_fast.trainer import algorithms as algos
from sppo_fast.trainer import compare as cmp
from sppo_fast.trainer.config import ALGORITHMS, ALGOS, TrainConfig

NEW_ALGOS = ("remax", "ppo_bce", "sspo_noadapt")

# The tiny runs of tests/test_compare.py: hidden 32, 2 layers, difficulty 1, no warm start.
TINY = ["warm_start=false", "hidden_size=32", "num_layers=2", "num_heads=2", "critic_hidden_size=16",
        "critic_layers=1", "critic_heads=2", "max_new_tokens=8", "eval_examples=4", "eval_every=1",
        "task_difficulty=1", "mini_batches=1", "critic_warmup_steps=0"]


# --- the tiny sweep, end to end ----------------------------------------------------------------------

def test_tiny_sweep_tunes_then_runs_the_best_on_fresh_seeds_and_reuse_keeps_every_run(tmp_path):
    """remax and gspo, lr in {1e-4, 1e-3} and clip_high 0.28 on tuning seed 7, then seed 0 at the best lr:
    gspo's sequence-level clip range is not on the grid's scale, so its clip_high sweep is skipped (and said
    so). 4 tuning runs and 2 fresh runs, 2 steps each; --reuse then trains none of them again."""
    out = tmp_path / "cmp"
    kw = dict(steps=2, prompts_per_step=2, jobs=2, reference="gspo", log=lambda m: None,
              overrides=TINY + ["gspo.samples_per_prompt=2", f"cache_dir={tmp_path / 'cache'}"],
              sweeps=["lr=1e-4,1e-3", "clip_high=0.28"], tune_seeds=[7])
    result = cmp.compare(["remax", "gspo"], [0], str(out), **kw)
    sweep = result["sweep"]
    assert sweep["tune_seeds"] == [7]
    assert [r["status"] for r in sweep["runs"]] == ["ok"] * 4, [r.get("error") for r in sweep["runs"]]
    assert sweep["grids"]["remax"] == [{"lr": 1e-4, "clip_high": 0.28}, {"lr": 1e-3, "clip_high": 0.28}]
    assert sweep["grids"]["gspo"] == [{"lr": 1e-4}, {"lr": 1e-3}]
    assert any(note.startswith("clip_high: gspo") for note in sweep["skipped"]["gspo"])
    assert sweep["skipped"]["remax"] == []
    for algo in ("remax", "gspo"):
        ranking = sweep["algorithms"][algo]
        assert ranking["best"] in sweep["grids"][algo] and ranking["margin"] is not None
        fresh = next(r for r in result["runs"] if r["algo"] == algo)
        assert fresh["status"] == "ok" and fresh["seed"] == 0
        used = json.loads((out / "runs" / f"{algo}-seed0" / "config.json").read_text())
        assert used["lr"] == ranking["best"]["lr"], "the fresh seed runs at the algorithm's best setting"
        assert used["clip_high"] == ranking["best"].get("clip_high")  # None (the preset's) for gspo
    assert sorted(os.listdir(out / "tune" / "runs")) == sorted(
        f"{a}-{cmp.setting_slug(s)}-seed7" for a in ("remax", "gspo") for s in sweep["grids"][a])

    # the per-step traces of every run, for the clip-fraction and entropy plots
    saved = json.loads((out / "compare.json").read_text())
    for run in saved["runs"] + saved["sweep"]["runs"]:
        trace = run["trace"]
        assert trace["step"] == [1, 2]
        assert len(trace["entropy"]) == len(trace["clipfrac"]) == 2 and all(v is not None for v in trace["entropy"])
    remax = next(r for r in saved["runs"] if r["algo"] == "remax")
    assert len(remax["trace"]["greedy_reward"]) == 2
    # ReMax decodes one greedy response per prompt next to its one sample: 2 steps x 2 prompts x 2
    assert saved["aggregate"]["algorithms"]["remax"]["rollouts"][0] == 8
    table = (out / "compare.md").read_text()
    assert "## Tuning: the same grid for every algorithm" in table and "### remax" in table
    assert "clip_high: gspo has a sequence-level clip range" in table and "(best)" in table
    assert "## Each algorithm at its best setting, on fresh seeds [0]" in table
    assert (out / "clip_entropy.png").stat().st_size > 1000 and (out / "accuracy_vs_time.png").exists()

    again = cmp.compare(["remax", "gspo"], [0], str(out), reuse=True, **kw)
    assert all(r.get("reused") for r in again["runs"] + again["sweep"]["runs"])
    assert {a: r["best"] for a, r in again["sweep"]["algorithms"].items()} == \
        {a: r["best"] for a, r in sweep["algorithms"].items()}


# --- bad input, before anything runs ------------------------------------------------------------------

def test_fresh_seeds_that_also_tune_are_refused(tmp_path, capsys):
    out = tmp_path / "cmp"
    with pytest.raises(ValueError, match=r"seeds: 1 also tune the settings .*take no part in tuning"):
        cmp.compare(["sppo", "grpo"], [0, 1], str(out), sweeps=["lr=1e-4,3e-4"], tune_seeds=[1, 5],
                    log=lambda m: None)
    assert cmp.main(["--sweep", "lr=1e-4", "--seeds", "0,1,2", "--tune-seeds", "2", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sppo-fast compare: error: seeds: 2 also tune") and err.count("\n") == 1
    assert not out.exists(), "nothing may run (or be written) for bad input"


@pytest.mark.parametrize("sweeps, tune_seeds, message", [
    (["lr"], None, "key=v1,v2"), (["lr="], None, "at least one value"), (["lr=1e-4,1e-4"], None, "each value once"),
    (["lr=fast"], None, "lr: expected a number"), (["seed=1,2"], None, "not a field a sweep may vary"),
    (["nope.lr=1"], None, "unknown algorithm 'nope'"), (["lr=1e-4", "lr=1e-3"], None, "swept twice"),
    (["rloo.lr=1e-4"], None, "rloo is not one of --algos"), ([], [5], "only a sweep"),
    (["lr=1e-4"], [], "at least one tuning seed"), (["lr=1e-4"], [5, 5], "each seed once"),
])
def test_bad_sweeps_are_refused(tmp_path, sweeps, tune_seeds, message):
    with pytest.raises(ValueError, match=message):
        cmp.compare(["sppo", "grpo"], [0], str(tmp_path / "cmp"), sweeps=sweeps, tune_seeds=tune_seeds,
                    log=lambda m: None)
    assert not (tmp_path / "cmp").exists()


def test_a_key_both_swept_and_set_is_refused(tmp_path):
    with pytest.raises(ValueError, match="--sweep lr and --set lr both set lr for sppo"):
        cmp.compare(["sppo"], [0], str(tmp_path / "cmp"), sweeps=["lr=1e-4,1e-3"], overrides=["sppo.lr=1e-4"],
                    log=lambda m: None)


# --- the grid ----------------------------------------------------------------------------------------

def test_each_algorithm_gets_the_sweeps_that_apply_to_it():
    common, per_algo = cmp.parse_sweeps(["lr=1e-4,3e-4", "clip_high=0.2,0.28", "critic_lr=1e-3",
                                         "gspo.clip_high=4e-4,1e-3"])
    assert common == {"lr": [1e-4, 3e-4], "clip_high": [0.2, 0.28], "critic_lr": [1e-3]}
    grid, skipped = cmp.sweep_grid("grpo", common, per_algo)
    assert grid == [{"lr": a, "clip_high": c} for a in (1e-4, 3e-4) for c in (0.2, 0.28)]
    assert skipped == ["critic_lr: grpo has no critic"]
    grid, skipped = cmp.sweep_grid("sppo", common, per_algo)
    assert len(grid) == 4 and all(s["critic_lr"] == 1e-3 for s in grid) and skipped == []
    grid, skipped = cmp.sweep_grid("gspo", common, per_algo)  # its own clip sweep replaces the common one
    assert grid == [{"lr": a, "clip_high": c} for a in (1e-4, 3e-4) for c in (4e-4, 1e-3)]
    assert skipped == ["critic_lr: gspo has no critic"]
    grid, skipped = cmp.sweep_grid("gspo", common, {})
    assert {"clip_high"} & set(grid[0]) == set() and skipped[0].startswith("clip_high: gspo has a sequence")
    assert cmp.sweep_grid("grpo", {}, {}) == ([{}], [])
    assert cmp.setting_label({"lr": 1e-4, "clip_high": 0.28}) == "lr=0.0001, clip_high=0.28"
    assert cmp.setting_label({}) == "defaults"
    assert cmp.setting_slug({"lr": 1e-4, "clip_high": 0.28}) == "lr0.0001_clip_high0.28"


# --- the choice of the best setting --------------------------------------------------------------------

def _rec(algo, setting, seed, final, seconds, status="ok"):
    if status != "ok":
        return {"algo": algo, "seed": seed, "status": "failed", "error": "boom", "setting": setting}
    return {"algo": algo, "seed": seed, "status": "ok", "setting": setting,
            "summary": {"eval_accuracy_before": 0.1, "eval_accuracy_after": final},
            "curve": [{"step": 0, "rl_seconds": 0.0, "rl_cpu_seconds": 0.0, "accuracy": 0.1},
                      {"step": 2, "rl_seconds": seconds, "rl_cpu_seconds": seconds / 2, "accuracy": final}]}


def test_best_setting_is_the_highest_final_accuracy_ties_go_to_the_faster():
    lo, mid, hi = {"lr": 1e-4}, {"lr": 3e-4}, {"lr": 1e-3}
    grids = {"sppo": [lo, mid, hi], "grpo": [lo, mid, hi]}
    records = [
        # sppo: mid wins by mean accuracy over two tuning seeds (0.7 vs 0.6), hi has a failed seed
        _rec("sppo", lo, 7, 0.5, 10), _rec("sppo", lo, 8, 0.7, 10),
        _rec("sppo", mid, 7, 0.8, 30), _rec("sppo", mid, 8, 0.6, 30),
        _rec("sppo", hi, 7, 0.9, 5), _rec("sppo", hi, 8, None, None, status="failed"),
        # grpo: lo and mid tie at 0.5; mid is faster; hi is worse
        _rec("grpo", lo, 7, 0.5, 20), _rec("grpo", lo, 8, 0.5, 20),
        _rec("grpo", mid, 7, 0.4, 12), _rec("grpo", mid, 8, 0.6, 12),
        _rec("grpo", hi, 7, 0.3, 1), _rec("grpo", hi, 8, 0.3, 1),
    ]
    ranking = cmp.choose_best(records, ["sppo", "grpo"], grids)
    s, g = ranking["sppo"], ranking["grpo"]
    assert s["best"] == mid and s["runner_up"] == lo and s["margin"] == pytest.approx(0.1)
    assert s["best_accuracy"] == pytest.approx(0.7)
    assert [r["setting"] for r in s["settings"]] == [mid, lo, hi]  # the incomplete one last, unranked
    assert not s["settings"][-1]["complete"] and s["settings"][-1]["errors"] == ["boom"]
    assert s["settings"][1]["behind_best"] == pytest.approx(0.1)
    assert g["best"] == mid and g["runner_up"] == lo and g["margin"] == pytest.approx(0.0)
    assert [r["setting"] for r in g["settings"]] == [mid, lo, hi]
    # on the CPU-time axis the tie goes the same way; exact ties of time too fall back to the grid's order
    assert cmp.choose_best(records, ["grpo"], grids, "rl_cpu_seconds")["grpo"]["best"] == mid
    tied = [_rec("grpo", lo, 7, 0.5, 10), _rec("grpo", mid, 7, 0.5, 10)]
    assert cmp.choose_best(tied, ["grpo"], {"grpo": [lo, mid]})["grpo"]["best"] == lo
    alone = cmp.choose_best([_rec("grpo", lo, 7, 0.5, 10)], ["grpo"], {"grpo": [lo]})["grpo"]
    assert alone["best"] == lo and alone["margin"] is None and alone["runner_up"] is None
    none = cmp.choose_best([_rec("grpo", lo, 7, 0, 0, status="failed")], ["grpo"], {"grpo": [lo]})["grpo"]
    assert none["best"] is None and none["best_accuracy"] is None


def test_sweep_markdown_says_which_setting_won_and_by_how_much():
    lo, hi = {"lr": 1e-4}, {"lr": 1e-3}
    records = [_rec("sppo", lo, 7, 0.5, 10), _rec("sppo", hi, 7, 0.75, 12), _rec("gspo", lo, 7, 0.4, 10)]
    sweep = {"grid": {"lr": [1e-4, 1e-3]}, "per_algo_grid": {}, "tune_seeds": [7],
             "skipped": {"gspo": ["clip_high: gspo has a sequence-level clip range"]},
             "algorithms": cmp.choose_best(records, ["sppo", "gspo"], {"sppo": [lo, hi], "gspo": [lo]})}
    text = "\n".join(cmp.sweep_markdown(sweep, ["sppo", "gspo"], [0, 1, 2]))
    assert "| sppo | 2 | `lr=0.001` | 75.0% | `lr=0.0001` | +25.0 |" in text
    assert "| gspo | 1 | `lr=0.0001` | 40.0% | - | only setting |" in text
    assert "| `lr=0.001` (best) | 1 |" in text and "| `lr=0.0001` | 1 | 10.0 +- 0.0% | 50.0 +- 0.0% | 25.0 |" in text
    assert "skipped for that algorithm): clip_high: gspo" in text and "fresh seeds [0, 1, 2] took no part" in text


# --- the new algorithms ----------------------------------------------------------------------------------

def test_new_algorithms_are_in_the_help_of_compare_and_train(capsys):
    from sppo_fast.trainer.cli import train_parser

    with pytest.raises(SystemExit) as stop:
        cmp.main(["--help"])
    assert stop.value.code == 0
    help_text = capsys.readouterr().out
    for name in NEW_ALGOS:
        assert name in help_text and name in ALGOS
        assert name in train_parser().format_help()
    assert "--sweep" in help_text and "--tune-seeds" in help_text


def test_every_algorithm_of_the_table_has_a_preset_an_estimator_and_compare_settings():
    import sppo_fast

    for name, spec in ALGORITHMS.items():
        cfg = TrainConfig(algo=name, warm_start=False)
        loss = algos.loss_config(cfg)
        assert isinstance(loss, sppo_fast.PolicyLossConfig)
        assert algos.estimator_name(cfg, loss) in algos.ADVANTAGE_ESTIMATORS
        assert name in cmp.ALGO_SETTINGS
        assert (spec.critic is None) == (algos.critic_config(cfg) is None)
    assert algos.estimator_name(TrainConfig(algo="remax"), algos.loss_config(TrainConfig(algo="remax"))) == "remax"
    assert algos.loss_config(TrainConfig(algo="remax")) == sppo_fast.PolicyLossConfig.preset("rloo")
    noadapt, sspo = algos.loss_config(TrainConfig(algo="sspo_noadapt")), algos.loss_config(TrainConfig(algo="sspo"))
    assert noadapt.entropy_adaptive is None and sspo.entropy_adaptive is not None
    assert (noadapt.ratio_level, noadapt.clip_low, noadapt.clip_high) == (sspo.ratio_level, sspo.clip_low,
                                                                            sspo.clip_high)
    assert algos.loss_config(TrainConfig(algo="ppo_bce")) == sppo_fast.PolicyLossConfig.preset("ppo")
    assert algos.critic_config(TrainConfig(algo="ppo_bce")).algo == "ppo"  # a token critic
    assert TrainConfig(algo="remax").group_size == 1 and TrainConfig(algo="sspo_noadapt").group_size == 8
    assert algos.loss_config(TrainConfig(algo="sspo_noadapt", clip_high=0.4)).clip_high == 0.4


def test_remax_advantage_is_the_reward_minus_the_greedy_reward():
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0])
    greedy = torch.tensor([1.0, 1.0, 0.0, 0.0])
    expected = torch.tensor([0.0, -1.0, 1.0, 0.0])
    assert torch.equal(algos.remax_advantage(rewards, greedy), expected)
    adv, returns = algos.compute_advantages("remax", algos.AdvantageInputs(
        rewards=rewards, response_mask=torch.ones(4, 3), group_size=1, baseline_rewards=greedy))
    assert torch.equal(adv, expected) and returns is None and adv.dtype == torch.float32
    with pytest.raises(ValueError, match="greedy"):
        algos.remax_advantage(rewards, None)
    with pytest.raises(ValueError, match="must match"):
        algos.remax_advantage(rewards, greedy[:2])


def test_ppo_bce_critic_is_trained_with_bce_and_read_as_a_probability():
    from types import SimpleNamespace

    logits = torch.tensor([[2.0, -1.0, 0.5], [0.0, 3.0, -2.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    rewards = torch.tensor([1.0, 0.0])
    batch = SimpleNamespace(input_ids=None, attention_mask=None, response_mask=mask,
                            response_slice=lambda x: x)
    loss = algos.critic_loss(ALGORITHMS["ppo_bce"], lambda ids, m: logits, batch, rewards, None)
    target = rewards[:, None].expand(2, 3)
    per_token = torch.nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="none")
    torch.testing.assert_close(loss, (per_token * mask).sum() / mask.sum())
    loss.backward()
    assert logits.grad[0, 2] == 0, "the padding token gets no gradient"
    torch.testing.assert_close(algos.token_values(ALGORITHMS["ppo_bce"], logits.detach()),
                               torch.sigmoid(logits.detach()))
    assert torch.equal(algos.token_values(ALGORITHMS["ppo"], logits.detach()), logits.detach())


def test_the_greedy_baseline_decodes_greedily_and_draws_nothing_from_the_generator():
    from sppo_fast.trainer.models import build_policy, load_tokenizer
    from sppo_fast.trainer.rollout import generate, generate_greedy_baseline

    cfg = TrainConfig(hidden_size=32, num_layers=2, num_heads=2, max_new_tokens=6, warm_start=False)
    tokenizer = load_tokenizer(cfg)
    torch.manual_seed(0)
    lm = build_policy(cfg, tokenizer, torch.device("cpu"))
    prompts = ["1+2=", "3*4-1="]
    state = torch.get_rng_state()
    greedy = generate_greedy_baseline(lm, tokenizer, prompts, max_new_tokens=6, device="cpu")
    assert torch.equal(torch.get_rng_state(), state)
    again = generate(lm, tokenizer, prompts, max_new_tokens=6, temperature=0.0, device="cpu")
    assert greedy.texts == again.texts and torch.equal(greedy.response_ids, again.response_ids)


@pytest.fixture
def alternating_rewards(monkeypatch):
    """Every other response of a scoring call is right (as in tests/test_trainer.py)."""
    import sppo_fast.trainer.tasks as tasks

    def score(task, responses, examples, timeout_s=1.0):
        return [float(i % 2 == 0) for i in range(len(responses))], {"verifier_errors": 0, "verifier_timeouts": 0}

    monkeypatch.setattr(tasks, "score_responses", score)


@pytest.mark.parametrize("algo", NEW_ALGOS)
def test_one_training_step_of_each_new_algorithm_moves_the_policy(tmp_path, algo, alternating_rewards):
    """ReMax runs 2 samples per prompt here: with one, the alternating rewards of the samples and of the
    greedy responses (scored in one call, samples first) would be equal row for row, a zero advantage."""
    from safetensors.torch import load_file

    from sppo_fast.trainer.loop import train
    from sppo_fast.trainer.models import build_policy, load_tokenizer

    cfg = TrainConfig(algo=algo, steps=1, samples_per_prompt=2 if algo != "ppo_bce" else 0, rollouts_per_step=4,
                      hidden_size=32, num_layers=2, num_heads=2, critic_hidden_size=16, critic_layers=1,
                      critic_heads=2, max_new_tokens=12, eval_examples=4, eval_every=100, warm_start=False,
                      progress=False, mini_batches=2, task_difficulty=1, threads=1, critic_warmup_steps=0,
                      out=str(tmp_path / "run"), cache_dir=str(tmp_path / "cache"))
    torch.manual_seed(0)
    initial = build_policy(cfg, load_tokenizer(cfg), torch.device("cpu")).state_dict()
    train(cfg)
    step = [json.loads(line) for line in open(os.path.join(cfg.out, "metrics.jsonl"))][-1]
    assert step["step"] == 1 and step["entropy"] is not None and step["clipfrac"] is not None
    if algo == "remax":  # 2 prompts: greedy rewards 1, 0 (the 5th and 6th responses scored)
        assert step["greedy_reward"] == pytest.approx(0.5)
    if algo == "ppo_bce":
        assert step["critic_loss"] > 0 and "critic_explained_variance" in step
        assert os.path.exists(os.path.join(cfg.out, "checkpoint", "critic.safetensors"))
    final = load_file(os.path.join(cfg.out, "checkpoint", "policy.safetensors"))
    assert any(not torch.equal(final[k], initial[k]) for k in initial), "the policy did not move"


def test_clip_entropy_plot_from_traces(tmp_path):
    from sppo_fast.trainer.plots import plot_training_signals

    def run(algo, entropy):
        return {"algo": algo, "status": "ok", "trace": {"step": [1, 2, 3], "clipfrac": [None, 0.1, 0.2],
                                                          "entropy": entropy}}

    records = [run("grpo", [1.0, 0.5, 0.2]), run("grpo", [1.1, 0.6, 0.3]), run("sspo", [1.0, 0.9, 0.8]),
               {"algo": "sspo", "status": "failed"}]
    path = plot_training_signals(records, str(tmp_path / "p.png"), algos=["grpo", "sspo"])
    assert os.path.getsize(path) > 1000


def test_clipping_and_entropy_are_summarised_per_algorithm():
    trace = {"step": list(range(1, 22)), "clipfrac": [None] + [0.1] * 2 + [0.0] * 16 + [0.3] * 2,
             "entropy": [None, 0.9, 0.8] + [0.5] * 15 + [0.2, 0.4, 0.45]}
    s = cmp.signals(trace)
    assert s["clipfrac"] == pytest.approx(0.8 / 20)
    assert (s["clipfrac_first"], s["clipfrac_last"]) == (pytest.approx(0.1), pytest.approx(0.3))
    assert (s["entropy_first"], s["entropy_min"], s["entropy_min_step"], s["entropy_final"]) == (0.9, 0.2, 19, 0.45)
    assert cmp.signals({"step": [1], "entropy": [0.5]}) is None  # a record from before traces had clipping
    other = dict(trace, entropy=[None, 0.7, 0.6] + [0.5] * 18)
    runs = [{"trace": trace}, {"trace": other}, {}]
    stats = cmp.signals_stats(runs)
    assert stats["runs"] == 2 and stats["entropy_first"][0] == pytest.approx(0.8)
    table = "\n".join(cmp.signals_markdown({"sspo": {"signals": stats}, "grpo": {"signals": None}}))
    assert "| sspo | 4 +- 0% | 10 +- 0% | 30 +- 0% | 0.800 +- 0.141 | 0.350 +- 0.212 (12) | 0.475 +- 0.035 |" in table
    assert "grpo" not in table
    assert cmp.signals_markdown({"grpo": {"signals": None}}) == []


def test_signals_spanning_orders_of_magnitude_get_a_symlog_axis():
    from sppo_fast.trainer.plots import log_scale_threshold

    assert log_scale_threshold([0.0, 0.1, 0.4, 0.2]) is None  # within 100x: linear
    assert log_scale_threshold([0.0, 3e-4, 0.4]) == 3e-4  # GRPO's 0.03% beside GSPO's 40%
    assert log_scale_threshold([1e-9, 0.5]) == 1e-6
    assert log_scale_threshold([]) is None and log_scale_threshold([0.0, 0.0]) is None
