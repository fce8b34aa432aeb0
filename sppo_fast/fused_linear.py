"""fused_linear_policy_loss in one pass: hidden x lm_head chunk by chunk, each chunk made of whole
sequences, so the (B, T) loss stage can run on the chunk alone (sequence and segment means never
leave a sequence) with the aggregation weights computed once from the whole mask. Each chunk is then
one matmul, the forward kernel, the loss stage, the backward kernel (in place on the chunk's logits)
and two matmuls for the gradients: three matmuls in all, like a fused cross-entropy, instead of the
four that recomputing the logits in a separate backward needs. Masked positions (prompt, padding)
carry no loss, so their rows are left out of the matmuls: the returned logp and entropy are 0 there."""

import torch

from . import dispatch
from .backends import LSE_DTYPE
from .buffers import LinearGrads, logits_buffer, logits_into
from .losses import PolicyLossOutput, loss_metrics, per_token_loss, token_weights


def _slice(x, a, b):
    return None if x is None else x[a:b]


class SequenceChunkedLinearLoss(torch.autograd.Function):
    """Computes the loss and every gradient in the forward (as Liger-Kernel's chunked losses do) and
    scales the stored gradients in the backward. With compute_grad=False (no gradient wanted) it is
    the same pass without the backward kernel and the two gradient matmuls."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, old_logp, advantages, valid, segment_ids, ref_logp,
                config, temperature, normalizer, seqs_per_chunk, compute_grad, is_weights, packed=None,
                weights=None):
        backend = dispatch.backend_for(hidden.device)
        B, T = valid.shape  # hidden is (B, T, H), or (N, H) rows when packed
        if weights is None:  # the aggregation weights, from the whole mask
            weights = token_weights(valid, config, normalizer)
        logp = hidden.new_zeros((B, T), dtype=torch.float32)
        entropy = torch.zeros_like(logp)
        loss = logp.new_zeros(())
        grads = LinearGrads(hidden, weight, bias) if compute_grad else None
        starts = range(0, B, seqs_per_chunk)
        # masked positions (padding, prompts) carry no loss: their logits are never computed
        rows_per_chunk = [valid[a:a + seqs_per_chunk].reshape(-1).nonzero().squeeze(1) for a in starts]
        # one buffer for every chunk's logits: a fresh one per chunk pays its page faults each time
        buffer = logits_buffer(hidden, weight, max(len(r) for r in rows_per_chunk))
        for a, rows in zip(starts, rows_per_chunk):
            b = min(a + seqs_per_chunk, B)
            chunk, hrows, dest = _chunk_hidden(hidden, grads, a, b, rows, packed)
            h = chunk.index_select(0, hrows)
            logits = logits_into(buffer, h, weight, bias)
            flat_targets = targets[a:b].reshape(-1).index_select(0, rows)
            lp, ent, lse = backend.token_logprobs_forward(logits, flat_targets, temperature, -100, True,
                                                          lse_dtype=LSE_DTYPE)
            logp[a:b].view(-1)[rows], entropy[a:b].view(-1)[rows] = lp, ent
            chunk_loss, g_logp, g_ent = _chunk_loss_and_coefficients(
                logp[a:b], entropy[a:b], old_logp[a:b], advantages[a:b], valid[a:b],
                weights[a:b], config, _slice(segment_ids, a, b), _slice(ref_logp, a, b), compute_grad,
                _slice(is_weights, a, b))
            loss += chunk_loss
            if grads is not None:
                g_ent = None if g_ent is None else g_ent.index_select(0, rows)
                grad = backend.token_logprobs_backward(logits, flat_targets, lse, ent, g_logp.index_select(0, rows),
                                                       g_ent, temperature, -100, True)
                grads.add_chunk(grad, h, dest, hrows)
        ctx.mark_non_differentiable(logp, entropy)
        if grads is not None:
            ctx.save_for_backward(*grads.result())
        return loss, logp, entropy

    @staticmethod
    def backward(ctx, grad_loss, _grad_logp, _grad_entropy):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        if torch.equal(grad_loss, torch.ones_like(grad_loss)):  # the usual case: no copy of the weight's size
            return grad_hidden, grad_weight, grad_bias, *([None] * 14)
        scale = grad_loss.to(grad_hidden.dtype)
        grads = [grad_hidden * scale, grad_weight * scale.to(grad_weight.dtype),
                 None if grad_bias is None else grad_bias * scale.to(grad_bias.dtype)]
        return (*grads, *([None] * 14))


def _chunk_hidden(hidden, grads, a, b, rows, packed):
    """Sequences a..b-1 as (chunk (n, H), the rows of `chunk` that `rows` (valid positions of the padded
    (b - a, T) chunk) name, the chunk's view of the hidden gradient). A packed batch keeps its sequences
    contiguous, so their hidden states are one slice of the (N, H) rows: nothing is padded."""
    H = hidden.shape[-1]
    if packed is None:
        dest = None if grads is None else grads.hidden[a:b].view(-1, H)
        return hidden[a:b].reshape(-1, H), rows, dest
    lo, hi, T = packed.cu[a], packed.cu[b], packed.width
    dest = None if grads is None else grads.hidden[lo:hi]
    return hidden[lo:hi], packed.source[a * T:b * T].index_select(0, rows) - lo, dest


def _chunk_loss_and_coefficients(logp, entropy, old_logp, advantages, valid, weights, config, segment_ids,
                                 ref_logp, compute_grad, is_weights=None):
    """The chunk's share of the loss and d loss / d (logp, entropy) through the shared loss stage."""
    def chunk_loss(logp, entropy):
        terms = per_token_loss(logp, old_logp, advantages, valid, config, segment_ids, entropy, ref_logp,
                               is_weights)
        return torch.where(valid, weights * terms.loss, torch.zeros_like(terms.loss)).sum()

    if not compute_grad:
        return chunk_loss(logp, entropy), None, None
    logp = logp.detach().requires_grad_(True)
    entropy = entropy.detach().requires_grad_(bool(config.entropy_coef))
    with torch.enable_grad():
        loss = chunk_loss(logp, entropy)
        inputs = [logp, entropy] if config.entropy_coef else [logp]
        grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    g_logp = torch.zeros_like(logp) if grads[0] is None else grads[0]
    g_ent = grads[1].reshape(-1).contiguous() if config.entropy_coef and grads[1] is not None else None
    return loss.detach(), g_logp.reshape(-1).contiguous(), g_ent


def sequence_chunked_policy_loss(hidden, weight, bias, targets, old_logp, advantages, valid, config, *,
                                 segment_ids, ref_logp, temperature, normalizer, seqs_per_chunk, compute_grad,
                                 rollout_is_weights=None, packed=None):
    """The one-pass fused linear policy loss (arguments already checked; rollout_is_weights (B, T) fp32).
    `packed` (sppo_fast.packing.ChunkedPacking): hidden is (N, H) packed rows, the rest padded (S, T)."""
    old_logp = old_logp.to(torch.float32)
    ref_logp = None if ref_logp is None else ref_logp.to(torch.float32)
    loss, logp, entropy = SequenceChunkedLinearLoss.apply(
        hidden, weight, bias, targets.to(torch.long), old_logp, advantages, valid, segment_ids, ref_logp,
        config, temperature, normalizer, seqs_per_chunk, compute_grad, rollout_is_weights, packed)
    terms = per_token_loss(logp, old_logp, advantages, valid, config, segment_ids, entropy, ref_logp,
                           rollout_is_weights)
    return PolicyLossOutput(loss, logp, entropy, loss_metrics(terms, logp, old_logp, entropy, valid))


def one_pass_layout(dtype, n_rows, longest, tokens_per_chunk, token_local):
    """How the one pass chunks a batch: "sequences" (whole sequences per chunk), "tokens" (sequences
    longer than a chunk, when each token's loss depends on that token alone: token ratios, no
    entropy-adaptive clip) or None, the two-pass fallback (fp64, traced calls, empty batches, and
    sequence or segment statistics over sequences longer than a chunk). Padded and packed batches
    both decide here."""
    if dtype == torch.float64 or torch.compiler.is_compiling() or n_rows == 0:
        return None
    if longest <= tokens_per_chunk:
        return "sequences"
    return "tokens" if token_local else None


def token_chunked_policy_loss(hidden, weight, bias, targets, old_logp, advantages, valid, config, *, ref_logp,
                              temperature, normalizer, tokens_per_chunk, compute_grad, rollout_is_weights=None,
                              packing=None):
    """The one pass for sequences longer than a chunk (see one_pass_layout). Every token becomes a row
    of its own, so chunks cut through sequences; the aggregation weights still come from the (B, T)
    mask. Without this, long responses take the two-pass path (four matmuls and a weight-gradient
    update per small chunk). `packing` (sppo_fast.packing.Packing): hidden (N, H) and targets (N,) are
    the packed rows, the rest padded (S, T); the returned logp and entropy are padded (S, T)."""
    B, T = valid.shape
    H = hidden.shape[-1]
    weights = token_weights(valid, config, normalizer)

    def rows(x):  # (B,), (B, 1) or (B, T) -> one row per token, (B * T, 1) or (N, 1)
        if x is None:
            return None
        x = (x.unsqueeze(1) if x.dim() == 1 else x).expand(B, T)
        return x.reshape(B * T, 1) if packing is None else packing.unpad(x.unsqueeze(-1))

    def padded(y):
        return y.view(B, T) if packing is None else packing.pad(y.view(-1))

    n = hidden.numel() // H
    old_logp = old_logp.to(torch.float32)
    ref_logp = None if ref_logp is None else ref_logp.to(torch.float32)
    loss, logp, entropy = SequenceChunkedLinearLoss.apply(
        hidden.reshape(n, 1, H), weight, bias, targets.to(torch.long).reshape(n, 1), rows(old_logp),
        rows(advantages), rows(valid), None, rows(ref_logp), config, temperature, normalizer, tokens_per_chunk,
        compute_grad, rows(rollout_is_weights), None, rows(weights))
    logp, entropy = padded(logp), padded(entropy)
    terms = per_token_loss(logp, old_logp, advantages, valid, config, None, entropy, ref_logp, rollout_is_weights)
    return PolicyLossOutput(loss, logp, entropy, loss_metrics(terms, logp, old_logp, entropy, valid))
