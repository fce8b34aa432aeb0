"""The native backward's pool of logits-sized gradient buffers: how much it holds, and a way to empty it.

The (N, V) gradient of token_logprobs' backward comes from a pool kept by the native extension
(csrc/buffer_pool.cpp): a freed gradient's block is reused by the next one of about its size, as the
CUDA caching allocator does, because a fresh one pays a page fault and the kernel's zeroing per page
(on bf16 2048 x 151936, 2.9x the time of the backward's own sweep on the 2-core AMD EPYC VM).
Between calls the pool holds at most two freed blocks; `empty_cache()` gives them back. (The linear
path's one logits buffer per call is sppo_fast.chunks'.)"""

from . import dispatch


def _native():
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
