"""The trainer: config and CLI, rollout layout, critics, one step of every algorithm, warm-start cache,
resume, plots. Tiny models (hidden 32, 2 layers) so the whole file runs in a minute or two on 2 cores."""

from __future__ import annotations

import json
import math
import os
import signal

import pytest
import torch

import sppo_fast
from sppo_fast.trainer import algorithms as algos
from sppo_fast.trainer.cli import config_from_args, plot_main, train_parser
from sppo_fast.trainer.config import ALGOS, TrainConfig
from sppo_fast.trainer.loop import train
from sppo_fast.trainer.models import (
    PolicyHidden,
    PromptCritic,
    build_policy,
    lm_head_of,
    load_tokenizer,
    tiny_llama_config,
)
from sppo_fast.trainer.rollout import generate, response_mask_after_eos

TINY = dict(hidden_size=32, num_layers=2, num_heads=2, critic_hidden_size=16, critic_layers=1, critic_heads=2,
            max_new_tokens=12, eval_examples=4, eval_every=100, warm_start=False, progress=False,
            rollouts_per_step=4, mini_batches=2, task_difficulty=1, threads=1, critic_warmup_steps=0)


def tiny(tmp_path, **kw):
    values = {**TINY, "out": str(tmp_path / "run"), "cache_dir": str(tmp_path / "cache"), **kw}
    return TrainConfig(**values)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(TrainConfig())


# --- config and command line -----------------------------------------------------------------------

def test_every_field_is_a_flag_with_help():
    help_text = train_parser().format_help()
    for f in TrainConfig.__dataclass_fields__.values():
        assert f"--{f.name}" in help_text
        assert f.metadata.get("help"), f"field {f.name} has no help"


def test_config_file_then_flags(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("algo: grpo\nsteps: 7\nlr: 0.01\n")
    cfg, resume = config_from_args(["--config", str(path), "--steps", "3", "--warm_start", "false"])
    assert (cfg.algo, cfg.steps, cfg.lr, cfg.warm_start, resume) == ("grpo", 3, 0.01, False, False)
    assert cfg.group_size == 8 and cfg.prompts_per_step == cfg.rollouts_per_step // 8
    jpath = tmp_path / "c.json"
    jpath.write_text(json.dumps({"algo": "sppo", "max_new_tokens": 5}))
    cfg, _ = config_from_args(["--config", str(jpath)])
    assert cfg.algo == "sppo" and cfg.max_new_tokens == 5 and cfg.group_size == 1


def test_bad_config_names_the_field(tmp_path):
    with pytest.raises(ValueError, match="algo"):
        TrainConfig(algo="nope")
    with pytest.raises(ValueError, match="rollouts_per_step"):
        TrainConfig(algo="grpo", rollouts_per_step=12)
    with pytest.raises(ValueError, match="bogus"):
        TrainConfig.from_dict({"bogus": 1})
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"bogus": 1}))
    with pytest.raises(ValueError, match="bogus"):  # a UserError: `sppo-fast train` prints it as one line
        config_from_args(["--config", str(path)])


# --- rollouts and the alignment of log-probs -------------------------------------------------------

def test_response_mask_stops_after_eos():
    eos = 2
    ids = torch.tensor([[5, 6, eos, 7, eos], [5, 5, 5, 5, 5], [eos, 9, 9, 9, 9]])
    mask, truncated = response_mask_after_eos(ids, eos)
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    assert truncated.tolist() == [False, True, False]


