"""The fused ops: torch.library custom ops around the two kernels of docs/api.md §9, their autograd, and the
public functions of docs/api.md §2 that check their arguments and compose them with the loss stage.

Four custom ops (namespace `sppo_fast`) carry all vocabulary-sized work:
    token_logprobs_forward / token_logprobs_backward(_)   on (N, V) logits
    linear_logprobs_forward / linear_logprobs_backward     on (N, H) hidden x (V, H) weight, chunked
Each has a fake (meta) implementation, so torch.compile traces them without graph breaks."""



import torch
from torch import Tensor

from . import dispatch, reference
from ._checks import (
    check_float,
    check_integer,
    check_logits_and_targets,
    check_same_device,
    check_shape,
    check_targets_range,
    check_temperature,
)
from .backends import LSE_DTYPE
from .buffers import LinearGrads, logits_buffer, logits_into
from .fused_linear import one_pass_layout, sequence_chunked_policy_loss, token_chunked_policy_loss
from .losses import aggregate, check_loss_inputs, expand_rollout_is_weights
from .packing import packed_fused_linear_policy_loss, packed_fused_policy_loss

# ----------------------------------------------------------------------------------------------------
# Kernel ops on (N, V) logits


@torch.library.custom_op("sppo_fast::token_logprobs_forward", mutates_args=())
def token_logprobs_forward(logits: Tensor, targets: Tensor, temperature: float, ignore_index: int,
                           compute_entropy: bool, inplace_backward: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(logp, entropy, lse), fp32 (N,). `inplace_backward` only tells the autograd formula where to
    write the gradient."""
    backend = dispatch.backend_for(logits.device)
    return backend.token_logprobs_forward(logits, targets, temperature, ignore_index, compute_entropy,
                                          lse_dtype=LSE_DTYPE)


@token_logprobs_forward.register_fake
def _(logits, targets, temperature, ignore_index, compute_entropy, inplace_backward):
    return _row_outputs(logits)


def _row_outputs(like, n=None):
    """Empty (logp, entropy, lse) for n rows: fp32, fp32 and LSE_DTYPE."""
    n = like.shape[0] if n is None else n
    return (like.new_empty(n, dtype=torch.float32), like.new_empty(n, dtype=torch.float32),
            like.new_empty(n, dtype=LSE_DTYPE))


@torch.library.custom_op("sppo_fast::token_logprobs_backward", mutates_args=())
def token_logprobs_backward(logits: Tensor, targets: Tensor, lse: Tensor, entropy: Tensor, grad_logp: Tensor,
                            grad_entropy: Tensor | None, temperature: float, ignore_index: int) -> Tensor:
    backend = dispatch.backend_for(logits.device)
    return backend.token_logprobs_backward(logits, targets, lse, entropy, grad_logp, grad_entropy,
                                           temperature, ignore_index, False)


@token_logprobs_backward.register_fake
def _(logits, targets, lse, entropy, grad_logp, grad_entropy, temperature, ignore_index):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


@torch.library.custom_op("sppo_fast::token_logprobs_backward_", mutates_args=("logits",))
def token_logprobs_backward_(logits: Tensor, targets: Tensor, lse: Tensor, entropy: Tensor, grad_logp: Tensor,
                             grad_entropy: Tensor | None, temperature: float, ignore_index: int) -> None:
    """The in-place backward: overwrites `logits` with their gradient (Liger-Kernel's convention)."""
    backend = dispatch.backend_for(logits.device)
    backend.token_logprobs_backward(logits, targets, lse, entropy, grad_logp, grad_entropy, temperature,
                                    ignore_index, True)


@token_logprobs_backward_.register_fake
def _(logits, targets, lse, entropy, grad_logp, grad_entropy, temperature, ignore_index):
    return None


def _token_setup_context(ctx, inputs, output):
    logits, targets, temperature, ignore_index, compute_entropy, inplace_backward = inputs
    _, entropy, lse = output
    ctx.save_for_backward(logits, targets, lse, entropy)
    ctx.options = (temperature, ignore_index, compute_entropy, inplace_backward)
    ctx.mark_non_differentiable(lse)
    # An entropy used only as a metric gets no gradient: None, not zeros, so that the backward kernel
    # skips the entropy term (about a tenth of its time) instead of multiplying by zero.
    ctx.set_materialize_grads(False)


def _token_backward(ctx, grad_logp, grad_entropy, _grad_lse):
    logits, targets, lse, entropy = ctx.saved_tensors
    temperature, ignore_index, compute_entropy, inplace = ctx.options
    grad_logp, grad_entropy = _coefficients(grad_logp, grad_entropy, lse, compute_entropy)
    args = (targets, lse, entropy, grad_logp, grad_entropy, temperature, ignore_index)
    if inplace:
        token_logprobs_backward_(logits, *args)
        grad = logits
    else:
        grad = token_logprobs_backward(logits, *args)
    return grad, None, None, None, None, None


def _coefficients(grad_logp, grad_entropy, like, compute_entropy):
    """fp32 contiguous per-row coefficients; no entropy term when nothing flows into the entropy."""
    grad_logp = (torch.zeros_like(like, dtype=torch.float32) if grad_logp is None
                 else grad_logp.to(torch.float32).contiguous())
    if not compute_entropy or grad_entropy is None:
        return grad_logp, None
    return grad_logp, grad_entropy.to(torch.float32).contiguous()


token_logprobs_forward.register_autograd(_token_backward, setup_context=_token_setup_context)


# ----------------------------------------------------------------------------------------------------
# Kernel ops on hidden states x lm_head: a chunked matmul with the two kernels as its epilogue


def default_chunk_size(n_rows, vocab):
    """Rows per chunk: about 64 MiB of fp32 logits, at least 256 rows. Each chunk also reads and writes the
    whole (V, H) weight gradient; at V = 151936, H = 512 that update dominated 128-row chunks (one step of
    1024 tokens: 7.3 s of CPU at 128 rows, 6.4 s at 256, 2-core AMD EPYC)."""
    rows = max(256, (1 << 24) // max(vocab, 1))
    return max(1, min(n_rows, rows))


@torch.library.custom_op("sppo_fast::linear_logprobs_forward", mutates_args=())
def linear_logprobs_forward(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor,
                            temperature: float, ignore_index: int, compute_entropy: bool,
                            chunk_size: int) -> tuple[Tensor, Tensor, Tensor]:
    backend = dispatch.backend_for(hidden.device)
    n = hidden.shape[0]
    logp, entropy, lse = _row_outputs(hidden)
    buffer = logits_buffer(hidden, weight, min(chunk_size, n))
    for a in range(0, n, chunk_size):
        b = min(a + chunk_size, n)
        logits = logits_into(buffer, hidden[a:b], weight, bias)
        out = backend.token_logprobs_forward(logits, targets[a:b], temperature, ignore_index, compute_entropy,
                                             lse_dtype=LSE_DTYPE)
        logp[a:b], entropy[a:b], lse[a:b] = out
    return logp, entropy, lse


@linear_logprobs_forward.register_fake
def _(hidden, weight, bias, targets, temperature, ignore_index, compute_entropy, chunk_size):
    return _row_outputs(hidden)


@torch.library.custom_op("sppo_fast::linear_logprobs_backward", mutates_args=())
def linear_logprobs_backward(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor,
                             lse: Tensor, entropy: Tensor, grad_logp: Tensor, grad_entropy: Tensor | None,
                             temperature: float, ignore_index: int,
                             chunk_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """(grad_hidden, grad_weight, grad_bias); the chunk's logits are recomputed, never stored."""
    backend = dispatch.backend_for(hidden.device)
    n = hidden.shape[0]
    grads = LinearGrads(hidden, weight, bias)
    buffer = logits_buffer(hidden, weight, min(chunk_size, n))
    for a in range(0, n, chunk_size):
        b = min(a + chunk_size, n)
        g_ent = None if grad_entropy is None else grad_entropy[a:b]
        logits = logits_into(buffer, hidden[a:b], weight, bias)
        grad = backend.token_logprobs_backward(logits, targets[a:b], lse[a:b], entropy[a:b], grad_logp[a:b],
                                               g_ent, temperature, ignore_index, True)
        grads.add_chunk(grad, hidden[a:b], grads.hidden[a:b])
    grad_hidden, grad_weight, grad_bias = grads.result()
    return grad_hidden, grad_weight, weight.new_zeros(0) if grad_bias is None else grad_bias


@linear_logprobs_backward.register_fake
def _(hidden, weight, bias, targets, lse, entropy, grad_logp, grad_entropy, temperature, ignore_index,
      chunk_size):
    n_bias = weight.shape[0] if bias is not None else 0
    return (torch.empty_like(hidden, memory_format=torch.contiguous_format), torch.empty_like(weight),
            weight.new_empty(n_bias))


def _linear_setup_context(ctx, inputs, output):
    hidden, weight, bias, targets, temperature, ignore_index, compute_entropy, chunk_size = inputs
    _, entropy, lse = output
    ctx.save_for_backward(hidden, weight, bias, targets, lse, entropy)
    ctx.options = (temperature, ignore_index, compute_entropy, chunk_size)
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)  # as in _token_setup_context


def _linear_backward(ctx, grad_logp, grad_entropy, _grad_lse):
    hidden, weight, bias, targets, lse, entropy = ctx.saved_tensors
    temperature, ignore_index, compute_entropy, chunk_size = ctx.options
    grad_logp, grad_entropy = _coefficients(grad_logp, grad_entropy, lse, compute_entropy)
    g_hidden, g_weight, g_bias = linear_logprobs_backward(hidden, weight, bias, targets, lse, entropy, grad_logp,
                                                          grad_entropy, temperature, ignore_index, chunk_size)
    return g_hidden, g_weight, (g_bias if bias is not None else None), None, None, None, None, None


linear_logprobs_forward.register_autograd(_linear_backward, setup_context=_linear_setup_context)


# ----------------------------------------------------------------------------------------------------
# Public functions (docs/api.md §2)


def _rows(x, width):
    """(N, width) view with unit stride along the last dim; copies only when it must."""
    x = x.reshape(-1, width)
    return x if x.stride(-1) == 1 or x.shape[0] == 0 else x.contiguous()


def _flat_targets(targets):
    return targets.reshape(-1).to(torch.long).contiguous()


def _check_vocab(logits, name):
    if logits.shape[-1] == 0 and logits.numel() == 0 and logits.shape[:-1].numel() > 0:
        raise ValueError(f"{name} has an empty vocabulary dimension: shape {tuple(logits.shape)}")


def token_logprobs(logits, targets, *, temperature=1.0, ignore_index=-100, return_entropy=False,
                   inplace_backward=False):
    """Per-token log-probs of `targets` under softmax(logits / temperature), fp32 with the leading shape
    of `targets`; with return_entropy, also the entropy of each distribution (docs/api.md §3.1)."""
    temperature = check_logits_and_targets(logits, targets, temperature, ignore_index)
    _check_vocab(logits, "logits")
    if logits.dtype == torch.float64:  # the fp64 oracle path: eager, differentiable by autograd
        return reference.token_logprobs(logits, targets, temperature=temperature, ignore_index=ignore_index,
                                        return_entropy=return_entropy)
    lead, vocab = targets.shape, logits.shape[-1]
    logp, entropy, _ = token_logprobs_forward(_rows(logits, vocab), _flat_targets(targets), temperature,
                                              ignore_index, bool(return_entropy), bool(inplace_backward))
    logp = logp.reshape(lead)
    return (logp, entropy.reshape(lead)) if return_entropy else logp


def _check_linear(hidden, weight, bias, targets, temperature, ignore_index, chunk_size):
    check_float("hidden", hidden)
    check_float("weight", weight)
    if weight.dim() != 2:
        raise ValueError(f"weight must have shape (V, H), got {tuple(weight.shape)}")
    if hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden must have shape (..., H) with H = weight.shape[1] = {weight.shape[1]}, "
                         f"got {tuple(hidden.shape)}")
    if hidden.dtype != weight.dtype:
        raise TypeError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must share a dtype")
    if bias is not None:
        check_shape("bias", check_float("bias", bias), weight.shape[:1], "one entry per row of weight (V,)")
        if bias.dtype != weight.dtype:
            raise TypeError(f"bias ({bias.dtype}) and weight ({weight.dtype}) must share a dtype")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    check_integer("targets", targets)
    check_shape("targets", targets, hidden.shape[:-1], "the leading shape of hidden (..., H)")
    if not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    check_same_device(hidden=hidden, weight=weight, bias=bias, targets=targets)
    check_targets_range(targets, weight.shape[0], ignore_index)
    return check_temperature(temperature)


def linear_logprobs(hidden, weight, targets, *, bias=None, temperature=1.0, ignore_index=-100,
                    return_entropy=False, chunk_size=None):
    """`token_logprobs(hidden @ weight.T + bias, ...)` without materialising the (N, V) logits: a
    chunked matmul whose chunks are consumed by the kernels and recomputed in the backward."""
    temperature = _check_linear(hidden, weight, bias, targets, temperature, ignore_index, chunk_size)
    if hidden.dtype == torch.float64:
        return reference.linear_logprobs(hidden, weight, targets, bias=bias, temperature=temperature,
                                         ignore_index=ignore_index, return_entropy=return_entropy)
    lead, (vocab, width) = targets.shape, weight.shape
    rows = _rows(hidden, width)
    chunk = chunk_size or default_chunk_size(rows.shape[0], vocab)
    logp, entropy, _ = linear_logprobs_forward(rows, weight, bias, _flat_targets(targets), temperature,
                                               ignore_index, bool(return_entropy), int(chunk))
    logp = logp.reshape(lead)
    return (logp, entropy.reshape(lead)) if return_entropy else logp


def _check_bt(name, x):
    if x.dim() != 3:
        raise ValueError(f"{name} must have shape (B, T, {'V' if name == 'logits' else 'H'}), "
                         f"got {tuple(x.shape)}")


def fused_policy_loss(logits, targets, old_logp, advantages, mask, config, *, segment_ids=None, ref_logp=None,
                      temperature=1.0, normalizer=None, inplace_backward=False, rollout_is_weights=None,
                      cu_seqlens=None):
    """The policy loss of docs/api.md §3 straight from (B, T, V) logits: one forward kernel, the (B, T) loss
    stage, one backward kernel. Equals policy_loss(token_logprobs(logits, ...), ...).
    `rollout_is_weights` ((B,), (B, 1) or (B, T), constant) weights each token's clipped
    policy-gradient term, not its KL or entropy term, as TRL's `importance_sampling_ratio` does.
    `cu_seqlens` takes a packed batch: logits (N, V) or (1, N, V), per-token inputs (N,) or (1, N)."""
    if cu_seqlens is not None:
        return packed_fused_policy_loss(logits, targets, old_logp, advantages, mask, config, cu_seqlens=cu_seqlens,
                                        segment_ids=segment_ids, ref_logp=ref_logp, temperature=temperature,
                                        normalizer=normalizer, inplace_backward=inplace_backward,
                                        rollout_is_weights=rollout_is_weights)
    check_float("logits", logits)
    _check_bt("logits", logits)
    temperature = check_logits_and_targets(logits, targets, temperature, -100)
    valid, advantages = _check_loss_args(logits[..., 0], old_logp, advantages, mask, config, segment_ids,
                                         ref_logp, normalizer, rollout_is_weights)
    logp, entropy = token_logprobs(logits, targets, temperature=temperature, return_entropy=True,
                                   inplace_backward=inplace_backward)
    return aggregate(logp, old_logp, advantages, valid, config, segment_ids=segment_ids, entropy=entropy,
                     ref_logp=ref_logp, normalizer=normalizer, rollout_is_weights=rollout_is_weights)


def fused_linear_policy_loss(hidden, weight, targets, old_logp, advantages, mask, config, *, bias=None,
                             segment_ids=None, ref_logp=None, temperature=1.0, normalizer=None,
                             chunk_size=None, rollout_is_weights=None, cu_seqlens=None):
    """The policy loss of docs/api.md §3 from hidden states and the lm_head weight, never holding the logits.
    `rollout_is_weights` as in fused_policy_loss. `cu_seqlens` takes a packed batch: hidden (N, H) or
    (1, N, H), never padded (see sppo_fast.packing)."""
    if cu_seqlens is not None:
        return packed_fused_linear_policy_loss(
            hidden, weight, targets, old_logp, advantages, mask, config, cu_seqlens=cu_seqlens, bias=bias,
            segment_ids=segment_ids, ref_logp=ref_logp, temperature=temperature, normalizer=normalizer,
            chunk_size=chunk_size, rollout_is_weights=rollout_is_weights)
    check_float("hidden", hidden)
    _check_bt("hidden", hidden)
    _check_linear(hidden, weight, bias, targets, temperature, -100, chunk_size)
    valid, advantages = _check_loss_args(hidden[..., 0], old_logp, advantages, mask, config, segment_ids,
                                         ref_logp, normalizer, rollout_is_weights)
    B, T, _ = hidden.shape
    tokens_per_chunk = chunk_size or default_chunk_size(B * T, weight.shape[0])
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    layout = one_pass_layout(hidden.dtype, B * T, T, tokens_per_chunk, config.token_local)
    if layout == "tokens":  # long sequences, chunks of tokens
        return token_chunked_policy_loss(
            hidden, weight, bias, targets, old_logp, advantages, valid, config, ref_logp=ref_logp,
            temperature=float(temperature), normalizer=normalizer, tokens_per_chunk=tokens_per_chunk,
            compute_grad=needs_grad,
            rollout_is_weights=expand_rollout_is_weights(rollout_is_weights, (B, T), torch.float32))
    if layout == "sequences":  # chunks of whole sequences: three matmuls, not four (fused_linear.py)
        return sequence_chunked_policy_loss(
            hidden, weight, bias, targets, old_logp, advantages, valid, config, segment_ids=segment_ids,
            ref_logp=ref_logp, temperature=float(temperature), normalizer=normalizer,
            seqs_per_chunk=max(1, tokens_per_chunk // T), compute_grad=needs_grad,
            rollout_is_weights=expand_rollout_is_weights(rollout_is_weights, (B, T), torch.float32))
    logp, entropy = _linear_logprobs_of_valid_rows(hidden, weight, bias, targets, valid, temperature, chunk_size)
    return aggregate(logp, old_logp, advantages, valid, config, segment_ids=segment_ids, entropy=entropy,
                     ref_logp=ref_logp, normalizer=normalizer, rollout_is_weights=rollout_is_weights)


def _linear_logprobs_of_valid_rows(hidden, weight, bias, targets, valid, temperature, chunk_size):
    """linear_logprobs over the rows that carry loss only: sequences longer than a chunk come here, and
    their prompt and padding rows would otherwise cost a quarter or more of the matmuls. Masked positions
    get logp = entropy = 0, as in the one-pass path. fp64 and traced calls keep every row (a
    data-dependent row count would break the graph)."""
    if hidden.dtype == torch.float64 or torch.compiler.is_compiling() or bool(valid.all()):
        return linear_logprobs(hidden, weight, targets, bias=bias, temperature=temperature,
                               return_entropy=True, chunk_size=chunk_size)
    B, T, H = hidden.shape
    rows = valid.reshape(-1).nonzero().squeeze(1)
    lp, ent = linear_logprobs(hidden.reshape(-1, H).index_select(0, rows), weight,
                              targets.reshape(-1).index_select(0, rows), bias=bias, temperature=temperature,
                              return_entropy=True, chunk_size=chunk_size)
    logp = lp.new_zeros(B * T).index_copy(0, rows, lp).view(B, T)
    entropy = ent.new_zeros(B * T).index_copy(0, rows, ent).view(B, T)
    return logp, entropy


def _check_loss_args(like, old_logp, advantages, mask, config, segment_ids, ref_logp, normalizer,
                     rollout_is_weights=None):
    """The (B, T) checks of policy_loss, run before any kernel; `like` stands in for logp."""
    stand_in = torch.empty(like.shape, dtype=torch.float32, device=like.device)
    needs_entropy = None if config is None else stand_in  # the fused ops always compute the entropy
    return check_loss_inputs(stand_in, old_logp, advantages, mask, config, segment_ids=segment_ids,
                             entropy=needs_entropy, ref_logp=ref_logp, normalizer=normalizer,
                             logp_name="targets", rollout_is_weights=rollout_is_weights)


