"""The public functions of docs/api.md §2. Each checks its arguments once (the value checks together:
one device sync), takes the batch layout once (sppo_fast.layout), then composes layout -> plan ->
kernels (sppo_fast.ops, sppo_fast.executor) -> loss stage (sppo_fast.losses), and restores the caller's
shapes once at the exit."""

import torch

from ._checks import ValueChecks, check_float, check_linear, check_logits_and_targets, check_same_device
from .executor import linear_policy_loss
from .layout import batch_layout, flat_rows, flat_targets
from .losses import aggregate, check_loss_inputs
from .ops import IGNORE_INDEX, linear_logprobs_rows, token_logprobs_rows
from .plan import default_chunk_size, plan_linear_loss


def token_logprobs(logits, targets, *, temperature=1.0, ignore_index=-100, return_entropy=False,
                   inplace_backward=False):
    """Per-token log-probs of `targets` under softmax(logits / temperature), fp32 with the leading shape
    of `targets`; with return_entropy, also the entropy of each distribution (docs/api.md §2.1)."""
    checks = ValueChecks()
    temperature = check_logits_and_targets(checks, logits, targets, temperature, ignore_index)
    checks.run()
    logp, entropy = token_logprobs_rows(flat_rows(logits), flat_targets(targets), temperature,
                                        ignore_index, bool(return_entropy), bool(inplace_backward))
    logp = logp.reshape(targets.shape)
    return (logp, entropy.reshape(targets.shape)) if return_entropy else logp


def linear_logprobs(hidden, weight, targets, *, bias=None, temperature=1.0, ignore_index=-100,
                    return_entropy=False, chunk_size=None):
    """`token_logprobs(hidden @ weight.T + bias, ...)` without materialising the (N, V) logits: a
    chunked matmul whose chunks are consumed by the kernels and recomputed in the backward (§2.2)."""
    checks = ValueChecks()
    temperature = check_linear(checks, hidden, weight, bias, targets, temperature, ignore_index, chunk_size)
    checks.run()
    logp, entropy = linear_logprobs_rows(flat_rows(hidden), weight, bias, flat_targets(targets),
                                         temperature, ignore_index, bool(return_entropy),
                                         chunk_size or default_chunk_size(weight.shape[0]))
    logp = logp.reshape(targets.shape)
    return (logp, entropy.reshape(targets.shape)) if return_entropy else logp


def policy_loss(logp, old_logp, advantages, mask, config, *, segment_ids=None, entropy=None, ref_logp=None,
                normalizer=None, rollout_is_weights=None, cu_seqlens=None):
    """The clipped policy loss of docs/api.md §3 on per-token log-probs (§2.3). Returns PolicyLossOutput.
    `cu_seqlens` ((S + 1,) offsets) takes a packed batch: per-token tensors (N,) or (1, N), advantages
    and rollout_is_weights also (S,) (§3.9). `rollout_is_weights` ((B, T), (B, 1) or (B,), finite, >= 0)
    multiply each token's clipped policy-gradient term (§3.8)."""
    check_float("logp", logp)
    layout = batch_layout("logp", logp, cu_seqlens)
    grid_logp = layout.to_grid(logp.reshape(layout.n_rows)) if layout.packed else logp
    checks = ValueChecks()
    old_logp, advantages, mask, segment_ids, ref_logp, rollout_is_weights, entropy = layout.grid_inputs(
        old_logp, advantages, mask, segment_ids, ref_logp, rollout_is_weights, entropy)
    inputs = check_loss_inputs(checks, old_logp, advantages, mask, config, logp=grid_logp, segment_ids=segment_ids,
                               entropy=entropy, ref_logp=ref_logp, normalizer=normalizer,
                               rollout_is_weights=rollout_is_weights)
    checks.run()
    out = aggregate(grid_logp, inputs, config, entropy=entropy, normalizer=normalizer)
    return _to_caller(out, layout, logp.shape)


