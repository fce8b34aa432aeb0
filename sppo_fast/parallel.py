"""Scale-out as values (docs/api.md §11): a vocabulary shard of the lm_head over a process group, and a
context split of every sequence over another. The public functions decide both once, at their entry,
and hand them down: the shard to the chunk loop (its kernels combine a few floats per row over the
group), the split to the batch layout (its grid is the whole sequences'). Nothing else branches on them.

Vocabulary shard: rank r holds ids [starts[r], starts[r + 1]) of the lm_head (or of the logits); hidden
states and targets are replicated. Each rank's forward kernel gives, over its own columns, lse_r,
entropy H_r and (on the rank holding the target) logp_r; with w_r = exp(lse_r - lse):

    lse = log sum_r exp(lse_r)      logp = logp_r* + (lse_r* - lse)      H = sum_r w_r (H_r + lse - lse_r)

exactly (no cancellation: every term of H is >= 0). That is 4 floats per row per rank (lse as an fp32
hi/lo pair, so that it keeps fp64 precision), in one all-gather. The backward kernel of each rank then
takes the global lse and H and writes its own columns of the gradient; the hidden states' gradient is
summed over the group once per call.

Context split: rank r holds a contiguous slice of every sequence, in rank order (as ring and Ulysses
attention leave it). The loss stage is cheap next to the vocabulary-sized work, so every rank runs it
on the whole (S, T) grid: each rank writes its rows into the grid and one all-reduce fills it
(`SumOverRanks`: sum forward, identity backward, as the loss is then the same on every rank). Every
loss of the family, GSPO's sequence means and SSPO's segments across a split included, is then exact
with no per-loss reduction code.

Bad input: the first collective of a call is `agree`, which every rank reaches with the outcome of its
own checks, so a rank's error is raised on every rank of the groups instead of leaving them waiting."""

import os
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch.distributed.distributed_c10d import _resolve_process_group
from torch.distributed.tensor import DTensor

from .backends import LSE_DTYPE


def debug_checks():
    """SPPO_FAST_DEBUG=1: the entry also checks that replicated inputs agree across ranks (a checksum each)."""
    return os.environ.get("SPPO_FAST_DEBUG") == "1"


class VocabShard(NamedTuple):
    group: object  # the ProcessGroup over which the vocabulary is split
    rank: int  # this process's rank in `group`
    starts: tuple  # P + 1 ids: rank r holds [starts[r], starts[r + 1])

    @property
    def start(self):
        return self.starts[self.rank]

    @property
    def size(self):
        return self.starts[self.rank + 1] - self.starts[self.rank]

    @property
    def vocab(self):
        return self.starts[-1]

    @property
    def group_name(self):
        return self.group.group_name

    def local_targets(self, targets, ignore_index):
        """Global ids -> this shard's columns; ignore_index stays, a target of another shard becomes an id
        outside [0, size) that is not ignore_index (the kernels then add no one-hot term)."""
        local = targets - self.start
        elsewhere = torch.full_like(targets, -1 if ignore_index != -1 else -2)
        local = torch.where((local >= 0) & (local < self.size), local, elsewhere)
        return torch.where(targets == ignore_index, targets, local)

    def combine(self, logp, entropy, lse, targets, ignore_index):
        """The global (logp, entropy, lse) of rows from this shard's kernel outputs: one all-gather of 4
        floats per row."""
        n, P, dtype = logp.shape[0], len(self.starts) - 1, logp.dtype  # fp32, or fp64 for the oracle
        lse_hi = lse.to(dtype)
        lse_lo = torch.where(torch.isfinite(lse_hi), (lse - lse_hi.to(lse.dtype)).to(dtype), torch.zeros_like(lse_hi))
        mine = torch.stack([lse_hi, lse_lo, entropy, logp])  # (4, n)
        every = torch.empty((P * 4, n), dtype=dtype, device=logp.device)
        _all_gather(every, mine, self.group)
        every = every.view(P, 4, n)
        lse_r = every[:, 0].double() + every[:, 1].double()  # (P, n)
        total = torch.logsumexp(lse_r, 0)
        gap = total - lse_r  # >= 0
        w = torch.where(torch.isfinite(lse_r), torch.exp(-gap), torch.zeros_like(gap))
        h = (w * torch.where(w > 0, every[:, 2].double() + gap, torch.zeros_like(gap))).sum(0)
        owner = torch.searchsorted(torch.tensor(self.starts[1:-1], device=targets.device), targets, right=True)
        owner = owner.clamp(0, P - 1).unsqueeze(0)
        lp = every[:, 3].double().gather(0, owner)[0] - gap.gather(0, owner)[0]
        ignored = targets == ignore_index
        zero = torch.zeros_like(logp)
        return (torch.where(ignored, zero, lp.to(dtype)), torch.where(ignored, zero, h.to(dtype)),
                torch.where(ignored, torch.zeros_like(total), total).to(lse.dtype))

    def reduce_grad(self, grad):
        """The hidden states' gradient summed over the group (each rank holds its columns' share)."""
        dist.all_reduce(grad, group=self.group)
        return grad


