"""TRL 1.16's GRPOTrainer with its policy loss computed by sppo-fast.

Switch with one import, or one line on a trainer already built:

    from sppo_fast.integrations.trl import SppoFastGRPOTrainer as GRPOTrainer
    trainer = patch_grpo_trainer(GRPOTrainer(...))          # the same, on an existing trainer

`_compute_loss` keeps every TRL feature that has an exact sppo-fast form and raises a ValueError for
the others (never a silently different loss). The log-probs and entropy of the completion come from
the decoder's last hidden states and the `lm_head` weight chunk by chunk (the `(B, T, V)` logits never
exist), with the `lm_head` and embedding gradients added straight into `.grad` on a single process
(grad_accumulation.py: no (V, H) temporary); the clipped loss is `sppo_fast.policy_loss` with the
configuration `loss_config` maps from TRL's arguments (`SPPOTrainer`, at the end, is the SPPO mode):

    TRL                                   sppo-fast
    loss_type grpo                        aggregation seq-mean-token-mean, normalizer B * grad_accum
    loss_type bnpo                        token-mean, normalizer max(N_tok, 1) * grad_accum
    loss_type dr_grpo                     seq-mean-token-sum-norm, max_length_norm max_completion_length,
                                          normalizer B * grad_accum
    loss_type dapo                        token-mean, normalizer num_items_in_batch / processes
                                          * grad_accum / steps_per_generation (TRL's own)
    importance_sampling_level             ratio_level "token" or "sequence" (GSPO)
    epsilon, epsilon_high                 clip_low, clip_high
    delta (two-sided clipping)            dual_clip (equal when delta >= 1 + epsilon_high)
    (no log-ratio clamp)                  log_ratio_clamp = inf
    off-policy mask, top_entropy_quantile,
    importance_sampling_ratio (vLLM)      rollout_is_weights (their product: they scale the clipped term)
    beta (k3 KL to ref_per_token_logps)   beta * unclamped k3 (times the ratio if use_bias_correction_kl)
                                          with the loss type's aggregation weights (sppo-fast's kl_coef
                                          k3 is clamped at 10, so it is not used)
    entropy_coef / use_adaptive_entropy   TRL's mean-entropy bonus and controller, unchanged
    temperature, logit_scale              temperature / logit_scale
    metrics                               TRL's names: entropy, kl, clip_ratio/*, policy_loss, entropy_coef

Each TRL choice that is not one of these raises in `check_supported` (listed in docs/integrations.md).

Why log-probs + `policy_loss` rather than `fused_linear_policy_loss` (whose one-pass form saves one
matmul): TRL's off-policy mask and high-entropy mask need the current log-probs and entropies before
the loss, its on-policy default (no old log-probs) needs `logp.detach()` as the old ones, and its
entropy bonus needs a differentiable entropy under its own normalisation. At V = 151936 a sequence
longer than 128 tokens does not fit one chunk anyway, and `fused_linear_policy_loss` then runs this
same two-stage path. The head runs here, not in `integrations.hf`, for the gradient accumulation and
for TRL's position ids (TRL passes none; `integrations.hf` derives them from the mask).
"""

import functools
import math
import types

import torch
from accelerate.utils import is_peft_model
from trl import GRPOTrainer
from trl.trainer.utils import nanmax, nanmin

from ..api import policy_loss
from ..losses import PolicyLossConfig, token_weights
from .grad_accumulation import accumulate_embedding_grad_into_grad, accumulation_is_safe, head_logprobs

AGGREGATIONS = {
    "grpo": "seq-mean-token-mean",
    "bnpo": "token-mean",
    "dr_grpo": "seq-mean-token-sum-norm",
    "dapo": "token-mean",
}
# Inputs of multimodal batches: the hidden-state forward here is text-only.
_MULTIMODAL_KEYS = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "image_sizes", "spatial_shapes",
                    "num_tiles", "token_type_ids", "mm_token_type_ids", "image_position_ids")


# ----------------------------------------------------------------------------------------------------
# TRL's arguments -> PolicyLossConfig


