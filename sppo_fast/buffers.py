"""Memory for the chunked linear ops: one logits buffer for all chunks, backed by huge pages on CPU.

On a CPU a fresh tensor of tens of MiB comes from mmap and pays a page fault per 4 KiB at its first
write (about 12 ms per 57 MiB on a small machine, more than the softmax kernels spend on it). Reusing
one buffer for every chunk pays that once, and 2 MiB pages (transparent huge pages in madvise mode)
make the once cheap. On GPU the caching allocator already reuses memory: plain torch.empty."""

import math
import mmap

import torch

_HUGE_PAGES = hasattr(mmap, "MADV_HUGEPAGE")
_MIN_BYTES = 16 << 20  # below this the faults cost little and ATen's allocator is fine


def empty_large(shape, dtype, device):
    """torch.empty(shape), on 2 MiB pages where the kernel allows it for a large CPU tensor."""
    nbytes = math.prod(shape) * dtype.itemsize
    if device.type != "cpu" or nbytes < _MIN_BYTES or not _HUGE_PAGES:
        return torch.empty(shape, dtype=dtype, device=device)
    # private: a shared anonymous mapping is shmem, which THP leaves alone; unmapped when the tensor dies
    pages = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    pages.madvise(mmap.MADV_HUGEPAGE)
    return torch.frombuffer(pages, dtype=dtype).view(shape)


def logits_into(buffer, h, weight, bias):
    """h @ weight.T (+ bias) written into the first len(h) rows of `buffer`, which it returns."""
    out = buffer[:h.shape[0]]
    if bias is None:
        return torch.mm(h, weight.T, out=out)
    return torch.addmm(bias, h, weight.T, out=out)
