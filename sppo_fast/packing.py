"""Packed (padding-free) batches: all sequences of a batch concatenated into one row of N tokens, with
`cu_seqlens` (S + 1 offsets, flash-attention's convention) or `position_ids` restarting at 0 marking
where each sequence starts. This is how verl's `use_remove_padding` and TRL's `padding_free` feed a
model.

The loss family is written once, on (B, T) tensors (docs/api.md §9). So the packed entry points map the small
per-token tensors (log-probs, masks, advantages: a few scalars per position, never O(N x V)) into the
padded (S, Tmax) layout by one index (S x Tmax scalars: more than N when lengths are skewed), run the shared loss stage there, and map log-probs and entropy back.
Every sequence is its own row of the padded layout, so sequence- and segment-level ratios and every
aggregation stay inside one packed sequence. The vocabulary-sized work runs on the packed rows
themselves: (N, V) logits or (N, H) hidden states are never padded (the fused linear loss chunks
whole packed sequences, or packed token rows when a sequence is longer than a chunk; the choice is
fused_linear.one_pass_layout's, the same as for padded batches).

Reading `cu_seqlens` and the longest sequence needs their values on the host: one device sync per
call, so the packed path is not traced by torch.compile."""

from typing import NamedTuple

import torch

from ._checks import check_float, check_integer, check_tensor


class Packing(NamedTuple):
    """Where each packed token sits in the padded (S, T) layout (T the longest sequence)."""

    cu: list  # S + 1 offsets, Python ints
    n_seqs: int  # S
    n_tokens: int  # N
    width: int  # T = the longest sequence (at least 1, so empty batches keep a (S, 1) layout)
    flat: torch.Tensor  # (N,) int64: s * T + t for the t-th token of sequence s
    seq: torch.Tensor  # (N,) int64: the sequence of each packed token

    def pad(self, x, fill=0):
        """(N, ...) packed -> (S, T, ...) padded with `fill`; differentiable with respect to x."""
        out = x.new_full((self.n_seqs * self.width, *x.shape[1:]), fill)
        return out.index_copy(0, self.flat, x).reshape(self.n_seqs, self.width, *x.shape[1:])

    def unpad(self, y):
        """(S, T, ...) padded -> (N, ...) packed."""
        return y.reshape(self.n_seqs * self.width, *y.shape[2:]).index_select(0, self.flat)

    def source_rows(self):
        """(S * T,) int64: the packed row of each padded position, -1 on padding."""
        src = torch.full((self.n_seqs * self.width,), -1, dtype=torch.long, device=self.flat.device)
        return src.index_copy(0, self.flat, torch.arange(self.n_tokens, device=self.flat.device))


class ChunkedPacking(NamedTuple):
    """What the one-pass fused linear loss needs to chunk a packed batch by whole sequences."""

    cu: list  # S + 1 offsets
    width: int  # T
    source: torch.Tensor  # (S * T,) the packed row of each padded position, -1 on padding


