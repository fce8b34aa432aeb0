"""Algorithms: the loss preset of each `--algo` (docs/api.md §4) and a registry from the preset's advantage
estimator name to the function that computes it. A new estimator is one decorated function here."""

from __future__ import annotations

from dataclasses import dataclass

import torch

import sppo_fast

ADVANTAGE_ESTIMATORS = {}


def advantage_estimator(name):
    def register(fn):
        ADVANTAGE_ESTIMATORS[name] = fn
        return fn
    return register


@dataclass
class AdvantageInputs:
    rewards: torch.Tensor                   # (B,) in {0, 1}
    response_mask: torch.Tensor             # (B, R)
    group_size: int
    critic_logits: torch.Tensor | None = None   # (B,) SPPO prompt critic, before its update
    values: torch.Tensor | None = None          # (B, R) PPO token critic, before its update
    gamma: float = 1.0
    lam: float = 1.0


@advantage_estimator("sppo")
def _sppo(x: AdvantageInputs):
    return sppo_fast.sequence_advantage(x.rewards, x.critic_logits), None


@advantage_estimator("group_std")
def _group_std(x: AdvantageInputs):
    return sppo_fast.group_advantage(x.rewards, x.group_size, scale="std"), None


@advantage_estimator("group_none")
def _group_none(x: AdvantageInputs):
    return sppo_fast.group_advantage(x.rewards, x.group_size, scale="none"), None


@advantage_estimator("rloo")
def _rloo(x: AdvantageInputs):
    return sppo_fast.rloo_advantage(x.rewards, x.group_size), None


@advantage_estimator("gae")
def _gae(x: AdvantageInputs):
    token_rewards = terminal_token_rewards(x.rewards, x.response_mask)
    return sppo_fast.gae(token_rewards, x.values, x.response_mask, gamma=x.gamma, lam=x.lam)


def terminal_token_rewards(rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The outcome reward placed on each response's last token (zero elsewhere)."""
    token_rewards = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    lengths = mask.long().sum(1)
    rows = torch.nonzero(lengths > 0).squeeze(1)
    token_rewards[rows, lengths[rows] - 1] = rewards[rows].float()
    return token_rewards


def loss_config(cfg):
    """The preset of `cfg.algo` with the command line's overrides."""
    overrides = {"kl_coef": cfg.kl_coef, "entropy_coef": cfg.entropy_coef}
    if cfg.clip_low is not None:
        overrides["clip_low"] = cfg.clip_low
    if cfg.clip_high is not None:
        overrides["clip_high"] = cfg.clip_high
    config = sppo_fast.PolicyLossConfig.preset(cfg.algo, **overrides)
    if config.aggregation == "seq-mean-token-sum-norm" and config.max_length_norm is None:
        # Dr. GRPO divides by a constant length; the padded width would differ between mini-batches
        # and ranks, the generation budget does not.
        config = sppo_fast.PolicyLossConfig.preset(cfg.algo, max_length_norm=cfg.max_new_tokens, **overrides)
    return config


def estimator_name(cfg, policy_loss_config) -> str:
    name = policy_loss_config.advantage
    if name not in ADVANTAGE_ESTIMATORS:
        raise ValueError(f"advantage estimator {name!r} of preset {cfg.algo!r} is not one of "
                         f"{sorted(ADVANTAGE_ESTIMATORS)}")
    return name


def compute_advantages(name: str, inputs: AdvantageInputs):
    """(advantages (B,) or (B, R), returns (B, R) or None)."""
    return ADVANTAGE_ESTIMATORS[name](inputs)


def critic_loss(algo: str, critic, batch, rewards, returns):
    """SPPO: BCE of the prompt critic's logit against the 0/1 reward. PPO: squared error of the token
    values against the GAE returns, over response tokens."""
    if algo == "sppo":
        logits = critic(batch.prompt_ids, batch.prompt_mask)
        return sppo_fast.value_bce_loss(logits, rewards)
    values = batch.response_slice(critic(batch.input_ids, batch.attention_mask))
    mask = batch.response_mask.float()
    return 0.5 * (((values - returns) ** 2) * mask).sum() / mask.sum().clamp(min=1.0)


def explained_variance(predicted: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None
                       ) -> float:
    """1 - Var(target - predicted) / Var(target) over the masked entries (nan when Var(target) = 0)."""
    if mask is not None:
        keep = mask.bool()
        predicted, target = predicted[keep], target[keep]
    predicted, target = predicted.float().flatten(), target.float().flatten()
    if target.numel() < 2:
        return float("nan")
    var = target.var(unbiased=False)
    if var <= 1e-12:
        return float("nan")
    return float(1.0 - (target - predicted).var(unbiased=False) / var)


def segment_ids_for(cfg, policy_loss_config, tokenizer, response_ids, response_mask):
    """SSPO's segments: sub-sentences closed by the tokenizer's newline tokens."""
    if policy_loss_config.ratio_level != "segment":
        return None
    boundary = sppo_fast.newline_token_ids(tokenizer)
    return sppo_fast.segment_ids(response_ids, boundary, mask=response_mask)
