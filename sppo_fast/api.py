"""The public functions of docs/api.md §2. Each checks its arguments once (the value checks together:
one device sync), takes the batch layout once (sppo_fast.layout), then composes layout -> plan ->
kernels (sppo_fast.ops, sppo_fast.executor) -> loss stage (sppo_fast.losses), and restores the caller's
shapes once at the exit."""

import torch

from ._checks import (
    ValueChecks,
    check_float,
    check_linear,
    check_logits_and_targets,
    check_one_pass,
    check_same_device,
)
from .executor import linear_policy_loss
from .layout import batch_layout, flat_rows, flat_targets, sequence_lengths, split_layout
from .losses import aggregate, check_loss_inputs
from .ops import IGNORE_INDEX, linear_logprobs_rows, token_logprobs_rows
from .parallel import (
    agree,
    checksum,
    context_lengths,
    debug_checks,
    group_rank,
    target_span,
    vocab_request,
    vocab_shard,
)
from .plan import default_chunk_size, logits_one_pass, plan_linear_loss


def token_logprobs(logits, targets, *, temperature=1.0, ignore_index=-100, return_entropy=False,
                   inplace_backward=False, process_group=None, vocab_start=None):
    """Per-token log-probs of `targets` under softmax(logits / temperature), fp32 with the leading shape
    of `targets`; with return_entropy, also the entropy of each distribution (docs/api.md §2.1). Logits
    split by vocabulary (a DTensor sharded on the last dim, or this rank's columns with process_group and
    vocab_start) give the values of the whole vocabulary on every rank (§11)."""
    vocab = vocab_request("logits", logits, -1, process_group, vocab_start)
    logits = vocab.tensor

    def local(checks):
        t = check_logits_and_targets(checks, logits, targets, temperature, ignore_index,
                                     check_range=vocab.group is None)
        return t, None

    temperature, _, shard = _meet(local, logits, vocab, None, targets, ignore_index)
    logp, entropy = token_logprobs_rows(flat_rows(logits), flat_targets(targets), temperature, ignore_index,
                                        bool(return_entropy), bool(inplace_backward), shard)
    logp = logp.reshape(targets.shape)
    return (logp, entropy.reshape(targets.shape)) if return_entropy else logp


def linear_logprobs(hidden, weight, targets, *, bias=None, temperature=1.0, ignore_index=-100,
                    return_entropy=False, chunk_size=None, process_group=None, vocab_start=None):
    """`token_logprobs(hidden @ weight.T + bias, ...)` without materialising the (N, V) logits: a
    chunked matmul whose chunks are consumed by the kernels and recomputed in the backward (§2.2). A
    weight split by vocabulary rows (§11) takes replicated hidden states and global targets."""
    vocab = vocab_request("weight", weight, 0, process_group, vocab_start, bias)
    weight, bias = vocab.tensor, vocab.bias

    def local(checks):
        t = check_linear(checks, hidden, weight, bias, targets, temperature, ignore_index, chunk_size,
                         check_range=vocab.group is None)
        return t, None

    temperature, _, shard = _meet(local, hidden, vocab, None, targets, ignore_index, hidden)
    size = chunk_size or default_chunk_size(_whole_vocab(weight, shard), weight.shape[1], targets.numel(),
                                            weight.dtype)
    logp, entropy = linear_logprobs_rows(flat_rows(hidden), weight, bias, flat_targets(targets), temperature,
                                         ignore_index, bool(return_entropy), size, shard)
    logp = logp.reshape(targets.shape)
    return (logp, entropy.reshape(targets.shape)) if return_entropy else logp


def policy_loss(logp, old_logp, advantages, mask, config, *, segment_ids=None, entropy=None, ref_logp=None,
                normalizer=None, rollout_is_weights=None, cu_seqlens=None, context_parallel_group=None):
    """The clipped policy loss of docs/api.md §3 on per-token log-probs (§2.3). Returns PolicyLossOutput.
    `cu_seqlens` ((S + 1,) offsets) takes a packed batch: per-token tensors (N,) or (1, N), advantages
    and rollout_is_weights also (S,) (§3.9). `rollout_is_weights` ((B, T), (B, 1) or (B,), finite, >= 0)
    multiply each token's clipped policy-gradient term (§3.8). `context_parallel_group`: each rank holds a
    slice of every sequence (§11); the loss is the whole batch's on every rank."""

    def local(checks):
        check_float("logp", logp)
        layout = batch_layout("logp", logp, cu_seqlens)
        rows = layout.input_rows(old_logp, advantages, mask, segment_ids, ref_logp, rollout_is_weights, entropy,
                                 split=context_parallel_group is not None)
        return rows, layout

    rows, layout, _ = _meet(local, logp, None, context_parallel_group, per_sequence=(advantages, rollout_is_weights),
                            optional=(segment_ids, ref_logp, entropy))
    grid_logp = layout.to_grid(logp.reshape(layout.n_rows)) if layout.mapped else logp
    old_logp, advantages, mask, segment_ids, ref_logp, rollout_is_weights, entropy = layout.inputs_to_grid(rows)
    checks = ValueChecks()
    inputs = check_loss_inputs(checks, old_logp, advantages, mask, config, logp=grid_logp, segment_ids=segment_ids,
                               entropy=entropy, ref_logp=ref_logp, normalizer=normalizer,
                               rollout_is_weights=rollout_is_weights)
    checks.run()
    out = aggregate(grid_logp, inputs, config, entropy=entropy, normalizer=normalizer)
    return _to_caller(out, layout, logp.shape)


