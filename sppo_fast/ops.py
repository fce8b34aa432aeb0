"""The custom ops: the two vocabulary-sized kernels of docs/api.md §9 as `torch.library` ops (namespace
`sppo_fast`), their autograd, and the differentiable row-level calls the public functions compose.
Arguments arrive checked (sppo_fast.api); nothing here validates again.

Six ops carry all vocabulary-sized work:
    token_logprobs_forward, token_logprobs_backward, token_logprobs_backward_ (in place)   on (N, V) logits
    token_logprobs_forward_basis   the one-pass forward on (N, V) logits (sppo_fast.plan.logits_one_pass)
    linear_logprobs_forward, linear_logprobs_backward      on (N, H) hidden x (V, H) weight, chunked
Each has a fake (meta) implementation, so torch.compile traces them without graph breaks. Each takes
a vocabulary shard as (vocab_group, vocab_starts) (parallel.op_args; "" and None when unsharded): the
logits or the weight are then this rank's columns or rows, targets global ids (docs/api.md §11)."""

import torch
from torch import Tensor

from . import dispatch, reference
from .backends import LSE_DTYPE
from .chunks import LinearGrads, chunk_logits, row_slices
from .parallel import kernel_backward, kernel_forward, op_args, vocab_shard_from_op

IGNORE_INDEX = -100  # the fused losses' ignore_index: masked rows are handed to the kernels with it


def _row_outputs(like, n=None):
    """Empty (logp, entropy, lse) for n rows: fp32 (fp64 for fp64 input: the oracle's) and LSE_DTYPE."""
    n = like.shape[0] if n is None else n
    dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
    return like.new_empty(n, dtype=dtype), like.new_empty(n, dtype=dtype), like.new_empty(n, dtype=LSE_DTYPE)


def coefficients(grad_logp, grad_entropy, like, compute_entropy=True):
    """fp32 contiguous per-row coefficients of the backward kernel; no entropy term (None) when nothing
    flows into the entropy, so the kernel skips it (about a tenth of its time) instead of adding zeros."""
    wide = lambda g: g.to(torch.promote_types(g.dtype, torch.float32)).contiguous()  # fp64 stays fp64
    grad_logp = (torch.zeros(like.shape[0], dtype=torch.float32, device=like.device) if grad_logp is None
                 else wide(grad_logp))
    if not compute_entropy or grad_entropy is None:
        return grad_logp, None
    return grad_logp, wide(grad_entropy)


# ----------------------------------------------------------------------------------------------------
# On (N, V) logits


