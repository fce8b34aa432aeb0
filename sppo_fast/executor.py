"""The executor of a chunk plan (sppo_fast.plan) for the loss from hidden states x lm_head, the same
for padded and packed batches: it sees hidden rows, grid cells and the loss stage's (S, T) inputs.

The one pass computes the loss and every gradient in the forward, as Liger-Kernel's chunked losses do:
per chunk one matmul, the forward kernel, the loss stage on the chunk, the backward kernel (in place on
the chunk's logits) and two matmuls for the gradients, three in all, against the four that recomputing
the logits in a separate backward needs. The autograd backward then only scales the stored gradients.
The two passes run linear_logprobs over the plan's rows and the loss stage after it.

A vocabulary shard (parallel.VocabShard) changes only the kernels' calls (kernel_forward/backward); a
context split only the layout, whose grid is the whole sequences': a one-pass plan is then token-local
(sppo_fast.plan), and the ranks' shares of the loss and of logp and entropy are summed over the group."""

import torch

from . import dispatch
from .chunks import LinearGrads, chunk_logits
from .losses import PolicyLossOutput, aggregate, loss_metrics, per_token_loss, token_weights, weighted_sum
from .ops import IGNORE_INDEX, linear_logprobs_rows
from .parallel import kernel_backward, kernel_forward, sum_over_ranks
from .plan import TWO_PASS


def linear_policy_loss(plan, layout, hidden, weight, bias, targets, inputs, config, *, temperature, normalizer,
                       compute_grad, shard=None):
    """The policy loss of hidden rows (N, H), targets (N,) int64, `inputs` (losses.LossInputs) on the
    layout's grid. Returns PolicyLossOutput with logp and entropy on the grid (0 where mask is 0)."""
    if plan.mode == TWO_PASS:
        logp, entropy = _two_pass_logprobs(plan, layout, hidden, weight, bias, targets, inputs.valid, temperature,
                                           shard)
        return aggregate(logp, inputs, config, entropy=entropy, normalizer=normalizer)
    weights = token_weights(inputs.valid, config, normalizer)
    loss, logp, entropy = _OnePassLinearLoss.apply(hidden, weight, bias, targets, plan, inputs, weights, config,
                                                   temperature, compute_grad, shard)
    if layout.context is not None:
        loss = sum_over_ranks(loss, layout.context)
        logp, entropy = sum_over_ranks(torch.stack([logp, entropy]), layout.context)
    terms = per_token_loss(logp, inputs, config, entropy)
    return PolicyLossOutput(loss, logp, entropy, loss_metrics(terms, logp, inputs, entropy))


def _two_pass_logprobs(plan, layout, hidden, weight, bias, targets, valid, temperature, shard):
    """(logp, entropy) on the grid from linear_logprobs over the plan's rows. Traced calls take every row,
    masked ones zeroed (hidden and target) so that whatever they hold, NaN included, gives a zero gradient."""
    if plan.rows is None:
        keep = layout.to_rows(valid).reshape(-1)
        hidden = torch.where(keep.unsqueeze(1), hidden, torch.zeros_like(hidden))
        targets = torch.where(keep, targets, torch.full_like(targets, IGNORE_INDEX))
    else:
        hidden, targets = hidden.index_select(0, plan.rows), targets.index_select(0, plan.rows)
    logp, entropy = linear_logprobs_rows(hidden, weight, bias, targets, temperature, IGNORE_INDEX, True,
                                         plan.chunk_size, shard)
    if plan.rows is None:
        return layout.to_grid(logp), layout.to_grid(entropy)
    grids = torch.stack([plan.output_grid(logp, valid.shape), plan.output_grid(entropy, valid.shape)])
    return sum_over_ranks(grids, layout.context).unbind(0)


