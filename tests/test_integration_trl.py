"""sppo-fast inside TRL's GRPOTrainer (sppo_fast.integrations.trl), checked against TRL's own loss.

On one batch, TRL 1.16's `GRPOTrainer._compute_loss` and ours give the same loss and the same
gradient of every parameter, for each loss type, sequence-level ratios, beta > 0, a rollout
importance-sampling ratio, the off-policy mask, top_entropy_quantile and the entropy bonus; then a few
`trainer.train()` steps run end to end. Tiny Qwen2 from a config, local character tokenizer, CPU."""

import math
import tempfile

import pytest
import torch

trl = pytest.importorskip("trl", reason="TRL is not installed (pip install 'trl==1.16.*')")
from datasets import Dataset  # noqa: E402  (installed with TRL)
from transformers import Qwen2Config, Qwen2ForCausalLM  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from sppo_fast.integrations import trl as sf_trl  # noqa: E402
from sppo_fast.trainer.tokenizer import build_tokenizer  # noqa: E402

B, P, K = 4, 5, 7  # sequences, prompt columns (left-padded), completion columns


def tiny_qwen2(tokenizer, **overrides):
    config = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                  pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                  eos_token_id=tokenizer.eos_token_id)
    config.update(overrides)
    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config(**config))


def reward_digits(completions, **kwargs):
    """The share of digits: varies between a random model's samples, so advantages are not all 0."""
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


def prompts():
    return Dataset.from_dict({"prompt": ["1+1=", "2+3=", "4+4=", "5+1=", "7+2=", "3+3=", "9+0=", "6+2="]})


def make_trainer(model=None, trainer_cls=GRPOTrainer, **args):
    tokenizer = build_tokenizer()
    model = tiny_qwen2(tokenizer) if model is None else model
    defaults = dict(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=4, num_generations=2,
                    max_completion_length=K, max_steps=2, report_to=[], use_cpu=True, logging_steps=1,
                    save_strategy="no", gradient_checkpointing=False, bf16=False)
    defaults.update(args)
    trainer = trainer_cls(model=model, reward_funcs=reward_digits, args=GRPOConfig(**defaults),
                          train_dataset=prompts(), processing_class=tokenizer)
    trainer.current_gradient_accumulation_steps = 2  # as Trainer sets it; 2 exercises the scaling
    return trainer


def make_batch(vocab, *, seed=0, old=True, ref=False, is_ratio=False, level="token"):
    g = torch.Generator().manual_seed(seed)
    prompt_ids = torch.randint(5, vocab, (B, P), generator=g)
    prompt_mask = torch.ones(B, P, dtype=torch.long)
    prompt_mask[1, :2] = 0  # left padding
    prompt_mask[3, :1] = 0
    prompt_ids = prompt_ids.masked_fill(prompt_mask == 0, 0)  # the pad id: the embedding's padding_idx
    completion_ids = torch.randint(5, vocab, (B, K), generator=g)
    completion_mask = torch.ones(B, K, dtype=torch.long)
    completion_mask[0, 4:] = 0  # ended early
    completion_mask[2, 1:] = 0  # one token
    inputs = dict(prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
                  completion_mask=completion_mask, advantages=torch.randn(B, generator=g),
                  num_items_in_batch=completion_mask.sum() * 3)  # as if the generation batch were larger
    noise = lambda scale: scale * torch.randn(B, K, generator=g)  # noqa: E731
    base = -math.log(vocab) + noise(0.05)  # a small random model's log-probs are near -log(V)
    if old:  # far enough from the current log-probs that both clip bounds are hit
        inputs["old_per_token_logps"] = base + noise(0.3)
    if ref:
        inputs["ref_per_token_logps"] = base + noise(1.5)  # k3 above 10 on some tokens: no clamp in TRL
    if is_ratio:
        inputs["importance_sampling_ratio"] = torch.rand(B, K, generator=g) * 1.5
    return inputs


def loss_and_grads(fn, trainer, inputs):
    model = trainer.model
    model.zero_grad(set_to_none=True)
    model.train()
    loss = fn(trainer, model, inputs)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, {k: list(v) for k, v in trainer._metrics["train"].items()}


CONTROLLER_STATE = ("entropy_coef", "_last_world_entropy")


