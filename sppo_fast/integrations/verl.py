"""sppo-fast inside verl 0.9.1: `register()` adds our SPPO advantage estimator and our SPPO and SSPO
policy losses to verl's registries, and `FusedLinearForPPO` stands in for verl's fused log-prob and
entropy head (`verl.utils.experimental.torch_functional.FusedLinearForPPO`).

    from sppo_fast.integrations import verl as sf_verl
    sf_verl.register()                   # then, in verl's config:
    # algorithm.adv_estimator=sppo_fast_sppo  actor_rollout_ref.actor.policy_loss.loss_mode=sppo_fast_sppo

verl is optional: importing this module does not import verl; `register()` and the patch do.

Megatron tensor parallelism: `vocab_parallel_log_probs_from_logits(logits, labels)` and
`vocab_parallel_entropy(vocab_parallel_logits)` stand in for verl's functions of the same names
(`verl.utils.megatron.tensor_parallel`), which take this rank's (..., V / P) columns of the logits:
same inputs, outputs and gradients, computed by `sppo_fast.token_logprobs(..., process_group=...)`,
with the group as an explicit `process_group=` (default: megatron's tensor-model-parallel group).

Contracts (verl passes these, we map them; docs/integrations.md has the tables):
- Advantage `sppo_fast_sppo`: verl's `compute_advantage` hands a registered estimator
  `token_level_rewards`, `response_mask`, `config`, `index` and, when the batch has one,
  `reward_baselines`. SPPO's critic logit `z` (one per sequence, read from the prompt alone) travels in
  `data.batch["reward_baselines"]` (shape (bs,)), or as `critic_logits=` when called directly; the
  advantage is `R - sigmoid(z)` on every response token, `R` the sequence's summed reward.
- Policy losses `sppo_fast_sppo` and `sppo_fast_sspo`: verl's signature
  `(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights)`
  and return `(loss, metrics)`. Clip bounds come from the actor config (`clip_ratio_low/high`, and
  `clip_ratio_c` as SPPO's dual clip); `loss_agg_mode` and `config.global_batch_info` (dp_size,
  global token and sequence counts, loss_scale_factor) map to our aggregation and `normalizer`, so
  the number equals verl's `agg_loss`. SSPO also needs the response's segment ids and per-token
  entropy, which verl's `ppo_loss` does not pass to a policy loss: give them as keywords, or wrap the
  call in `loss_inputs(segment_ids=..., entropy=...)`."""

import contextlib
import contextvars

import torch

from ..advantages import sequence_advantage
from ..api import linear_logprobs, policy_loss, token_logprobs
from ..losses import EntropyAdaptiveClip, PolicyLossConfig

SPPO_ADVANTAGE = "sppo_fast_sppo"
SPPO_LOSS = "sppo_fast_sppo"
SSPO_LOSS = "sppo_fast_sspo"

_LOSS_INPUTS = contextvars.ContextVar("sppo_fast_verl_loss_inputs", default=None)  # a dict inside loss_inputs


def _core_algos():
    try:
        from verl.trainer.ppo import core_algos
    except ImportError as exc:
        raise ImportError("sppo_fast.integrations.verl needs verl (tested with 0.9.1): pip install verl==0.9.1"
                          ) from exc
    return core_algos


# ----------------------------------------------------------------------------------------------------
# Registration


def register(*, fused_linear=False):
    """Adds `sppo_fast_sppo` (advantage estimator), `sppo_fast_sppo` and `sppo_fast_sspo` (policy losses)
    to verl's registries; with fused_linear=True also patches verl's FusedLinearForPPO (see
    `patch_fused_linear_for_ppo`). Idempotent. Returns the registered names."""
    core = _core_algos()
    for name, fn in ((SPPO_LOSS, sppo_policy_loss), (SSPO_LOSS, sspo_policy_loss)):
        existing = core.POLICY_LOSS_REGISTRY.get(name)
        if existing is not None and existing is not fn:
            raise ValueError(f"verl already has a policy loss named {name!r} ({existing!r}); not overwriting it")
        core.register_policy_loss(name)(fn)
    core.register_adv_est(SPPO_ADVANTAGE)(compute_sppo_advantage)  # verl itself refuses another function
    if fused_linear:
        patch_fused_linear_for_ppo()
    return {"adv_estimator": [SPPO_ADVANTAGE], "policy_loss": [SPPO_LOSS, SSPO_LOSS]}


