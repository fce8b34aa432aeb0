"""Gradients of the two vocabulary-sized parameters, the output projection and the input embedding,
accumulated straight into their `.grad`, as Megatron's gradient-accumulation fusion does.

Autograd hands a parameter's gradient to its AccumulateGrad node as a fresh tensor and only then adds
it to `.grad`: for a (V, H) matrix that is 297 MiB at V = 151936, H = 512 in fp32, twice per step
(the lm_head's and the embedding's dense backward), more than everything else a long-completion RL
step needs once the logits are never materialised. Here each backward adds its contribution into
`.grad` itself (the lm_head chunk by chunk, `grad_logits.T @ hidden`; the embedding by `index_add_`)
and reports no gradient to autograd, so those tensors never exist. The sum is the same.

Skipping autograd's accumulation is only safe when nothing else watches the parameter's gradient:
`accumulation_is_safe` says no when it has hooks, is not a plain fp32 leaf, or is a DTensor (FSDP);
callers with DDP or DeepSpeed must not ask for it (their reducers hook the accumulation)."""

import torch
import torch.nn.functional as F

from .. import dispatch
from .._checks import ValueChecks, check_linear
from ..api import linear_logprobs
from ..chunks import LinearGrads
from ..ops import coefficients, linear_backward_into, linear_logprobs_forward
from ..plan import default_chunk_size


def accumulation_is_safe(weight):
    """True when adding into `weight.grad` by hand gives what autograd would, and nothing is bypassed."""
    if not (isinstance(weight, torch.nn.Parameter) and weight.requires_grad and weight.is_leaf):
        return False
    if type(weight.data) is not torch.Tensor:  # DTensor and other subclasses (FSDP2, tensor parallel)
        return False
    if weight.dtype != torch.float32:  # bf16 .grad would round once per chunk instead of once
        return False
    hooks = (getattr(weight, "_backward_hooks", None), getattr(weight, "_post_accumulate_grad_hooks", None))
    return not any(hooks)


def head_logprobs(hidden, weight, targets, *, bias=None, temperature=1.0, chunk_size=None,
                  accumulate_into_grad=False):
    """(logp, entropy) fp32 (N,) of `targets` (N,) under softmax((hidden @ weight.T + bias) / temperature)
    for hidden (N, H), never holding the (N, V) logits. Both are differentiable with respect to hidden;
    with `accumulate_into_grad` (only where `accumulation_is_safe(weight)`), the gradients of weight
    and bias are added into their `.grad` during the backward instead of being returned to autograd."""
    if not accumulate_into_grad:
        return linear_logprobs(hidden, weight, targets, bias=bias, temperature=temperature,
                               return_entropy=True, chunk_size=chunk_size)
    if not accumulation_is_safe(weight):
        raise ValueError("accumulate_into_grad=True needs the weight to be a plain fp32 nn.Parameter that "
                         "requires grad and has no gradient hooks (check with accumulation_is_safe)")
    checks = ValueChecks()
    temperature = check_linear(checks, hidden, weight, bias, targets, temperature, -100, chunk_size)
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be (N, H) and targets (N,), got {tuple(hidden.shape)} and "
                         f"{tuple(targets.shape)}")
    checks.run()
    chunk = chunk_size or default_chunk_size(weight.shape[0])
    return _HeadLogprobsIntoGrad.apply(hidden.contiguous(), weight, bias, targets.to(torch.long).contiguous(),
                                       temperature, int(chunk))


def _grad_buffer(param):
    """`param.grad`, allocated (zeros) if absent; None for a missing or frozen parameter."""
    if param is None or not param.requires_grad:
        return None
    if param.grad is None:
        param.grad = torch.zeros_like(param)
    return param.grad


class _HeadLogprobsIntoGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, chunk_size):
        logp, entropy, lse = linear_logprobs_forward(hidden, weight, bias, targets, temperature, -100, True,
                                                     chunk_size)
        ctx.save_for_backward(hidden, targets, lse, entropy)
        ctx.head = (weight, bias)  # leaves: their .grad is written in the backward
        ctx.options = (temperature, chunk_size)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, targets, lse, entropy = ctx.saved_tensors
        weight, bias = ctx.head
        temperature, chunk = ctx.options
        grad_logp, grad_entropy = coefficients(grad_logp, grad_entropy, lse)
        grads = LinearGrads(hidden, weight, bias, dispatch.backend_for(hidden.device, hidden.dtype),
                            into=(_grad_buffer(weight), _grad_buffer(bias)))
        linear_backward_into(grads, hidden, weight, bias, targets, lse, entropy, grad_logp, grad_entropy,
                             temperature, -100, chunk)
        return grads.hidden, None, None, None, None, None


# ----------------------------------------------------------------------------------------------------
# The input embedding


def embedding_accumulation_possible(module):
    """An nn.Embedding whose backward is a plain scatter-add (no max_norm, frequency scaling or sparse)."""
    return (isinstance(module, torch.nn.Embedding) and module.max_norm is None and not module.scale_grad_by_freq
            and not module.sparse)


def accumulate_embedding_grad_into_grad(module):
    """Patch `module` (an nn.Embedding) so that, while `accumulation_is_safe(module.weight)`, its backward
    adds into `weight.grad` with index_add_ instead of building the dense (V, H) gradient; otherwise
    its forward is unchanged. Idempotent; returns whether the module was (or already is) patched."""
    if getattr(module, "_sppo_fast_grad_into", False):
        return True
    if not embedding_accumulation_possible(module):
        return False
    previous = module.forward

    def forward(input_ids):
        if torch.is_grad_enabled() and accumulation_is_safe(module.weight):
            return _EmbeddingIntoGrad.apply(input_ids, module.weight, module.padding_idx)
        return previous(input_ids)

    module.forward = forward
    module._sppo_fast_grad_into = True
    return True


class _EmbeddingIntoGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input_ids, weight, padding_idx):
        ctx.save_for_backward(input_ids)
        ctx.weight, ctx.padding_idx = weight, padding_idx
        return F.embedding(input_ids, weight, padding_idx)

    @staticmethod
    def backward(ctx, grad_output):
        (input_ids,) = ctx.saved_tensors
        weight = ctx.weight
        rows = input_ids.reshape(-1)
        grads = grad_output.reshape(-1, weight.shape[1])
        if ctx.padding_idx is not None:  # nn.Embedding never updates its padding row
            keep = rows != ctx.padding_idx
            rows, grads = rows[keep], grads[keep]
        _grad_buffer(weight).index_add_(0, rows, grads.to(weight.dtype))
        return None, None, None