def fused_policy_loss(logits, targets, old_logp, advantages, mask, config, *, segment_ids=None, ref_logp=None,
                      temperature=1.0, normalizer=None, inplace_backward=False, rollout_is_weights=None,
                      cu_seqlens=None):
    """The policy loss of docs/api.md §3 straight from (B, T, V) logits (packed: (N, V) or (1, N, V)): one
    forward kernel, the loss stage on the grid, one backward kernel (§2.4). Equals
    policy_loss(token_logprobs(logits, ...), ...); logp and entropy are 0 where mask is 0, and so is the
    logits' gradient, whatever those rows hold."""
    checks = ValueChecks()
    temperature = check_logits_and_targets(checks, logits, targets, temperature, IGNORE_INDEX,
                                           packed=cu_seqlens is not None)
    layout, logits_rows, kernel_targets, inputs = _fused_entry(
        checks, "logits", logits, targets, cu_seqlens, old_logp, advantages, mask, config, segment_ids, ref_logp,
        normalizer, rollout_is_weights)
    keep = layout.to_rows(inputs.valid).reshape(-1)
    if logits_rows.dtype == torch.float64:  # the eager oracle differentiates through masked rows too
        logits_rows = torch.where(keep.unsqueeze(1), logits_rows, torch.zeros_like(logits_rows))
    kernel_targets = torch.where(keep, kernel_targets, torch.full_like(kernel_targets, IGNORE_INDEX))
    logp, entropy = token_logprobs_rows(logits_rows, kernel_targets, temperature, IGNORE_INDEX, True,
                                        bool(inplace_backward))
    out = aggregate(layout.to_grid(logp), inputs, config, entropy=layout.to_grid(entropy), normalizer=normalizer)
    return _to_caller(out, layout, targets.shape)


def fused_linear_policy_loss(hidden, weight, targets, old_logp, advantages, mask, config, *, bias=None,
                             segment_ids=None, ref_logp=None, temperature=1.0, normalizer=None,
                             chunk_size=None, rollout_is_weights=None, cu_seqlens=None):
    """The policy loss of docs/api.md §3 from hidden states (B, T, H) (packed: (N, H) or (1, N, H)) and the
    lm_head weight, never holding the logits (§2.5): the chunk plan (sppo_fast.plan) decides between one
    pass (three matmuls) and two; rows with mask 0 never enter a matmul."""
    checks = ValueChecks()
    temperature = check_linear(checks, hidden, weight, bias, targets, temperature, IGNORE_INDEX, chunk_size,
                               packed=cu_seqlens is not None)
    layout, hidden_rows, target_rows, inputs = _fused_entry(
        checks, "hidden", hidden, targets, cu_seqlens, old_logp, advantages, mask, config, segment_ids, ref_logp,
        normalizer, rollout_is_weights)
    plan = plan_linear_loss(layout, inputs.valid, token_local=config.token_local,
                            oracle=weight.dtype == torch.float64, vocab=weight.shape[0], chunk_size=chunk_size)
    compute_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    out = linear_policy_loss(plan, layout, hidden_rows, weight, bias, target_rows, inputs, config,
                             temperature=temperature, normalizer=normalizer, compute_grad=compute_grad)
    return _to_caller(out, layout, targets.shape)


def _fused_entry(checks, name, x, targets, cu_seqlens, old_logp, advantages, mask, config, segment_ids, ref_logp,
                 normalizer, rollout_is_weights):
    """The rest of a fused op's entry, after its kernel arguments' checks: the layout, the (N, V|H) rows and
    (N,) targets of the vocabulary-sized work, and the loss stage's inputs on the grid, all checked."""
    check_same_device(**{name: x}, old_logp=old_logp)
    layout = batch_layout(name, x, cu_seqlens, trailing=1)
    rows, target_rows = layout.token_rows(x, targets)
    old_logp, advantages, mask, segment_ids, ref_logp, rollout_is_weights, _ = layout.grid_inputs(
        old_logp, advantages, mask, segment_ids, ref_logp, rollout_is_weights)
    inputs = check_loss_inputs(checks, old_logp, advantages, mask, config, grid=(layout.n_seqs, layout.width),
                               segment_ids=segment_ids, ref_logp=ref_logp, normalizer=normalizer,
                               rollout_is_weights=rollout_is_weights, logp_name="targets", computes_entropy=True)
    checks.run()
    return layout, rows, target_rows, inputs


def _to_caller(out, layout, shape):
    """PolicyLossOutput with logp and entropy in the caller's per-token shape."""
    return out._replace(logp=layout.to_caller(out.logp, shape), entropy=layout.to_caller(out.entropy, shape))