def test_rollout_logprobs_match_the_full_logits(tokenizer):
    """The hidden state at position t predicts token t + 1: the fused log-probs of the response must equal
    log_softmax of the model's own logits at the shifted positions, with left-padded prompts."""
    torch.manual_seed(0)
    cfg = TrainConfig(**{**TINY, "max_new_tokens": 6})
    lm = build_policy(cfg, tokenizer, torch.device("cpu"))
    rollout = generate(lm, tokenizer, ["1+2\n", "12*11-3\n"], max_new_tokens=6, temperature=1.0, device="cpu")
    assert rollout.prompt_mask[0, 0] == 0, "the shorter prompt is left-padded"
    hidden = rollout.response_slice(PolicyHidden(lm)(rollout.input_ids, rollout.attention_mask))
    weight, bias = lm_head_of(lm)
    logp = sppo_fast.linear_logprobs(hidden, weight, rollout.response_ids, bias=bias)
    from sppo_fast.trainer.models import position_ids_from_mask

    logits = lm(input_ids=rollout.input_ids, attention_mask=rollout.attention_mask,
                position_ids=position_ids_from_mask(rollout.attention_mask)).logits
    expected = rollout.response_slice(torch.log_softmax(logits.float(), -1)).gather(
        -1, rollout.response_ids.unsqueeze(-1)).squeeze(-1)
    m = rollout.response_mask.bool()
    torch.testing.assert_close(logp[m], expected[m], atol=1e-5, rtol=1e-5)


def test_greedy_generation_reproduces_its_tokens(tokenizer):
    """Greedy tokens are the argmax of the logits our training forward computes, so the sampler and the
    learner see the same positions (left padding included)."""
    torch.manual_seed(1)
    cfg = TrainConfig(**TINY)
    lm = build_policy(cfg, tokenizer, torch.device("cpu"))
    rollout = generate(lm, tokenizer, ["3\n", "10+10\n"], max_new_tokens=5, temperature=0.0, device="cpu")
    hidden = rollout.response_slice(PolicyHidden(lm)(rollout.input_ids, rollout.attention_mask))
    weight, bias = lm_head_of(lm)
    argmax = torch.nn.functional.linear(hidden, weight, bias).argmax(-1)
    m = rollout.response_mask.bool()
    assert torch.equal(argmax[m], rollout.response_ids[m])


# --- critics ----------------------------------------------------------------------------------------

def _prompt_critic(tokenizer):
    torch.manual_seed(0)
    config = tiny_llama_config(tokenizer, hidden=16, layers=1, heads=2)
    return PromptCritic(config)


def test_prompt_critic_reads_the_last_prompt_token(tokenizer):
    critic = _prompt_critic(tokenizer).eval()
    alone = tokenizer(["7+8\n"], return_tensors="pt", padding=True)
    batch = tokenizer(["7+8\n", "12*11-3+4\n"], return_tensors="pt", padding=True)
    z_alone = critic(alone["input_ids"], alone["attention_mask"])
    z_batch = critic(batch["input_ids"], batch["attention_mask"])
    assert z_batch.shape == (2,)
    torch.testing.assert_close(z_batch[0], z_alone[0], atol=1e-5, rtol=1e-5)


def test_prompt_critic_learns_success_probability(tokenizer):
    """Trained with value_bce_loss on prompts whose reward is a function of the prompt, sigmoid(z) must
    separate them (and explained variance must become positive)."""
    critic = _prompt_critic(tokenizer)
    prompts = [f"{a}+{b}\n" for a in range(6) for b in range(4)]
    rewards = torch.tensor([1.0 if p.startswith(("0", "1", "2")) else 0.0 for p in prompts])
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    opt = torch.optim.AdamW(critic.parameters(), lr=1e-2)
    for _ in range(60):
        loss = sppo_fast.value_bce_loss(critic(enc["input_ids"], enc["attention_mask"]), rewards)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        v = torch.sigmoid(critic(enc["input_ids"], enc["attention_mask"]))
    assert v[rewards == 1].min() > v[rewards == 0].max()
    assert algos.explained_variance(v, rewards) > 0.5


def test_sppo_advantage_uses_values_before_the_critic_update(tmp_path, monkeypatch):
    """docs/api.md §3.7: A = R - sigmoid(z) with z read before the critic's update in the same step."""
    seen = {}
    real = algos.compute_advantages

    def spy(name, inputs):
        seen["logits"] = inputs.critic_logits.clone()
        return real(name, inputs)

    monkeypatch.setattr(algos, "compute_advantages", spy)
    import sppo_fast.trainer.loop as loop

    cfg = tiny(tmp_path, algo="sppo", steps=1)
    original_update = loop.Trainer.critic_update
    before = {}

    def record(self, mb, rewards, returns):
        if "z" not in before:
            with torch.no_grad():
                before["z"] = self.critic(mb.prompt_ids, mb.prompt_mask).clone()
                before["prompts"] = mb.prompt_ids.clone()
        return original_update(self, mb, rewards, returns)

    monkeypatch.setattr(loop.Trainer, "critic_update", record)
    train(cfg)
    assert seen["logits"].shape == (cfg.rollouts_per_step,)
    # The first critic mini-batch saw the critic unchanged: its logits are among those used for A.
    for z in before["z"]:
        assert torch.isclose(seen["logits"], z, atol=1e-6).any()


