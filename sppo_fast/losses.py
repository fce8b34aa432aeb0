"""The loss stage: the loss family of docs/api.md §3.2-§3.6, written once in PyTorch on the (S, T) grid and
shared by every backend and batch layout (packed batches reach it already on the grid, sppo_fast.layout).
Autograd through this stage yields the per-token coefficients (d loss / d logp and d loss / d entropy)
that the backward kernel turns into the logits' gradient (docs/api.md §9).

A loss is `sum_t w_t * l_t`: a per-token loss `l_t` (ratios, clipping, KL, entropy bonus) and
per-token weights `w_t` that encode the aggregation. A new variant is a few lines here."""

from dataclasses import dataclass, fields, replace
from typing import NamedTuple

import torch

from ._checks import (
    ValueChecks,
    check_float,
    check_integer,
    check_number,
    check_same_device,
    check_shape,
    check_tensor,
)

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
        for f in fields(self):
            check_number(f"EntropyAdaptiveClip.{f.name}", getattr(self, f.name))
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
        for name in ("clip_low", "clip_high", "kl_coef", "entropy_coef", "log_ratio_clamp"):
            check_number(f"PolicyLossConfig.{name}", getattr(self, name))
        if self.dual_clip is not None:
            check_number("PolicyLossConfig.dual_clip", self.dual_clip)
        if self.max_length_norm is not None:
            check_number("PolicyLossConfig.max_length_norm", self.max_length_norm, integer=True)
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
    if not isinstance(value, str) or value not in choices:
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
    `groups` is (B, T) int64 in [0, T) on the mask (anything off it); groups of different sequences never mix."""
    B, T = values.shape
    n_groups = max(T, 1)  # a sequence has at most T segments; no device sync to find the real count
    groups = torch.where(valid, groups, torch.zeros_like(groups))
    flat = (torch.arange(B, device=values.device).unsqueeze(1) * n_groups + groups).reshape(-1)
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


def log_ratio(logp, inputs, config):
    """docs/api.md §3.2: the clamped log-ratio at token, sequence or segment level (0 off the mask)."""
    c, valid = config.log_ratio_clamp, inputs.valid
    r = torch.where(valid, (logp - inputs.old_logp).clamp(-c, c), torch.zeros_like(logp))
    if config.ratio_level == "sequence":
        return masked_sequence_mean(r, valid)
    if config.ratio_level == "segment":
        return group_mean(r, valid, inputs.segment_ids)
    return r


def clip_bounds(config, inputs, entropy=None):
    """docs/api.md §3.4: (lo, hi) as numbers, or per-token tensors when entropy-adaptive."""
    lo, hi = 1.0 - config.clip_low, 1.0 + config.clip_high
    ea, valid, segment_ids = config.entropy_adaptive, inputs.valid, inputs.segment_ids
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


class LossInputs(NamedTuple):
    """The constants of the loss stage on the (S, T) grid, checked, detached and in the compute dtype
    (fp32, or fp64 for the oracle): nothing of them carries gradient (docs/api.md §2)."""

    valid: torch.Tensor  # bool (S, T): the positions that carry loss
    old_logp: torch.Tensor
    advantages: torch.Tensor  # (S, T), a per-sequence advantage broadcast over its tokens
    segment_ids: torch.Tensor | None  # int64 (S, T), -1 off the mask
    ref_logp: torch.Tensor | None
    is_weights: torch.Tensor | None  # rollout IS weights, (S, T)

    def sequences(self, a, b):
        """The inputs of sequences a..b-1 (a chunk of whole sequences)."""
        return LossInputs(*(None if x is None else x[a:b] for x in self))

    def cells(self, index):
        """The inputs at flat grid positions `index` (n,), as an (n, 1) grid: each token its own row, which
        is exact for token-local losses (every input is per token)."""
        return LossInputs(*(None if x is None else x.reshape(-1).index_select(0, index).unsqueeze(1) for x in self))


class TokenLoss(NamedTuple):
    loss: torch.Tensor  # l_t, (S, T)
    ratio: torch.Tensor  # rho_t, detached
    clipped: torch.Tensor  # bool: the clipped branch strictly larger
    dual_clipped: torch.Tensor  # bool: the dual clip applied
    kl: torch.Tensor | None  # detached, when ref_logp is given


def per_token_loss(logp, inputs, config, entropy=None):
    """docs/api.md §3.4 per token: l_t = max(-A rho, -A clip(rho, lo, hi)), the dual clip, KL and entropy.
    The rollout IS weights multiply the clipped policy-gradient term only, as TRL 1.16 multiplies by its
    `importance_sampling_ratio`: the KL and entropy terms are not weighted."""
    advantages, valid = inputs.advantages, inputs.valid
    rho = torch.exp(log_ratio(logp, inputs, config))
    lo, hi = clip_bounds(config, inputs, entropy)
    unclipped = -advantages * rho
    clipped = -advantages * torch.clamp(rho, lo, hi)
    loss = torch.maximum(unclipped, clipped)
    dual_clipped = torch.zeros_like(valid)
    if config.dual_clip is not None:
        floor = -config.dual_clip * advantages
        dual_clipped = (advantages < 0) & (floor < loss)
        loss = torch.where(dual_clipped, floor, loss)
    if inputs.is_weights is not None:
        loss = loss * inputs.is_weights
    kl = None
    if inputs.ref_logp is not None:
        kl = kl_penalty(logp, inputs.ref_logp, config.kl_estimator)
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


def weighted_sum(weights, terms, valid):
    """sum_t w_t l_t over the valid positions (a masked position's l_t may be anything, even NaN)."""
    return torch.where(valid, weights * terms.loss, torch.zeros_like(terms.loss)).sum()


# ----------------------------------------------------------------------------------------------------
# The loss on the grid


def aggregate(logp, inputs, config, *, entropy=None, normalizer=None):
    """The policy loss of per-token (S, T) log-probs after the checks. Returns PolicyLossOutput."""
    terms = per_token_loss(logp, inputs, config, entropy)
    weights = token_weights(inputs.valid, config, normalizer, dtype=terms.loss.dtype)
    loss = weighted_sum(weights, terms, inputs.valid)
    metrics = loss_metrics(terms, logp, inputs, entropy)
    entropy = torch.zeros_like(logp) if entropy is None else entropy
    dtype = torch.promote_types(logp.dtype, torch.float32)
    return PolicyLossOutput(loss, logp.detach().to(dtype), entropy.detach().to(dtype), metrics)


def policy_loss_on_grid(logp, old_logp, advantages, mask, config, *, segment_ids=None, entropy=None, ref_logp=None,
                        normalizer=None, rollout_is_weights=None):
    """sppo_fast.policy_loss for a padded (B, T) batch: the checks, then `aggregate`."""
    checks = ValueChecks()
    inputs = check_loss_inputs(checks, old_logp, advantages, mask, config, logp=logp, segment_ids=segment_ids,
                               entropy=entropy, ref_logp=ref_logp, normalizer=normalizer,
                               rollout_is_weights=rollout_is_weights)
    checks.run()
    return aggregate(logp, inputs, config, entropy=entropy, normalizer=normalizer)


def loss_metrics(terms, logp, inputs, entropy):
    """docs/api.md §3.6: masked token means over the local batch, detached."""
    valid = inputs.valid
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
            "approx_kl": mean(inputs.old_logp - logp.detach()),
        }
        if entropy is not None:
            metrics["entropy"] = mean(entropy.detach())
        if terms.kl is not None:
            metrics["kl"] = mean(terms.kl)
    return metrics


