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
from .losses import PolicyLossOutput, loss_metrics, per_token_loss, token_weights


def _slice(x, a, b):
    return None if x is None else x[a:b]


class SequenceChunkedLinearLoss(torch.autograd.Function):
    """Computes the loss and every gradient in the forward (as Liger-Kernel's chunked losses do) and
    scales the stored gradients in the backward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, old_logp, advantages, valid, segment_ids, ref_logp,
                config, temperature, normalizer, seqs_per_chunk):
        backend = dispatch.backend_for(hidden.device)
        B, T, H = hidden.shape
        weights = token_weights(valid, config, normalizer)
        logp = hidden.new_zeros((B, T), dtype=torch.float32)
        entropy = torch.zeros_like(logp)
        loss = logp.new_zeros(())
        grad_hidden = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        grad_bias = None if bias is None else torch.zeros(bias.shape, dtype=torch.float32, device=bias.device)
        for a in range(0, B, seqs_per_chunk):
            b = min(a + seqs_per_chunk, B)
            # masked positions (padding, prompts) carry no loss: their logits are never computed
            rows = valid[a:b].reshape(-1).nonzero().squeeze(1)
            h = hidden[a:b].reshape(-1, H).index_select(0, rows)
            logits = h @ weight.T if bias is None else torch.addmm(bias, h, weight.T)
            flat_targets = targets[a:b].reshape(-1).index_select(0, rows)
            lp, ent, lse = backend.token_logprobs_forward(logits, flat_targets, temperature, -100, True,
                                                          lse_dtype=LSE_DTYPE)
            logp[a:b].view(-1)[rows], entropy[a:b].view(-1)[rows] = lp, ent
            chunk_loss, g_logp, g_ent = _chunk_loss_and_coefficients(
                logp[a:b], entropy[a:b], old_logp[a:b], advantages[a:b], valid[a:b],
                weights[a:b], config, _slice(segment_ids, a, b), _slice(ref_logp, a, b))
            g_ent = None if g_ent is None else g_ent.index_select(0, rows)
            grad = backend.token_logprobs_backward(logits, flat_targets, lse, ent, g_logp.index_select(0, rows),
                                                   g_ent, temperature, -100, True)
            chunk_grad_hidden = grad_hidden[a:b].view(-1, H)
            chunk_grad_hidden.zero_().index_copy_(0, rows, (grad @ weight).to(hidden.dtype))
            grad_weight.addmm_(grad.T.to(torch.float32), h.to(torch.float32))
            if grad_bias is not None:
                grad_bias += grad.sum(0, dtype=torch.float32)
            loss += chunk_loss
            del logits, grad  # two chunks' logits alive at once would double the peak
        grad_bias = None if grad_bias is None else grad_bias.to(bias.dtype)
        ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype), grad_bias)
        ctx.mark_non_differentiable(logp, entropy)
        return loss, logp, entropy

    @staticmethod
    def backward(ctx, grad_loss, _grad_logp, _grad_entropy):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        scale = grad_loss.to(grad_hidden.dtype)
        grads = [grad_hidden * scale, grad_weight * scale.to(grad_weight.dtype),
                 None if grad_bias is None else grad_bias * scale.to(grad_bias.dtype)]
        return (*grads, *([None] * 10))


def _chunk_loss_and_coefficients(logp, entropy, old_logp, advantages, valid, weights, config, segment_ids,
                                 ref_logp):
    """The chunk's share of the loss and d loss / d (logp, entropy) through the shared loss stage."""
    logp = logp.detach().requires_grad_(True)
    entropy = entropy.detach().requires_grad_(bool(config.entropy_coef))
    with torch.enable_grad():
        terms = per_token_loss(logp, old_logp, advantages, valid, config, segment_ids, entropy, ref_logp)
        loss = torch.where(valid, weights * terms.loss, torch.zeros_like(terms.loss)).sum()
        inputs = [logp, entropy] if config.entropy_coef else [logp]
        grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    g_logp = torch.zeros_like(logp) if grads[0] is None else grads[0]
    g_ent = grads[1].reshape(-1).contiguous() if config.entropy_coef and grads[1] is not None else None
    return loss.detach(), g_logp.reshape(-1).contiguous(), g_ent


def sequence_chunked_policy_loss(hidden, weight, bias, targets, old_logp, advantages, valid, config, *,
                                 segment_ids, ref_logp, temperature, normalizer, seqs_per_chunk):
    """The one-pass fused linear policy loss (arguments already checked)."""
    old_logp = old_logp.to(torch.float32)
    ref_logp = None if ref_logp is None else ref_logp.to(torch.float32)
    loss, logp, entropy = SequenceChunkedLinearLoss.apply(
        hidden, weight, bias, targets.to(torch.long), old_logp, advantages, valid, segment_ids, ref_logp,
        config, temperature, normalizer, seqs_per_chunk)
    terms = per_token_loss(logp, old_logp, advantages, valid, config, segment_ids, entropy, ref_logp)
    return PolicyLossOutput(loss, logp, entropy, loss_metrics(terms, logp, old_logp, entropy, valid))
