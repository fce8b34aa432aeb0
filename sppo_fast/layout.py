"""The batch layout, decided once at the API boundary: where each row of the vocabulary-sized work (a
row of logits or of hidden states) sits in the (S, T) grid of the loss stage, and the way back to the
caller's shapes.

Two layouts reach the public functions (docs/api.md §3.9):
- padded: (B, T) per-token tensors and (B, T, V) logits or (B, T, H) hidden states; row b * T + t is
  grid cell (b, t), so the map is the identity;
- packed (padding-free, as verl's `use_remove_padding` and TRL's `padding_free` feed a model): the S
  sequences concatenated into N rows, `cu_seqlens` (S + 1 offsets, flash-attention's convention) or
  `position_ids` marking where each starts; sequence s is row s of a (S, T_max) grid.

Only the small per-token tensors (log-probs, masks, advantages: a few scalars per position) ever move
between the two; the (N, V) logits and (N, H) hidden states stay as the caller laid them out. Reading
`cu_seqlens` needs its values on the host: one device sync per packed call, so the packed path is not
traced by torch.compile."""

from typing import NamedTuple

import torch

from ._checks import check_float, check_integer, check_tensor


class BatchLayout(NamedTuple):
    n_seqs: int  # S: rows of the grid
    width: int  # T: columns of the grid (packed: the longest sequence, at least 1)
    n_rows: int  # N: rows of the vocabulary-sized work
    cell_of_row: torch.Tensor | None = None  # packed: (N,) int64, s * T + t of each row (increasing)
    seq_of_row: torch.Tensor | None = None  # packed: (N,) int64, the sequence of each row
    cu: list | None = None  # packed: the S + 1 offsets, Python ints

    @property
    def packed(self):
        return self.cell_of_row is not None

    def to_grid(self, x, fill=0):
        """(N, ...) rows -> (S, T, ...) grid, `fill` where no row lands; differentiable in x."""
        if not self.packed:
            return x.reshape(self.n_seqs, self.width, *x.shape[1:])
        out = x.new_full((self.n_seqs * self.width, *x.shape[1:]), fill)
        return out.index_copy(0, self.cell_of_row, x).reshape(self.n_seqs, self.width, *x.shape[1:])

    def to_rows(self, y):
        """(S, T, ...) grid -> (N, ...) rows."""
        flat = y.reshape(self.n_seqs * self.width, *y.shape[2:])
        return flat if not self.packed else flat.index_select(0, self.cell_of_row)

    def to_caller(self, y, shape):
        """A (S, T) grid tensor in the caller's per-token `shape` ((B, T), or packed (N,) or (1, N))."""
        return y if not self.packed else self.to_rows(y).reshape(shape)

    def token_rows(self, x, targets):
        """The (N, V|H) rows of the logits or hidden states (unit stride along the last dim) and the (N,)
        int64 targets, from either layout (checked before)."""
        return flat_rows(x), flat_targets(targets)

    def grid_inputs(self, old_logp, advantages, mask, segment_ids, ref_logp, rollout_is_weights, entropy=None):
        """The caller's loss inputs on the grid, in that order. Padded inputs pass as they are (the loss
        stage checks their (B, T) shapes); packed ones are checked here, each error naming its argument."""
        if not self.packed:
            return old_logp, advantages, mask, segment_ids, ref_logp, rollout_is_weights, entropy
        N = self.n_rows
        mask_row = packed_row("mask", check_tensor("mask", mask), N)
        valid = mask_row.bool() if mask_row.dtype != torch.bool else mask_row

        def per_token(name, x):
            return None if x is None else self.to_grid(packed_row(name, check_float(name, x), N))

        segments = None if segment_ids is None else self._renumber_segments(segment_ids, valid)
        return (per_token("old_logp", old_logp), self._sequence_or_token("advantages", advantages),
                self.to_grid(valid, fill=False), segments, per_token("ref_logp", ref_logp),
                self._sequence_or_token("rollout_is_weights", rollout_is_weights), per_token("entropy", entropy))

    def _sequence_or_token(self, name, x):
        """Per-sequence (S,) values as they are; per-token (N,)/(1, N) values on the grid."""
        if x is None:
            return None
        check_tensor(name, x)
        S, N = self.n_seqs, self.n_rows
        if x.dim() == 1 and x.shape[0] == S:
            if S != N:
                return x
            if any(b - a != 1 for a, b in zip(self.cu, self.cu[1:])):
                raise ValueError(f"{name} of shape ({S},) is ambiguous: there are as many sequences as tokens "
                                 f"({S}) but not one token per sequence; pass per-token {name} as (1, {N}) or "
                                 f"per-sequence ones expanded with torch.repeat_interleave(x, lengths)")
        return self.to_grid(packed_row(name, x, N))  # (one token per sequence: both readings agree)

    def _renumber_segments(self, segment_ids, valid_rows):
        """Packed segment ids -> ids that start at 0 in every sequence (-1 off the mask). Ids counted over
        the whole packed row (sppo_fast.segment_ids on the (1, N) row) run on across sequences; the loss
        stage indexes segments within a grid row, so each sequence's ids are shifted by their minimum.
        Relative ids, and so the segments, are unchanged: segments never cross a sequence boundary."""
        check_integer("segment_ids", segment_ids)
        ids = packed_row("segment_ids", segment_ids, self.n_rows).to(torch.long)
        big = torch.iinfo(torch.long).max
        first = torch.full((self.n_seqs,), big, dtype=torch.long, device=ids.device)
        first = first.scatter_reduce(0, self.seq_of_row, torch.where(valid_rows, ids, torch.full_like(ids, big)),
                                     reduce="amin")
        shifted = ids - first.gather(0, self.seq_of_row)  # garbage off the mask, replaced by -1 below
        return self.to_grid(torch.where(valid_rows, shifted, torch.full_like(ids, -1)), fill=-1)