def check_cu_seqlens(cu_seqlens, n_tokens, device=None):
    """cu_seqlens: an int32/int64 (S + 1,) tensor, starting at 0, non-decreasing, ending at N.
    Returns the offsets as a list of Python ints."""
    if not isinstance(cu_seqlens, torch.Tensor):
        raise ValueError(f"cu_seqlens must be a torch.Tensor of int32 or int64 offsets, "
                         f"got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"cu_seqlens must have shape (S + 1,) with S >= 0, got {tuple(cu_seqlens.shape)}")
    if device is not None and cu_seqlens.device != device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but the tokens are on {device}; "
                         "move it with .to(device)")
    cu = cu_seqlens.tolist()
    if cu[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {cu[0]}")
    if any(b < a for a, b in zip(cu, cu[1:])):
        raise ValueError(f"cu_seqlens must be non-decreasing, got {cu}")
    if cu[-1] != n_tokens:
        raise ValueError(f"cu_seqlens must end at the number of packed tokens N = {n_tokens}, got {cu[-1]}")
    return cu


def packing_from_cu_seqlens(cu_seqlens, n_tokens, device):
    cu = check_cu_seqlens(cu_seqlens, n_tokens, device)
    n_seqs = len(cu) - 1
    lengths = torch.tensor([b - a for a, b in zip(cu, cu[1:])], dtype=torch.long, device=device)
    width = max(max((b - a for a, b in zip(cu, cu[1:])), default=0), 1)
    seq = torch.repeat_interleave(torch.arange(n_seqs, device=device), lengths, output_size=n_tokens)
    starts = torch.tensor(cu[:-1], dtype=torch.long, device=device)
    pos = torch.arange(n_tokens, device=device) - starts[seq]
    return Packing(cu, n_seqs, n_tokens, width, seq * width + pos, seq)


def cu_seqlens_from_position_ids(position_ids):
    """cu_seqlens (S + 1,) int32 from packed `position_ids` (N,) or (1, N) that restart at 0 at the start
    of each sequence and count up by one inside it (what TRL's padding-free collator and verl's
    remove-padding path produce). Empty sequences cannot be expressed this way; use cu_seqlens."""
    check_integer("position_ids", position_ids)
    if position_ids.dim() == 2 and position_ids.shape[0] == 1:
        position_ids = position_ids[0]
    if position_ids.dim() != 1:
        raise ValueError(f"position_ids must have shape (N,) or (1, N) (one packed row), "
                         f"got {tuple(position_ids.shape)}")
    n = position_ids.shape[0]
    if n and int(position_ids[0]) != 0:
        raise ValueError(f"position_ids must start at 0 (the first packed sequence), got {int(position_ids[0])}")
    starts = position_ids == 0
    follows = position_ids[1:] == position_ids[:-1] + 1
    if not bool((starts[1:] | follows).all()):
        t = int((~(starts[1:] | follows)).nonzero()[0]) + 1
        raise ValueError(f"position_ids must restart at 0 or count up by 1; at index {t} got "
                         f"{int(position_ids[t - 1])} then {int(position_ids[t])}")
    offsets = starts.nonzero().squeeze(1).to(torch.int32)
    end = torch.tensor([n], dtype=torch.int32, device=position_ids.device)
    return torch.cat([offsets, end])


# ----------------------------------------------------------------------------------------------------
# Packed per-token inputs


def packed_length(name, x, trailing=0):
    """N of a packed tensor shaped (N, *rest) or (1, N, *rest), `trailing` the number of rest dims."""
    if x.dim() == 2 + trailing and x.shape[0] == 1:
        return x.shape[1]
    if x.dim() == 1 + trailing:
        return x.shape[0]
    rest = "".join(", " + d for d in ("V" if name == "logits" else "H",)[:trailing])
    raise ValueError(f"{name} must have shape (N{rest}) or (1, N{rest}) with cu_seqlens (one packed row), "
                     f"got {tuple(x.shape)}")


def packed_row(name, x, n_tokens):
    """(N,) or (1, N) -> (N,); anything else is a ValueError naming the argument."""
    if x.dim() == 2 and x.shape[0] == 1:
        x = x[0]
    if tuple(x.shape) != (n_tokens,):
        raise ValueError(f"{name} must have shape ({n_tokens},) or (1, {n_tokens}) (one entry per packed "
                         f"token, as cu_seqlens[-1] = {n_tokens}), got {tuple(x.shape)}")
    return x


def _per_sequence(name, x, packing):
    """True when x holds one value per sequence (S,), False when one per token (N,) or (1, N). A 1-D
    tensor of length S == N is ambiguous unless every sequence has one token (then both read alike)."""
    S, N = packing.n_seqs, packing.n_tokens
    if x.dim() != 1 or x.shape[0] != S:
        return False
    if S != N:
        return True
    if all(b - a == 1 for a, b in zip(packing.cu, packing.cu[1:])):
        return False
    raise ValueError(f"{name} of shape ({S},) is ambiguous: there are as many sequences as tokens ({S}) "
                     f"but not one token per sequence; pass per-token {name} as (1, {N}) or per-sequence "
                     f"ones expanded with torch.repeat_interleave(x, lengths)")


def pad_sequence_or_token(name, x, packing):
    """Per-sequence (S,) values as they are; per-token (N,)/(1, N) values padded to (S, T)."""
    if x is None:
        return None
    check_tensor(name, x)
    if _per_sequence(name, x, packing):
        return x
    return packing.pad(packed_row(name, x, packing.n_tokens))


def renumber_segments(segment_ids, valid_packed, packing):
    """Packed segment ids -> ids that start at 0 in every sequence (-1 off the mask). Ids counted over
    the whole packed row (sppo_fast.segment_ids on the (1, N) row) run on across sequences; the shared
    loss stage indexes segments within a row of width T, so each sequence's ids are shifted by their
    minimum. Relative ids, and so the segments, are unchanged: segments never cross a boundary."""
    check_integer("segment_ids", segment_ids)
    ids = packed_row("segment_ids", segment_ids, packing.n_tokens).to(torch.long)
    big = torch.iinfo(torch.long).max
    first = torch.full((packing.n_seqs,), big, dtype=torch.long, device=ids.device)
    first = first.scatter_reduce(0, packing.seq, torch.where(valid_packed, ids, torch.full_like(ids, big)),
                                 reduce="amin")
    shifted = ids - first.gather(0, packing.seq)  # garbage off the mask, replaced by -1 below
    return packing.pad(torch.where(valid_packed, shifted, torch.full_like(ids, -1)), fill=-1)


class PaddedInputs(NamedTuple):
    """The small loss inputs in the padded (S, T) layout."""

    old_logp: torch.Tensor
    advantages: torch.Tensor
    mask: torch.Tensor
    segment_ids: torch.Tensor | None
    ref_logp: torch.Tensor | None
    rollout_is_weights: torch.Tensor | None


def pad_loss_inputs(packing, old_logp, advantages, mask, segment_ids, ref_logp, rollout_is_weights):
    """Checks the packed shapes (each error names its argument) and pads to (S, T)."""
    N = packing.n_tokens
    check_tensor("mask", mask)
    mask_row = packed_row("mask", mask, N)
    valid = mask_row.bool() if mask_row.dtype != torch.bool else mask_row
    check_float("old_logp", old_logp)
    segments = None if segment_ids is None else renumber_segments(segment_ids, valid, packing)
    ref = None if ref_logp is None else packing.pad(packed_row("ref_logp", check_float("ref_logp", ref_logp), N))
    return PaddedInputs(packing.pad(packed_row("old_logp", old_logp, N)),
                        pad_sequence_or_token("advantages", advantages, packing),
                        packing.pad(valid, fill=False), segments, ref,
                        pad_sequence_or_token("rollout_is_weights", rollout_is_weights, packing))


def to_packed_layout(out, packing, like):
    """PolicyLossOutput with logp and entropy mapped back to the packed layout, shaped like `like`."""
    return out._replace(logp=packing.unpad(out.logp).reshape(like.shape),
                        entropy=packing.unpad(out.entropy).reshape(like.shape))


# ----------------------------------------------------------------------------------------------------
# The packed policy losses (called by the public functions when cu_seqlens is given)


def packed_policy_loss(logp, old_logp, advantages, mask, config, *, cu_seqlens, segment_ids=None, entropy=None,
                       ref_logp=None, normalizer=None, rollout_is_weights=None):
    from .losses import aggregate, check_loss_inputs

    check_float("logp", logp)
    packing = packing_from_cu_seqlens(cu_seqlens, packed_length("logp", logp), logp.device)
    row = packed_row("logp", logp, packing.n_tokens)
    padded = pad_loss_inputs(packing, old_logp, advantages, mask, segment_ids, ref_logp, rollout_is_weights)
    ent = None if entropy is None else packing.pad(packed_row("entropy", check_float("entropy", entropy),
                                                              packing.n_tokens))
    plogp = packing.pad(row)
    valid, adv = check_loss_inputs(plogp, padded.old_logp, padded.advantages, padded.mask, config,
                                   segment_ids=padded.segment_ids, entropy=ent, ref_logp=padded.ref_logp,
                                   normalizer=normalizer, rollout_is_weights=padded.rollout_is_weights)
    out = aggregate(plogp, padded.old_logp, adv, valid, config, segment_ids=padded.segment_ids, entropy=ent,
                    ref_logp=padded.ref_logp, normalizer=normalizer,
                    rollout_is_weights=padded.rollout_is_weights)
    return to_packed_layout(out, packing, logp)


def packed_fused_policy_loss(logits, targets, old_logp, advantages, mask, config, *, cu_seqlens, segment_ids,
                             ref_logp, temperature, normalizer, inplace_backward, rollout_is_weights):
    """fused_policy_loss on (N, V) / (1, N, V) packed logits: the kernels run on the packed rows."""
    from ._checks import check_logits_and_targets
    from .ops import token_logprobs

    check_float("logits", logits)
    packing = packing_from_cu_seqlens(cu_seqlens, packed_length("logits", logits, 1), logits.device)
    rows = logits.reshape(packing.n_tokens, logits.shape[-1])
    flat_targets = packed_row("targets", check_integer("targets", targets), packing.n_tokens)
    temperature = check_logits_and_targets(rows, flat_targets, temperature, -100)
    padded, valid, adv = _checked_padded_inputs(packing, logits, old_logp, advantages, mask, config, segment_ids,
                                                ref_logp, normalizer, rollout_is_weights)
    logp, entropy = token_logprobs(rows, flat_targets, temperature=temperature, return_entropy=True,
                                   inplace_backward=inplace_backward)
    return _aggregate_padded(packing, logp, entropy, padded, valid, adv, config, normalizer, targets)


def packed_fused_linear_policy_loss(hidden, weight, targets, old_logp, advantages, mask, config, *, cu_seqlens,
                                    bias, segment_ids, ref_logp, temperature, normalizer, chunk_size,
                                    rollout_is_weights):
    """fused_linear_policy_loss on (N, H) / (1, N, H) packed hidden states, never padding them: the
    one-pass chunking takes whole packed sequences (each a contiguous slice of the rows) or, for long
    sequences and a token-local loss, chunks of packed token rows."""
    from .fused_linear import one_pass_layout, sequence_chunked_policy_loss, token_chunked_policy_loss
    from .losses import expand_rollout_is_weights
    from .ops import _check_linear, _linear_logprobs_of_valid_rows, default_chunk_size

    check_float("hidden", hidden)
    packing = packing_from_cu_seqlens(cu_seqlens, packed_length("hidden", hidden, 1), hidden.device)
    N, T = packing.n_tokens, packing.width
    rows = hidden.reshape(N, hidden.shape[-1])
    flat_targets = packed_row("targets", check_integer("targets", targets), N)
    temperature = _check_linear(rows, weight, bias, flat_targets, temperature, -100, chunk_size)
    padded, valid, adv = _checked_padded_inputs(packing, hidden, old_logp, advantages, mask, config, segment_ids,
                                                ref_logp, normalizer, rollout_is_weights)
    tokens_per_chunk = chunk_size or default_chunk_size(packing.n_seqs * T, weight.shape[0])
    layout = one_pass_layout(rows.dtype, N, T, tokens_per_chunk, config.token_local)
    if layout is None:
        logp, entropy = _linear_logprobs_of_valid_rows(rows.unsqueeze(0), weight, bias, flat_targets.unsqueeze(0),
                                                       packing.unpad(valid).unsqueeze(0), temperature, chunk_size)
        return _aggregate_padded(packing, logp.view(N), entropy.view(N), padded, valid, adv, config, normalizer,
                                 targets)
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    is_weights = expand_rollout_is_weights(padded.rollout_is_weights, valid.shape, torch.float32)
    common = dict(ref_logp=padded.ref_logp, temperature=temperature, normalizer=normalizer, compute_grad=needs_grad,
                  rollout_is_weights=is_weights)
    if layout == "tokens":  # sequences longer than a chunk, token-local loss: chunks of packed rows
        out = token_chunked_policy_loss(rows, weight, bias, flat_targets, padded.old_logp, adv, valid, config,
                                        tokens_per_chunk=tokens_per_chunk, packing=packing, **common)
    else:
        out = sequence_chunked_policy_loss(
            rows, weight, bias, packing.pad(flat_targets.to(torch.long)), padded.old_logp, adv, valid, config,
            segment_ids=padded.segment_ids, seqs_per_chunk=max(1, tokens_per_chunk // T),
            packed=ChunkedPacking(packing.cu, T, packing.source_rows()), **common)
    return to_packed_layout(out, packing, targets)


def _checked_padded_inputs(packing, like, old_logp, advantages, mask, config, segment_ids, ref_logp, normalizer,
                           rollout_is_weights):
    """The padded loss inputs and the (B, T) checks of policy_loss, run before any kernel."""
    from .losses import check_loss_inputs

    padded = pad_loss_inputs(packing, old_logp, advantages, mask, segment_ids, ref_logp, rollout_is_weights)
    stand_in = torch.empty((packing.n_seqs, packing.width), dtype=torch.float32, device=like.device)
    valid, adv = check_loss_inputs(stand_in, padded.old_logp, padded.advantages, padded.mask, config,
                                   segment_ids=padded.segment_ids, entropy=stand_in, ref_logp=padded.ref_logp,
                                   normalizer=normalizer, logp_name="targets",
                                   rollout_is_weights=padded.rollout_is_weights)
    return padded, valid, adv


def _aggregate_padded(packing, logp, entropy, padded, valid, adv, config, normalizer, like):
    from .losses import aggregate

    out = aggregate(packing.pad(logp), padded.old_logp, adv, valid, config, segment_ids=padded.segment_ids,
                    entropy=packing.pad(entropy), ref_logp=padded.ref_logp, normalizer=normalizer,
                    rollout_is_weights=padded.rollout_is_weights)
    return to_packed_layout(out, packing, like)