def loss_config(trainer):
    """The PolicyLossConfig equal to the trainer's TRL loss (ValueError naming what cannot be mapped)."""
    loss_type = trainer.loss_type
    if loss_type not in AGGREGATIONS:
        raise ValueError(f"TRL loss_type {loss_type!r} is not supported by sppo-fast; supported: "
                         f"{sorted(AGGREGATIONS)} (cispo, sapo, luspo and vespo have no sppo-fast form)")
    level = trainer.importance_sampling_level
    if level not in ("token", "sequence"):
        raise ValueError(f"unknown TRL importance_sampling_level {level!r}; choose 'token' or 'sequence'")
    low, high, delta = trainer.epsilon_low, trainer.epsilon_high, trainer.args.delta
    if delta is not None and not delta >= 1 + high:
        # TRL clamps the unclipped ratio at delta for both signs of the advantage; that equals our dual
        # clip (A < 0 only) exactly when delta never cuts below the clipped branch's 1 + epsilon_high.
        raise ValueError(f"TRL delta={delta} is below 1 + epsilon_high = {1 + high}: that two-sided clipping "
                         "has no sppo-fast form (TRL recommends delta > 1 + epsilon)")
    return PolicyLossConfig(
        ratio_level=level, clip_low=low, clip_high=high, dual_clip=delta, aggregation=AGGREGATIONS[loss_type],
        advantage="group_none" if trainer.scale_rewards in ("none", False) else "group_std",
        max_length_norm=trainer.max_completion_length if loss_type == "dr_grpo" else None,
        log_ratio_clamp=math.inf)  # TRL exponentiates the raw log-ratio


def check_supported(trainer):
    """Raise a ValueError for every TRL setting the sppo-fast loss would not reproduce exactly."""
    loss_config(trainer)
    if trainer.aux_loss_enabled:
        raise ValueError("the MoE router auxiliary loss (router_aux_loss_coef) is not supported by sppo-fast's "
                         "TRL integration; set router_aux_loss_coef=0.0")
    text_config = _unwrapped(trainer.model).config.get_text_config()
    if getattr(text_config, "final_logit_softcapping", None) is not None:
        raise ValueError(f"{type(_unwrapped(trainer.model)).__name__} has final_logit_softcapping="
                         f"{text_config.final_logit_softcapping}: sppo-fast's kernels do not soft-cap logits")


def logit_scale(config):
    """The factor TRL multiplies the logits by (trl/trainer/utils.py:add_fused_lm_head, same rules)."""
    scale = getattr(config, "logit_scale", None)
    if scale is None:
        scale = getattr(config, "output_multiplier", None)
    if scale is None:
        scale = getattr(config, "lm_head_multiplier", None)
    if scale is None and getattr(config, "logits_scaling", None) is not None:
        scale = config.logits_scaling if config.model_type == "hyperclovax" else 1 / config.logits_scaling
    return 1.0 if scale is None else float(scale)


def loss_normalizer(trainer, inputs, mask, mode):
    """The denominator TRL divides the summed token losses by (gradient accumulation included), as the
    `normalizer` of the matching aggregation."""
    accum = trainer.current_gradient_accumulation_steps if mode == "train" else 1.0
    if trainer.loss_type in ("grpo", "dr_grpo"):
        return mask.shape[0] * accum  # every sequence counts, even an empty one
    if trainer.loss_type == "bnpo":
        return mask.sum().clamp(min=1.0) * accum
    normalizer = inputs["num_items_in_batch"].clamp(min=1.0) / trainer.accelerator.num_processes  # dapo
    if mode == "train":
        normalizer = normalizer * trainer.current_gradient_accumulation_steps / trainer.args.steps_per_generation
    return normalizer


# ----------------------------------------------------------------------------------------------------
# Log-probs from hidden states


def _unwrapped(model):
    return model.get_base_model() if is_peft_model(model) else model


def add_hidden_state_forward(model):
    """Let `model(..., sppo_fast_hidden=True)` return the decoder's last hidden states (B, L, H) and skip
    the LM head, as TRL's `fused_lm_head=True` does; any other call is the forward it had. Going through
    the (possibly wrapped) model keeps DDP's and PEFT's forward logic in the path."""
    target = _unwrapped(model)
    if getattr(target, "_sppo_fast_hidden", False):
        return
    previous = target.forward

    @functools.wraps(type(target).forward)  # generate() validates its kwargs against this signature
    def forward(self, *args, sppo_fast_hidden=False, **kwargs):
        if not sppo_fast_hidden:
            return previous(*args, **kwargs)
        kwargs["use_cache"] = False
        return self.base_model(*args, **kwargs).last_hidden_state

    target.forward = types.MethodType(forward, target)
    target._sppo_fast_hidden = True