def vocab_shard_from_op(group_name, starts):
    """The VocabShard that a custom op's (group_name, starts) arguments encode; None for "" (unsharded)."""
    if not group_name:
        return None
    group = _resolve_process_group(group_name)
    return VocabShard(group, dist.get_rank(group), tuple(starts))


def op_args(shard):
    """(group_name, starts) of a shard for the custom ops: ("", None) when unsharded."""
    return ("", None) if shard is None else (shard.group_name, list(shard.starts))


def kernel_forward(backend, shard, logits, targets, temperature, ignore_index, compute_entropy):
    """The forward kernel on (n, V) logits, or on this rank's columns combined over the shard's group:
    (logp, entropy, lse) of the whole vocabulary, lse in LSE_DTYPE."""
    if shard is None:
        return backend.token_logprobs_forward(logits, targets, temperature, ignore_index, compute_entropy,
                                              lse_dtype=LSE_DTYPE)
    local = backend.token_logprobs_forward(logits, shard.local_targets(targets, ignore_index), temperature,
                                           ignore_index, compute_entropy, lse_dtype=LSE_DTYPE)
    logp, entropy, lse = shard.combine(*local, targets, ignore_index)
    return logp, entropy if compute_entropy else torch.zeros_like(entropy), lse


def kernel_backward(backend, shard, logits, targets, lse, entropy, grad_logp, grad_entropy, temperature,
                    ignore_index, inplace):
    """The backward kernel; on a shard, this rank's columns of the gradient (lse and entropy global)."""
    if shard is not None:
        targets = shard.local_targets(targets, ignore_index)
    return backend.token_logprobs_backward(logits, targets, lse, entropy, grad_logp, grad_entropy, temperature,
                                           ignore_index, inplace)


class SumOverRanks(torch.autograd.Function):
    """The sum of a tensor over a group, forward; the gradient passes through unchanged, since what
    follows runs the same on every rank (the loss on the whole grid): each rank keeps its own share."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def sum_over_ranks(x, group):
    return x if group is None else SumOverRanks.apply(x, group)


def _all_gather(out, x, group):
    """out (P * k, ...) <- every rank's x (k, ...), in rank order."""
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, x.contiguous(), group=group)


# ----------------------------------------------------------------------------------------------------
# The entry of a parallel call


class VocabRequest(NamedTuple):
    """What a call says of its vocabulary split, before the ranks meet: the group (None: unsharded), this
    rank's first id (None: after the lower ranks' shards), its size, and the local tensors."""

    group: object | None
    start: int | None
    size: int
    tensor: object  # the local weight (V_r, H) or logits (..., V_r)
    bias: object


