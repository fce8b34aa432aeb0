"""Issue 10, long chain-of-thought: the five --loss_impl agree (torch_lce on losses without the entropy), a
real vocabulary (--vocab_size) and the long_arithmetic task run end to end, and bad input fails before
training. Small sizes: seconds."""

from __future__ import annotations

import json
import os

import pytest
import torch
from spec_helpers import assert_spec_close

import sppo_fast
from sppo_fast.trainer.config import LOSS_IMPLS, TrainConfig
from sppo_fast.trainer.loop import train
from sppo_fast.trainer.loss_impls import check_loss_impl, eager_policy_loss, policy_loss_from_hidden
from sppo_fast.trainer.models import load_tokenizer, tiny_llama_config
from sppo_fast.trainer.rollout import UNKNOWN_ID_TEXT, decode_responses, generate
from sppo_fast.trainer.tasks import get_task
from sppo_fast.trainer.tasks.long_arithmetic import LEVELS, solution_text, worked_steps

TINY = dict(hidden_size=32, num_layers=1, num_heads=2, critic_hidden_size=16, critic_layers=1, critic_heads=2,
            eval_examples=2, eval_every=100, progress=False, rollouts_per_step=2, mini_batches=1, threads=1,
            critic_warmup_steps=0, task="long_arithmetic", task_difficulty=1, steps=1, warm_start=False)


def tiny(tmp_path, **kw):
    return TrainConfig(**{**TINY, "out": str(tmp_path / "run"), "cache_dir": str(tmp_path / "cache"), **kw})


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(TrainConfig())


# --- the five loss implementations ---------------------------------------------------------------