# ----------------------------------------------------------------------------------------------------
# Checks (docs/api.md §6)


def _check_rollout_is_weights(checks, weights, shape, device, logp_name):
    """(B,), (B, 1) or (B, T), finite and >= 0 (a negative or NaN weight would flip or poison the
    gradient without any error)."""
    check_float("rollout_is_weights", weights)
    B = shape[0]
    if tuple(weights.shape) not in ((B,), (B, 1), tuple(shape)):
        raise ValueError(f"rollout_is_weights must have shape ({B},), ({B}, 1) or {tuple(shape)} (the shape "
                         f"of {logp_name}), got {tuple(weights.shape)}")
    if weights.device != device:
        raise ValueError(f"rollout_is_weights is on {weights.device} but old_logp is on {device}; "
                         "move it with .to(device)")
    if weights.numel():
        bad = ~torch.isfinite(weights) | (weights < 0)
        checks.add(bad.any(), lambda: ValueError(
            f"rollout_is_weights must be finite and >= 0, found {float(weights[bad][0])}"))


def _check_segment_ids(checks, segment_ids, valid, shape, logp_name):
    """Integers in [0, T) on the mask: segment t of a sequence is group t of its row."""
    check_shape("segment_ids", check_integer("segment_ids", segment_ids), shape, f"the shape of {logp_name}")
    T = shape[1]
    bad = valid & ((segment_ids < 0) | (segment_ids >= T))
    if bad.numel():
        checks.add(bad.any(), lambda: ValueError(
            f"segment_ids must lie in [0, {T}) where mask is 1 (a sequence of T = {T} positions has at most T "
            f"segments; build them with sppo_fast.segment_ids), found {int(segment_ids[bad][0])}"))


