"""Subsentence segments for SSPO (docs/api.md §3.3): a boundary token (usually a newline) closes its segment."""

import torch

from ._checks import check_integer, check_same_device, check_shape, check_tensor


def segment_ids(tokens, boundary_ids, *, mask=None):
    """`segment_ids[b, t]` counts the boundary tokens strictly before t among masked positions of
    sequence b; -1 where mask is 0. Returns (B, T) int64."""
    check_integer("tokens", tokens)
    if tokens.dim() != 2:
        raise ValueError(f"tokens must have shape (B, T), got {tuple(tokens.shape)}")
    if mask is None:
        valid = torch.ones_like(tokens, dtype=torch.bool)
    else:
        check_shape("mask", check_tensor("mask", mask), tokens.shape, "the shape of tokens")
        check_same_device(tokens=tokens, mask=mask)
        valid = mask.bool()
    boundaries = _as_id_tensor(boundary_ids, tokens.device)
    closes = (torch.isin(tokens, boundaries) & valid).to(torch.long)
    before = torch.cumsum(closes, dim=1) - closes  # exclusive: the boundary belongs to its own segment
    return torch.where(valid, before, torch.full_like(before, -1))


def _as_id_tensor(boundary_ids, device):
    if isinstance(boundary_ids, torch.Tensor):
        check_integer("boundary_ids", boundary_ids)
        return boundary_ids.reshape(-1).to(device=device, dtype=torch.long)
    if isinstance(boundary_ids, int):
        boundary_ids = [boundary_ids]
    try:
        ids = [int(i) for i in boundary_ids]
    except (TypeError, ValueError):
        raise TypeError("boundary_ids must be an int, a sequence of ints or an integer tensor, "
                        f"got {type(boundary_ids).__name__}") from None
    if any(not float(i).is_integer() for i in boundary_ids):
        raise TypeError("boundary_ids must hold integers")
    return torch.tensor(ids, dtype=torch.long, device=device)


def newline_token_ids(tokenizer):
    """Sorted ids whose decoded text contains a newline: the SSPO segment boundaries of a tokenizer."""
    if not hasattr(tokenizer, "decode"):
        raise TypeError(f"tokenizer must have a decode method (a Hugging Face tokenizer), "
                        f"got {type(tokenizer).__name__}")
    size = len(tokenizer) if hasattr(tokenizer, "__len__") else tokenizer.vocab_size
    return sorted(i for i in range(size) if "\n" in tokenizer.decode([i]))
