"""Triton forward of token_logprobs (docs/api.md §3.1, §9 kernel 1): per row, one read of the logits.

One program per row streams the vocabulary in BLOCK_V tiles and keeps three fp32 scalars, an online
softmax with an entropy accumulator:

    m = running max of z,  S = sum_j exp(z_j - m),  W = sum_j exp(z_j - m) * (z_j - m)   (W <= 0)

When a tile raises the max from m to m', every old term is scaled by a = exp(m - m') and each old
(z_j - m) becomes (z_j - m) + (m - m'), so  S' = a*S + tile,  W' = a*(W + S*(m - m')) + tile.
At the end lse = m + log S, logp = (z_t - m) - log S and entropy = log S - W/S. Both entropy terms are
>= 0, so nothing cancels, even for logits of magnitude 1e4 (lse - sum p*z would cancel there).

-inf logits (masked vocabulary) are legal: while every z seen is -inf the reference point is 0 instead
of m (so no exp(-inf - -inf) = NaN), and a term whose exp(z - m) is 0 adds 0 to W (no 0 * -inf).
A NaN logit makes S, hence everything of its row, NaN, and touches no other row.

A target outside [0, V) (other than ignore_index) lies in another vocabulary shard (tensor-parallel
lm_head): the row's lse and entropy are computed as usual, its logp is 0 and its target is not read.
"""

import torch
import triton
import triton.language as tl

# Tuning. The kernel is a bandwidth-bound stream: per element it does one load, ~6 flops and one exp,
# and the row state is three scalars, so speed is "enough bytes in flight per SM". With one program
# per row and N >= a few thousand rows (RL batches are 4k-64k tokens), an H100's 132 SMs are full
# after the first wave, so the tile shape only has to hide memory latency inside one program:
# - BLOCK_V 1024..8192 elements (2-32 KiB of bf16 per tile) covers the range where per-tile
#   reductions (one max, one or two sums across warps) are amortised but registers do not spill;
# - 4, 8 or 16 warps give 4-64 elements per thread, i.e. 1-8 16-byte vector loads in flight each;
# - fewer than 4 elements per thread wastes lanes on the reductions and is pruned, as is any tile
#   wider than the (next power of two of the) vocabulary, which would only load masked lanes.
# Compiled for sm_90a without a GPU (ptxas -v), every config uses 30-96 registers and spills nothing,
# so none is excluded on that ground; which one is fastest only a GPU can say.
# The choice is made by measurement, once per (V, dtype, entropy flag, temperature flag, row bucket).
# The row count enters only as a power-of-two bucket capped at ROWS_BUCKET_CAP: below it the GPU is
# not full (one program per row) and wider tiles/more warps per row pay off, above it every batch size
# behaves alike, so a run of varying RL micro-batches tunes a handful of times, not once per batch,
# and a tiny first call does not fix the config of the large ones. Re-running this kernel during
# tuning is harmless: it only writes its three (N,) outputs, never its input.
GPU_BLOCK_SIZES = (1024, 2048, 4096, 8192)
GPU_NUM_WARPS = (4, 8, 16)
MIN_ELEMENTS_PER_THREAD = 4
ROWS_BUCKET_CAP = 2048  # ~16 rows per SM on an H100: past this, more rows change nothing per program

# Under TRITON_INTERPRET=1 (CPU, numpy) timing means nothing and each config costs a full run, so one
# small tile is used: it also drives the multi-tile path (max rescaling) on the small test vocabularies.
INTERPRETER_BLOCK_V = 128