def test_terminal_rewards_and_gae_returns():
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    token_rewards = algos.terminal_token_rewards(torch.tensor([1.0, 0.0]), mask)
    assert token_rewards.tolist() == [[0, 0, 1, 0], [0, 0, 0, 0]]
    values = torch.zeros(2, 4)
    adv, ret = algos.compute_advantages("gae", algos.AdvantageInputs(
        rewards=torch.tensor([1.0, 0.0]), response_mask=mask, group_size=1, values=values))
    assert ret[0, :3].tolist() == [1.0, 1.0, 1.0] and ret[1, 0] == 0.0


# --- one step of every algorithm ------------------------------------------------------------------

@pytest.fixture
def alternating_rewards(monkeypatch):
    """A random tiny policy is never right; reward every other response so that every algorithm sees a
    non-zero advantage (within each group of two as well) and must move the policy."""
    import sppo_fast.trainer.tasks as tasks

    def score(task, responses, examples, timeout_s=1.0):
        rewards = [float(i % 2 == 0) for i in range(len(responses))]
        return rewards, {"verifier_errors": 0, "verifier_timeouts": 0}

    monkeypatch.setattr(tasks, "score_responses", score)


@pytest.mark.parametrize("algo", ALGOS)
def test_one_step_of_every_algorithm(tmp_path, algo, alternating_rewards):
    cfg = tiny(tmp_path, algo=algo, steps=1, samples_per_prompt=2 if algo in algos_group() or algo == "remax" else 0)
    torch.manual_seed(0)
    initial = {k: v.clone() for k, v in build_policy(cfg, load_tokenizer(cfg), torch.device("cpu"))
               .state_dict().items()}
    summary = train(cfg)
    assert summary["algo"] == algo and summary["steps"] == 1
    rows = [json.loads(line) for line in open(os.path.join(cfg.out, "metrics.jsonl"))]
    step = rows[-1]
    assert step["step"] == 1
    for key in ("reward", "accuracy", "entropy", "clipfrac", "approx_kl", "response_length", "tokens_per_s",
                "step_time", "step_cpu_time", "eval_accuracy", "loss"):
        assert key in step and step[key] is not None and math.isfinite(step[key]), key
    if algo in ("sppo", "ppo"):
        assert math.isfinite(step["critic_loss"])
        assert "critic_explained_variance" in step
        assert "critic_explained_variance_last_quarter" in summary
    if algo == "sppo":  # rewards alternate 1, 0, 1, 0: the base rate 0.5 has entropy log 2
        assert step["reward_entropy"] == pytest.approx(math.log(2))
        assert math.isfinite(step["critic_bce"]) and summary["critic_bce_last_quarter"] == step["critic_bce"]
    from safetensors.torch import load_file

    final = load_file(os.path.join(cfg.out, "checkpoint", "policy.safetensors"))
    assert any(not torch.equal(final[k], initial[k]) for k in initial), "the policy did not move"
    for name in ("summary.json", "accuracy.png", "reward.png", "config.json"):
        assert os.path.exists(os.path.join(cfg.out, name))


def algos_group():
    from sppo_fast.trainer.config import GROUP_ALGOS

    return GROUP_ALGOS


# --- warm start cache -------------------------------------------------------------------------------