def loss_inputs(dtype=torch.float32, B=3, T=10, H=16, V=300, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=gen, dtype=torch.float64).to(dtype)
    weight = (torch.randn(V, H, generator=gen, dtype=torch.float64) / H**0.5).to(dtype)
    targets = torch.randint(0, V, (B, T), generator=gen)
    mask = torch.ones(B, T)
    mask[0, 7:] = 0  # padding, as in any rollout batch
    mask[2, :3] = 0
    with torch.no_grad():
        logp = torch.log_softmax((hidden.double() @ weight.double().T), -1).gather(-1, targets[..., None])[..., 0]
    old_logp = (logp + 0.1 * torch.randn(B, T, generator=gen, dtype=torch.float64)).float()
    advantages = torch.randn(B, generator=gen)
    segments = torch.where(mask > 0, torch.arange(T).expand(B, T) // 4, -1)
    return hidden, weight, targets, old_logp, advantages, mask, segments


def run_impl(impl, inputs, config, **kw):
    hidden, weight, targets, old_logp, advantages, mask, segments = inputs
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    segment_ids = segments if config.needs_segments else None
    out = policy_loss_from_hidden(impl, h, w, None, targets, old_logp, advantages, mask, config,
                                  segment_ids=segment_ids, temperature=0.9, **kw)
    grad_h, grad_w = torch.autograd.grad(out.loss, (h, w))
    return out.loss.detach(), grad_h, grad_w


# one compiled case: compilation takes tens of seconds on 2 cores
@pytest.mark.parametrize("impl,preset", [(impl, preset) for preset in ("sppo", "sspo")
                                         for impl in ("fused_linear", "fused", "eager")] + [("compile", "sppo")])
def test_every_loss_impl_gives_the_same_loss_and_gradients(impl, preset):
    """Each implementation against fp64 (the eager loss on fp64 inputs), by docs/api.md §5's criterion:
    no further from it than the eager loss in fp32, plus 1e-5. sspo: segment ratios, entropy-adaptive
    clipping; the entropy bonus makes the entropy's gradient count too."""
    config = sppo_fast.PolicyLossConfig.preset(preset, entropy_coef=0.01)
    inputs = loss_inputs()
    oracle = run_impl("eager", tuple(x.double() if x.is_floating_point() else x for x in inputs[:2])
                      + inputs[2:], config)
    eager = run_impl("eager", inputs, config)
    ours = run_impl(impl, inputs, config)
    for name, got, ref, exact in zip(("loss", "grad hidden", "grad weight"), ours, eager, oracle):
        assert_spec_close(got, ref, exact, torch.float32, f"{impl}/{preset} {name}")
    assert ours[0].abs() > 0 and ours[1].abs().max() > 0  # a loss that is not trivially zero


@pytest.mark.parametrize("preset", ["sppo", "dapo"])
def test_torch_lce_gives_the_same_loss_and_gradients(preset):
    """PyTorch 2.13's chunked F.linear_cross_entropy (issue 18), with torch's default options and with 4 rows
    per chunk (the trainer's --chunk_size), against fp64 by the same criterion, on losses without the
    entropy (it gives none)."""
    config = sppo_fast.PolicyLossConfig.preset(preset)
    inputs = loss_inputs()
    oracle = run_impl("eager", tuple(x.double() if x.is_floating_point() else x for x in inputs[:2])
                      + inputs[2:], config)
    eager = run_impl("eager", inputs, config)
    for chunk in (None, 4):
        ours = run_impl("torch_lce", inputs, config, chunk_size=chunk)
        for name, got, ref, exact in zip(("loss", "grad hidden", "grad weight"), ours, eager, oracle):
            assert_spec_close(got, ref, exact, torch.float32, f"torch_lce/{preset}/chunk {chunk} {name}")
        assert ours[0].abs() > 0 and ours[1].abs().max() > 0


def test_torch_lce_refuses_losses_that_need_the_entropy():
    inputs = loss_inputs()
    for config in (sppo_fast.PolicyLossConfig.preset("sspo"),
                   sppo_fast.PolicyLossConfig.preset("sppo", entropy_coef=0.01)):
        with pytest.raises(ValueError, match="torch_lce.*entropy"):
            run_impl("torch_lce", inputs, config)


def test_eager_loss_is_the_idiomatic_one():
    """eager_policy_loss equals policy_loss on token_logprobs' log-probs and entropy (the fused op's
    definition), so 'same loss' above compares the right thing."""
    hidden, weight, targets, old_logp, advantages, mask, _ = loss_inputs(torch.float64)
    config = sppo_fast.PolicyLossConfig.preset("dapo", entropy_coef=0.1)
    out = eager_policy_loss(hidden, weight, None, targets, old_logp, advantages, mask, config)
    logp, entropy = sppo_fast.token_logprobs(hidden @ weight.T, targets, return_entropy=True)
    ref = sppo_fast.policy_loss(logp, old_logp, advantages, mask, config, entropy=entropy)
    torch.testing.assert_close(out.loss, ref.loss)


def test_compile_without_a_compiler_fails_before_training(tmp_path):
    import torch._inductor.config as inductor_config

    # config.patch restores the option; monkeypatch.setattr's undo would delete it (later compiles fail)
    with inductor_config.patch({"cpp.cxx": ("/nonexistent/c++",)}):
        _check_compile_refused(tmp_path)
    assert inductor_config.cpp.cxx != ("/nonexistent/c++",)


def _check_compile_refused(tmp_path):
    with pytest.raises(ValueError, match="loss_impl: compile cannot run on cpu"):
        check_loss_impl("compile", torch.device("cpu"))
    with pytest.raises(ValueError, match="loss_impl: compile cannot run"):
        train(tiny(tmp_path, loss_impl="compile", warm_start=True))
    assert not os.path.exists(tmp_path / "cache"), "the warm start ran before the check"
    for impl in ("fused_linear", "fused", "eager", "torch_lce"):  # need no compiler
        check_loss_impl(impl, torch.device("cpu"))


def test_unknown_loss_impl_is_refused():
    with pytest.raises(ValueError, match="loss_impl"):
        TrainConfig(loss_impl="triton")
    assert LOSS_IMPLS == ("fused_linear", "fused", "eager", "compile", "torch_lce")


# --- vocabulary, positions, decoding --------------------------------------------------------------

def test_vocab_smaller_than_the_tokenizer_is_refused(tmp_path, tokenizer):
    with pytest.raises(ValueError, match=f"vocab_size \\(50\\) is smaller than the tokenizer's {len(tokenizer)}"):
        train(tiny(tmp_path, vocab_size=50))
    with pytest.raises(ValueError, match="vocab_size"):
        TrainConfig(vocab_size=-1)


def test_response_longer_than_the_positions_is_refused(tmp_path):
    # prompts such as "137 mod 9\n" are about 11 tokens with BOS: 11 + 60 > 64
    with pytest.raises(ValueError, match="max_new_tokens \\(60\\).*max_position_embeddings \\(64\\)"):
        train(tiny(tmp_path, max_positions=64, max_new_tokens=60, warm_start=True))
    assert not os.path.exists(tmp_path / "cache"), "the warm start ran before the check"


def test_unknown_ids_decode_to_a_marker_no_verifier_accepts(tokenizer):
    task = get_task("long_arithmetic", difficulty=1)
    example = task.examples("test", 1)[0]
    ids = tokenizer(f"#### {example.answer}", add_special_tokens=False)["input_ids"]
    stray = len(tokenizer) + 5000  # a row of a --vocab_size 151936 policy that no token maps to
    eos = tokenizer.eos_token_id
    rows = torch.tensor([ids[:-1] + [stray] + ids[-1:] + [eos], ids + [eos, tokenizer.pad_token_id]])
    mask = torch.ones_like(rows)
    texts = decode_responses(tokenizer, rows, mask)
    assert UNKNOWN_ID_TEXT in texts[0] and texts[0].replace(UNKNOWN_ID_TEXT, "") == f"#### {example.answer}"
    assert task.reward(texts[0], example) == 0.0  # the tokenizer alone would drop the id: reward 1
    assert task.reward(texts[1], example) == 1.0


def test_generation_uses_the_kv_cache(tokenizer):
    """Linear in length: after the prompt, each forward pass of generate reads one new token."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    lm = LlamaForCausalLM(tiny_llama_config(tokenizer, hidden=16, layers=1, heads=2, vocab_size=1000,
                                            max_positions=128))
    widths = []
    lm.register_forward_pre_hook(lambda mod, args, kwargs: widths.append(kwargs["input_ids"].shape[1]),
                                 with_kwargs=True)
    rollout = generate(lm, tokenizer, ["12 mod 5\n", "7 mod 3\n"], max_new_tokens=40, temperature=1.0,
                       device="cpu")
    assert widths[0] == rollout.prompt_ids.shape[1] and set(widths[1:]) == {1}
    assert len(widths) == rollout.response_ids.shape[1]


# --- the long task --------------------------------------------------------------------------------

@pytest.mark.parametrize("difficulty", sorted(LEVELS))
def test_long_arithmetic_solutions_are_long_and_verified(difficulty, tokenizer):
    task = get_task("long_arithmetic", difficulty=difficulty)
    train_set, test_set = task.examples("train", 40, seed=3), task.examples("test", 40, seed=3)
    assert not {e.prompt for e in train_set} & {e.prompt for e in test_set}
    level = LEVELS[difficulty]
    for example in train_set + test_set:
        n, k = (int(x) for x in example.prompt.split(" mod "))
        steps = example.solution.split("\n")[:-1]
        assert level.min_steps <= len(steps) <= level.max_steps
        assert steps == worked_steps(n, k) and steps[-1].endswith(f"={n % k}")
        assert task.reward(example.solution, example) == 1.0
        assert task.reward(example.solution.replace(f"#### {example.answer}", "#### 10"), example) == 0.0
    lengths = [len(tokenizer(e.solution, add_special_tokens=False)["input_ids"]) for e in train_set]
    assert min(lengths) >= 6 * level.min_steps  # hundreds (level 1) to thousands (level 3) of tokens
    assert solution_text(23, 5) == "23-5=18\n18-5=13\n13-5=8\n8-5=3\n#### 3"


# --- end to end -----------------------------------------------------------------------------------

def test_trainer_runs_with_torch_lce(tmp_path):
    """--loss_impl torch_lce trains (SPPO: no entropy needed) and logs no entropy it did not compute."""
    summary = train(tiny(tmp_path, loss_impl="torch_lce"))
    rows = [json.loads(line) for line in open(os.path.join(summary["run_dir"], "metrics.jsonl"))]
    step = rows[-1]
    assert step["step"] == 1 and torch.isfinite(torch.tensor([step["loss"], step["grad_norm"]])).all()
    assert "entropy" not in step


def test_trainer_runs_with_a_real_vocabulary_on_the_long_task(tmp_path):
    """vocab 151936 (Qwen's), responses of up to 160 tokens, activation checkpointing, a warm start, the
    eager loss (the fused ones are the same loss: above); the untrained policy samples mostly ids without
    a token, which must decode and score as wrong, never crash."""
    cfg = tiny(tmp_path, vocab_size=151936, max_new_tokens=160, max_positions=192, loss_impl="eager",
               gradient_checkpointing=True, warm_start=True, sft_steps=2, sft_batch_size=2, sft_examples=8)
    summary = train(cfg)
    rows = [json.loads(line) for line in open(os.path.join(summary["run_dir"], "metrics.jsonl"))]
    step = rows[-1]
    assert step["step"] == 1 and step["response_length"] > 0 and step["verifier_errors"] == 0
    assert torch.isfinite(torch.tensor([step["loss"], step["grad_norm"]])).all() and step["grad_norm"] > 0
    assert summary["policy_parameters"] > 2 * 151936 * 32  # the embedding and lm_head have every row