# ----------------------------------------------------------------------------------------------------
# The SPPO advantage estimator


def compute_sppo_advantage(token_level_rewards, response_mask, config=None, index=None, reward_baselines=None,
                           critic_logits=None, **kwargs):
    """SPPO: `A = R - sigmoid(z)` on every response token (docs/api.md §3.7). `R` = token_level_rewards summed
    over the response (outcome reward, in {0, 1}); `z` the critic logit per sequence, given as
    `critic_logits` or, through verl's compute_advantage, as `reward_baselines` (bs,). Returns
    (advantages, returns), both (bs, response_length) and 0 off the mask; `returns` is R, the critic's
    BCE target. `index` (the prompt uid) is unused: SPPO needs no group."""
    logits = critic_logits if critic_logits is not None else reward_baselines
    if logits is None:
        raise ValueError("sppo_fast_sppo needs the critic logit of each sequence: put it in "
                         "data.batch['reward_baselines'] (shape (bs,)) or pass critic_logits=")
    if token_level_rewards.dim() != 2:
        raise ValueError(f"token_level_rewards must have shape (bs, response_length), "
                         f"got {tuple(token_level_rewards.shape)}")
    if tuple(response_mask.shape) != tuple(token_level_rewards.shape):
        raise ValueError(f"response_mask must have the shape of token_level_rewards "
                         f"{tuple(token_level_rewards.shape)}, got {tuple(response_mask.shape)}")
    with torch.no_grad():
        scores = token_level_rewards.sum(-1)
        mask = response_mask.to(scores.dtype)
        advantages = sequence_advantage(scores, logits).to(scores.dtype).unsqueeze(-1) * mask
        returns = scores.unsqueeze(-1) * mask
    return advantages, returns


# ----------------------------------------------------------------------------------------------------
# The policy losses


@contextlib.contextmanager
def loss_inputs(*, segment_ids=None, entropy=None):
    """Inside this block the registered losses read `segment_ids` and `entropy` ((bs, response_length),
    verl's padded layout) when verl's call does not pass them: how a custom verl loss_fn that wraps
    verl's `ppo_loss` feeds SSPO."""
    token = _LOSS_INPUTS.set({"segment_ids": segment_ids, "entropy": entropy})
    try:
        yield
    finally:
        _LOSS_INPUTS.reset(token)


def _get(config, name, default=None):
    value = config.get(name, default) if hasattr(config, "get") else getattr(config, name, default)
    return default if value is None else value


def clip_bounds(config):
    """(clip_low, clip_high, clip_ratio_c) from a verl actor config, as verl's vanilla loss reads them."""
    if config is None:
        raise ValueError("config (verl's ActorConfig) is required: the clip ratios come from it")
    clip = _get(config, "clip_ratio", 0.2)
    low, high = _get(config, "clip_ratio_low", clip), _get(config, "clip_ratio_high", clip)
    return low, high, _get(config, "clip_ratio_c", 3.0)


def aggregation(loss_agg_mode, response_mask, global_batch_info):
    """verl's loss_agg_mode + global_batch_info -> (aggregation, normalizer, max_length_norm) such that our
    aggregation equals verl's agg_loss: verl divides by a global count and multiplies by dp_size, our
    `normalizer` replaces the local denominator, so normalizer = count / dp_size."""
    info = dict(global_batch_info or {})
    dp_size = info.get("dp_size") or 1
    tokens, seqs, scale = info.get("batch_num_tokens"), info.get("global_batch_size"), info.get("loss_scale_factor")

    def per_rank(count, what):
        if count is None:
            if dp_size > 1:
                raise ValueError(f"global_batch_info: {what} is required when dp_size > 1 (as in verl's agg_loss)")
            return None
        return float(count) / dp_size

    if loss_agg_mode == "token-mean":
        return "token-mean", per_rank(tokens, "batch_num_tokens"), None
    if loss_agg_mode == "token-sum":  # the masked sum times dp_size: token-mean over 1 / dp_size
        return "token-mean", 1.0 / dp_size, None
    if loss_agg_mode in ("seq-mean-token-mean", "seq-mean-token-sum"):
        return loss_agg_mode, per_rank(seqs, "global_batch_size"), None
    if loss_agg_mode == "seq-mean-token-sum-norm":
        normalizer = per_rank(seqs, "global_batch_size")
        if normalizer is None:  # verl counts the sequences that have a token; docs/api.md §3.5 counts all B
            nonempty = int(response_mask.bool().any(-1).sum())
            normalizer = float(nonempty) if nonempty else None
        return loss_agg_mode, normalizer, scale
    raise ValueError(f"unknown loss_agg_mode {loss_agg_mode!r}; verl's modes are token-mean, token-sum, "
                     "seq-mean-token-mean, seq-mean-token-sum, seq-mean-token-sum-norm")


