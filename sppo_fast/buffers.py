"""The chunked linear ops write every chunk's logits into one buffer.

On a CPU a fresh tensor of tens of MiB comes from mmap and pays a page fault per 4 KiB at its first
write (about 12 ms per 57 MiB on the 2-core machine, as much as the softmax kernels spend on it); one
buffer reused by every chunk pays that once. (Backing it with huge pages through madvise was tried:
no faster in the median, and much slower when the kernel had to compact memory to find them.) On GPU
the caching allocator reuses memory anyway."""

import torch


def logits_buffer(hidden, weight, rows):
    """An uninitialised (rows, V) buffer for the logits of chunks of at most `rows` rows of hidden."""
    return torch.empty((rows, weight.shape[0]), dtype=hidden.dtype, device=hidden.device)


def logits_into(buffer, h, weight, bias):
    """h @ weight.T (+ bias) written into the first len(h) rows of `buffer`, which it returns."""
    out = buffer[:h.shape[0]]
    if bias is None:
        return torch.mm(h, weight.T, out=out)
    return torch.addmm(bias, h, weight.T, out=out)