def assert_same_as_trl(trainer, inputs, atol=2e-6):
    """TRL's own loss first, on the pristine trainer; then the same trainer switched by
    patch_grpo_trainer (embedding and lm_head gradients then go straight into .grad)."""
    state = {k: getattr(trainer, k) for k in CONTROLLER_STATE}  # the adaptive entropy controller moves
    trainer._metrics["train"].clear()
    ref_loss, ref_grads, ref_metrics = loss_and_grads(GRPOTrainer._compute_loss, trainer, inputs)
    ref_state = {k: getattr(trainer, k) for k in CONTROLLER_STATE}
    for k, v in state.items():
        setattr(trainer, k, v)
    trainer._metrics["train"].clear()
    sf_trl.patch_grpo_trainer(trainer)
    loss, grads, metrics = loss_and_grads(lambda t, m, x: t._compute_loss(m, x), trainer, inputs)
    assert trainer.model.get_input_embeddings()._sppo_fast_grad_into
    for k in CONTROLLER_STATE:
        assert getattr(trainer, k) == pytest.approx(ref_state[k]), k
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=atol)
    assert grads.keys() == ref_grads.keys()
    for name in ref_grads:
        scale = ref_grads[name].abs().max().item()
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-5 * max(scale, 1e-3),
                                   msg=lambda m, n=name: f"{n}: {m}")
    assert metrics.keys() == ref_metrics.keys()
    for name in ref_metrics:
        assert metrics[name] == pytest.approx(ref_metrics[name], rel=1e-4, abs=1e-6), name


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_each_loss_type_equals_trl(loss_type):
    trainer = make_trainer(loss_type=loss_type, epsilon_high=0.28)
    assert_same_as_trl(trainer, make_batch(trainer.model.config.vocab_size))


@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_sequence_level_ratio_equals_trl(loss_type):
    trainer = make_trainer(loss_type=loss_type, importance_sampling_level="sequence", epsilon=3e-2,
                           epsilon_high=4e-2)
    assert_same_as_trl(trainer, make_batch(trainer.model.config.vocab_size, level="sequence"))


@pytest.mark.parametrize("level, bias_correction", [("token", True), ("token", False), ("sequence", True)])
def test_beta_kl_and_delta_equal_trl(level, bias_correction):
    trainer = make_trainer(loss_type="dapo", delta=1.5, importance_sampling_level=level,
                           use_bias_correction_kl=bias_correction)
    trainer.beta = 0.3  # the reference log-probs come with the batch: no reference model needed here
    assert_same_as_trl(trainer, make_batch(trainer.model.config.vocab_size, ref=True))


def test_rollout_is_ratio_and_masks_equal_trl():
    trainer = make_trainer(loss_type="grpo", top_entropy_quantile=0.5, off_policy_mask_threshold=0.05,
                           entropy_coef=0.01, temperature=0.7)
    trainer.use_vllm, trainer.vllm_importance_sampling_correction = True, True  # what vLLM rollouts set
    inputs = make_batch(trainer.model.config.vocab_size, is_ratio=True)
    inputs["sampling_per_token_logps"] = inputs["old_per_token_logps"] + 0.2 * torch.randn(B, K)
    assert_same_as_trl(trainer, inputs)


def test_on_policy_without_old_logps_equals_trl():
    trainer = make_trainer(loss_type="bnpo", use_adaptive_entropy=True, entropy_coef=0.01)
    assert_same_as_trl(trainer, make_batch(trainer.model.config.vocab_size, old=False))


def test_tied_embeddings_equal_trl():
    tokenizer = build_tokenizer()
    trainer = make_trainer(model=tiny_qwen2(tokenizer, tie_word_embeddings=True), loss_type="dapo")
    assert_same_as_trl(trainer, make_batch(trainer.model.config.vocab_size))


def test_bf16_autocast_default_agrees_to_bf16_precision():
    """TRL's default bf16=True autocasts the model; TRL's head then runs in bf16, ours in the weight's
    fp32 (more precise), so the two agree to bf16 precision, not to fp32's."""
    trainer = make_trainer(loss_type="dapo", bf16=True)
    inputs = make_batch(trainer.model.config.vocab_size)
    ref_loss, ref_grads, _ = loss_and_grads(GRPOTrainer._compute_loss, trainer, inputs)
    sf_trl.patch_grpo_trainer(trainer)
    loss, grads, _ = loss_and_grads(lambda t, m, x: t._compute_loss(m, x), trainer, inputs)
    torch.testing.assert_close(loss, ref_loss, rtol=2e-2, atol=1e-3)
    head, ref_head = grads["lm_head.weight"], ref_grads["lm_head.weight"]
    assert (head - ref_head).norm() <= 0.05 * ref_head.norm()