def test_warm_start_is_cached_and_reloaded(tmp_path, monkeypatch, tokenizer):
    from sppo_fast.trainer import warmstart
    from sppo_fast.trainer.loop import make_task

    cfg = tiny(tmp_path, warm_start=True, sft_steps=3, sft_batch_size=4, sft_examples=16)
    task = make_task(cfg)
    torch.manual_seed(0)
    lm = build_policy(cfg, tokenizer, torch.device("cpu"))
    initial = {k: v.clone() for k, v in lm.state_dict().items()}
    path = warmstart.warm_start(cfg, lm, tokenizer, task, torch.device("cpu"), log=lambda m: None,
                                progress=False)
    assert os.path.exists(path) and path.startswith(str(tmp_path / "cache"))
    trained = {k: v.clone() for k, v in lm.state_dict().items()}
    assert any(not torch.equal(trained[k], initial[k]) for k in initial)

    def must_not_train(*a, **k):
        raise AssertionError("the cache was not used")

    monkeypatch.setattr(warmstart, "supervised_fine_tune", must_not_train)
    lm.load_state_dict(initial)
    warmstart.warm_start(cfg, lm, tokenizer, task, torch.device("cpu"), log=lambda m: None, progress=False)
    for k, v in lm.state_dict().items():
        assert torch.equal(v, trained[k])
    other = tiny(tmp_path, warm_start=True, sft_steps=4, sft_batch_size=4, sft_examples=16)
    assert warmstart.cache_path(other, lm, tokenizer) != path


# --- checkpoints and resume -------------------------------------------------------------------------

def _weights(run_dir, name):
    from safetensors.torch import load_file

    return load_file(os.path.join(run_dir, "checkpoint", f"{name}.safetensors"))


@pytest.mark.parametrize("algo", ["sppo", "grpo"])
def test_resume_equals_straight_run(tmp_path, algo, alternating_rewards):
    """2 steps, then 2 resumed steps, give the same weights as 4 straight steps."""
    kw = dict(algo=algo, samples_per_prompt=2 if algo == "grpo" else 0, save_every=2, eval_every=2)
    straight = tiny(tmp_path / "a", steps=4, **kw)
    train(straight)
    half = tiny(tmp_path / "b", steps=2, **kw)
    train(half)
    cfg, resume = config_from_args(["--resume", half.out, "--steps", "4"])
    assert resume and cfg.out == half.out and cfg.hidden_size == TINY["hidden_size"]
    summary = train(cfg, resume=True)
    assert summary["resumed_from_step"] == 2
    names = ["policy"] + (["critic"] if algo == "sppo" else [])
    for name in names:
        a, b = _weights(straight.out, name), _weights(half.out, name)
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=0, msg=f"{name}.{k}")
    rows_a = [json.loads(x) for x in open(os.path.join(straight.out, "metrics.jsonl"))]
    rows_b = [json.loads(x) for x in open(os.path.join(half.out, "metrics.jsonl"))]
    assert [r["step"] for r in rows_b] == [r["step"] for r in rows_a] == [0, 1, 2, 3, 4]
    assert [r.get("reward") for r in rows_b] == [r.get("reward") for r in rows_a]


def test_checkpoint_survives_an_interrupted_save(tmp_path):
    """A save that died after moving the old checkpoint aside still leaves a loadable checkpoint."""
    from sppo_fast.trainer.checkpoint import find_checkpoint

    cfg = tiny(tmp_path, steps=1)
    train(cfg)
    os.replace(os.path.join(cfg.out, "checkpoint"), os.path.join(cfg.out, "checkpoint.old"))
    assert find_checkpoint(cfg.out).endswith("checkpoint.old")
    state = torch.load(os.path.join(cfg.out, "checkpoint.old", "state.pt"), weights_only=True)
    assert state["step"] == 1


# --- plots ------------------------------------------------------------------------------------------

def test_plot_command_overlays_runs(tmp_path):
    for i, algo in enumerate(("sppo", "rloo")):
        run = tmp_path / f"r{i}"
        run.mkdir()
        (run / "config.json").write_text(json.dumps({"algo": algo}))
        rows = [{"step": 0, "wall": 0.0, "eval_accuracy": 0.2}]
        rows += [{"step": s, "wall": 1.0 * s, "reward": 0.1 * s, "eval_accuracy": 0.2 + 0.05 * s}
                 for s in (1, 2)]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "plots"
    assert plot_main([str(tmp_path / "r0"), str(tmp_path / "r1"), "--out", str(out)]) == 0
    for name in ("accuracy.png", "reward.png"):
        assert (out / name).stat().st_size > 1000
    with pytest.raises(SystemExit):
        plot_main([str(tmp_path / "missing")])


