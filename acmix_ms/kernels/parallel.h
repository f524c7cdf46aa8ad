// The threading of the CPU kernels of acmix_ms: one small persistent pool per process, no OpenMP.
//
// Why not OpenMP: its worker threads spin after each parallel region (GOMP_SPINCOUNT) and compete with
// MindSpore's own thread pool and with other processes on a loaded machine; a pool whose idle workers sleep
// on a condition variable does not. Threads: $ACMIX_MS_KERNEL_THREADS if set (>= 1), else the number of
// hardware threads (at most 64). The pool serves one kernel at a time; a kernel launched while another one
// is using the pool (MindSpore may run independent kernels concurrently) runs its chunks on its own thread.
//
// Usage: acmix::parallel_for(n, [&](int64_t begin, int64_t end, int worker) { ... });  worker < num_workers()
// indexes per-worker scratch.
#pragma once

#include <algorithm>
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

// fn(begin, end, worker) over [0, n) in num_workers() contiguous chunks (empty chunks skipped).
template <class F>
void parallel_for(int64_t n, F &&fn) {
  const int workers = num_workers();
  if (n <= 1 || workers == 1) {
    if (n > 0) fn(int64_t{0}, n, 0);
    return;
  }
  pool().Run([&](int t) {
    const int64_t begin = n * t / workers, end = n * (t + 1) / workers;
    if (begin < end) fn(begin, end, t);
  });
}

}  // namespace acmix
