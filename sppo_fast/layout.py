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

from ._checks import check_float, check_integer, check_shape, check_tensor
from .parallel import sum_over_ranks


class BatchLayout(NamedTuple):
    n_seqs: int  # S: rows of the grid
    width: int  # T: columns of the grid (packed: the longest sequence, at least 1)
    n_rows: int  # N: rows of the vocabulary-sized work (this rank's, when the sequences are split)
    cell_of_row: torch.Tensor | None = None  # mapped: (N,) int64, s * T + t of each row (increasing)
    seq_of_row: torch.Tensor | None = None  # mapped: (N,) int64, the sequence of each row
    cu: list | None = None  # packed: the S + 1 offsets of this rank's rows, Python ints
    context: object | None = None  # the process group the sequences are split over (parallel.py), or None

    @property
    def packed(self):
        return self.cu is not None

    @property
    def mapped(self):
        """Rows land in the grid through cell_of_row (packed, or a slice of each sequence)."""
        return self.cell_of_row is not None

    def to_grid(self, x):
        """(N, ...) rows -> (S, T, ...) grid, 0 where no row lands; differentiable in x. When the sequences
        are split, every rank's rows land: the grid is summed over the group (sum_over_ranks)."""
        if not self.mapped:
            return x.reshape(self.n_seqs, self.width, *x.shape[1:])
        out = x.new_zeros((self.n_seqs * self.width, *x.shape[1:])).index_copy(0, self.cell_of_row, x)
        return sum_over_ranks(out, self.context).reshape(self.n_seqs, self.width, *x.shape[1:])

    def to_rows(self, y):
        """(S, T, ...) grid -> (N, ...) rows (this rank's)."""
        flat = y.reshape(self.n_seqs * self.width, *y.shape[2:])
        return flat if not self.mapped else flat.index_select(0, self.cell_of_row)

    def to_caller(self, y, shape):
        """A (S, T) grid tensor in the caller's per-token `shape` ((B, T), or packed (N,) or (1, N))."""
        return y if not self.mapped else self.to_rows(y).reshape(shape)

    def token_rows(self, x, targets):
        """The (N, V|H) rows of the logits or hidden states (unit stride along the last dim) and the (N,)
        int64 targets, from either layout (checked before)."""
        return flat_rows(x), flat_targets(targets)

    def input_rows(self, old_logp, advantages, mask, segment_ids, ref_logp, rollout_is_weights, entropy=None, *,
                   split=False):
        """The caller's loss inputs, checked, each error naming its argument, as two dicts: per-token ones
        as this rank's (N,) rows, per-sequence ones (S,) as they are. No collective: a bad argument is
        found before the ranks meet (parallel.agree). Padded inputs pass as they are, all in the first
        dict (the loss stage checks their (B, T) shapes), unless `split`: the rank's slice of sequences
        that split_layout will place."""
        given = dict(old_logp=old_logp, advantages=advantages, mask=mask, segment_ids=segment_ids,
                     ref_logp=ref_logp, rollout_is_weights=rollout_is_weights, entropy=entropy)
        if not self.mapped and not split:
            return given, {}
        checks = dict(mask=check_tensor, segment_ids=check_integer)
        rows, per_sequence = {}, {}
        for name, x in given.items():
            if x is None:
                continue
            checks.get(name, check_float)(name, x)
            if name in ("advantages", "rollout_is_weights") and self._per_sequence(name, x, split):
                per_sequence[name] = x
            else:
                rows[name] = self._row(name, x)
        rows["mask"] = rows["mask"].bool() if rows["mask"].dtype != torch.bool else rows["mask"]
        return rows, per_sequence

    def inputs_to_grid(self, inputs):
        """input_rows' output on the (S, T) grid, as the tuple (old_logp, advantages, mask, segment_ids,
        ref_logp, rollout_is_weights, entropy); split sequences: one all-reduce for all of them."""
        rows, per_sequence = inputs
        names = ("old_logp", "advantages", "mask", "segment_ids", "ref_logp", "rollout_is_weights", "entropy")
        if not self.mapped:
            return tuple(rows[n] for n in names)
        per_token = [n for n in names if n in rows]
        # fp64 carries every dtype here exactly (ids < 2**53, bools, fp32 and fp64 values), and each cell
        # of the sum is one rank's value plus zeros
        grid = self.to_grid(torch.stack([rows[n].to(torch.float64) for n in per_token], 1))
        out = {n: per_sequence.get(n) for n in names}
        out.update({n: grid[..., k].to(rows[n].dtype) for k, n in enumerate(per_token)})
        if out["segment_ids"] is not None:
            out["segment_ids"] = _renumber_segments(out["segment_ids"], out["mask"])
        return tuple(out[n] for n in names)

    def _row(self, name, x):
        """A per-token input as (N,) rows: packed (N,) or (1, N); a split padded batch (B, T_rank)."""
        if self.packed:
            return packed_row(name, x, self.n_rows)
        check_shape(name, x, (self.n_seqs, self.n_rows // max(self.n_seqs, 1)), "this rank's slice (B, T)")
        return x.reshape(-1)

    def _per_sequence(self, name, x, split):
        """Whether a per-sequence-or-token input is per sequence: (S,) where that cannot mean (N,) rows.
        Split sequences: (S,) always, as every rank must read it alike (per token is (B, T_rank) or (1, N))."""
        if x.dim() != 1 or x.shape[0] != self.n_seqs:
            return False
        if not self.packed or split:
            return True
        if self.n_seqs != self.n_rows:
            return True
        if any(b - a != 1 for a, b in zip(self.cu, self.cu[1:])):
            raise ValueError(f"{name} of shape ({self.n_seqs},) is ambiguous: there are as many sequences as "
                             f"tokens ({self.n_seqs}) but not one token per sequence; pass per-token {name} as "
                             f"(1, {self.n_rows}) or per-sequence ones expanded with torch.repeat_interleave(x, "
                             f"lengths)")
        return False  # one token per sequence: both readings agree


def _renumber_segments(ids, valid):
    """Segment ids on the grid -> ids that start at 0 in every sequence (-1 off the mask). Ids counted over
    a whole packed row run on across sequences; the loss stage indexes segments within a grid row, so each
    sequence's ids are shifted by their minimum. Segments never cross a sequence boundary, so relative
    ids, and the segments, are unchanged."""
    big = torch.iinfo(torch.long).max
    first = torch.where(valid, ids, torch.full_like(ids, big)).amin(1, keepdim=True) if ids.numel() else ids
    return torch.where(valid, ids - first, torch.full_like(ids, -1))


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
    return _mapped_layout(lengths, [0] * len(lengths), max(max(lengths, default=0), 1), n_tokens, device, cu)


def sequence_lengths(layout):
    """This rank's tokens of each sequence: what the ranks of a context split exchange (parallel.agree)."""
    if layout.packed:
        return [b - a for a, b in zip(layout.cu, layout.cu[1:])]
    return [layout.width] * layout.n_seqs


def split_layout(layout, every_lengths, rank, group, device):
    """The layout of this rank's slice of every sequence, the slices in rank order (`every_lengths[r][s]`:
    rank r's tokens of sequence s, as exchanged): the grid holds the whole sequences."""
    lengths = every_lengths[rank]
    offsets = [sum(theirs[s] for theirs in every_lengths[:rank]) for s in range(len(lengths))]
    width = max(max((sum(col) for col in zip(*every_lengths)), default=0), 1)
    return _mapped_layout(lengths, offsets, width, layout.n_rows, device, layout.cu, group)


def _mapped_layout(lengths, offsets, width, n_tokens, device, cu=None, context=None):
    """Rows that hold lengths[s] tokens of sequence s, one sequence after the other, starting at position
    offsets[s] of it, on a (S, width) grid."""
    S = len(lengths)
    as_tensor = lambda values: torch.tensor(values, dtype=torch.long, device=device)
    seq = torch.repeat_interleave(torch.arange(S, device=device), as_tensor(lengths), output_size=n_tokens)
    row_starts = torch.cumsum(as_tensor([0] + lengths[:-1]), 0) if S else as_tensor([])
    position = torch.arange(n_tokens, device=device) - row_starts[seq] + as_tensor(offsets)[seq]
    return BatchLayout(S, width, n_tokens, seq * width + position, seq, cu, context)


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