# --- two processes (torchrun, gloo on CPU) ----------------------------------------------------------

def _torchrun(tmp_path, name, *extra, **overrides):
    """`torchrun --nproc_per_node 2 -m sppo_fast.trainer.cli` on CPU (gloo) with a tiny config."""
    import sys

    out = tmp_path / name
    flags = {**TINY, "algo": "sppo", "steps": 2, "rollouts_per_step": 4, "eval_examples": 4, "save_every": 0,
             "out": str(out), "cache_dir": str(tmp_path / "cache"), "device": "cpu", **overrides}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "sppo_fast.trainer.cli", *extra]
    for k, v in flags.items():
        cmd += [f"--{k}", str(v).lower() if isinstance(v, bool) else str(v)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}
    returncode, stderr = _run_group(cmd, env)
    if returncode != 0 and ABORT in stderr:
        # The gloo-worker abort at interpreter exit (see distributed.shutdown; 2 in ~260 runs before its
        # fix, 0 in 200 after): should it ever come back, one more run; twice in a row fails.
        returncode, stderr = _run_group(cmd, env)
    assert returncode == 0, stderr[-3000:]
    return out


ABORT = "terminate called without an active exception"


def _run_group(cmd, env):
    """(returncode, stderr) of cmd in its own process group, so that a hang kills the workers too."""
    import subprocess

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, stderr = proc.communicate()
        raise AssertionError(f"torchrun did not finish in 240 s: {stderr[-3000:]}") from None
    return proc.returncode, stderr


def test_two_process_run_on_cpu(tmp_path):
    """`torchrun --nproc_per_node 2` of the same entry point: the warm start made once by rank 0 (the
    other rank waits, then loads the cache), 2 RL steps with the rollouts sharded over the ranks."""
    out = _torchrun(tmp_path, "ddp", warm_start=True, sft_steps=3, sft_batch_size=4, sft_examples=16)
    assert len(list((tmp_path / "cache" / "warmstart").glob("*.safetensors"))) == 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 2
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert all(math.isfinite(r["loss"]) for r in rows[1:])


def test_two_process_resume_restores_every_rank(tmp_path):
    """Each rank samples from its own generator; a 2-process resume must restore each rank's."""
    straight = _torchrun(tmp_path, "straight", steps=4, save_every=2, parallel="ddp")
    half = _torchrun(tmp_path, "half", steps=2, save_every=2, parallel="ddp")
    _torchrun(tmp_path, "half", "--resume", str(half), steps=4, save_every=2, parallel="ddp")
    a, b = _weights(str(straight), "policy"), _weights(str(half), "policy")
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=0, msg=k)


@pytest.mark.skipif(not __import__("sppo_fast.trainer.distributed", fromlist=["x"]).fsdp2_available(),
                    reason="torch.distributed.fsdp.fully_shard is not available")
def test_fsdp2_matches_ddp(tmp_path):
    """FSDP2 (decoder layers sharded, lm_head replicated) computes the same update as DDP."""
    ddp = _torchrun(tmp_path, "ddp", parallel="ddp", save_every=1)
    fsdp = _torchrun(tmp_path, "fsdp2", parallel="fsdp2", save_every=1)
    a, b = _weights(str(ddp), "policy"), _weights(str(fsdp), "policy")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=1e-5, msg=k)
    # and it did train: the weights moved away from the initial ones
    torch.manual_seed(0)
    initial = build_policy(TrainConfig(**TINY), load_tokenizer(TrainConfig()), torch.device("cpu")).state_dict()
    assert any(not torch.equal(a[k], initial[k]) for k in a)


def test_local_hugging_face_model_directory(tmp_path, alternating_rewards):
    """`--model PATH`: any local causal-LM directory (here a saved tiny Llama and its tokenizer), offline."""
    from transformers import LlamaForCausalLM

    tok = load_tokenizer(TrainConfig())
    torch.manual_seed(0)
    lm = LlamaForCausalLM(tiny_llama_config(tok, hidden=32, layers=1, heads=2))
    model_dir = tmp_path / "hf-model"
    lm.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    cfg = tiny(tmp_path, model=str(model_dir), steps=1, algo="rloo", samples_per_prompt=2)
    summary = train(cfg)
    assert summary["steps"] == 1 and summary["policy_parameters"] == sum(p.numel() for p in lm.parameters())


