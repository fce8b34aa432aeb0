"""Memory reuse on CPU: the native backward's pool of logits-sized gradient buffers (its cache is
inspected and emptied here), and what the two chunked linear ops (linear_logprobs' backward, the
one-pass fused_linear_policy_loss) share: one buffer for every chunk's logits, and the gradients
accumulated chunk by chunk.

The (N, V) gradient of token_logprobs' backward comes from a pool kept by the native extension
(csrc/buffer_pool.cpp): a freed gradient's block is reused by the next one of about its size, as the
CUDA caching allocator does, because a fresh one pays a page fault and the kernel's zeroing per page
(on bf16 2048 x 151936, 2.9x the time of the backward's own sweep on the 2-core AMD EPYC VM).
Between calls the pool holds at most two freed blocks; `empty_cache()` gives them back.

Every chunk's logits go into one buffer.

On a CPU a fresh tensor of tens of MiB comes from mmap and pays a page fault per 4 KiB at its first
write (about 12 ms per 57 MiB on the 2-core machine, as much as the softmax kernels spend on it); one
buffer reused by every chunk pays that once. (Backing it with huge pages through madvise was tried:
no faster in the median, and much slower when the kernel had to compact memory to find them.) On GPU
the caching allocator reuses memory anyway."""

import torch


def _native():
    from . import dispatch

    return dispatch.load("native")[0]


def cached_bytes():
    """Bytes the native backend holds in freed gradient buffers kept for reuse (0 without it)."""
    native = _native()
    return 0 if native is None else native.cached_buffer_bytes()


def empty_cache():
    """Frees the gradient buffers the native backend keeps for reuse, as torch.cuda.empty_cache() does
    for CUDA's caching allocator; returns the bytes freed. Buffers of live tensors are untouched."""
    native = _native()
    return 0 if native is None else native.release_cached_buffers()


def logits_buffer(hidden, weight, rows):
    """An uninitialised (rows, V) buffer for the logits of chunks of at most `rows` rows of hidden."""
    return torch.empty((rows, weight.shape[0]), dtype=hidden.dtype, device=hidden.device)


def logits_into(buffer, h, weight, bias):
    """h @ weight.T (+ bias) written into the first len(h) rows of `buffer`, which it returns."""
    out = buffer[:h.shape[0]]
    if bias is None:
        return torch.mm(h, weight.T, out=out)
    return torch.addmm(bias, h, weight.T, out=out)


class LinearGrads:
    """The gradients of hidden, weight and bias of `logits = hidden @ weight.T + bias`, accumulated chunk
    by chunk (weight and bias in fp32). The weight's is never zeroed: the first chunk's matmul writes
    it (beta=0), which saves a pass over V x H."""

    def __init__(self, hidden, weight, bias):
        self.lm_head = weight
        self.hidden = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device)
        self.weight = torch.empty(weight.shape, dtype=torch.float32, device=weight.device)
        self.bias = None if bias is None else torch.zeros(bias.shape, dtype=torch.float32, device=bias.device)
        self.chunks = 0

    def add_chunk(self, grad_logits, h, dest, rows=None):
        """grad_logits (n, V) of the chunk whose hidden rows are h (n, H); its hidden gradient goes to
        `dest`, a view of self.hidden: all of it, or (rows given) dest[rows] and zeros elsewhere."""
        grad_h = (grad_logits @ self.lm_head).to(self.hidden.dtype)
        if rows is None:
            dest.copy_(grad_h)
        else:
            dest.zero_().index_copy_(0, rows, grad_h)
        beta = 1 if self.chunks else 0
        self.weight.addmm_(grad_logits.T.to(torch.float32), h.to(torch.float32), beta=beta)
        if self.bias is not None:
            self.bias += grad_logits.sum(0, dtype=torch.float32)
        self.chunks += 1

    def result(self):
        """(grad_hidden, grad_weight, grad_bias or None), weight and bias in the weight's dtype."""
        if not self.chunks:
            self.weight.zero_()
        dtype = self.lm_head.dtype
        return self.hidden, self.weight.to(dtype), None if self.bias is None else self.bias.to(dtype)