@torch.library.custom_op("sppo_fast::token_logprobs_forward", mutates_args=())
def token_logprobs_forward(logits: Tensor, targets: Tensor, temperature: float, ignore_index: int,
                           compute_entropy: bool, inplace_backward: bool, vocab_group: str = "",
                           vocab_starts: list[int] | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """(logp, entropy, lse), fp32 (N,). `inplace_backward` only tells the autograd formula where to
    write the gradient."""
    backend, shard = dispatch.backend_for(logits.device, logits.dtype), vocab_shard_from_op(vocab_group, vocab_starts)
    return kernel_forward(backend, shard, logits, targets, temperature, ignore_index, compute_entropy)


@token_logprobs_forward.register_fake
def _(logits, targets, temperature, ignore_index, compute_entropy, inplace_backward, vocab_group="",
      vocab_starts=None):
    return _row_outputs(logits)


@torch.library.custom_op("sppo_fast::token_logprobs_backward", mutates_args=())
def token_logprobs_backward(logits: Tensor, targets: Tensor, lse: Tensor, entropy: Tensor, grad_logp: Tensor,
                            grad_entropy: Tensor | None, temperature: float, ignore_index: int, vocab_group: str = "",
                            vocab_starts: list[int] | None = None) -> Tensor:
    backend, shard = dispatch.backend_for(logits.device, logits.dtype), vocab_shard_from_op(vocab_group, vocab_starts)
    return kernel_backward(backend, shard, logits, targets, lse, entropy, grad_logp, grad_entropy, temperature,
                           ignore_index, False)


@token_logprobs_backward.register_fake
def _(logits, targets, lse, entropy, grad_logp, grad_entropy, temperature, ignore_index, vocab_group="",
      vocab_starts=None):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


@torch.library.custom_op("sppo_fast::token_logprobs_backward_", mutates_args=("logits",))
def token_logprobs_backward_(logits: Tensor, targets: Tensor, lse: Tensor, entropy: Tensor, grad_logp: Tensor,
                             grad_entropy: Tensor | None, temperature: float, ignore_index: int, vocab_group: str = "",
                             vocab_starts: list[int] | None = None) -> None:
    """The in-place backward: overwrites `logits` with their gradient (Liger-Kernel's convention)."""
    backend, shard = dispatch.backend_for(logits.device, logits.dtype), vocab_shard_from_op(vocab_group, vocab_starts)
    kernel_backward(backend, shard, logits, targets, lse, entropy, grad_logp, grad_entropy, temperature,
                    ignore_index, True)


@token_logprobs_backward_.register_fake
def _(logits, targets, lse, entropy, grad_logp, grad_entropy, temperature, ignore_index, vocab_group="",
      vocab_starts=None):
    return None


def _token_setup_context(ctx, inputs, output):
    logits, targets, temperature, ignore_index, compute_entropy, inplace_backward, *vocab = inputs
    _, entropy, lse = output
    ctx.save_for_backward(logits, targets, lse, entropy)
    ctx.options = (temperature, ignore_index, compute_entropy, inplace_backward, vocab)
    ctx.mark_non_differentiable(lse)
    # An entropy used only as a metric gets no gradient: None, not zeros (see coefficients)
    ctx.set_materialize_grads(False)


def _token_backward(ctx, grad_logp, grad_entropy, _grad_lse):
    logits, targets, lse, entropy = ctx.saved_tensors
    temperature, ignore_index, compute_entropy, inplace, vocab = ctx.options
    grad_logp, grad_entropy = coefficients(grad_logp, grad_entropy, lse, compute_entropy)
    args = (targets, lse, entropy, grad_logp, grad_entropy, temperature, ignore_index, *vocab)
    if inplace:
        token_logprobs_backward_(logits, *args)
        grad = logits
    else:
        grad = token_logprobs_backward(logits, *args)
    return grad, None, None, None, None, None, None, None


token_logprobs_forward.register_autograd(_token_backward, setup_context=_token_setup_context)


@torch.library.custom_op("sppo_fast::token_logprobs_forward_basis", mutates_args=())
def token_logprobs_forward_basis(logits: Tensor, targets: Tensor, temperature: float, ignore_index: int,
                                 compute_entropy: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(logp, entropy, lse, basis): the forward, and d logp / d logits (N, V) in the logits' dtype, so that
    the backward only scales rows (sppo_fast.backends: token_logprobs_forward_basis)."""
    backend = dispatch.backend_for(logits.device, logits.dtype)
    return backend.token_logprobs_forward_basis(logits, targets, temperature, ignore_index, compute_entropy)


@token_logprobs_forward_basis.register_fake
def _(logits, targets, temperature, ignore_index, compute_entropy):
    return (*_row_outputs(logits), torch.empty_like(logits, memory_format=torch.contiguous_format))


def _basis_setup_context(ctx, inputs, output):
    logits, targets, temperature, ignore_index, compute_entropy = inputs
    _, entropy, lse, basis = output
    ctx.save_for_backward(logits, targets, lse, entropy)
    # not saved for backward: the backward turns it into the gradient in place, which would fail the saved
    # tensors' version check of a second backward (retain_graph); non-differentiable, it makes no cycle
    ctx.basis = basis
    ctx.options = (temperature, ignore_index, compute_entropy)
    ctx.mark_non_differentiable(lse, basis)
    ctx.set_materialize_grads(False)


def _basis_backward(ctx, grad_logp, grad_entropy, _grad_lse, _grad_basis):
    """grad_logp * basis, in place on the basis (it becomes the gradient, handed to autograd). A gradient
    that also reaches the entropy (the plan rules that out, but a caller may differentiate the entropy
    output) and a second backward (retain_graph: the basis is gone) take the two-pass backward kernel
    from the saved logits instead."""
    logits, targets, lse, entropy = ctx.saved_tensors
    temperature, ignore_index, compute_entropy = ctx.options
    grad_logp, grad_entropy = coefficients(grad_logp, grad_entropy, lse, compute_entropy)
    basis, ctx.basis = ctx.basis, None
    if grad_entropy is not None or basis is None:
        grad = token_logprobs_backward(logits, targets, lse, entropy, grad_logp, grad_entropy, temperature,
                                       ignore_index)
        return grad, None, None, None, None
    backend = dispatch.backend_for(basis.device, basis.dtype)
    return backend.token_logprobs_backward_from_basis_(basis, grad_logp), None, None, None, None


token_logprobs_forward_basis.register_autograd(_basis_backward, setup_context=_basis_setup_context)


# ----------------------------------------------------------------------------------------------------
# On hidden states x lm_head: the chunk loop with the two kernels as its epilogue


@torch.library.custom_op("sppo_fast::linear_logprobs_forward", mutates_args=())
def linear_logprobs_forward(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor,
                            temperature: float, ignore_index: int, compute_entropy: bool, chunk_size: int,
                            vocab_group: str = "",
                            vocab_starts: list[int] | None = None) -> tuple[Tensor, Tensor, Tensor]:
    logp, entropy, lse = _row_outputs(hidden)
    backend, shard = dispatch.backend_for(hidden.device, hidden.dtype), vocab_shard_from_op(vocab_group, vocab_starts)
    for rows, _, logits in chunk_logits(hidden, weight, bias, row_slices(hidden.shape[0], chunk_size)):
        out = kernel_forward(backend, shard, logits, targets[rows], temperature, ignore_index, compute_entropy)
        logp[rows], entropy[rows], lse[rows] = out
    return logp, entropy, lse


@linear_logprobs_forward.register_fake
def _(hidden, weight, bias, targets, temperature, ignore_index, compute_entropy, chunk_size, vocab_group="",
      vocab_starts=None):
    return _row_outputs(hidden)


def linear_backward_into(grads, hidden, weight, bias, targets, lse, entropy, grad_logp, grad_entropy,
                         temperature, ignore_index, chunk_size, shard=None):
    """The backward of the linear chunk loop into `grads` (a chunks.LinearGrads): each chunk's logits are
    recomputed, turned into their gradient in place by grads' backend's backward kernel, and folded in."""
    backend = grads.backend
    for rows, h, logits in chunk_logits(hidden, weight, bias, row_slices(hidden.shape[0], chunk_size)):
        g_ent = None if grad_entropy is None else grad_entropy[rows]
        grad = kernel_backward(backend, shard, logits, targets[rows], lse[rows], entropy[rows], grad_logp[rows],
                               g_ent, temperature, ignore_index, True)
        grads.add_chunk(grad, h, rows)
    return grads


@torch.library.custom_op("sppo_fast::linear_logprobs_backward", mutates_args=())
def linear_logprobs_backward(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor,
                             lse: Tensor, entropy: Tensor, grad_logp: Tensor, grad_entropy: Tensor | None,
                             temperature: float, ignore_index: int, chunk_size: int, vocab_group: str = "",
                             vocab_starts: list[int] | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """(grad_hidden, grad_weight, grad_bias); the chunk's logits are recomputed, never stored. On a
    vocabulary shard: the hidden states' gradient summed over the group, the weight's and bias' local."""
    shard = vocab_shard_from_op(vocab_group, vocab_starts)
    grads = LinearGrads(hidden, weight, bias, dispatch.backend_for(hidden.device, hidden.dtype), shard=shard,
                        single_chunk=hidden.shape[0] <= chunk_size)
    grads = linear_backward_into(grads, hidden, weight, bias, targets, lse, entropy, grad_logp, grad_entropy,
                                 temperature, ignore_index, chunk_size, shard)
    grad_hidden, grad_weight, grad_bias = grads.result()
    return grad_hidden, grad_weight, weight.new_zeros(0) if grad_bias is None else grad_bias


@linear_logprobs_backward.register_fake
def _(hidden, weight, bias, targets, lse, entropy, grad_logp, grad_entropy, temperature, ignore_index,
      chunk_size, vocab_group="", vocab_starts=None):
    n_bias = weight.shape[0] if bias is not None else 0
    return (torch.empty_like(hidden, memory_format=torch.contiguous_format), torch.empty_like(weight),
            weight.new_empty(n_bias))


def _linear_setup_context(ctx, inputs, output):
    hidden, weight, bias, targets, temperature, ignore_index, compute_entropy, chunk_size, *vocab = inputs
    _, entropy, lse = output
    ctx.save_for_backward(hidden, weight, bias, targets, lse, entropy)
    ctx.options = (temperature, ignore_index, compute_entropy, chunk_size, vocab)
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)  # as in _token_setup_context


def _linear_backward(ctx, grad_logp, grad_entropy, _grad_lse):
    hidden, weight, bias, targets, lse, entropy = ctx.saved_tensors
    temperature, ignore_index, compute_entropy, chunk_size, vocab = ctx.options
    grad_logp, grad_entropy = coefficients(grad_logp, grad_entropy, lse, compute_entropy)
    g_hidden, g_weight, g_bias = linear_logprobs_backward(hidden, weight, bias, targets, lse, entropy, grad_logp,
                                                          grad_entropy, temperature, ignore_index, chunk_size, *vocab)
    return g_hidden, g_weight, (g_bias if bias is not None else None), *[None] * 7


linear_logprobs_forward.register_autograd(_linear_backward, setup_context=_linear_setup_context)


# ----------------------------------------------------------------------------------------------------
# Differentiable row-level calls: (N, V) logits or (N, H) hidden rows, (N,) int64 targets


def token_logprobs_rows(logits, targets, temperature, ignore_index, compute_entropy, inplace_backward=False,
                        shard=None, one_pass=False):
    """(logp, entropy) fp32 (N,) (fp64 for fp64 logits: the eager oracle, differentiable by autograd; a
    sharded fp64 call runs the reference backend's kernels, in fp64, through the same op). `one_pass`
    (sppo_fast.plan.logits_one_pass): the forward also writes d logp / d logits, the backward scales it."""
    if one_pass:
        logp, entropy, _, _ = token_logprobs_forward_basis(logits, targets, temperature, ignore_index, compute_entropy)
        return logp, entropy
    if logits.dtype != torch.float64 or shard is not None:
        logp, entropy, _ = token_logprobs_forward(logits, targets, temperature, ignore_index, compute_entropy,
                                                  inplace_backward, *op_args(shard))
        return logp, entropy
    return reference.token_logprobs(logits, targets, temperature=temperature, ignore_index=ignore_index,
                                    return_entropy=True)


def linear_logprobs_rows(hidden, weight, bias, targets, temperature, ignore_index, compute_entropy, chunk_size,
                         shard=None):
    """(logp, entropy) fp32 (N,) of hidden rows (N, H) x weight (V, H), chunk_size rows at a time."""
    if hidden.dtype != torch.float64 or shard is not None:
        logp, entropy, _ = linear_logprobs_forward(hidden, weight, bias, targets, temperature, ignore_index,
                                                   compute_entropy, chunk_size, *op_args(shard))
        return logp, entropy
    return reference.linear_logprobs(hidden, weight, targets, bias=bias, temperature=temperature,
                                     ignore_index=ignore_index, return_entropy=True)
