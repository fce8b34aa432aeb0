"""The loss family of docs/api.md §3.2-§3.6, written once in PyTorch on (B, T) tensors and shared by every
backend. Autograd through this stage yields the per-token coefficients (d loss / d logp and
d loss / d entropy) that the backward kernel turns into the logits' gradient (docs/api.md §9).

A loss is `sum_t w_t * l_t`: a per-token loss `l_t` (ratios, clipping, KL, entropy bonus) and
per-token weights `w_t` that encode the aggregation. A new variant is a few lines here."""

from dataclasses import dataclass, fields, replace
from typing import NamedTuple

import torch

from ._checks import check_float, check_integer, check_same_device, check_shape, check_tensor

RATIO_LEVELS = ("token", "sequence", "segment")
AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
KL_ESTIMATORS = ("k1", "k2", "k3")
ADVANTAGES = ("gae", "group_std", "group_none", "rloo", "sppo")


@dataclass(frozen=True)
class EntropyAdaptiveClip:
    """SSPO's entropy-adaptive clip bounds (docs/api.md §3.4). Every constant is a parameter: the paper's
    exact values are not public."""

    low_threshold: float = 0.5
    high_threshold: float = 1.0
    alpha: float = 0.2
    low_entropy_lower: float = 0.8

    def __post_init__(self):
        if not self.low_threshold <= self.high_threshold:
            raise ValueError(f"EntropyAdaptiveClip: low_threshold ({self.low_threshold}) must not exceed "
                             f"high_threshold ({self.high_threshold})")
        if not 0 <= self.low_entropy_lower <= 1:
            raise ValueError(f"EntropyAdaptiveClip: low_entropy_lower must be in [0, 1], "
                             f"got {self.low_entropy_lower}")


