"""Eager PyTorch for every formula of docs/api.md §3: the executable specification that each kernel is tested
against. Pass float64 tensors to get the oracle; other dtypes compute in float32 (docs/api.md §3: all
accumulation in fp32). The loss family itself (§3.2-§3.6) is `sppo_fast.losses`, written once in
PyTorch on (B, T) tensors and shared by every backend, so the references here compose with it."""

import torch

from .losses import policy_loss_on_grid


def _compute_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def logprobs_entropy_lse(logits, targets, temperature=1.0, ignore_index=-100):
    """docs/api.md §3.1 forward on (..., V): returns (logp, entropy, lse); logp and entropy in the compute
    dtype, lse in fp64. Everything is taken relative to the row max m, so a logit of 1e4 loses
    nothing: logp = (z_t - m) - log S rather than z_t - lse, whose fp32 lse is off by ulp(1e4)."""
    z = logits.to(_compute_dtype(logits.dtype)) / temperature
    m = z.amax(dim=-1, keepdim=True) if z.shape[-1] else z.new_zeros((*z.shape[:-1], 1))
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)  # a row of -inf: no -inf - -inf
    shifted = z - m
    log_s = torch.logsumexp(shifted, dim=-1)
    ignored = targets == ignore_index
    # a target outside [0, V) lies in another vocabulary shard: logp 0 here, lse and entropy as usual
    local = ~ignored & (targets >= 0) & (targets < z.shape[-1])
    safe_targets = torch.where(local, targets, torch.zeros_like(targets)).long()
    logp = shifted.gather(-1, safe_targets.unsqueeze(-1)).squeeze(-1) - log_s
    # entropy = lse - sum p z, written as sum p (lse - z): the same number without the cancellation of
    # two large terms; p == 0 terms are 0 (0 * -inf counts as 0, docs/api.md §3.1).
    p = torch.exp(shifted - log_s.unsqueeze(-1))
    # masking the surprisal itself (not only the product) keeps inf out of autograd's backward too
    surprisal = torch.where(p > 0, log_s.unsqueeze(-1) - shifted, torch.zeros_like(z))
    entropy = (p * surprisal).sum(-1)
    lse = m.squeeze(-1).double() + log_s.double()
    zero = torch.zeros_like(logp)
    return torch.where(local, logp, zero), torch.where(ignored, zero, entropy), lse


def logprobs_grad(logits, targets, lse, entropy, grad_logp, grad_entropy, temperature=1.0,
                  ignore_index=-100):
    """docs/api.md §3.1 backward: the gradient of the logits given per-row coefficients (compute dtype)."""
    z = logits.to(_compute_dtype(logits.dtype)) / temperature
    log_p = z - lse.unsqueeze(-1)
    p = torch.exp(log_p)
    ignored = targets == ignore_index
    # a target outside [0, V) lies in another vocabulary shard: no one-hot term on this one
    local = ~ignored & (targets >= 0) & (targets < z.shape[-1])
    safe_targets = torch.where(local, targets, torch.zeros_like(targets)).long()
    onehot = torch.zeros_like(p).scatter_(-1, safe_targets.unsqueeze(-1), local.unsqueeze(-1).to(p.dtype))
    grad = grad_logp.unsqueeze(-1).to(p.dtype) * (onehot - p)
    if grad_entropy is not None:
        dent = torch.where(p > 0, p * (log_p + entropy.unsqueeze(-1)), torch.zeros_like(p))
        grad = grad - grad_entropy.unsqueeze(-1).to(p.dtype) * dent
    grad = torch.where(ignored.unsqueeze(-1), torch.zeros_like(grad), grad)
    return grad / temperature


def token_logprobs(logits, targets, *, temperature=1.0, ignore_index=-100, return_entropy=False):
    """Eager `sppo_fast.token_logprobs`, differentiable by autograd."""
    logp, entropy, _ = logprobs_entropy_lse(logits, targets, temperature, ignore_index)
    return (logp, entropy) if return_entropy else logp


def linear_logprobs(hidden, weight, targets, *, bias=None, temperature=1.0, ignore_index=-100,
                    return_entropy=False):
    """Eager `sppo_fast.linear_logprobs`: materialises the full logits."""
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    return token_logprobs(logits, targets, temperature=temperature, ignore_index=ignore_index,
                          return_entropy=return_entropy)


def fused_policy_loss(logits, targets, old_logp, advantages, mask, config, *, segment_ids=None,
                      ref_logp=None, temperature=1.0, normalizer=None, rollout_is_weights=None):
    """Eager `sppo_fast.fused_policy_loss`: token_logprobs, then the shared loss stage."""
    logp, entropy = token_logprobs(logits, targets, temperature=temperature, return_entropy=True)
    return policy_loss_on_grid(logp, old_logp, advantages, mask, config, segment_ids=segment_ids,
                               entropy=entropy, ref_logp=ref_logp, normalizer=normalizer,
                       rollout_is_weights=rollout_is_weights)


def fused_linear_policy_loss(hidden, weight, targets, old_logp, advantages, mask, config, *, bias=None,
                             segment_ids=None, ref_logp=None, temperature=1.0, normalizer=None,
                             rollout_is_weights=None):
    """Eager `sppo_fast.fused_linear_policy_loss`: materialises the full logits."""
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    return fused_policy_loss(logits, targets, old_logp, advantages, mask, config, segment_ids=segment_ids,
                             ref_logp=ref_logp, temperature=temperature, normalizer=normalizer,
                             rollout_is_weights=rollout_is_weights)