def completion_logprobs(trainer, model, input_ids, attention_mask, logits_to_keep):
    """(logp, entropy) (B, K) fp32 of the last K tokens, differentiable, 0 where attention_mask is 0; the
    positions and the masking are TRL's (`_get_per_token_logps_and_entropies`)."""
    if input_ids.shape[1] <= logits_to_keep:
        raise ValueError(f"logits_to_keep ({logits_to_keep}) must be shorter than the sequence "
                         f"({input_ids.shape[1]} tokens): the first completion token needs a prompt token")
    with trainer.accelerator.autocast():
        hidden = model(input_ids=input_ids, attention_mask=attention_mask, sppo_fast_hidden=True)
    hidden = hidden[:, -logits_to_keep - 1:-1]  # position t predicts token t + 1
    targets = input_ids[:, -logits_to_keep:]
    valid = attention_mask[:, -logits_to_keep:] != 0
    base = _unwrapped(trainer.model)
    head = base.get_output_embeddings()
    weight, bias = head.weight, head.bias
    # only the valid positions go through the head: prompts' padding and post-EOS tokens cost nothing
    rows = hidden[valid].to(weight.dtype)
    temperature = trainer.temperature / logit_scale(base.config.get_text_config())
    logp, entropy = head_logprobs(rows, weight, targets[valid], bias=bias, temperature=temperature,
                                  accumulate_into_grad=_single_process(trainer) and accumulation_is_safe(weight))
    zeros = torch.zeros(valid.shape, dtype=logp.dtype, device=logp.device)
    return zeros.masked_scatter(valid, logp), zeros.masked_scatter(valid, entropy)


# ----------------------------------------------------------------------------------------------------
# The loss


def sppo_fast_compute_loss(self, model, inputs):
    """GRPOTrainer._compute_loss with the log-probs and the clipped loss from sppo-fast."""
    present = [k for k in _MULTIMODAL_KEYS if inputs.get(k) is not None]
    if present:
        raise ValueError(f"multimodal inputs {present} are not supported by sppo-fast's TRL integration")
    config = loss_config(self)
    completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
    input_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)
    attention_mask = torch.cat([inputs["prompt_mask"], completion_mask], dim=1)
    mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
    logp, entropies = completion_logprobs(self, model, input_ids, attention_mask, completion_ids.size(1))
    mode = "train" if self.model.training else "eval"

    entropy_mask = None
    if self.top_entropy_quantile < 1.0:
        entropy_mask = self.get_high_entropy_mask(entropies.detach(), mask, 1 - self.top_entropy_quantile)
    advantages = inputs["advantages"]
    advantages_bt = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
    old_logp = inputs.get("old_per_token_logps")
    old_logp = logp.detach() if old_logp is None else old_logp
    weights = token_loss_weights(self, inputs, advantages_bt, logp, old_logp, mask, entropy_mask)

    normalizer = loss_normalizer(self, inputs, mask, mode)
    out = policy_loss(logp, old_logp, advantages, mask, config, entropy=entropies, normalizer=normalizer,
                      rollout_is_weights=weights)
    loss = out.loss
    per_token_kl = None
    if self.beta != 0.0:
        # TRL's k3, unclamped, aggregated with the policy term's own weights
        d = inputs["ref_per_token_logps"] - logp
        per_token_kl = torch.exp(d) - d - 1
        if self.args.use_bias_correction_kl:  # times the differentiable ratio (token or sequence level)
            per_token_kl = per_token_kl * torch.exp(ratio_log(self, logp - old_logp, mask))
        valid = mask.bool()
        w = token_weights(valid, config, normalizer, dtype=per_token_kl.dtype)
        loss = loss + self.beta * torch.where(valid, w * per_token_kl, torch.zeros_like(per_token_kl)).sum()
    accum = self.current_gradient_accumulation_steps if mode == "train" else 1.0
    policy_value = loss.detach() * (1.0 if self.loss_type == "dapo" else accum)  # TRL logs it unscaled
    if self._entropy_bonus_enabled:
        loss = entropy_bonus(self, loss, entropies, mask, entropy_mask, mode, policy_value)
    log_metrics(self, mode, mask, entropies.detach(), logp.detach() - old_logp, advantages_bt,
                None if per_token_kl is None else per_token_kl.detach())
    return loss