def vocab_request(name, x, dim, process_group, vocab_start, bias=None):
    """A call's vocabulary split from a DTensor `x` sharded on its vocabulary dim `dim` over one mesh
    dimension (torch.distributed.tensor.parallel.ColwiseParallel on lm_head gives one), or from a local
    shard with `process_group` and `vocab_start`. No collective."""
    if process_group is not None and not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(f"process_group must be a torch.distributed ProcessGroup, got {type(process_group).__name__}")
    if vocab_start is not None and (isinstance(vocab_start, bool) or not isinstance(vocab_start, int)
                                    or vocab_start < 0):
        raise ValueError(f"vocab_start must be an int >= 0 (the first vocabulary id of this rank's shard), "
                         f"got {vocab_start!r}")
    if isinstance(x, DTensor):
        return _dtensor_request(name, x, dim, process_group, vocab_start, bias)
    if vocab_start is not None and process_group is None:
        raise ValueError("vocab_start is given without process_group: pass the group the vocabulary is split over")
    size = x.shape[dim] if isinstance(x, torch.Tensor) and x.dim() else 0
    return VocabRequest(process_group, vocab_start, size, x, bias)


def _dtensor_request(name, x, dim, process_group, vocab_start, bias):
    mesh, placements = x.device_mesh, x.placements
    sharded = [i for i, p in enumerate(placements) if p.is_shard()]
    dim = dim % x.dim()
    if any(placements[i].dim % x.dim() != dim for i in sharded) or len(sharded) > 1:
        raise ValueError(f"{name} is a DTensor with placements {tuple(placements)}: it must be sharded on its "
                         f"vocabulary dim ({dim}) over one mesh dimension (ColwiseParallel on lm_head), or replicated")
    group = mesh.get_group(sharded[0]) if sharded else None
    if process_group is not None and (group is None or process_group.group_name != group.group_name):
        raise ValueError(f"process_group does not match the device mesh dimension {name} is sharded over "
                         f"(placements {tuple(placements)}); leave process_group out for a DTensor {name}")
    if vocab_start is not None:
        raise ValueError(f"vocab_start is given for a DTensor {name}: its placement already says where each "
                         "shard starts; leave vocab_start out")
    local_bias = bias.to_local() if isinstance(bias, DTensor) else bias
    local = x.to_local()
    return VocabRequest(group, None, local.shape[dim], local, local_bias)


def vocab_shard(group, every):
    """The VocabShard from every rank's (start or None, size, targets' (min, max) or None, checksum) in
    rank order; a ValueError (the same on every rank) when they do not tile [0, V) in rank order, a
    target lies outside it, or (debug) the replicated inputs differ."""
    starts, sizes = [p[0] for p in every], [p[1] for p in every]
    offsets = [sum(sizes[:r]) for r in range(len(sizes) + 1)]
    if any(s is None for s in starts) and any(s is not None for s in starts):
        raise ValueError("vocab_start is given on some ranks of process_group and not on others: give it on "
                         "every rank, or on none (the shards then follow rank order)")
    for r, start in enumerate(starts):
        if start is not None and start != offsets[r]:
            raise ValueError(f"vocab_start of rank {r} is {start}, but ranks 0..{r - 1} hold {offsets[r]} ids "
                             f"(shard sizes {sizes}): the shards must tile [0, V) in rank order, without gap or "
                             "overlap")
    V = offsets[-1]
    spans = [p[2] for p in every if p[2] is not None]
    if spans and (min(lo for lo, _ in spans) < 0 or max(hi for _, hi in spans) >= V):
        bad = min(lo for lo, _ in spans) if min(lo for lo, _ in spans) < 0 else max(hi for _, hi in spans)
        raise ValueError(f"targets must lie in [0, {V}) (the shards' sizes {sizes} add up to V = {V}) or equal "
                         f"ignore_index, found {bad}")
    if any(p[3] != every[0][3] for p in every):
        r = next(r for r, p in enumerate(every) if p[3] != every[0][3])
        raise ValueError(f"the hidden states or targets of rank {r} of process_group differ from rank 0's: a "
                         "vocabulary-parallel call needs them replicated over the group (SPPO_FAST_DEBUG=1 check)")
    return VocabShard(group, dist.get_rank(group), tuple(offsets))


