"""Triton backward of token_logprobs (docs/api.md §3.1, §9 kernel 2): one read of the logits, one write.

Given the forward's lse and entropy and the per-row coefficients g_logp = dL/dlogp and
g_ent = dL/dentropy, one program per row streams the vocabulary and writes, with z = logits / T and
p_j = exp(z_j - lse),

    grad_j = (g_logp * (1[j == t] - p_j) - g_ent * p_j * (z_j - lse + entropy)) / T

in the logits' dtype. Where p_j == 0 (a -inf logit) the entropy term is 0, not 0 * -inf. Ignored rows
read nothing and write zeros. With `inplace` the output pointer is the logits pointer: each element is
read and then overwritten by the same program within the same tile, so nothing is read after it was
written.
"""

import torch
import triton
import triton.language as tl

# Not autotuned, on purpose. The in-place mode overwrites its own input, so an autotuner re-running it
# would read gradients as logits; `restore_value` would fix that only by cloning the whole (N, V) logits
# on every new key, the very buffer in-place mode exists to save. Both modes share one heuristic so
# they run identical code and give bitwise-identical gradients. The kernel is a pure element-wise
# stream (no reductions), so a fixed shape is close to the bandwidth limit: 4096-element tiles with
# 8 warps give each thread 16 elements, i.e. two 16-byte bf16 loads and stores in flight per tile,
# plenty with one program per row and thousands of rows across an H100's 132 SMs; narrow vocabularies
# use a tile of their own (next power of two) width and fewer warps. Compiled without a GPU (ptxas -v),
# 4096 x 8 warps takes 32-80 registers on sm_90a, by dtype and alignment, and spills nothing
# (bench/results/triton-compile.md, checked by tests/test_triton_compile.py).
GPU_MAX_BLOCK_V = 4096
GPU_MIN_BLOCK_V = 512
INTERPRETER_BLOCK_V = 128  # TRITON_INTERPRET=1: small tiles also exercise the multi-tile path


@triton.jit
def token_logprobs_backward_kernel(
    logits_ptr,
    logits_row_stride,
    grad_ptr,
    grad_row_stride,
    targets_ptr,
    lse_ptr,
    entropy_ptr,
    grad_logp_ptr,
    grad_entropy_ptr,
    V,
    temperature,
    inv_temperature,
    ignore_index,
    SCALE: tl.constexpr,
    HAS_GRAD_ENTROPY: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # int64: row * stride exceeds 2^31 for 64k x 152k logits
    row_logits = logits_ptr + row * logits_row_stride
    row_grad = grad_ptr + row * grad_row_stride
    target = tl.load(targets_ptr + row)
    ignored = target == ignore_index
    n_read = tl.where(ignored, 0, V)  # an ignored row reads nothing: its z are -inf, its p are 0
    # lse may be fp32 or fp64: split it into hi + lo fp32 parts (lo = 0 for fp32) and subtract both, so
    # an fp64 lse gives p_j to fp32 accuracy even where |lse| ~ 1e4 (see the forward kernel).
    lse_full = tl.load(lse_ptr + row)
    lse_hi = tl.where(ignored, 0.0, lse_full.to(tl.float32))
    lse_lo = tl.where(ignored, 0.0, (lse_full - lse_full.to(tl.float32).to(lse_full.dtype)).to(tl.float32))
    g_logp = tl.where(ignored, 0.0, tl.load(grad_logp_ptr + row))
    if HAS_GRAD_ENTROPY:
        g_ent = tl.where(ignored, 0.0, tl.load(grad_entropy_ptr + row))
        ent = tl.where(ignored, 0.0, tl.load(entropy_ptr + row))

    cols = tl.arange(0, BLOCK_V)
    for start in range(0, V, BLOCK_V):
        offs = start + cols
        z = tl.load(row_logits + offs, mask=offs < n_read, other=float("-inf")).to(tl.float32)
        if SCALE:  # IEEE division, as in the forward and in eager z = logits / T
            z = tl.math.div_rn(z, temperature)
        log_p = (z - lse_hi) - lse_lo
        p = tl.exp(log_p)
        # A target outside [0, V) (in another vocabulary shard) matches no stored lane, so it gets no
        # one-hot term and nothing is written out of bounds: no special case needed.
        grad = tl.where(offs == target, g_logp, 0.0) - g_logp * p
        if HAS_GRAD_ENTROPY:
            grad -= g_ent * p * tl.where(p == 0.0, 0.0, log_p + ent)  # p = 0: 0, never 0 * -inf
        if SCALE:  # one rounding of a value ~1: the forward's care is not needed here
            grad = grad * inv_temperature
        tl.store(row_grad + offs, grad.to(grad_ptr.dtype.element_ty), mask=offs < V)


def _tile_shape(vocab):
    """(BLOCK_V, num_warps) for this vocabulary; see the comment on GPU_MAX_BLOCK_V."""
    if triton.knobs.runtime.interpret:
        return INTERPRETER_BLOCK_V, 4
    block = min(GPU_MAX_BLOCK_V, max(GPU_MIN_BLOCK_V, triton.next_power_of_2(vocab)))
    return block, (8 if block >= 2048 else 4)


def launch_token_logprobs_backward(logits, targets, lse, entropy, grad_logp, grad_entropy,
                                   temperature, ignore_index, inplace):
    """The (N, V) gradient of the logits in logits.dtype; written into `logits` itself if `inplace`.

    Arguments are already validated by the dispatch layer (see sppo_fast.backends).
    """
    n_rows, vocab = logits.shape
    grad = logits if inplace else torch.empty((n_rows, vocab), dtype=logits.dtype, device=logits.device)
    if n_rows == 0 or vocab == 0:
        return grad
    has_grad_entropy = grad_entropy is not None
    block, warps = _tile_shape(vocab)
    token_logprobs_backward_kernel[(n_rows,)](
        logits, logits.stride(0), grad, grad.stride(0), targets, lse, entropy,
        grad_logp, grad_entropy if has_grad_entropy else grad_logp,  # unused pointer when absent
        vocab, float(temperature), 1.0 / float(temperature), int(ignore_index),
        SCALE=float(temperature) != 1.0, HAS_GRAD_ENTROPY=has_grad_entropy,
        BLOCK_V=block, num_warps=warps,
    )
    return grad