class _OnePassLinearLoss(torch.autograd.Function):
    """Loss, logp and entropy (on the grid) in one pass over the plan's chunks; the gradients of hidden,
    weight and bias computed on the way when compute_grad, scaled by the incoming gradient in the backward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, plan, inputs, weights, config, temperature, compute_grad, shard):
        backend = dispatch.backend_for(hidden.device, hidden.dtype)
        grid_inputs, grid_weights = plan.loss_grid(inputs, weights)
        logp = torch.zeros(grid_inputs.valid.shape, dtype=torch.float32, device=hidden.device)
        entropy = torch.zeros_like(logp)
        grads = LinearGrads(hidden, weight, bias, backend, shard=shard, single_chunk=len(plan.chunks) == 1) \
            if compute_grad else None
        loss = _run_chunks(backend, plan, hidden, weight, bias, targets, grid_inputs, grid_weights, config,
                           temperature, shard, logp, entropy, grads)
        shape = inputs.valid.shape
        logp, entropy = plan.output_grid(logp, shape), plan.output_grid(entropy, shape)
        ctx.mark_non_differentiable(logp, entropy)
        if grads is not None:
            ctx.save_for_backward(*grads.result())
        return loss, logp, entropy

    @staticmethod
    def backward(ctx, grad_loss, _grad_logp, _grad_entropy):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        none = [None] * 8
        # the usual grad_loss is 1: on the CPU, where reading it costs no device sync, skip the scaling (a
        # pass over the (V, H) weight gradient); on an accelerator, scale without reading it
        if grad_loss.device.type == "cpu" and float(grad_loss) == 1.0:
            return grad_hidden, grad_weight, grad_bias, *none
        return (*(None if g is None else g * grad_loss.to(g.dtype) for g in (grad_hidden, grad_weight, grad_bias)),
                *none)


def _run_chunks(backend, plan, hidden, weight, bias, targets, grid_inputs, grid_weights, config, temperature, shard,
                logp, entropy, grads):
    """The one pass over the plan's chunks: fills logp and entropy (on the loss grid), adds each chunk's
    gradients into `grads` (None: no gradient), returns the loss. A function of its own so that the last
    chunk's logits buffer is freed on return, before the caller's grads.result() copies the weight gradient."""
    loss = logp.new_zeros(())
    for chunk, (rows, h, logits) in zip(plan.chunks, chunk_logits(hidden, weight, bias,
                                                                   [c.rows for c in plan.chunks])):
        chunk_targets = targets.index_select(0, rows)
        lp, ent, lse = kernel_forward(backend, shard, logits, chunk_targets, temperature, IGNORE_INDEX, True)
        a, b = chunk.seqs
        _place(logp[a:b], chunk.cells, lp)
        _place(entropy[a:b], chunk.cells, ent)
        chunk_loss, g_logp, g_ent = _loss_and_coefficients(
            logp[a:b], entropy[a:b], grid_inputs.sequences(a, b), grid_weights[a:b], config, grads is not None)
        loss += chunk_loss
        if grads is not None:
            g_logp, g_ent = _take(g_logp, chunk.cells), None if g_ent is None else _take(g_ent, chunk.cells)
            grad = kernel_backward(backend, shard, logits, chunk_targets, lse, ent, g_logp, g_ent, temperature,
                                   IGNORE_INDEX, True)
            grads.add_chunk(grad, h, rows)
    return loss


def _place(sub_grid, cells, values):
    """Writes the chunk's per-row values into its sub-grid (in order when cells is None)."""
    flat = sub_grid.view(-1)
    if cells is None:
        flat.copy_(values)
    else:
        flat.index_copy_(0, cells, values)


def _take(sub_grid, cells):
    flat = sub_grid.reshape(-1)
    return (flat if cells is None else flat.index_select(0, cells)).contiguous()


def _loss_and_coefficients(logp, entropy, inputs, weights, config, compute_grad):
    """The chunk's share of the loss and d loss / d (logp, entropy) on its sub-grid, by the shared loss
    stage; the entropy coefficient is None when no term of the loss depends on the entropy's value."""
    def chunk_loss(logp, entropy):
        return weighted_sum(weights, per_token_loss(logp, inputs, config, entropy), inputs.valid)

    if not compute_grad:
        return chunk_loss(logp, entropy), None, None
    logp = logp.detach().requires_grad_(True)
    entropy = entropy.detach().requires_grad_(bool(config.entropy_coef))
    with torch.enable_grad():
        loss = chunk_loss(logp, entropy)
        wrt = [logp, entropy] if config.entropy_coef else [logp]
        grads = torch.autograd.grad(loss, wrt, allow_unused=True)
    g_logp = torch.zeros_like(logp) if grads[0] is None else grads[0]
    g_ent = grads[1] if config.entropy_coef and grads[1] is not None else None
    return loss.detach(), g_logp, g_ent