def test_kl_penalty_to_the_warm_start(tmp_path, alternating_rewards):
    cfg = tiny(tmp_path, algo="grpo", samples_per_prompt=2, steps=1, kl_coef=0.1)
    train(cfg)
    step = [json.loads(x) for x in open(os.path.join(cfg.out, "metrics.jsonl"))][-1]
    assert "kl" in step and math.isfinite(step["kl"])


def test_default_task_level_per_task_and_its_solutions_fit_the_response_budget():
    """task_difficulty=0 means the task's own default (arithmetic 3, long_arithmetic 2, none for the
    others), and the default max_new_tokens holds the longest worked solution of the default task with
    its EOS, so the warm start's format is never cut off."""
    from sppo_fast.trainer.loop import make_task

    assert TrainConfig().task_difficulty == 3
    assert TrainConfig(task="long_arithmetic").task_difficulty == 2
    assert TrainConfig(task="countdown").task_difficulty == 0
    assert TrainConfig(task_difficulty=1).task_difficulty == 1
    cfg = TrainConfig()
    assert TrainConfig(**cfg.to_dict()) == cfg
    task, tok = make_task(cfg), load_tokenizer(cfg)
    examples = task.examples("train", 4000, seed=0) + task.examples("test", 1000, seed=0)
    longest = max(len(tok(ex.solution, add_special_tokens=False)["input_ids"]) + 1 for ex in examples)
    assert longest <= cfg.max_new_tokens


# --- stopping by a signal (SIGINT, SIGTERM) and by a kill (SIGKILL), then --resume -----------------------

def _rows(run_dir):
    return [json.loads(x) for x in open(os.path.join(run_dir, "metrics.jsonl"))]


def _same_run(a, b, names):
    """Same final weights and the same per-step metrics that do not depend on the clock."""
    for name in names:
        wa, wb = _weights(a, name), _weights(b, name)
        assert wa.keys() == wb.keys()
        for k in wa:
            torch.testing.assert_close(wb[k], wa[k], atol=1e-6, rtol=0, msg=f"{name}.{k}")
    ra, rb = _rows(a), _rows(b)
    assert [r["step"] for r in rb] == [r["step"] for r in ra]
    for key in ("reward", "loss", "critic_loss", "eval_accuracy", "response_length"):
        assert [r.get(key) for r in rb] == [r.get(key) for r in ra], key