@pytest.mark.parametrize("loss_type", ["cispo", "sapo", "luspo", "vespo", "no_such_loss"])
def test_unmapped_loss_types_raise_naming_them(loss_type):
    trainer = make_trainer()
    trainer.loss_type = loss_type  # set after construction: TRL's own config rejects an unknown name
    with pytest.raises(ValueError, match=loss_type):
        sf_trl.patch_grpo_trainer(trainer)


def test_delta_below_the_clip_bound_raises():
    with pytest.raises(ValueError, match="delta"):
        make_trainer(trainer_cls=sf_trl.SppoFastGRPOTrainer, delta=1.1, epsilon_high=0.28)
    assert sf_trl.loss_config(make_trainer(delta=1.3, epsilon_high=0.28)).dual_clip == 1.3


def test_softcapping_and_moe_aux_loss_raise():
    trainer = make_trainer()
    trainer.aux_loss_enabled = True
    with pytest.raises(ValueError, match="router_aux_loss_coef"):
        sf_trl.check_supported(trainer)
    tokenizer = build_tokenizer()
    trainer = make_trainer(model=tiny_qwen2(tokenizer))
    trainer.model.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        sf_trl.check_supported(trainer)
    with pytest.raises(TypeError, match="trainer"):
        sf_trl.patch_grpo_trainer(object())


def test_train_steps_end_to_end():
    trainer = make_trainer(trainer_cls=sf_trl.SppoFastGRPOTrainer, loss_type="dapo", max_steps=2,
                           learning_rate=1e-2, gradient_checkpointing=True)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 2 and all(math.isfinite(h["loss"]) for h in logged)
    assert all("entropy" in h and "clip_ratio/region_mean" in h for h in logged)
    lm_head = trainer.model.lm_head.weight
    assert not torch.equal(lm_head, before["lm_head.weight"])  # the head's gradient reached the optimizer
    assert not torch.equal(trainer.model.model.layers[0].mlp.up_proj.weight,
                           before["model.layers.0.mlp.up_proj.weight"])


def test_sppo_mode_one_sample_per_prompt_with_a_prompt_critic():
    from sppo_fast.trainer.models import PromptCritic, tiny_llama_config

    tokenizer = build_tokenizer()
    critic = PromptCritic(tiny_llama_config(tokenizer, hidden=16, layers=1, heads=2))
    before = [p.detach().clone() for p in critic.parameters()]
    seen_logits, seen_rewards = [], []
    critic_forward = critic.forward
    critic.forward = lambda ids, mask: seen_logits.append(critic_forward(ids, mask)) or seen_logits[-1]

    def has_digit(completions, **kwargs):
        rewards = [float(any(ch.isdigit() for ch in c)) for c in completions]
        seen_rewards.append(torch.tensor(rewards))
        return rewards

    args = sf_trl.sppo_config(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=4, max_completion_length=K,
                              max_steps=2, report_to=[], use_cpu=True, logging_steps=1, save_strategy="no",
                              bf16=False, loss_type="bnpo", learning_rate=1e-2, gradient_checkpointing=False)
    trainer = sf_trl.SPPOTrainer(model=tiny_qwen2(tokenizer), reward_funcs=has_digit, args=args,
                                 train_dataset=prompts(), processing_class=tokenizer, critic=critic)
    trainer.train()
    assert trainer.num_generations == 1 and len(seen_rewards) == 2 and all(len(r) == 4 for r in seen_rewards)
    # the last batch's advantages are R - sigmoid(z) with the critic's values from before its update
    expected = seen_rewards[-1] - torch.sigmoid(seen_logits[-1].detach())
    got = torch.cat([b["advantages"] for b in trainer._buffered_inputs])
    torch.testing.assert_close(got.sort().values, expected.sort().values)
    assert any(not torch.equal(p, q) for p, q in zip(critic.parameters(), before))  # the critic learned
    assert all("sppo/critic_loss" in h for h in trainer.state.log_history if "loss" in h)
    with pytest.raises(ValueError, match="num_generations"):
        sf_trl.sppo_config(output_dir=tempfile.mkdtemp(), num_generations=4)


