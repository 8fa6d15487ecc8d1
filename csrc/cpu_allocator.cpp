// A caching allocator for large CPU tensors, for training: torch.ops.srlm_C.use_caching_cpu_allocator.
//
// PyTorch has no caching allocator on the CPU: every tensor is malloc'd and freed, and glibc keeps
// freed memory in its heap. One DPO step on SmolLM2 allocates thousands of activations and
// temporaries of a few sizes with gradients and optimizer state between them; the heap ends up in
// pieces the next step's activations do not fit, and the resident memory settles ~1.5 GB above what
// the live tensors hold. Handing every large block back to the OS (a low mmap threshold) fixes the
// memory but faults every page in again: 15-20% slower steps.
//
// This allocator does what CUDA's does: tensors of kMinBytes and more get whole mappings (sizes
// rounded to 64 KiB, starts 2 MiB aligned so transparent huge pages can back them where the kernel
// allows: one fault per 2 MiB), and a freed block goes to a cache keyed by its size, where the next
// tensor of that size (the same activation of the next layer or step) takes it without a fault.
// The cache holds at most `max_cached` bytes; past that, freed blocks are unmapped, largest cached
// first. Smaller tensors go to the allocator that was installed before (glibc). Allocations are
// reported to the profiler like the default allocator's.
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <sys/mman.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <map>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace {

constexpr size_t kGranule = size_t{64} << 10;  // block sizes are multiples of 64 KiB
constexpr size_t kHuge = size_t{2} << 20;      // blocks start on a 2 MiB boundary
constexpr size_t kMinBytes = size_t{4} << 20;

size_t round_up(size_t n, size_t m) { return (n + m - 1) / m * m; }

class CachingCPUAllocator final : public c10::Allocator {
 public:
  CachingCPUAllocator(c10::Allocator* fallback, size_t max_cached)
      : fallback_(fallback), fallback_free_(fallback->raw_deleter()), max_cached_(max_cached) {
    TORCH_CHECK(fallback_free_, "srlm_C caching CPU allocator: the installed CPU allocator has no raw deleter");
  }

  c10::DataPtr allocate(size_t n) override {
    if (n < kMinBytes) return fallback_->allocate(n);
    const size_t size = round_up(n, kGranule);
    void* data = nullptr;
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = free_.find(size);
      if (it != free_.end()) {
        data = it->second;
        free_.erase(it);
        cached_ -= size;
      }
    }
    const bool miss = !data;
    if (miss) data = map(size);  // outside the lock: page-table work
    size_t allocated, reserved;
    {
      std::lock_guard<std::mutex> lock(mu_);
      maps_ += miss;
      sizes_[data] = size;
      allocated_ += size;
      peak_ = std::max(peak_, allocated_);
      allocated = allocated_, reserved = allocated_ + cached_;
    }
    c10::reportMemoryUsageToProfiler(data, static_cast<int64_t>(size), allocated, reserved,
                                     c10::Device(c10::DeviceType::CPU));
    return {data, data, &release, c10::Device(c10::DeviceType::CPU)};
  }

  // Data and context are one pointer, so torch's raw_allocate users (oneDNN) free through this,
  // small blocks included: those go on to the fallback's deleter.
  c10::DeleterFnPtr raw_deleter() const override { return &release; }

  void copy_data(void* dest, const void* src, std::size_t count) const override { std::memcpy(dest, src, count); }

  // Bytes in live blocks, their high-water mark since the last reset, bytes cached, blocks mapped
  // (cache misses) and unmapped (evictions) so far.
  std::vector<int64_t> stats(bool reset_peak) {
    std::lock_guard<std::mutex> lock(mu_);
    std::vector<int64_t> s{static_cast<int64_t>(allocated_), static_cast<int64_t>(peak_), static_cast<int64_t>(cached_),
                           static_cast<int64_t>(maps_), static_cast<int64_t>(unmaps_)};
    if (reset_peak) peak_ = allocated_;
    return s;
  }

  void set_max_cached(size_t bytes) {
    std::lock_guard<std::mutex> lock(mu_);
    max_cached_ = bytes;
    trim_locked();
  }

 private:
  static void* map(size_t size) {
    // Over-map by 2 MiB and cut the ends off, so the block starts on a 2 MiB boundary.
    const size_t span = size + kHuge;
    char* p = static_cast<char*>(mmap(nullptr, span, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
    TORCH_CHECK(p != MAP_FAILED, "srlm_C caching CPU allocator: out of memory mapping ", size, " bytes");
    char* start = reinterpret_cast<char*>(round_up(reinterpret_cast<uintptr_t>(p), kHuge));
    if (start > p) munmap(p, start - p);
    if (p + span > start + size) munmap(start + size, p + span - (start + size));
    madvise(start, size, MADV_HUGEPAGE);  // a hint: ignored where THP is off
    return start;
  }

  static void release(void* data) { instance->give_back(data); }

  void give_back(void* data) {
    size_t size, allocated, reserved;
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = sizes_.find(data);
      if (it == sizes_.end()) {  // a small block, raw-allocated through the fallback
        fallback_free_(data);
        return;
      }
      size = it->second;
      sizes_.erase(it);
      allocated_ -= size;
      free_.emplace(size, data);
      cached_ += size;
      trim_locked();
      allocated = allocated_, reserved = allocated_ + cached_;
    }
    c10::reportMemoryUsageToProfiler(data, -static_cast<int64_t>(size), allocated, reserved,
                                     c10::Device(c10::DeviceType::CPU));
  }

  void trim_locked() {
    while (cached_ > max_cached_ && !free_.empty()) {
      auto it = std::prev(free_.end());  // the largest cached block
      munmap(it->second, it->first);
      ++unmaps_;
      cached_ -= it->first;
      free_.erase(it);
    }
  }

  c10::Allocator* fallback_;
  c10::DeleterFnPtr fallback_free_;
  size_t max_cached_;
  std::mutex mu_;
  std::multimap<size_t, void*> free_;  // cached blocks by size
  std::unordered_map<void*, size_t> sizes_;  // live blocks' sizes
  size_t allocated_ = 0, peak_ = 0, cached_ = 0, maps_ = 0, unmaps_ = 0;

 public:
  static CachingCPUAllocator* instance;
};

CachingCPUAllocator* CachingCPUAllocator::instance = nullptr;

// Installs the allocator (once; later calls change the cache bound). Tensors allocated before keep
// their own deleters, so they are freed where they came from.
void use_caching_cpu_allocator(int64_t max_cached_mb) {
  TORCH_CHECK(max_cached_mb >= 0, "srlm_C::use_caching_cpu_allocator: max_cached_mb must be >= 0, got ", max_cached_mb);
  const size_t bytes = static_cast<size_t>(max_cached_mb) << 20;
  static std::mutex install;
  std::lock_guard<std::mutex> lock(install);
  if (!CachingCPUAllocator::instance) {
    CachingCPUAllocator::instance = new CachingCPUAllocator(c10::GetCPUAllocator(), bytes);  // lives as long as the process
    c10::SetCPUAllocator(CachingCPUAllocator::instance, /*priority=*/100);
    TORCH_CHECK(c10::GetCPUAllocator() == CachingCPUAllocator::instance,
                "srlm_C::use_caching_cpu_allocator: another CPU allocator of higher priority is installed");
  } else {
    CachingCPUAllocator::instance->set_max_cached(bytes);
  }
}

std::vector<int64_t> caching_cpu_allocator_stats(bool reset_peak) {
  TORCH_CHECK(CachingCPUAllocator::instance, "srlm_C::caching_cpu_allocator_stats: the allocator is not installed");
  return CachingCPUAllocator::instance->stats(reset_peak);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(srlm_C, m) {
  // Large CPU tensors from here on come from a caching allocator (csrc/cpu_allocator.cpp) that keeps
  // at most max_cached_mb of freed blocks; a second call only changes that bound.
  m.def("use_caching_cpu_allocator(int max_cached_mb) -> ()", &use_caching_cpu_allocator);
  // [bytes in live blocks, their peak since the last reset, bytes cached, blocks mapped, blocks
  // unmapped] (blocks of 4 MiB and more).
  m.def("caching_cpu_allocator_stats(bool reset_peak=False) -> int[]", &caching_cpu_allocator_stats);
}
