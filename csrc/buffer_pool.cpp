// The reuse pool of buffer_pool.h.
//
// Why: on a CPU a fresh tensor of hundreds of MiB comes from mmap, and its first write pays a page fault
// and the kernel's zeroing of every page. For the backward's (N, V) gradient that cost more than the
// kernel itself: on the 2-core AMD EPYC VM, bf16 2048 x 151936 (594 MiB) took 817 ms of CPU per call into
// a fresh buffer and 263 ms in place, the same sweep. A trainer frees the gradient of the logits once the
// lm_head's backward has used it, and asks for one of the same size at the next micro-batch, so keeping
// the freed block turns every call after the first into the in-place cost. Memory: between calls the
// pool holds what the last gradient held (1x the logits), as the CUDA caching allocator does on GPU;
// pool_release() (sppo_fast.buffers.empty_cache()) gives it back, SPPO_FAST_NO_BUFFER_POOL=1 disables it.
#include "buffer_pool.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>

#include <sys/mman.h>

#include <cstdlib>
#include <mutex>
#include <new>
#include <vector>

namespace sppo_fast {
namespace {

constexpr size_t kHugePage = size_t{2} << 20;
constexpr size_t kMinPooled = 4 * kHugePage;  // below this ATen's allocator is cheap enough
constexpr size_t kMaxCached = 2;              // freed blocks kept (e.g. policy and reference shapes)

struct Block {
  void* data;
  size_t capacity;  // bytes, a multiple of kHugePage
};

class Pool {
 public:
  // A block of at least `bytes` (and at most 1/8 more, so a reused block never holds much more memory
  // than a fresh one would), from the cache or new.
  Block take(size_t bytes) {
    const size_t capacity = (bytes + kHugePage - 1) / kHugePage * kHugePage;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      for (auto it = free_.rbegin(); it != free_.rend(); ++it) {  // most recently freed first
        if (it->capacity >= capacity && it->capacity <= capacity + capacity / 8) {
          const Block found = *it;
          free_.erase(std::next(it).base());
          return found;
        }
      }
    }
    void* data = std::aligned_alloc(kHugePage, capacity);
    if (data == nullptr) {  // perhaps only the cached blocks are in the way
      release();
      data = std::aligned_alloc(kHugePage, capacity);
      if (data == nullptr) throw std::bad_alloc();
    }
    madvise(data, capacity, MADV_HUGEPAGE);  // advisory: without THP the pages are simply 4 KiB
    return {data, capacity};
  }

  void give(const Block& block) {
    void* evicted = nullptr;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      free_.push_back(block);
      if (free_.size() > kMaxCached) {
        evicted = free_.front().data;
        free_.erase(free_.begin());
      }
    }
    std::free(evicted);  // outside the lock; free(nullptr) is a no-op
  }

  int64_t cached_bytes() {
    std::lock_guard<std::mutex> lock(mutex_);
    size_t total = 0;
    for (const Block& b : free_) total += b.capacity;
    return static_cast<int64_t>(total);
  }

  int64_t release() {
    std::vector<Block> blocks;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      blocks.swap(free_);
    }
    size_t total = 0;
    for (const Block& b : blocks) {
      total += b.capacity;
      std::free(b.data);
    }
    return static_cast<int64_t>(total);
  }

 private:
  std::mutex mutex_;
  std::vector<Block> free_;  // oldest first
};

// Never destroyed: tensors that die during interpreter exit may still hand their blocks back.
Pool& pool() {
  static Pool* instance = new Pool();
  return *instance;
}

}  // namespace

at::Tensor empty_pooled(at::IntArrayRef sizes, const at::TensorOptions& options) {
  int64_t numel = 1;
  for (int64_t s : sizes) numel *= s;
  const size_t bytes = static_cast<size_t>(numel) * options.dtype().itemsize();
  static const bool enabled = std::getenv("SPPO_FAST_NO_BUFFER_POOL") == nullptr;
  if (!enabled || bytes < kMinPooled) return at::empty(sizes, options);
  const Block block = pool().take(bytes);
  return at::from_blob(block.data, sizes, [block](void*) { pool().give(block); }, options);
}

int64_t pool_cached_bytes() { return pool().cached_bytes(); }

int64_t pool_release() { return pool().release(); }

}  // namespace sppo_fast
