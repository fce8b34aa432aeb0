"""Kernel backends: each serves the two vocabulary-sized kernels of docs/api.md §9, and may offer a faster
weight-gradient product for the linear path; nothing else.

A backend is a module with these two kernels and `accumulate_weight_grad` (below; None when it has
none). The public functions (`sppo_fast.api`) have validated every argument before any kernel runs, so
a backend never checks input again:

    token_logprobs_forward(logits, targets, temperature, ignore_index, compute_entropy, lse_dtype=fp32)
        -> (logp, entropy, lse)

        logits  (N, V) fp32/bf16/fp16, logits.stride(1) == 1 (any row stride; N or V may be 0)
        targets (N,) int64 contiguous, each in [0, V), == ignore_index, or outside [0, V): the target
                lies in another vocabulary shard (logp 0, no one-hot term; see vocabulary parallelism below)
        returns three contiguous (N,) tensors, logp and entropy fp32, lse of `lse_dtype` (the ops ask
        for fp64: an fp32 lse loses half an ulp of |lse|, 5e-4 at logits of 1e4, which the backward's
        p = exp(z - lse) would carry into every gradient entry); with z = logits / temperature:
            lse     = log sum_j exp(z_j)           (kept for the backward; any value on ignored rows)
            logp    = z[target] - lse              (0 where targets == ignore_index or outside [0, V))
            entropy = lse - sum_j p_j z_j          (0 where ignored; all zeros if not compute_entropy)
        -inf logits are legal: p_j = 0 and 0 * -inf counts as 0. NaN in a row gives NaN in that row.

    token_logprobs_backward(logits, targets, lse, entropy, grad_logp, grad_entropy,
                            temperature, ignore_index, inplace) -> grad_logits

        lse (N,) fp32 or fp64; grad_logp (N,) fp32; grad_entropy (N,) fp32 or None (no entropy term)
        with p_j = exp(z_j - lse), the gradient of the logits, in logits.dtype, (N, V):
            grad_j = (grad_logp * (1[j == target] - p_j)
                      - grad_entropy * p_j * (z_j - lse + entropy)) / temperature
        where p_j == 0 the entropy term is 0 (never NaN from -inf); rows with targets == ignore_index
        are 0; a target outside [0, V) has no 1[j == target] term. inplace=True writes the gradient
        into `logits` itself and returns it (the caller no longer needs the logits); otherwise a new
        contiguous tensor is returned.

    token_logprobs_forward_basis(logits, targets, temperature, ignore_index, compute_entropy) or None

        the forward for the one-pass logits path (sppo_fast.plan.logits_one_pass), where the backend
        has it: (logp, entropy, lse fp64, basis), the first three as token_logprobs_forward gives them
        and basis (N, V) in logits.dtype the rows' d logp / d logits = (1[j == target] - p_j) /
        temperature (0 on ignored rows, no one-hot term for a target outside [0, V), NaN on a row
        with a NaN or of -inf only). A loss whose gradient reaches the logits through logp alone then
        gets the logits' gradient as grad_logp * basis, a scaling of rows, with no exp. Only the
        native backend has it (csrc/token_logprobs_forward.cpp).

    token_logprobs_backward_from_basis_(basis, grad_logp) -> basis

        with the forward above: the one-pass backward, basis (N, V) *= grad_logp (N,) fp32 row by
        row, in place, each product in fp32 and rounded once to the basis' dtype (torch's mul_ of a
        bf16 tensor by an fp32 one takes a scalar path, 30x slower).

    accumulate_weight_grad(accumulator, grad_logits, hidden, accumulate) or None

        the linear path's weight-gradient product where the backend has a faster one than torch's:
        accumulator (V, H) fp32 contiguous += grad_logits (n, V)^T hidden (n, H) (= when not
        accumulate), both bf16 with unit column strides; products exact, sums in fp32. Only the
        native backend has one, on CPUs with AVX512-BF16 (csrc/weight_grad_bf16.cpp); the callers
        (sppo_fast.chunks.weight_grad_product) decide where it serves.

Vocabulary parallelism (tensor-parallel lm_head): each rank passes its shard (N, V_r) of the logits
and targets translated to local ids, so a row whose target another rank holds has one outside [0, V_r).
The forward's lse_r and entropy H_r are the shard's own; the caller combines them into the global
    lse = logsumexp_r lse_r,   logp = logp_r + lse_r - lse (owning shard r),
    entropy = sum_r w_r (H_r + lse - lse_r) with w_r = exp(lse_r - lse),
and passes the GLOBAL lse and entropy to every shard's backward: p_j = exp(z_j - lse) then does not
sum to 1 over a shard, and the shards' gradients, concatenated, are the gradient of the full logits.
The public functions (`sppo_fast.api`) still reject such targets: only the kernels accept them.
"""

import torch

# The dtype the ops ask for lse in (see token_logprobs_forward above).
LSE_DTYPE = torch.float64