@pytest.fixture
def default_sigint():
    """SIGINT at Python's default handler for the test: a suite launched in the background (`cmd &` from a
    script) inherits SIGINT ignored, which the trainer rightly keeps ignored (sppo_fast/trainer/signals.py)."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


def _signal_at(monkeypatch, owner, attr, call, signum):
    """Make the `call`-th call of owner.attr deliver `signum` to this process (through the real handler)."""
    real = getattr(owner, attr)
    calls = []

    def wrapped(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append(1)
        if len(calls) == call:
            os.kill(os.getpid(), signum)
        return out

    monkeypatch.setattr(owner, attr, wrapped)


def test_sigint_in_rl_checkpoints_the_step_and_resume_equals_straight_run(tmp_path, monkeypatch,
                                                                          alternating_rewards, default_sigint):
    """Ctrl-C during step 2 of 4 (save_every 0: no checkpoint would exist before the end): the step is
    finished and checkpointed, the run stops with the resume command, and --resume gives the same weights
    and metrics as a run that was never interrupted."""
    import sppo_fast.trainer.loop as loop
    from sppo_fast.trainer.signals import RunInterrupted

    kw = dict(algo="sppo", steps=4, save_every=0, eval_every=2)
    straight = tiny(tmp_path / "a", **kw)
    train(straight)
    cfg = tiny(tmp_path / "b", **kw)
    handler = signal.getsignal(signal.SIGINT)
    with monkeypatch.context() as m:
        _signal_at(m, loop.Trainer, "step", 2, signal.SIGINT)
        with pytest.raises(RunInterrupted) as stop:
            train(cfg)
    assert signal.getsignal(signal.SIGINT) is handler, "the handler is put back"
    assert stop.value.exit_code == 130
    assert "at step 2 of 4" in str(stop.value) and f"--resume {cfg.out}" in str(stop.value)
    state = torch.load(os.path.join(cfg.out, "checkpoint", "state.pt"), weights_only=True)
    assert state["step"] == 2 and not os.path.exists(os.path.join(cfg.out, "summary.json"))
    resumed, resume = config_from_args(["--resume", cfg.out])
    assert resume and resumed == cfg
    assert train(resumed, resume=True)["resumed_from_step"] == 2
    _same_run(straight.out, cfg.out, ["policy", "critic"])


def test_sigterm_in_the_warm_start_keeps_its_progress_and_resume_equals_straight_run(tmp_path, monkeypatch):
    """SIGTERM during SFT step 3 of 6: the warm start saves its progress beside its cache entry and the run
    stops; --resume continues the fine-tuning from step 3 and ends with the same warm start (bit for bit)
    and the same RL run as an uninterrupted one."""
    from sppo_fast.trainer import warmstart
    from sppo_fast.trainer.signals import RunInterrupted

    kw = dict(algo="grpo", samples_per_prompt=2, steps=2, warm_start=True, sft_steps=6, sft_batch_size=4,
              sft_examples=16)
    straight = tiny(tmp_path / "a", **kw)
    train(straight)
    cfg = tiny(tmp_path / "b", **kw)
    with monkeypatch.context() as m:
        _signal_at(m, warmstart, "sft_loss", 3, signal.SIGTERM)
        with pytest.raises(RunInterrupted) as stop:
            train(cfg)
    assert stop.value.exit_code == 143
    assert "warm start (SFT step 3 of 6)" in str(stop.value) and f"--resume {cfg.out}" in str(stop.value)
    cache = tmp_path / "b" / "cache" / "warmstart"
    assert not list(cache.glob("*.safetensors")) and len(list(cache.glob("*.partial"))) == 1
    assert sorted(os.listdir(cfg.out)) == ["config.json"]
    calls = []
    real_loss = warmstart.sft_loss
    monkeypatch.setattr(warmstart, "sft_loss", lambda *a: calls.append(1) or real_loss(*a))
    resumed, _ = config_from_args(["--resume", cfg.out])
    train(resumed, resume=True)
    assert len(calls) == 3, "the fine-tuning continued from step 3"
    assert not list(cache.glob("*.partial"))
    from safetensors.torch import load_file

    [a] = (tmp_path / "a" / "cache" / "warmstart").glob("*.safetensors")
    [b] = cache.glob("*.safetensors")
    wa, wb = load_file(a), load_file(b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    _same_run(straight.out, cfg.out, ["policy"])


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_killed_cli_run_resumes_to_the_straight_run(tmp_path, sig):
    """`sppo-fast train` in its own process, signalled from outside once it has checkpointed a step:
    SIGTERM stops it cleanly after the step in flight (exit 143, the resume command on its last line);
    SIGKILL leaves the last checkpoint (and perhaps a line cut short in metrics.jsonl). Either way
    `--resume` continues to the same weights and metrics as a straight run."""
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    values = {**TINY, "algo": "sppo", "steps": 100000, "save_every": 1, "out": str(out),
              "cache_dir": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "sppo_fast.trainer.cli"]
    for k, v in values.items():
        cmd += [f"--{k}", str(v).lower() if isinstance(v, bool) else str(v)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)
    from sppo_fast.trainer.checkpoint import find_checkpoint

    def saved_step():
        """The step of the checkpoint a resume would load (a kill mid-save leaves checkpoint.old)."""
        try:
            return torch.load(os.path.join(find_checkpoint(str(out)), "state.pt"), weights_only=True)["step"]
        except (TypeError, OSError, RuntimeError, EOFError):  # none yet, or being renamed right now
            return 0

    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None and saved_step() < 1:
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    step = saved_step()
    assert step >= 1
    if sig == signal.SIGTERM:
        assert proc.returncode == 143, stderr[-3000:]
        last = stderr.strip().splitlines()[-1]
        assert last.startswith(f"sppo-fast train: interrupted by SIGTERM at step {step} of 100000")
        assert last.endswith(f"resume with: sppo-fast train --resume {out}")
        assert "Traceback" not in stderr
    else:
        assert proc.returncode == -signal.SIGKILL
    total = step + 2
    straight = tiny(tmp_path / "straight", algo="sppo", steps=total, save_every=1)
    train(straight)
    cfg, resume = config_from_args(["--resume", str(out), "--steps", str(total)])
    assert train(cfg, resume=True)["resumed_from_step"] == step
    _same_run(straight.out, str(out), ["policy", "critic"])


def test_a_second_signal_stops_at_once_and_the_handlers_are_put_back(default_sigint):
    from sppo_fast.trainer.signals import StopRequest

    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    seen = []
    with pytest.raises(KeyboardInterrupt):
        with StopRequest(seen.append) as stop:
            assert not stop
            os.kill(os.getpid(), signal.SIGTERM)
            assert stop and stop.name == "SIGTERM" and "SIGTERM" in seen[0]
            os.kill(os.getpid(), signal.SIGINT)
            raise AssertionError("the second signal must stop at once")
    assert {s: signal.getsignal(s) for s in before} == before


# --- speed paths of the default run (issue 18): same numbers as the plain ones --------------------------

def test_sft_micro_batches_give_the_padded_batch_loss_and_gradient(tokenizer):
    from sppo_fast.trainer import warmstart
    from sppo_fast.trainer.loop import make_task

    cfg = TrainConfig(hidden_size=32, num_layers=2, num_heads=2, threads=1)
    torch.manual_seed(0)
    lm = build_policy(cfg, tokenizer, torch.device("cpu"))
    examples = make_task(cfg).examples("train", 24, seed=3)
    pairs = warmstart.sft_targets(examples, 0.5, torch.Generator().manual_seed(1))
    encoded = warmstart.encode_pairs(tokenizer, pairs)
    groups = warmstart.length_groups([len(p) + len(t) for p, t in encoded], cost=8)
    assert sorted(i for g in groups for i in g) == list(range(len(pairs))) and len(groups) > 1
    hidden = PolicyHidden(lm)
    losses, grads = [], []
    for batches in ([warmstart.sft_batch(tokenizer, pairs, "cpu")],
                    warmstart.sft_micro_batches(tokenizer, None, "cpu", encoded=encoded)):
        lm.zero_grad(set_to_none=True)
        loss = warmstart.sft_loss(hidden, lm, batches)
        loss.backward()
        losses.append(loss.detach())
        grads.append([p.grad.clone() for p in lm.parameters()])
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


def test_sampler_logprobs_equal_recomputed_ones_and_leave_the_draws_alone(tokenizer):
    from sppo_fast.trainer.loop import response_logprobs

    cfg = TrainConfig(hidden_size=32, num_layers=2, num_heads=2, threads=1)
    torch.manual_seed(0)
    lm = build_policy(cfg, tokenizer, torch.device("cpu"))
    prompts = ["1+2\n", "12*11-3\n", "(3+5)*2-4\n"]
    torch.manual_seed(1)
    plain = generate(lm, tokenizer, prompts, max_new_tokens=8, temperature=0.7, device="cpu")
    torch.manual_seed(1)
    rollout = generate(lm, tokenizer, prompts, max_new_tokens=8, temperature=0.7, device="cpu", logprobs=True)
    assert torch.equal(rollout.response_ids, plain.response_ids) and plain.logprobs is None
    again = response_logprobs(PolicyHidden(lm), lm, rollout, 0.7, torch.device("cpu"))
    mask = rollout.response_mask.bool()
    torch.testing.assert_close(rollout.logprobs[mask], again[mask], rtol=0, atol=1e-5)
    assert (rollout.logprobs[~mask] == 0).all()
    sub = rollout.select(torch.tensor([2, 0]))
    assert sub.logprobs.shape == sub.response_ids.shape