def token_loss_weights(trainer, inputs, advantages, logp, old_logp, mask, entropy_mask):
    """The constant per-token factors TRL multiplies the clipped term by, as one rollout_is_weights
    tensor: the off-policy sequence mask, the high-entropy mask, the vLLM importance-sampling ratio."""
    factors = []
    if trainer.off_policy_mask_threshold is not None:
        sampling = inputs.get("sampling_per_token_logps", old_logp)
        factors.append(trainer.get_off_policy_mask(advantages=advantages, per_token_logps=logp,
                                                   sampling_per_token_logps=sampling, mask=mask,
                                                   off_policy_threshold=trainer.off_policy_mask_threshold))
    if entropy_mask is not None:
        factors.append(entropy_mask.to(torch.float32))
    if trainer.use_vllm and trainer.vllm_importance_sampling_correction:
        factors.append(inputs["importance_sampling_ratio"])
    if not factors:
        return None
    weights = factors[0].to(torch.float32)
    for f in factors[1:]:
        weights = weights * f
    return weights


def entropy_bonus(self, loss, entropies, mask, entropy_mask, mode, policy_value):
    """TRL's entropy bonus and its adaptive coefficient (GRPOTrainer._compute_loss, unchanged)."""
    effective_mask = mask if entropy_mask is None else mask * entropy_mask
    accumulation_factor = self.current_gradient_accumulation_steps if mode == "train" else 1.0
    entropy_loss = (entropies * effective_mask).sum() / effective_mask.sum().clamp(min=1.0) / accumulation_factor
    if self.use_adaptive_entropy:
        apply_coef = self.entropy_coef if self._last_world_entropy <= self.args.entropy_target else 0.0
    else:
        apply_coef = self.entropy_coef
    loss = loss - apply_coef * entropy_loss
    self._metrics[mode]["policy_loss"].append(self.accelerator.gather(policy_value).nanmean().item())
    if self.use_adaptive_entropy and mode == "train":
        stats = torch.stack([(entropies * effective_mask).sum(), effective_mask.sum()]).detach()
        self._entropy_window_stats = stats if self._entropy_window_stats is None else self._entropy_window_stats + stats
        if self.accelerator.sync_gradients:
            window = self.accelerator.reduce(self._entropy_window_stats, reduction="sum")
            world_entropy = (window[0] / window[1].clamp(min=1.0)).item()
            if world_entropy <= self.args.entropy_target:
                self.entropy_coef = min(self.entropy_coef + self.args.entropy_coef_delta, self.args.entropy_coef_max)
            else:
                self.entropy_coef = max(self.entropy_coef - self.args.entropy_coef_delta, self.args.entropy_coef_min)
            self._last_world_entropy = world_entropy
            self._entropy_window_stats = None
    if mode == "train" and self.accelerator.sync_gradients:
        self._metrics[mode]["entropy_coef"].append(self.entropy_coef)
    return loss


def ratio_log(trainer, log_ratio, mask):
    """TRL's log importance weights: (B, T) per token, or (B, 1), the masked mean, per sequence."""
    if trainer.importance_sampling_level == "sequence":
        return ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    return log_ratio


