"""Advantage estimators and the SPPO critic loss (docs/api.md §3.7), on (B,) or (B, T) tensors."""

import torch
import torch.nn.functional as F

from ._checks import check_float, check_same_device, check_shape, check_tensor


def _rewards(rewards, name="rewards"):
    check_tensor(name, rewards)
    if rewards.dim() != 1:
        raise ValueError(f"{name} must have shape (B,), got {tuple(rewards.shape)}")
    if rewards.dtype.is_complex:
        raise TypeError(f"{name} must be a real tensor, got {rewards.dtype}")
    return rewards.to(torch.float32) if not rewards.dtype.is_floating_point else rewards


def sequence_advantage(rewards, critic_logits):
    """SPPO: A = R - sigmoid(z), the reward minus the critic's predicted success probability."""
    rewards = _rewards(rewards)
    check_float("critic_logits", critic_logits)
    check_shape("critic_logits", critic_logits, rewards.shape, "one logit per sequence, like rewards")
    check_same_device(rewards=rewards, critic_logits=critic_logits)
    return (rewards - torch.sigmoid(critic_logits.detach().to(rewards.dtype))).to(torch.float32)


def value_bce_loss(critic_logits, rewards):
    """The SPPO critic loss: mean binary cross-entropy of sigmoid(z) against rewards in {0, 1}."""
    rewards = _rewards(rewards)
    check_float("critic_logits", critic_logits)
    check_shape("critic_logits", critic_logits, rewards.shape, "one logit per sequence, like rewards")
    check_same_device(rewards=rewards, critic_logits=critic_logits)
    if rewards.numel() == 0:
        return critic_logits.sum() * 0.0
    return F.binary_cross_entropy_with_logits(critic_logits.float(), rewards.detach().float())


def _groups(rewards, group_size):
    rewards = _rewards(rewards)
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        raise TypeError(f"group_size must be an int, got {type(group_size).__name__}")
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2 for a group baseline, got {group_size}; with one sample "
                         "per prompt use SPPO: sequence_advantage(rewards, critic_logits)")
    if rewards.numel() % group_size:
        raise ValueError(f"rewards has {rewards.numel()} entries, not a multiple of group_size={group_size}")
    return rewards.reshape(-1, group_size)


def group_advantage(rewards, group_size, *, scale="std", eps=1e-6):
    """GRPO (scale="std": (R - mean) / (std + eps), unbiased std) or Dr. GRPO (scale="none": R - mean)
    over consecutive groups of `group_size` samples of one prompt."""
    if scale not in ("std", "none"):
        raise ValueError(f"unknown scale {scale!r}; choose 'std' (GRPO) or 'none' (Dr. GRPO)")
    groups = _groups(rewards, group_size)
    centered = groups - groups.mean(-1, keepdim=True)
    if scale == "std":
        centered = centered / (groups.std(-1, keepdim=True, unbiased=True) + eps)
    return centered.reshape(-1)


def rloo_advantage(rewards, group_size):
    """RLOO: A_i = R_i - mean_{j != i} R_j within each group."""
    groups = _groups(rewards, group_size)
    others = (groups.sum(-1, keepdim=True) - groups) / (group_size - 1)
    return (groups - others).reshape(-1)


def gae(token_rewards, values, mask, *, gamma=1.0, lam=1.0):
    """Generalized advantage estimation over the masked positions of each sequence (PPO).
    delta_t = r_t + gamma V_{t+1} - V_t, where t+1 is the next masked position (0 after the last).
    Returns (advantages, returns), both (B, T), 0 off the mask."""
    check_float("token_rewards", token_rewards)
    if token_rewards.dim() != 2:
        raise ValueError(f"token_rewards must have shape (B, T), got {tuple(token_rewards.shape)}")
    check_shape("values", check_float("values", values), token_rewards.shape, "the shape of token_rewards")
    check_shape("mask", check_tensor("mask", mask), token_rewards.shape, "the shape of token_rewards")
    check_same_device(token_rewards=token_rewards, values=values, mask=mask)
    for name, x in (("gamma", gamma), ("lam", lam)):
        if not 0 <= x <= 1:
            raise ValueError(f"{name} must be in [0, 1], got {x}")
    valid = mask.bool()
    rewards = torch.where(valid, token_rewards.float(), torch.zeros_like(token_rewards, dtype=torch.float32))
    values = torch.where(valid, values.detach().float(), torch.zeros_like(rewards))
    B, T = rewards.shape
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros(B, dtype=torch.float32, device=rewards.device)
    running = torch.zeros_like(next_value)
    for t in reversed(range(T)):
        m = valid[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        step = delta + gamma * lam * running
        # unmasked positions are skipped: they carry the running sums through unchanged
        running = torch.where(m, step, running)
        next_value = torch.where(m, values[:, t], next_value)
        advantages[:, t] = torch.where(m, step, torch.zeros_like(step))
    returns = torch.where(valid, advantages + values, torch.zeros_like(advantages))
    return advantages, returns