def context_lengths(every):
    """Every rank's tokens of each sequence (rank order), after checking that each holds every sequence."""
    counts = [len(p[0]) for p in every]
    if any(c != counts[0] for c in counts):
        r = next(r for r, c in enumerate(counts) if c != counts[0])
        raise ValueError(f"rank {r} of context_parallel_group holds {counts[r]} sequences and rank 0 holds "
                         f"{counts[0]}: every rank must hold a slice of every sequence")
    if any(p[1] != every[0][1] for p in every):
        r = next(r for r, p in enumerate(every) if p[1] != every[0][1])
        raise ValueError(f"the per-sequence inputs (advantages, rollout_is_weights) of rank {r} of "
                         "context_parallel_group differ from rank 0's: they must be the same on every rank "
                         "(SPPO_FAST_DEBUG=1 check)")
    if any(p[2] != every[0][2] for p in every):
        r = next(r for r, p in enumerate(every) if p[2] != every[0][2])
        raise ValueError(f"rank {r} of context_parallel_group passes other optional loss inputs than rank 0 "
                         f"(advantages, rollout_is_weights, segment_ids, ref_logp, entropy: dims {every[r][2]} "
                         f"against {every[0][2]}, None where absent): every rank must pass the same ones, alike")
    return [p[0] for p in every]


class RankError(ValueError):
    """Another rank of a group rejected its arguments; raised on the ranks that did not."""


def agree(rounds, error=None):
    """The entry collective. `rounds`: (name, group or None, this rank's payload, judge) in order; each
    rank sends the outcome of its own checks (`error`, an exception or None) and its payload, and
    judge(every rank's payloads) returns the round's result (or raises the same error on every rank).
    Returns name -> result. If any rank failed, every rank raises: the failing one its own error, the
    others a RankError naming it. An error learnt in one round travels in the next, so the two groups of
    a 2-D mesh (rows, then columns) tell every rank."""
    results = {}
    message = None if error is None else f"{type(error).__name__}: {error}"
    for name, group, payload, judge in rounds:
        if group is None:
            continue
        every = [None] * group.size()
        dist.all_gather_object(every, (message, payload), group=group)
        if message is None:
            theirs = next(((r, m) for r, (m, _) in enumerate(every) if m is not None), None)
            if theirs is not None:
                message = f"rank {theirs[0]} of the {name} group rejected its arguments: {theirs[1]}"
        if message is None:
            try:
                results[name] = judge([p for _, p in every])
            except ValueError as exc:
                error, message = exc, f"{type(exc).__name__}: {exc}"
    if error is not None:
        raise error
    if message is not None:
        raise RankError(f"sppo_fast: {message}")
    return results


def checksum(*tensors):
    """A few numbers that differ when a tensor differs (debug mode: replicated inputs must agree)."""
    out = []
    for x in tensors:
        if not isinstance(x, torch.Tensor):
            continue
        flat = x.detach().reshape(-1).double()
        ramp = torch.linspace(1.0, 2.0, flat.numel(), dtype=torch.float64, device=flat.device)
        out += torch.stack([flat.nansum(), (flat * ramp).nansum(), torch.isnan(flat).sum().double()]).tolist()
    return out


def target_span(targets, ignore_index):
    """(min, max) of the targets that are not ignore_index, or None: checked against V after the meeting."""
    kept = targets[targets != ignore_index]
    return None if kept.numel() == 0 else tuple(torch.stack([kept.min(), kept.max()]).tolist())


def group_rank(group):
    return dist.get_rank(group)