def _check_normalizer(checks, normalizer):
    if normalizer is None:
        return
    if isinstance(normalizer, torch.Tensor):
        if normalizer.dim() != 0 or normalizer.dtype.is_complex or normalizer.dtype == torch.bool:
            raise ValueError(f"normalizer must be a positive number or a 0-dim tensor, got a tensor of shape "
                             f"{tuple(normalizer.shape)}")
        checks.add(~(normalizer > 0), lambda: ValueError(
            f"normalizer must be > 0 (a global token or sequence count), got {float(normalizer)}"))
        return
    value = check_number("normalizer", normalizer)
    if not value > 0:
        raise ValueError(f"normalizer must be > 0 (a global token or sequence count), got {value}")


def check_loss_inputs(checks, old_logp, advantages, mask, config, *, logp=None, grid=None, segment_ids=None,
                      entropy=None, ref_logp=None, normalizer=None, rollout_is_weights=None, logp_name="logp",
                      computes_entropy=False):
    """The checks of docs/api.md §6 for the loss stage on a (B, T) grid: the grid of `logp`, or `grid` for the
    fused ops (which compute logp and, with `computes_entropy`, the entropy). Value checks go into `checks`.
    Returns the LossInputs: detached, each in its own dtype promoted to fp32 at least (fp64 stays fp64)."""
    if not isinstance(config, PolicyLossConfig):
        raise TypeError(f"config must be a PolicyLossConfig (e.g. PolicyLossConfig.preset('sppo')), "
                        f"got {type(config).__name__}")
    if logp is not None:
        check_float(logp_name, logp)
        if logp.dim() != 2:
            raise ValueError(f"{logp_name} must have shape (B, T), got {tuple(logp.shape)}")
        grid = tuple(logp.shape)
    shape = tuple(grid)
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
    check_same_device(**{logp_name: logp}, old_logp=old_logp, mask=mask, advantages=advantages,
                      entropy=entropy, ref_logp=ref_logp, segment_ids=segment_ids)
    if config.needs_segments and segment_ids is None:
        raise ValueError("segment_ids is required for ratio_level='segment' (SSPO); build it with "
                         "sppo_fast.segment_ids(tokens, sppo_fast.newline_token_ids(tokenizer), mask=mask)")
    if (config.entropy_adaptive is not None or config.entropy_coef) and entropy is None and not computes_entropy:
        raise ValueError("entropy is required when entropy_adaptive or entropy_coef is set; pass "
                         "entropy= (token_logprobs(..., return_entropy=True)) or use the fused loss")
    if config.kl_coef and ref_logp is None:
        raise ValueError(f"ref_logp is required when kl_coef={config.kl_coef} is non-zero")
    valid = (mask.bool() if mask.dtype != torch.bool else mask).detach()
    if segment_ids is not None:
        _check_segment_ids(checks, segment_ids, valid, shape, logp_name)
    if rollout_is_weights is not None:
        _check_rollout_is_weights(checks, rollout_is_weights, shape, old_logp.device, logp_name)
    _check_normalizer(checks, normalizer)

    def constant(x):
        if x is None:
            return None
        x = x.detach().to(torch.promote_types(x.dtype, torch.float32))
        return x.unsqueeze(1).expand(shape) if x.dim() == 1 else x.expand(shape)

    return LossInputs(valid, constant(old_logp), constant(advantages),
                      None if segment_ids is None else segment_ids.detach().to(torch.long), constant(ref_logp),
                      constant(rollout_is_weights))