def fused_policy_loss(logits, targets, old_logp, advantages, mask, config, *, segment_ids=None, ref_logp=None,
                      temperature=1.0, normalizer=None, inplace_backward=False, rollout_is_weights=None,
                      cu_seqlens=None, process_group=None, vocab_start=None, context_parallel_group=None,
                      one_pass=None):
    """The policy loss of docs/api.md §3 straight from (B, T, V) logits (packed: (N, V) or (1, N, V)): one
    forward kernel, the loss stage on the grid, one backward kernel (§2.4). Equals
    policy_loss(token_logprobs(logits, ...), ...); logp and entropy are 0 where mask is 0, and so is the
    logits' gradient, whatever those rows hold. Logits split by vocabulary and sequences split over a
    context group as in §11. `one_pass`: None lets sppo_fast.plan.logits_one_pass choose; True asks for the
    one-pass form where it can run, False for two passes (§2.4)."""
    check_one_pass(one_pass)
    vocab = vocab_request("logits", logits, -1, process_group, vocab_start)
    logits = vocab.tensor

    def check(checks):
        return check_logits_and_targets(checks, logits, targets, temperature, IGNORE_INDEX,
                                        packed=cu_seqlens is not None, check_range=vocab.group is None)

    temperature, logits_rows, kernel_targets, inputs, layout, shard = _fused_entry(
        check, "logits", logits, targets, cu_seqlens, old_logp, advantages, mask, config, segment_ids, ref_logp,
        normalizer, rollout_is_weights, vocab, context_parallel_group)
    keep = layout.to_rows(inputs.valid).reshape(-1)
    if logits_rows.dtype == torch.float64 and shard is None:  # the eager oracle differentiates masked rows too
        logits_rows = torch.where(keep.unsqueeze(1), logits_rows, torch.zeros_like(logits_rows))
    kernel_targets = torch.where(keep, kernel_targets, torch.full_like(kernel_targets, IGNORE_INDEX))
    one_pass = logits_one_pass(logits_rows, config, shard, bool(inplace_backward), requested=one_pass)
    logp, entropy = token_logprobs_rows(logits_rows, kernel_targets, temperature, IGNORE_INDEX, True,
                                        bool(inplace_backward), shard, one_pass)
    out = aggregate(layout.to_grid(logp), inputs, config, entropy=layout.to_grid(entropy), normalizer=normalizer)
    return _to_caller(out, layout, targets.shape)


def fused_linear_policy_loss(hidden, weight, targets, old_logp, advantages, mask, config, *, bias=None,
                             segment_ids=None, ref_logp=None, temperature=1.0, normalizer=None,
                             chunk_size=None, rollout_is_weights=None, cu_seqlens=None, process_group=None,
                             vocab_start=None, context_parallel_group=None):
    """The policy loss of docs/api.md §3 from hidden states (B, T, H) (packed: (N, H) or (1, N, H)) and the
    lm_head weight, never holding the logits (§2.5): the chunk plan (sppo_fast.plan) decides between one
    pass (three matmuls) and two; rows with mask 0 never enter a matmul. A weight split by vocabulary
    rows and sequences split over a context group as in §11."""
    vocab = vocab_request("weight", weight, 0, process_group, vocab_start, bias)
    weight, bias = vocab.tensor, vocab.bias

    def check(checks):
        return check_linear(checks, hidden, weight, bias, targets, temperature, IGNORE_INDEX, chunk_size,
                            packed=cu_seqlens is not None, check_range=vocab.group is None)

    temperature, hidden_rows, target_rows, inputs, layout, shard = _fused_entry(
        check, "hidden", hidden, targets, cu_seqlens, old_logp, advantages, mask, config, segment_ids, ref_logp,
        normalizer, rollout_is_weights, vocab, context_parallel_group)
    plan = plan_linear_loss(layout, inputs.valid, token_local=config.token_local,
                            oracle=weight.dtype == torch.float64, vocab=_whole_vocab(weight, shard),
                            hidden=weight.shape[1], dtype=weight.dtype, chunk_size=chunk_size)
    compute_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    out = linear_policy_loss(plan, layout, hidden_rows, weight, bias, target_rows, inputs, config,
                             temperature=temperature, normalizer=normalizer, compute_grad=compute_grad, shard=shard)
    return _to_caller(out, layout, targets.shape)