def _sppo_trainer(output_dir, critic_seed, callbacks=(), **overrides):
    """A tiny SPPOTrainer; the critic's initial weights come from `critic_seed`."""
    from sppo_fast.trainer.models import PromptCritic, tiny_llama_config

    tokenizer = build_tokenizer()
    torch.manual_seed(critic_seed)
    critic = PromptCritic(tiny_llama_config(tokenizer, hidden=16, layers=1, heads=2))

    def has_digit(completions, **kwargs):
        return [float(any(ch.isdigit() for ch in c)) for c in completions]

    values = dict(output_dir=str(output_dir), per_device_train_batch_size=4, max_completion_length=K, max_steps=4,
                  report_to=[], use_cpu=True, logging_steps=1, save_strategy="steps", save_steps=2, bf16=False,
                  loss_type="bnpo", learning_rate=1e-2, lr_scheduler_type="constant", gradient_checkpointing=False,
                  seed=0)
    values.update(overrides)
    # 16 prompts, 4 a step: the 4 steps are one epoch (TRL's sampler draws the order of a later epoch afresh
    # when resumed, which would be TRL's own difference, not the critic's)
    dataset = Dataset.from_dict({"prompt": [f"{a}+{b}=" for a in range(4) for b in range(4)]})
    return sf_trl.SPPOTrainer(model=tiny_qwen2(tokenizer), reward_funcs=has_digit, args=sf_trl.sppo_config(**values),
                              train_dataset=dataset, processing_class=tokenizer, critic=critic,
                              critic_learning_rate=1e-2, callbacks=list(callbacks))


def _critic_state(trainer):
    return {k: v.detach().clone() for k, v in trainer.critic.state_dict().items()}


def test_sppo_mode_checkpoints_its_critic_and_resume_continues_where_it_stopped(tmp_path):
    """4 steps straight, against 2 steps that stop (checkpoint-2 written by TRL) and a new trainer, whose critic
    starts from other weights, resumed from that checkpoint: the critic, its optimizer and the policy end as
    in the straight run. Without the critic in the checkpoint the resumed critic would keep its other start."""
    from safetensors.torch import load_file
    from transformers import TrainerCallback

    class StopAt2(TrainerCallback):  # an interruption right after TRL's checkpoint of step 2
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2:
                control.should_training_stop = True

    straight = _sppo_trainer(tmp_path / "straight", critic_seed=1, save_strategy="no")
    straight.train()
    stopped = _sppo_trainer(tmp_path / "run", critic_seed=1, callbacks=[StopAt2()])
    stopped.train()
    assert stopped.state.global_step == 2
    checkpoint = tmp_path / "run" / "checkpoint-2"
    saved = load_file(checkpoint / sf_trl.SPPO_CRITIC_WEIGHTS)
    at_stop = _critic_state(stopped)
    assert saved.keys() == at_stop.keys() and all(torch.equal(saved[k], at_stop[k]) for k in saved)
    assert (checkpoint / sf_trl.SPPO_CRITIC_OPTIMIZER).exists()

    resumed = _sppo_trainer(tmp_path / "run", critic_seed=2)
    assert any(not torch.equal(v, at_stop[k]) for k, v in _critic_state(resumed).items())
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 4
    end, expected = _critic_state(resumed), _critic_state(straight)
    for k in expected:
        torch.testing.assert_close(end[k], expected[k], atol=1e-6, rtol=0, msg=k)
    steps = [s["step"] for s in resumed.critic_optimizer.state_dict()["state"].values()]
    assert steps and all(int(s) == 2 * 2 for s in steps), steps  # one critic step per step, none lost
    for (name, p), q in zip(resumed.model.named_parameters(), straight.model.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0, msg=name)
    assert (tmp_path / "run" / "checkpoint-4" / sf_trl.SPPO_CRITIC_WEIGHTS).exists()


def test_sppo_mode_refuses_a_checkpoint_without_its_critic(tmp_path):
    plain = _sppo_trainer(tmp_path / "run", critic_seed=1, max_steps=2)
    plain.train()
    (tmp_path / "run" / "checkpoint-2" / sf_trl.SPPO_CRITIC_WEIGHTS).unlink()
    again = _sppo_trainer(tmp_path / "run", critic_seed=1, max_steps=4)
    with pytest.raises(ValueError, match="sppo_critic.safetensors"):
        again.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
