"""The eager fallback backend: sppo_fast.reference's formulas, a block of rows at a time so that its
temporaries stay a few times one block, not a few times the logits."""

import torch

from .. import reference

_BLOCK_ELEMENTS = 1 << 24  # 64 MiB of fp32 per temporary


def _row_blocks(n_rows, vocab):
    step = max(1, _BLOCK_ELEMENTS // max(vocab, 1))
    return [(i, min(i + step, n_rows)) for i in range(0, n_rows, step)]


def token_logprobs_forward(logits, targets, temperature, ignore_index, compute_entropy,
                           lse_dtype=torch.float32):
    n = logits.shape[0]
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32  # fp64: the oracle's precision
    logp, entropy = (torch.empty(n, dtype=dtype, device=logits.device) for _ in range(2))
    lse = torch.empty(n, dtype=lse_dtype, device=logits.device)
    for a, b in _row_blocks(n, logits.shape[1]):
        lp, ent, ls = reference.logprobs_entropy_lse(logits[a:b], targets[a:b], temperature, ignore_index)
        logp[a:b], entropy[a:b], lse[a:b] = lp, ent, ls
    if not compute_entropy:
        entropy.zero_()
    return logp, entropy, lse


def token_logprobs_backward(logits, targets, lse, entropy, grad_logp, grad_entropy, temperature,
                            ignore_index, inplace):
    out = logits if inplace else torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    for a, b in _row_blocks(logits.shape[0], logits.shape[1]):
        g_ent = None if grad_entropy is None else grad_entropy[a:b]
        out[a:b] = reference.logprobs_grad(logits[a:b], targets[a:b], lse[a:b], entropy[a:b],
                                           grad_logp[a:b], g_ent, temperature, ignore_index)
    return out


accumulate_weight_grad = None  # no weight-gradient product of its own: the linear path uses torch's
token_logprobs_forward_basis = None  # no one-pass forward: the logits path takes two passes (plan.logits_one_pass)
token_logprobs_backward_from_basis_ = None