def flat_rows(x):
    """(N, width) view of (..., width) with unit stride along the last dim; copies only when it must."""
    x = x.reshape(-1, x.shape[-1])
    return x if x.stride(-1) == 1 or x.shape[0] == 0 else x.contiguous()


def flat_targets(targets):
    return targets.reshape(-1).to(torch.long).contiguous()


def batch_layout(name, x, cu_seqlens=None, trailing=0):
    """The layout of a call whose main tensor `x` (named `name`) has `trailing` dims after the tokens:
    0 for log-probs, 1 for logits (V) and hidden states (H)."""
    if cu_seqlens is None:
        if x.dim() != 2 + trailing:
            rest = ", " + ("V" if name == "logits" else "H") if trailing else ""
            raise ValueError(f"{name} must have shape (B, T{rest}), got {tuple(x.shape)}")
        B, T = x.shape[:2]
        return BatchLayout(B, T, B * T)
    n = packed_length(name, x, trailing)
    return packed_layout(cu_seqlens, n, x.device)


def packed_layout(cu_seqlens, n_tokens, device):
    cu = check_cu_seqlens(cu_seqlens, n_tokens, device)
    lengths = [b - a for a, b in zip(cu, cu[1:])]
    S, T = len(lengths), max(max(lengths, default=0), 1)
    seq = torch.repeat_interleave(torch.arange(S, device=device), torch.tensor(lengths, dtype=torch.long,
                                                                               device=device),
                                  output_size=n_tokens)
    starts = torch.tensor(cu[:-1], dtype=torch.long, device=device)
    cell = seq * T + torch.arange(n_tokens, device=device) - starts[seq]
    return BatchLayout(S, T, n_tokens, cell, seq, cu)


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


def packed_length(name, x, trailing=0):
    """N of a packed tensor shaped (N, *rest) or (1, N, *rest), `trailing` the number of rest dims."""
    if x.dim() == 2 + trailing and x.shape[0] == 1:
        return x.shape[1]
    if x.dim() == 1 + trailing:
        return x.shape[0]
    rest = ", " + ("V" if name == "logits" else "H") if trailing else ""
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