@dataclass(frozen=True)
class PolicyLossConfig:
    """Everything that makes PPO, GRPO, DAPO, Dr. GRPO, RLOO, GSPO, SSPO and SPPO differ (docs/api.md §4)."""

    ratio_level: str = "token"
    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip: float | None = None
    entropy_adaptive: EntropyAdaptiveClip | None = None
    aggregation: str = "token-mean"
    advantage: str = "gae"
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    entropy_coef: float = 0.0
    max_length_norm: int | None = None
    log_ratio_clamp: float = 20.0

    def __post_init__(self):
        _check_choice("ratio_level", self.ratio_level, RATIO_LEVELS)
        _check_choice("aggregation", self.aggregation, AGGREGATIONS)
        _check_choice("kl_estimator", self.kl_estimator, KL_ESTIMATORS)
        _check_choice("advantage", self.advantage, ADVANTAGES)
        for name in ("clip_low", "clip_high", "kl_coef", "entropy_coef"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"PolicyLossConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.clip_low > 1:
            raise ValueError(f"PolicyLossConfig.clip_low must be <= 1 (lower bound 1 - clip_low >= 0), "
                             f"got {self.clip_low}")
        if self.dual_clip is not None and not self.dual_clip > 1:
            raise ValueError(f"PolicyLossConfig.dual_clip must be > 1 (or None), got {self.dual_clip}")
        if self.entropy_adaptive is not None and not isinstance(self.entropy_adaptive, EntropyAdaptiveClip):
            raise TypeError("PolicyLossConfig.entropy_adaptive must be an EntropyAdaptiveClip or None, "
                            f"got {type(self.entropy_adaptive).__name__}")
        if self.max_length_norm is not None and not self.max_length_norm > 0:
            raise ValueError(f"PolicyLossConfig.max_length_norm must be > 0, got {self.max_length_norm}")
        if not self.log_ratio_clamp > 0:
            raise ValueError(f"PolicyLossConfig.log_ratio_clamp must be > 0, got {self.log_ratio_clamp}")

    @classmethod
    def preset(cls, name, **overrides):
        """A preset of docs/api.md §4 with any field overridden, e.g. `preset("dapo", kl_coef=0.01)`."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"unknown PolicyLossConfig field(s) {unknown}; fields are {sorted(known)}")
        return replace(PRESETS[name], **overrides)

    @property
    def token_local(self):
        """True when each token's loss depends on that token alone (no sequence or segment means)."""
        return self.ratio_level == "token" and self.entropy_adaptive is None

    @property
    def needs_segments(self):
        return self.ratio_level == "segment"


def _check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; choose one of {list(choices)}")


PRESETS = {
    "ppo": PolicyLossConfig(dual_clip=3.0, aggregation="token-mean", advantage="gae"),
    "grpo": PolicyLossConfig(aggregation="seq-mean-token-mean", advantage="group_std"),
    "dapo": PolicyLossConfig(clip_high=0.28, aggregation="token-mean", advantage="group_std"),
    "dr_grpo": PolicyLossConfig(aggregation="seq-mean-token-sum-norm", advantage="group_none"),
    "rloo": PolicyLossConfig(aggregation="token-mean", advantage="rloo"),
    "gspo": PolicyLossConfig(ratio_level="sequence", clip_low=3e-4, clip_high=4e-4,
                             aggregation="seq-mean-token-mean", advantage="group_std"),
    "sspo": PolicyLossConfig(ratio_level="segment", clip_low=0.3, clip_high=0.3,
                             entropy_adaptive=EntropyAdaptiveClip(), aggregation="seq-mean-token-mean",
                             advantage="group_std"),
    "sppo": PolicyLossConfig(dual_clip=3.0, aggregation="token-mean", advantage="sppo"),
}


class PolicyLossOutput(NamedTuple):
    loss: torch.Tensor
    logp: torch.Tensor
    entropy: torch.Tensor
    metrics: dict


# ----------------------------------------------------------------------------------------------------
# Group statistics over sequences and segments


def group_mean(values, valid, groups):
    """Masked mean of `values` over each group, broadcast back to its tokens (0 off the mask).
    `groups` is (B, T) int64 with -1 off the mask; groups of different sequences never mix."""
    B, T = values.shape
    n_groups = max(T, 1)  # a sequence has at most T segments; no device sync to find the real count
    flat = (torch.arange(B, device=values.device).unsqueeze(1) * n_groups + groups.clamp(min=0)).reshape(-1)
    vflat = torch.where(valid, values, torch.zeros_like(values)).reshape(-1)
    sums = torch.zeros(B * n_groups, dtype=values.dtype, device=values.device).index_add(0, flat, vflat)
    counts = torch.zeros(B * n_groups, dtype=values.dtype, device=values.device).index_add(
        0, flat, valid.reshape(-1).to(values.dtype))
    means = sums / counts.clamp(min=1)
    out = means.gather(0, flat).reshape(B, T)
    return torch.where(valid, out, torch.zeros_like(out))


def sequence_groups(valid):
    """Every valid token of a sequence in group 0 (-1 off the mask)."""
    return torch.where(valid, torch.zeros_like(valid, dtype=torch.long), torch.full_like(valid, -1, dtype=torch.long))


def masked_sequence_mean(values, valid):
    """The masked mean over each sequence, broadcast to its tokens (0 off the mask)."""
    zero = torch.zeros_like(values)
    sums = torch.where(valid, values, zero).sum(-1, keepdim=True)
    counts = valid.sum(-1, keepdim=True).clamp(min=1).to(values.dtype)
    return torch.where(valid, (sums / counts).expand_as(values), zero)


# ----------------------------------------------------------------------------------------------------
# The per-token loss and the aggregation weights


def log_ratio(logp, old_logp, valid, config, segment_ids=None):
    """docs/api.md §3.2: the clamped log-ratio at token, sequence or segment level (0 off the mask)."""
    c = config.log_ratio_clamp
    r = torch.where(valid, (logp - old_logp).clamp(-c, c), torch.zeros_like(logp))
    if config.ratio_level == "sequence":
        return masked_sequence_mean(r, valid)
    if config.ratio_level == "segment":
        return group_mean(r, valid, segment_ids)
    return r


def clip_bounds(config, valid, segment_ids=None, entropy=None):
    """docs/api.md §3.4: (lo, hi) as numbers, or per-token tensors when entropy-adaptive."""
    lo, hi = 1.0 - config.clip_low, 1.0 + config.clip_high
    ea = config.entropy_adaptive
    if ea is None:
        return lo, hi
    groups = segment_ids if segment_ids is not None else sequence_groups(valid)
    hs = group_mean(entropy.detach().to(torch.promote_types(entropy.dtype, torch.float32)), valid, groups)
    high, low = hs > ea.high_threshold, hs < ea.low_threshold
    lo_t = torch.where(low, torch.full_like(hs, ea.low_entropy_lower), torch.full_like(hs, lo))
    hi_t = torch.where(high, 1.0 + ea.alpha + hs, torch.full_like(hs, hi))
    return lo_t, hi_t


def kl_penalty(logp, ref_logp, estimator):
    """docs/api.md §3.4: k1, k2 or k3 with d = clamp(ref_logp - logp, -20, 20)."""
    d = (ref_logp - logp).clamp(-20.0, 20.0)
    if estimator == "k1":
        return -d
    if estimator == "k2":
        return 0.5 * d * d
    return (torch.exp(d) - d - 1.0).clamp(max=10.0)


class TokenLoss(NamedTuple):
    loss: torch.Tensor  # l_t, (B, T)
    ratio: torch.Tensor  # rho_t, detached
    clipped: torch.Tensor  # bool: the clipped branch strictly larger
    dual_clipped: torch.Tensor  # bool: the dual clip applied
    kl: torch.Tensor | None  # detached, when ref_logp is given


def per_token_loss(logp, old_logp, advantages, valid, config, segment_ids=None, entropy=None, ref_logp=None,
                   rollout_is_weights=None):
    """docs/api.md §3.4 per token: l_t = max(-A rho, -A clip(rho, lo, hi)), the dual clip, KL and entropy.
    `rollout_is_weights` ((B, T), constant) multiplies the clipped policy-gradient term only, as TRL
    1.16 multiplies by its `importance_sampling_ratio`: the KL and entropy terms are not weighted."""
    rho = torch.exp(log_ratio(logp, old_logp, valid, config, segment_ids))
    lo, hi = clip_bounds(config, valid, segment_ids, entropy)
    unclipped = -advantages * rho
    clipped = -advantages * torch.clamp(rho, lo, hi)
    loss = torch.maximum(unclipped, clipped)
    dual_clipped = torch.zeros_like(valid)
    if config.dual_clip is not None:
        floor = -config.dual_clip * advantages
        dual_clipped = (advantages < 0) & (floor < loss)
        loss = torch.where(dual_clipped, floor, loss)
    if rollout_is_weights is not None:
        loss = loss * rollout_is_weights
    kl = None
    if ref_logp is not None:
        kl = kl_penalty(logp, ref_logp, config.kl_estimator)
        if config.kl_coef:
            loss = loss + config.kl_coef * kl
        kl = kl.detach()
    if config.entropy_coef:
        loss = loss - config.entropy_coef * entropy
    return TokenLoss(loss, rho.detach(), (clipped > unclipped) & valid, dual_clipped & valid, kl)


def token_weights(valid, config, normalizer=None, dtype=torch.float32):
    """docs/api.md §3.5 as per-token weights: the loss is sum_t w_t l_t. `normalizer` replaces the local
    denominator (the token count, or the sequence count) for data-parallel jobs."""
    m = valid.to(dtype)
    per_seq = m.sum(-1, keepdim=True)
    if config.aggregation == "token-mean":
        denom = m.sum() if normalizer is None else normalizer
        return m / _positive(denom)
    n_seqs = (per_seq > 0).sum() if normalizer is None else normalizer
    if config.aggregation == "seq-mean-token-mean":
        return m / per_seq.clamp(min=1) / _positive(n_seqs)
    if config.aggregation == "seq-mean-token-sum":
        return m / _positive(n_seqs)
    B, T = valid.shape
    length = config.max_length_norm or T
    n_seqs = B if normalizer is None else normalizer
    return m / _positive(torch.as_tensor(n_seqs, dtype=dtype) * length)


def _positive(denom):
    """A denominator of 0 means no valid token: every weight is then 0 anyway, so use 1 (never NaN)."""
    denom = torch.as_tensor(denom)
    return torch.where(denom > 0, denom, torch.ones_like(denom))


# ----------------------------------------------------------------------------------------------------
# The public loss


def policy_loss(logp, old_logp, advantages, mask, config, *, segment_ids=None, entropy=None, ref_logp=None,
                normalizer=None, rollout_is_weights=None, cu_seqlens=None):
    """The clipped policy loss of docs/api.md §3 on per-token log-probs. Returns PolicyLossOutput.

    `cu_seqlens` ((S + 1,) int32/int64 offsets) takes a packed batch: every per-token tensor is
    (N,) or (1, N), advantages and rollout_is_weights may also be (S,); see sppo_fast.packing.

    `rollout_is_weights`, optional, `(B, T)`, `(B, 1)` or `(B,)`, finite and >= 0, no gradient: the
    rollout engine's importance-sampling correction (TRL's `importance_sampling_ratio`, Liger's
    `vllm_is_ratio`, verl's `rollout_is_weights`). It multiplies each token's clipped policy-gradient
    term (after the dual clip), not the KL or entropy terms, exactly where TRL 1.16 applies it; the
    aggregation weights and the metrics are unchanged."""
    if cu_seqlens is not None:
        from .packing import packed_policy_loss  # packing builds on this module

        return packed_policy_loss(logp, old_logp, advantages, mask, config, cu_seqlens=cu_seqlens,
                                  segment_ids=segment_ids, entropy=entropy, ref_logp=ref_logp,
                                  normalizer=normalizer, rollout_is_weights=rollout_is_weights)
    valid, advantages = check_loss_inputs(logp, old_logp, advantages, mask, config, segment_ids=segment_ids,
                                          entropy=entropy, ref_logp=ref_logp, normalizer=normalizer,
                                          rollout_is_weights=rollout_is_weights)
    return aggregate(logp, old_logp, advantages, valid, config, segment_ids=segment_ids, entropy=entropy,
                     ref_logp=ref_logp, normalizer=normalizer, rollout_is_weights=rollout_is_weights)


def aggregate(logp, old_logp, advantages, valid, config, *, segment_ids=None, entropy=None, ref_logp=None,
              normalizer=None, rollout_is_weights=None):
    """policy_loss after its checks: `valid` is the boolean mask, `advantages` already (B, T) fp32."""
    dtype = torch.promote_types(logp.dtype, torch.float32)  # fp64 in, fp64 throughout: the oracle
    old_logp, advantages = old_logp.to(dtype), advantages.to(dtype)
    ref_logp = None if ref_logp is None else ref_logp.to(dtype)
    is_weights = expand_rollout_is_weights(rollout_is_weights, logp.shape, dtype)
    terms = per_token_loss(logp, old_logp, advantages, valid, config, segment_ids, entropy, ref_logp, is_weights)
    weights = token_weights(valid, config, normalizer, dtype=terms.loss.dtype)
    loss = torch.where(valid, weights * terms.loss, torch.zeros_like(terms.loss)).sum()
    metrics = loss_metrics(terms, logp, old_logp, entropy, valid)
    entropy = torch.zeros_like(logp) if entropy is None else entropy
    return PolicyLossOutput(loss, logp.detach().to(dtype), entropy.detach().to(dtype), metrics)


def loss_metrics(terms, logp, old_logp, entropy, valid):
    """docs/api.md §3.6: masked token means over the local batch, detached."""
    with torch.no_grad():
        n = valid.sum().clamp(min=1).to(torch.float32)
        zero = torch.zeros_like(terms.ratio)

        def mean(x):
            return torch.where(valid, x.to(torch.float32), zero).sum() / n

        metrics = {
            "clipfrac": mean(terms.clipped),
            "dual_clipfrac": mean(terms.dual_clipped),
            "ratio_mean": mean(terms.ratio),
            "ratio_max": torch.where(valid, terms.ratio, zero).amax() if valid.numel() else zero.sum(),
            "approx_kl": mean(old_logp - logp.detach()),
        }
        if entropy is not None:
            metrics["entropy"] = mean(entropy.detach())
        if terms.kl is not None:
            metrics["kl"] = mean(terms.kl)
    return metrics


def expand_rollout_is_weights(weights, shape, dtype):
    """(B,), (B, 1) or (B, T) rollout IS weights as a detached (B, T) tensor of `dtype` (None stays None)."""
    if weights is None:
        return None
    weights = weights.detach().to(dtype)
    if weights.dim() == 1:
        weights = weights.unsqueeze(1)
    return weights.expand(shape)


def check_rollout_is_weights(weights, shape, device, logp_name="logp"):
    """rollout_is_weights: a float tensor of shape (B,), (B, 1) or (B, T) on the loss's device, finite
    and >= 0 (a negative or NaN weight would flip or poison the gradient without any error)."""
    if weights is None:
        return
    check_float("rollout_is_weights", weights)
    B = shape[0]
    if tuple(weights.shape) not in ((B,), (B, 1), tuple(shape)):
        raise ValueError(f"rollout_is_weights must have shape ({B},), ({B}, 1) or {tuple(shape)} (the shape "
                         f"of {logp_name}), got {tuple(weights.shape)}")
    if weights.device != device:
        raise ValueError(f"rollout_is_weights is on {weights.device} but {logp_name} is on {device}; "
                         "move it with .to(device)")
    if torch.compiler.is_compiling() or weights.numel() == 0:
        return  # the value check reads the tensor (a device sync)
    bad = ~torch.isfinite(weights) | (weights < 0)
    if bool(bad.any()):
        raise ValueError(f"rollout_is_weights must be finite and >= 0, found {float(weights[bad][0])}")


def check_loss_inputs(logp, old_logp, advantages, mask, config, *, segment_ids=None, entropy=None,
                      ref_logp=None, normalizer=None, logp_name="logp", rollout_is_weights=None):
    """Checks of docs/api.md §6 for the (B, T) stage. Returns (valid: bool (B, T), advantages: fp32 (B, T))."""
    if not isinstance(config, PolicyLossConfig):
        raise TypeError(f"config must be a PolicyLossConfig (e.g. PolicyLossConfig.preset('sppo')), "
                        f"got {type(config).__name__}")
    check_float(logp_name, logp)
    if logp.dim() != 2:
        raise ValueError(f"{logp_name} must have shape (B, T), got {tuple(logp.shape)}")
    shape = tuple(logp.shape)
    check_shape("old_logp", check_float("old_logp", old_logp), shape, f"the shape of {logp_name}")
    check_tensor("mask", mask)
    check_shape("mask", mask, shape, f"the shape of {logp_name}")
    if mask.dtype.is_complex:
        raise TypeError(f"mask must be a bool or 0/1 tensor, got {mask.dtype}")
    check_tensor("advantages", advantages)
    if not advantages.dtype.is_floating_point:
        raise TypeError(f"advantages must be a floating-point tensor, got {advantages.dtype}")
    if tuple(advantages.shape) not in (shape[:1], shape):
        raise ValueError(f"advantages must have shape ({shape[0]},) or {shape}, got {tuple(advantages.shape)}")
    for name, x in (("entropy", entropy), ("ref_logp", ref_logp)):
        if x is not None:
            check_shape(name, check_float(name, x), shape, f"the shape of {logp_name}")
    if segment_ids is not None:
        check_shape("segment_ids", check_integer("segment_ids", segment_ids), shape, f"the shape of {logp_name}")
    check_same_device(**{logp_name: logp}, old_logp=old_logp, mask=mask, advantages=advantages,
                      entropy=entropy, ref_logp=ref_logp, segment_ids=segment_ids)
    check_rollout_is_weights(rollout_is_weights, shape, logp.device, logp_name)
    if config.needs_segments and segment_ids is None:
        raise ValueError("segment_ids is required for ratio_level='segment' (SSPO); build it with "
                         "sppo_fast.segment_ids(tokens, sppo_fast.newline_token_ids(tokenizer), mask=mask)")
    if (config.entropy_adaptive is not None or config.entropy_coef) and entropy is None:
        raise ValueError("entropy is required when entropy_adaptive or entropy_coef is set; pass "
                         "entropy= (token_logprobs(..., return_entropy=True)) or use the fused loss")
    if config.kl_coef and ref_logp is None:
        raise ValueError(f"ref_logp is required when kl_coef={config.kl_coef} is non-zero")
    if normalizer is not None and not torch.compiler.is_compiling():
        value = float(normalizer)
        if not value > 0:
            raise ValueError(f"normalizer must be > 0 (a global token or sequence count), got {value}")
    valid = mask.bool() if mask.dtype != torch.bool else mask
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1).expand(shape)
    return valid, advantages.detach().to(torch.promote_types(logp.dtype, torch.float32))
