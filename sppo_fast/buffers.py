"""What the two chunked linear ops (linear_logprobs' backward, the one-pass fused_linear_policy_loss)
share: one buffer for every chunk's logits, and the gradients accumulated chunk by chunk.

Every chunk's logits go into one buffer.

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