def _meet(local, anchor, vocab, context_group, targets=None, ignore_index=IGNORE_INDEX, replicated=None,
          per_sequence=(), optional=()):
    """Runs local(checks) -> (result, layout or None): every check that needs no other rank, the value
    checks in one sync (`anchor`: the main tensor, checked there). A parallel call then meets its groups
    once (parallel.agree): the vocabulary shard is settled (sizes, targets against the whole V), the
    layout of split sequences built, and any rank's error raised on every rank. Returns (result, layout,
    shard or None)."""
    vocab_group = None if vocab is None else vocab.group
    checks = ValueChecks()
    if vocab_group is None and context_group is None:
        result, layout = local(checks)
        checks.run()
        return result, layout, None
    error = result = layout = None
    try:
        result, layout = local(checks)
        checks.run()
        debug = debug_checks()
        vocab_payload = None if vocab_group is None else (
            vocab.start, vocab.size, target_span(targets, ignore_index), checksum(replicated, targets) if debug else [])
        context_payload = None if context_group is None else (
            sequence_lengths(layout), checksum(*per_sequence) if debug else [],
            [None if x is None else x.dim() for x in (*per_sequence, *optional)])
    except (TypeError, ValueError) as exc:
        error, vocab_payload, context_payload = exc, None, None
    met = agree([("process_group", vocab_group, vocab_payload, lambda every: vocab_shard(vocab_group, every)),
                 ("context_parallel_group", context_group, context_payload, context_lengths)], error)
    if context_group is not None:
        layout = split_layout(layout, met["context_parallel_group"], group_rank(context_group), context_group,
                              anchor.device)
    return result, layout, met.get("process_group")


def _fused_entry(check, name, x, targets, cu_seqlens, old_logp, advantages, mask, config, segment_ids, ref_logp,
                 normalizer, rollout_is_weights, vocab, context_group):
    """A fused op's entry after `check(checks)` (its kernel arguments' checks, returning the temperature):
    the layout, the (N, V|H) rows and (N,) targets of the vocabulary-sized work, the loss stage's inputs
    on the grid (checked) and the vocabulary shard. Returns (temperature, rows, targets, inputs, layout,
    shard)."""
    split = context_group is not None

    def local(checks):
        temperature = check(checks)
        check_same_device(**{name: x}, old_logp=old_logp)
        layout = batch_layout(name, x, cu_seqlens, trailing=1)
        rows, target_rows = layout.token_rows(x, targets)
        inputs = layout.input_rows(old_logp, advantages, mask, segment_ids, ref_logp, rollout_is_weights, split=split)
        if not split:  # no collective fills the grid: check it before the ranks meet
            inputs = _loss_inputs(layout, inputs, config, normalizer)
        return (temperature, rows, target_rows, inputs), layout

    (temperature, rows, target_rows, inputs), layout, shard = _meet(
        local, x, vocab, context_group, targets, IGNORE_INDEX, x if name == "hidden" else None,
        (advantages, rollout_is_weights), (segment_ids, ref_logp))
    if split:
        inputs = _loss_inputs(layout, inputs, config, normalizer)
    return temperature, rows, target_rows, inputs, layout, shard


def _loss_inputs(layout, rows, config, normalizer):
    """The loss stage's inputs on the layout's grid (losses.LossInputs), checked: the same on every rank."""
    old_logp, advantages, mask, segment_ids, ref_logp, rollout_is_weights, _ = layout.inputs_to_grid(rows)
    checks = ValueChecks()
    inputs = check_loss_inputs(checks, old_logp, advantages, mask, config, grid=(layout.n_seqs, layout.width),
                               segment_ids=segment_ids, ref_logp=ref_logp, normalizer=normalizer,
                               rollout_is_weights=rollout_is_weights, logp_name="targets", computes_entropy=True)
    checks.run()
    return inputs


def _whole_vocab(weight, shard):
    """The V that sizes the chunks: the whole vocabulary's, also on a shard, so that a rank's chunk buffer
    shrinks with its shard (the weight-gradient traffic per chunk, V_r x H against rows x V_r x H of
    matmul, does not depend on V_r)."""
    return weight.shape[0] if shard is None else shard.vocab


def _to_caller(out, layout, shape):
    """PolicyLossOutput with logp and entropy in the caller's per-token shape."""
    return out._replace(logp=layout.to_caller(out.logp, shape), entropy=layout.to_caller(out.entropy, shape))