def log_metrics(self, mode, mask, entropies, log_ratio, advantages, per_token_kl):
    """TRL's metrics under TRL's names, computed as TRL computes them."""
    coef_1 = torch.exp(ratio_log(self, log_ratio, mask))
    if self.args.delta is not None:
        coef_1 = torch.clamp(coef_1, max=self.args.delta)

    def masked_seq_mean(x):
        return x.squeeze(1) if x.shape[1] == 1 else (x * mask).sum(-1) / mask.sum(-1)

    def global_masked_mean(x):
        if x.shape[1] == 1:
            local_sum, local_count = x.sum(), torch.tensor(float(x.shape[0]), device=x.device)
        else:
            local_sum, local_count = (x * mask).sum(), mask.sum().float()
        totals = self.accelerator.reduce(torch.stack([local_sum, local_count]), reduction="sum")
        return (totals[0] / totals[1].clamp(min=1.0)).item()

    metrics = self._metrics[mode]
    if per_token_kl is not None:
        metrics["kl"].append(global_masked_mean(per_token_kl))
    metrics["entropy"].append(global_masked_mean(entropies))
    low = (coef_1 < 1 - self.epsilon_low) & (advantages < 0)
    high = (coef_1 > 1 + self.epsilon_high) & (advantages > 0)
    metrics["clip_ratio/low_mean"].append(global_masked_mean(low.float()))
    metrics["clip_ratio/high_mean"].append(global_masked_mean(high.float()))
    metrics["clip_ratio/region_mean"].append(global_masked_mean((low | high).float()))
    metrics["clip_ratio/low_min"].append(nanmin(self.accelerator.gather(masked_seq_mean(low.float()))).item())
    metrics["clip_ratio/high_max"].append(nanmax(self.accelerator.gather(masked_seq_mean(high.float()))).item())


# ----------------------------------------------------------------------------------------------------
# The two ways in


def _single_process(trainer):
    """No DDP, DeepSpeed or FSDP reducer hooks the gradients: they may be added into .grad by hand."""
    return (trainer.accelerator.num_processes == 1 and not trainer.is_deepspeed_enabled
            and not trainer.is_fsdp_enabled)


def _prepare(trainer):
    check_supported(trainer)
    add_hidden_state_forward(trainer.model)
    if _single_process(trainer):
        accumulate_embedding_grad_into_grad(_unwrapped(trainer.model).get_input_embeddings())


class SppoFastGRPOTrainer(GRPOTrainer):
    """`trl.GRPOTrainer` whose policy loss runs through sppo-fast (see the module docstring)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _prepare(self)

    _compute_loss = sppo_fast_compute_loss


def patch_grpo_trainer(trainer):
    """Switch an existing `trl.GRPOTrainer` to sppo-fast's loss; returns the trainer."""
    if not isinstance(trainer, GRPOTrainer):
        raise TypeError(f"trainer must be a trl.GRPOTrainer, got {type(trainer).__name__}")
    _prepare(trainer)
    trainer._compute_loss = types.MethodType(sppo_fast_compute_loss, trainer)
    return trainer


# ----------------------------------------------------------------------------------------------------
# SPPO mode: one sample per prompt, the baseline from a prompt critic


def sppo_config(**grpo_config_kwargs):
    """A GRPOConfig for SPPOTrainer: `num_generations` 1 (one sample per prompt). GRPOConfig itself
    refuses fewer than 2 because a group baseline needs them; SPPO's baseline is the critic, so the
    config is validated with 2 and then set to 1 (TRL's trainer code handles 1: its eval path uses it)."""
    from trl import GRPOConfig

    if grpo_config_kwargs.get("num_generations", 1) != 1 or grpo_config_kwargs.get("num_generations_eval", 1) != 1:
        raise ValueError("num_generations must be 1 in SPPO mode (one sample per prompt; the critic is the baseline)")
    config = GRPOConfig(**dict(grpo_config_kwargs, num_generations=2))
    config.num_generations, config.num_generations_eval = 1, 1
    return config


SPPO_CRITIC_WEIGHTS = "sppo_critic.safetensors"
SPPO_CRITIC_OPTIMIZER = "sppo_critic_optimizer.pt"


