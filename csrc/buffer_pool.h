// A reuse pool for the logits-sized gradient buffers of the CPU backward (the CUDA caching
// allocator's idea, on CPU): see buffer_pool.cpp.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace sppo_fast {

// An uninitialised contiguous tensor. Large ones (>= 8 MiB) come from the pool: a block freed by an
// earlier such tensor of about the same size (at most 1/8 larger) when there is one, else a new block
// backed by 2 MiB huge pages where the kernel allows (THP "madvise" mode). When the tensor dies its
// block goes back to the pool, which keeps the two most recently freed blocks.
at::Tensor empty_pooled(at::IntArrayRef sizes, const at::TensorOptions& options);

// Bytes held by freed blocks waiting for reuse.
int64_t pool_cached_bytes();

// Frees every block waiting for reuse (blocks of live tensors are untouched); returns the bytes freed.
int64_t pool_release();

}  // namespace sppo_fast