def verl_metrics(metrics):
    """Our metrics under verl's names (pg_clipfrac, pg_clipfrac_lower, ppo_kl), plus ratio_mean/max."""
    names = {"clipfrac": "pg_clipfrac", "dual_clipfrac": "pg_clipfrac_lower", "approx_kl": "ppo_kl",
             "ratio_mean": "ratio_mean", "ratio_max": "ratio_max"}
    return {"actor/" + theirs: float(metrics[ours]) for ours, theirs in names.items()}


def _run(preset, old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights,
         **fields):
    clip_low, clip_high, clip_c = clip_bounds(config)
    segment_ids, entropy = fields.pop("segment_ids", None), fields.pop("entropy", None)
    mode, normalizer, max_length_norm = aggregation(loss_agg_mode, response_mask, _get(config, "global_batch_info"))
    ours = PolicyLossConfig.preset(preset, clip_low=clip_low, clip_high=clip_high, aggregation=mode,
                                   max_length_norm=max_length_norm,
                                   **({"dual_clip": clip_c} if preset == "sppo" else {}), **fields)
    out = policy_loss(log_prob, old_log_prob, advantages, response_mask, ours, segment_ids=segment_ids,
                      entropy=entropy, normalizer=normalizer, rollout_is_weights=rollout_is_weights)
    return out.loss, verl_metrics(out.metrics)


def sppo_policy_loss(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean", config=None,
                     rollout_is_weights=None):
    """SPPO's token-level clipped loss with the dual clip (docs/api.md §4 preset `sppo`) in verl's signature:
    verl's vanilla loss computed by our loss stage (the same number; SPPO's difference is its advantage)."""
    return _run("sppo", old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
                rollout_is_weights)


def sspo_policy_loss(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="seq-mean-token-mean",
                     config=None, rollout_is_weights=None, *, segment_ids=None, entropy=None, entropy_clip=None):
    """SSPO (docs/api.md §4 preset `sspo`): one ratio per newline-separated segment, entropy-adaptive clip bounds
    (`entropy_clip`, default EntropyAdaptiveClip()), no dual clip (verl's clip_ratio_c is not used).
    `segment_ids` and `entropy` (bs, response_length) come as keywords or from `loss_inputs(...)`."""
    extra = _LOSS_INPUTS.get() or {}
    segment_ids = extra.get("segment_ids") if segment_ids is None else segment_ids
    entropy = extra.get("entropy") if entropy is None else entropy
    if segment_ids is None:
        raise ValueError("sppo_fast_sspo needs segment_ids (bs, response_length): build them with "
                         "sppo_fast.segment_ids(responses, sppo_fast.newline_token_ids(tokenizer), mask=response_mask) "
                         "and pass segment_ids= or wrap the call in sppo_fast.integrations.verl.loss_inputs(...)")
    if entropy is None:
        raise ValueError("sppo_fast_sspo needs the per-token entropy (bs, response_length) for its "
                         "entropy-adaptive clip: pass entropy= or use loss_inputs(entropy=...)")
    clip = EntropyAdaptiveClip() if entropy_clip is None else entropy_clip
    return _run("sspo", old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
                rollout_is_weights, segment_ids=segment_ids, entropy=entropy, entropy_adaptive=clip)


# ----------------------------------------------------------------------------------------------------
# The fused log-prob + entropy head


