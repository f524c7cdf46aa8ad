// The threading of the CPU kernels of acmix_ms: one small persistent pool per process, no OpenMP.
//
// Why not OpenMP: its worker threads spin after each parallel region (GOMP_SPINCOUNT) and compete with
// MindSpore's own thread pool and with other processes on a loaded machine; a pool whose idle workers sleep
// on a condition variable does not. Threads: $ACMIX_MS_KERNEL_THREADS if set (>= 1), else the number of
// hardware threads (at most 64). The pool serves one kernel at a time; a kernel launched while another one
// is using the pool (MindSpore may run independent kernels concurrently) runs its chunks on its own thread.
//
// Usage: acmix::parallel_for(n, [&](int64_t begin, int64_t end, int64_t chunk) { ... });  chunk < num_chunks(n)
// indexes per-chunk partial results (deterministic reductions).
#pragma once

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace acmix {

inline int configured_threads() {
  static const int threads = [] {
    const char *text = std::getenv("ACMIX_MS_KERNEL_THREADS");
    int value = text ? std::atoi(text) : 0;
    if (value <= 0) value = static_cast<int>(std::thread::hardware_concurrency());
    return std::max(1, std::min(value, 64));
  }();
  return threads;
}

class ThreadPool {
 public:
  explicit ThreadPool(int threads) : size_(threads) {
    for (int index = 1; index < threads; ++index) {
      std::thread([this, index] { Loop(index); }).detach();  // lives as long as the process
    }
  }
  int size() const { return size_; }

  // body(t) for every t < size(), t = 0 on the calling thread; returns when all are done.
  void Run(const std::function<void(int)> &body) {
    std::unique_lock<std::mutex> busy(busy_, std::try_to_lock);
    if (!busy.owns_lock() || size_ == 1) {
      for (int t = 0; t < size_; ++t) body(t);
      return;
    }
    {
      std::lock_guard<std::mutex> lock(mutex_);
      job_ = &body;
      pending_ = size_ - 1;
      ++generation_;
    }
    wake_.notify_all();
    body(0);
    std::unique_lock<std::mutex> lock(mutex_);
    done_.wait(lock, [this] { return pending_ == 0; });
    job_ = nullptr;
  }

 private:
  void Loop(int index) {
    uint64_t seen = 0;
    for (;;) {
      const std::function<void(int)> *job;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] { return generation_ != seen; });
        seen = generation_;
        job = job_;
      }
      (*job)(index);
      std::lock_guard<std::mutex> lock(mutex_);
      if (--pending_ == 0) done_.notify_one();
    }
  }

  const int size_;
  std::mutex busy_, mutex_;
  std::condition_variable wake_, done_;
  const std::function<void(int)> *job_ = nullptr;
  uint64_t generation_ = 0;
  int pending_ = 0;
};

inline ThreadPool &pool() {
  static ThreadPool *instance = new ThreadPool(configured_threads());  // never destroyed: no join at exit
  return *instance;
}

inline int num_workers() { return pool().size(); }

// The chunks of parallel_for over n items: about n / (8 * num_workers()) items each (one chunk with one worker).
inline int64_t chunk_size(int64_t n) {
  const int workers = num_workers();
  if (n <= 1 || workers == 1) return std::max<int64_t>(n, 1);
  return std::max<int64_t>(1, (n + 8 * workers - 1) / (8 * workers));
}

inline int64_t num_chunks(int64_t n) { return n <= 0 ? 0 : (n + chunk_size(n) - 1) / chunk_size(n); }

// fn(begin, end, chunk) for the contiguous chunks [begin, end) of [0, n), chunk = begin / chunk_size(n) <
// num_chunks(n), handed out dynamically to the workers: one whose core is shared with another process (a loaded
// machine) takes fewer chunks instead of holding up the others with a fixed half of the work. Which thread runs a
// chunk varies; the chunks do not (for a thread count): per-chunk partial sums added in chunk order are
// deterministic, and calls with different chunk indices never overlap in time on one thread.
template <class F>
void parallel_for(int64_t n, F &&fn) {
  if (n <= 0) return;
  const int64_t chunk = chunk_size(n);
  if (chunk >= n) {
    fn(int64_t{0}, n, int64_t{0});
    return;
  }
  std::atomic<int64_t> next{0};
  pool().Run([&](int) {
    for (int64_t begin = next.fetch_add(chunk); begin < n; begin = next.fetch_add(chunk)) {
      fn(begin, std::min(n, begin + chunk), begin / chunk);
    }
  });
}

}  // namespace acmix