class SPPOTrainer(SppoFastGRPOTrainer):
    """SPPO inside TRL: one completion per prompt, advantages `R - sigmoid(critic(prompt))` (docs/api.md §3.7)
    with the critic's values taken before its update, the critic trained by `value_bce_loss` once per
    generation batch; the policy loss is TRL's (its `loss_type`, e.g. "bnpo" or "dapo") through sppo-fast.

    `critic`: a module mapping TRL's left-padded `(prompt_ids, prompt_mask)` to one logit per prompt,
    e.g. `sppo_fast.trainer.models.PromptCritic`. Rewards must lie in [0, 1] (success probabilities).
    `args` must come from `sppo_config(...)`. The critic and its optimizer are saved in each of TRL's
    checkpoints (`sppo_critic.safetensors`, `sppo_critic_optimizer.pt`) and restored by
    `train(resume_from_checkpoint=...)`, so a resumed run continues with the critic it stopped with."""

    def __init__(self, *args, critic, critic_learning_rate=1e-3, **kwargs):
        super().__init__(*args, **kwargs)
        if self.num_generations != 1:
            raise ValueError(f"SPPOTrainer needs one sample per prompt: build args with sppo_config(...), got "
                             f"num_generations={self.num_generations}")
        self.critic = critic.to(self.accelerator.device)
        self.critic_optimizer = torch.optim.AdamW(self.critic.parameters(), lr=critic_learning_rate)
        self._sppo_rewards = None

    def _save_checkpoint(self, model, trial):
        """TRL's checkpoint, plus the critic's weights and its optimizer's state in the same folder."""
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            import os

            from safetensors.torch import save_file
            from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

            name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            folder = os.path.join(self._get_output_dir(trial=trial), name)
            save_file({k: v.detach().cpu().contiguous().clone() for k, v in self.critic.state_dict().items()},
                      os.path.join(folder, SPPO_CRITIC_WEIGHTS))
            torch.save(self.critic_optimizer.state_dict(), os.path.join(folder, SPPO_CRITIC_OPTIMIZER))

    def _load_optimizer_and_scheduler(self, checkpoint):
        """On `train(resume_from_checkpoint=...)`: TRL's states, then the critic and its optimizer."""
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        import os

        from safetensors.torch import load_file

        weights = os.path.join(checkpoint, SPPO_CRITIC_WEIGHTS)
        if not os.path.exists(weights):
            raise ValueError(f"checkpoint {checkpoint} has no {SPPO_CRITIC_WEIGHTS}: it was not written by "
                             "SPPOTrainer, and resuming would restart the critic from scratch (wrong advantages)")
        device = next(self.critic.parameters()).device
        self.critic.load_state_dict({k: v.to(device) for k, v in load_file(weights).items()})
        optimizer = os.path.join(checkpoint, SPPO_CRITIC_OPTIMIZER)
        if os.path.exists(optimizer):
            self.critic_optimizer.load_state_dict(torch.load(optimizer, map_location=device, weights_only=True))

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)  # all processes
        rewards = (per_func * self.reward_weights.to(per_func.device).unsqueeze(0)).nansum(dim=1)
        rewards[torch.isnan(per_func).all(dim=1)] = torch.nan  # unscorable: no advantage, no critic target
        start = self.accelerator.process_index * len(prompts)
        self._sppo_rewards = rewards[start:start + len(prompts)]
        return per_func

    def _generate_and_score_completions(self, inputs):
        from ..advantages import sequence_advantage, value_bce_loss

        out = super()._generate_and_score_completions(inputs)
        rewards, self._sppo_rewards = self._sppo_rewards, None
        scored = ~torch.isnan(rewards)
        if bool(((rewards[scored] < 0) | (rewards[scored] > 1)).any()):
            raise ValueError("SPPO needs rewards in [0, 1] (the critic predicts a success probability); got "
                             f"{rewards[scored].min().item()}..{rewards[scored].max().item()}")
        prompt_ids, prompt_mask = out["prompt_ids"], out["prompt_mask"]
        mode = "train" if self.model.training else "eval"
        logits = self.critic(prompt_ids, prompt_mask)
        out["advantages"] = torch.where(scored, sequence_advantage(rewards.nan_to_num(0.0), logits),
                                        torch.zeros_like(rewards))
        if mode == "train" and bool(scored.any()):  # after the advantages: values from before the update
            loss = value_bce_loss(logits[scored], rewards[scored])
            self.critic_optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if self.accelerator.num_processes > 1:  # the critic is not DDP-wrapped: average its gradients
                for p in self.critic.parameters():
                    if p.grad is not None:
                        p.grad = self.accelerator.reduce(p.grad, reduction="mean")
            self.critic_optimizer.step()
            self._metrics[mode]["sppo/critic_loss"].append(loss.item())
        self._metrics[mode]["sppo/value_mean"].append(torch.sigmoid(logits.detach()).mean().item())
        return out