@triton.jit
def token_logprobs_forward_kernel(
    logits_ptr,
    logits_row_stride,
    targets_ptr,
    logp_ptr,
    entropy_ptr,
    lse_ptr,
    V,
    temperature,
    ignore_index,
    rows_bucket,  # autotuning key only (see _rows_bucket); unused by the kernel
    SCALE: tl.constexpr,
    COMPUTE_ENTROPY: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # int64: row * stride exceeds 2^31 for 64k x 152k logits
    row_logits = logits_ptr + row * logits_row_stride
    target = tl.load(targets_ptr + row)
    ignored = target == ignore_index
    valid = target != ignore_index
    n_read = tl.where(ignored, 0, V)  # an ignored row reads no logits at all

    cols = tl.arange(0, BLOCK_V)
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.zeros((), tl.float32)
    w = tl.zeros((), tl.float32)
    for start in range(0, n_read, BLOCK_V):
        offs = start + cols
        z = tl.load(row_logits + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
        if SCALE:  # IEEE division, as eager z = logits / T: x * (1/T) rounds twice
            z = tl.math.div_rn(z, temperature)
        m_new = tl.maximum(m, tl.max(z, axis=0))
        ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # finite while all z so far are -inf
        e = tl.exp(z - ref)
        scale_old = tl.exp(m - ref)  # 0 when m == -inf, where S = W = 0 anyway
        if COMPUTE_ENTROPY:
            shift = tl.where(m == float("-inf"), 0.0, m - ref)  # avoid S * -inf = 0 * -inf
            offset = tl.where(e == 0.0, 0.0, z - ref)  # p_j = 0 adds 0 to W, never 0 * -inf
            w = scale_old * (w + s * shift) + tl.sum(e * offset, axis=0)
        s = scale_old * s + tl.sum(e, axis=0)
        m = m_new

    ref = tl.where(m == float("-inf"), 0.0, m)
    s = tl.where(ignored, 1.0, s)  # an ignored row read nothing: no log(0) or 0 / 0 to discard later
    log_s = tl.log(s)
    # A target outside [0, V) lies in another rank's vocabulary shard: not read, logp 0 on this shard.
    local = valid & (target >= 0) & (target < V)
    safe_target = tl.where(local, target, 0)
    z_target = tl.load(row_logits + safe_target, mask=local, other=0.0).to(tl.float32)
    if SCALE:
        z_target = tl.math.div_rn(z_target, temperature)
    # (z_t - m) - log S rather than z_t - lse: lse rounds to the ulp of |m|, z_t - m is exact.
    logp = tl.where(local, (z_target - ref) - log_s, 0.0)
    tl.store(logp_ptr + row, logp)
    # Summed in fp64 and rounded once to lse's dtype; an fp64 lse keeps the bits that an fp32 one loses
    # when |m| is large (ulp(1e4) ~ 1e-3), which the backward's p = exp(z - lse) would otherwise feel.
    lse = ref.to(tl.float64) + log_s.to(tl.float64)
    tl.store(lse_ptr + row, tl.where(ignored, 0.0, lse).to(lse_ptr.dtype.element_ty))
    if COMPUTE_ENTROPY:
        tl.store(entropy_ptr + row, tl.where(ignored, 0.0, log_s - w / s))
    else:
        tl.store(entropy_ptr + row, 0.0)


def _prune_configs(configs, named_args, **kwargs):
    """Drop tiles wider than the vocabulary and warp counts that leave threads nearly idle."""
    widest_useful = max(GPU_BLOCK_SIZES[0], triton.next_power_of_2(max(int(named_args["V"]), 1)))
    kept = [c for c in configs
            if c.kwargs["BLOCK_V"] <= widest_useful
            and c.kwargs["BLOCK_V"] // (32 * c.num_warps) >= MIN_ELEMENTS_PER_THREAD]
    return kept or configs[:1]


def _rows_bucket(n_rows):
    return triton.next_power_of_2(min(n_rows, ROWS_BUCKET_CAP))


def _interpreting() -> bool:
    return bool(triton.knobs.runtime.interpret)


if _interpreting():
    _launch = token_logprobs_forward_kernel
    _FIXED_META = {"BLOCK_V": INTERPRETER_BLOCK_V}
else:
    _launch = triton.autotune(
        configs=[triton.Config({"BLOCK_V": b}, num_warps=w) for b in GPU_BLOCK_SIZES for w in GPU_NUM_WARPS],
        key=["V", "rows_bucket", "SCALE", "COMPUTE_ENTROPY"],
        prune_configs_by={"early_config_prune": _prune_configs},
    )(token_logprobs_forward_kernel)
    _FIXED_META = {}


def launch_token_logprobs_forward(logits, targets, temperature, ignore_index, compute_entropy,
                                  lse_dtype=torch.float32):
    """(N, V) logits with unit column stride, (N,) int64 targets -> (logp, entropy, lse), each (N,).

    logp and entropy are fp32; lse is `lse_dtype` (fp32 per the backend interface; fp64 makes the
    backward exact to fp32 rounding even where |logits| is large, see the kernel).
    Arguments are already validated by the dispatch layer (see sppo_fast.backends).
    """
    n_rows, vocab = logits.shape
    logp = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    entropy = torch.empty_like(logp)
    lse = torch.empty(n_rows, dtype=lse_dtype, device=logits.device)
    if n_rows == 0:
        return logp, entropy, lse
    if vocab == 0:  # every target is then ignore_index: logp = entropy = 0, lse = log(empty sum)
        return logp.zero_(), entropy.zero_(), lse.fill_(float("-inf"))
    _launch[(n_rows,)](
        logits, logits.stride(0), targets, logp, entropy, lse,
        vocab, float(temperature), int(ignore_index), _rows_bucket(n_rows),
        SCALE=float(temperature) != 1.0, COMPUTE_ENTROPY=bool(compute_entropy), **_FIXED_META,
    )
    return logp, entropy, lse
