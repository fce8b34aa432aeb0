"""Algorithms: the loss preset of each `--algo` (docs/api.md §4, through the table `ALGORITHMS` of
config.py), its critic, and a registry from an advantage estimator's name to the function that computes
it. A new estimator is one decorated function here; a new algorithm is a row of `ALGORITHMS`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

import sppo_fast
from sppo_fast.trainer.config import ALGORITHMS, Algorithm

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
    baseline_rewards: torch.Tensor | None = None  # (B,) ReMax: the reward of the prompt's greedy response


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


@advantage_estimator("remax")
def _remax(x: AdvantageInputs):
    return remax_advantage(x.rewards, x.baseline_rewards), None


def remax_advantage(rewards: torch.Tensor, greedy_rewards: torch.Tensor) -> torch.Tensor:
    """ReMax (Li et al., 2023): A_i = R_i - R(greedy response to the prompt of sample i), one value per
    sequence. `greedy_rewards` holds, for every sampled row, the reward of its prompt's greedy response."""
    if greedy_rewards is None:
        raise ValueError("remax: the advantage needs the rewards of the greedy responses (greedy_baseline)")
    if greedy_rewards.shape != rewards.shape:
        raise ValueError(f"remax: greedy_rewards {tuple(greedy_rewards.shape)} must match rewards "
                         f"{tuple(rewards.shape)} (one per sampled response)")
    return (rewards.float() - greedy_rewards.to(rewards.device).float()).to(torch.float32)


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


def spec(cfg_or_name) -> Algorithm:
    """The row of `ALGORITHMS` for a config (its `algo`) or an algorithm name."""
    name = cfg_or_name if isinstance(cfg_or_name, str) else cfg_or_name.algo
    if name not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {name!r}; choose one of {', '.join(ALGORITHMS)}")
    return ALGORITHMS[name]


def loss_config(cfg):
    """The preset of `cfg.algo` with the algorithm's own overrides, then the command line's."""
    algo = spec(cfg)
    overrides = {**dict(algo.loss_overrides), "kl_coef": cfg.kl_coef, "entropy_coef": cfg.entropy_coef}
    if cfg.clip_low is not None:
        overrides["clip_low"] = cfg.clip_low
    if cfg.clip_high is not None:
        overrides["clip_high"] = cfg.clip_high
    config = sppo_fast.PolicyLossConfig.preset(algo.preset, **overrides)
    if config.aggregation == "seq-mean-token-sum-norm" and config.max_length_norm is None:
        # Dr. GRPO divides by a constant length; the padded width would differ between mini-batches
        # and ranks, the generation budget does not.
        config = sppo_fast.PolicyLossConfig.preset(algo.preset, max_length_norm=cfg.max_new_tokens, **overrides)
    return config


def estimator_name(cfg, policy_loss_config) -> str:
    """The algorithm's own estimator (ReMax's), else its preset's."""
    name = spec(cfg).advantage or policy_loss_config.advantage
    if name not in ADVANTAGE_ESTIMATORS:
        raise ValueError(f"advantage estimator {name!r} of preset {cfg.algo!r} is not one of "
                         f"{sorted(ADVANTAGE_ESTIMATORS)}")
    return name


def compute_advantages(name: str, inputs: AdvantageInputs):
    """(advantages (B,) or (B, R), returns (B, R) or None)."""
    return ADVANTAGE_ESTIMATORS[name](inputs)


def critic_config(cfg):
    """The config `models.build_critic` reads to build the algorithm's critic (it chooses by `algo`: a prompt
    critic for "sppo", a token critic for "ppo"); None when the algorithm has no critic."""
    kind = spec(cfg).critic
    if kind is None:
        return None
    return dataclasses.replace(cfg, algo={"prompt": "sppo", "token": "ppo"}[kind])


def critic_loss(algo: Algorithm, critic, batch, rewards, returns):
    """Prompt critic (SPPO): BCE of its logit against the 0/1 reward. Token critic: squared error of the
    values against the GAE returns over response tokens ("mse", PPO), or BCE of every response token's logit
    against the sequence's final 0/1 reward ("bce", the ppo_bce ablation), a token mean either way."""
    if algo.critic == "prompt":
        logits = critic(batch.prompt_ids, batch.prompt_mask)
        return sppo_fast.value_bce_loss(logits, rewards)
    values = batch.response_slice(critic(batch.input_ids, batch.attention_mask))
    mask = batch.response_mask.float()
    if algo.critic_loss == "bce":
        target = rewards.float()[:, None].expand_as(values)
        per_token = torch.nn.functional.binary_cross_entropy_with_logits(values.float(), target, reduction="none")
        return (per_token * mask).sum() / mask.sum().clamp(min=1.0)
    return 0.5 * (((values - returns) ** 2) * mask).sum() / mask.sum().clamp(min=1.0)


def token_values(algo: Algorithm, critic_out: torch.Tensor) -> torch.Tensor:
    """The token critic's output as values for GAE: the logit's sigmoid (a success probability) when the
    critic is trained with BCE, the output itself when it regresses returns."""
    return torch.sigmoid(critic_out.float()) if algo.critic_loss == "bce" else critic_out.float()


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