class FusedLinearForPPO(torch.nn.Module):
    """Stands in for verl's `FusedLinearForPPO`: the same constructor keywords, the same forward
    `(hidden_states (T, H) or (B, T, H), vocab_weights (V, H), input_ids, temperature)` and outputs
    (log_probs fp32, entropy in the hidden states' dtype), differentiable in hidden_states and
    vocab_weights; computed by `sppo_fast.linear_logprobs` (chunked, never holding the (T, V) logits,
    C++/Triton kernels). `chunk_size=None` lets sppo-fast size the chunks; `impl_backend` is accepted
    for verl's call sites and ignored (sppo-fast picks its kernels per device)."""

    def __init__(self, chunk_size=None, impl_backend="torch"):
        super().__init__()
        self.chunk_size = chunk_size
        self.impl_backend = impl_backend

    def forward(self, hidden_states, vocab_weights, input_ids, temperature=1.0):
        if hidden_states.ndim not in (2, 3):
            raise ValueError(f"hidden_states must be 2D or 3D, got shape {tuple(hidden_states.shape)}")
        logp, entropy = linear_logprobs(hidden_states, vocab_weights, input_ids.to(torch.int64),
                                        temperature=float(temperature), return_entropy=True,
                                        chunk_size=self.chunk_size)
        return logp, entropy.to(hidden_states.dtype)


def patch_fused_linear_for_ppo():
    """Makes verl's model forwards (`use_fused_kernels=True`, torch backend), which import
    `FusedLinearForPPO` from `verl.utils.experimental.torch_functional` at each call, use ours.
    Idempotent; returns verl's original class (`unpatch_fused_linear_for_ppo` puts it back)."""
    from verl.utils.experimental import torch_functional

    if torch_functional.FusedLinearForPPO is not FusedLinearForPPO:
        _ORIGINAL["FusedLinearForPPO"] = torch_functional.FusedLinearForPPO
        torch_functional.FusedLinearForPPO = FusedLinearForPPO
    return _ORIGINAL["FusedLinearForPPO"]


def unpatch_fused_linear_for_ppo():
    from verl.utils.experimental import torch_functional

    if "FusedLinearForPPO" in _ORIGINAL:
        torch_functional.FusedLinearForPPO = _ORIGINAL.pop("FusedLinearForPPO")


_ORIGINAL = {}


# ----------------------------------------------------------------------------------------------------
# Megatron's vocabulary-parallel log-probs and entropy (verl.utils.megatron.tensor_parallel)


def _tp_group(process_group):
    """The group the vocabulary is split over: `process_group`, or megatron's tensor-model-parallel group."""
    if process_group is not None:
        return process_group
    try:
        from megatron.core import parallel_state as mpu
    except ImportError:
        raise ValueError("process_group is required: megatron-core is not installed, so there is no "
                         "tensor-model-parallel group to default to") from None
    if not mpu.model_parallel_is_initialized():
        raise ValueError("process_group is required: megatron's model parallel state is not initialized "
                         "(parallel_state.initialize_model_parallel), so there is no tensor-model-parallel group "
                         "to default to")
    return mpu.get_tensor_model_parallel_group()


def vocab_parallel_log_probs_from_logits(logits, labels, *, process_group=None, vocab_start=None):
    """Stands in for verl's `vocab_parallel_log_probs_from_logits` (minus megatron's
    `vocab_parallel_cross_entropy`): `logits` this rank's (..., V / P) columns, rank r holding ids
    [r * V / P, (r + 1) * V / P) as megatron splits them (`vocab_start`: another first id), `labels`
    (...) global ids. Returns the log-probs fp32 (...), the same on every rank of the group, differentiable
    in `logits` (each rank its own columns' gradient). Unlike megatron's function, the logits are not
    overwritten. A label of -100 gives 0 (megatron has no ignored label)."""
    return token_logprobs(logits, labels.to(torch.int64), process_group=_tp_group(process_group),
                          vocab_start=vocab_start)


def vocab_parallel_entropy(vocab_parallel_logits, *, process_group=None, vocab_start=None):
    """Stands in for verl's `vocab_parallel_entropy`: the entropy (...) of softmax over the whole
    vocabulary from this rank's (..., V / P) columns, in the logits' dtype, the same on every rank,
    differentiable in the local columns."""
    logits = vocab_parallel_logits
    targets = torch.zeros(logits.shape[:-1], dtype=torch.int64, device=logits.device)  # any id: unused
    _, entropy = token_logprobs(logits, targets, return_entropy=True, process_group=_tp_group(process_group),
                                vocab_start=vocab_start)
    return entropy.to(logits.dtype)
