// Run-time pieces shared by the baseline-compiled glue units (decoder.cpp, grouped_ops.cpp):
// the kernel table the rest of the library uses, and the persistent thread team of the
// native decode step. Never included by the ISA units.
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>
#include <sched.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>  // _mm_pause (SSE2, part of the x86-64 baseline)
#endif

#include "qs_kernels.h"

namespace qs {

// The table that quantserve::isa() names (QS_KERNEL_ISA / quantserve::set_isa decide it), so
// that every op of the library follows one choice; asked through the op registry because the
// choice itself lives in ops.cpp.
inline const KernelTable& active_kernel_table() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("quantserve::isa", "").typed<std::string()>();
  const std::string name = op.call();
  const KernelTable* table = nullptr;
  for (const KernelTable* t : {avx512_table(), avx2_table()})
    if (t != nullptr && name == t->name) table = t;
  TORCH_CHECK(table != nullptr, "quantserve: this CPU has no supported kernel ISA (isa() = '", name, "')");
  return *table;
}

inline void cpu_relax() {
#if defined(__x86_64__)
  _mm_pause();
#endif
}

// Waits until `done()`: pause-spins for `spin_us`, then yields the CPU (another process or
// thread on this core gets it) and, if `word` is given, sleeps on it (futex) once `yield_us`
// have passed, until `*word` differs from `seen`.
template <class Done>
void wait_until(Done done, int64_t spin_us, int64_t yield_us, std::atomic<uint32_t>* word = nullptr,
                uint32_t seen = 0) {
  using clock = std::chrono::steady_clock;
  for (int i = 0; i < 128; ++i) {  // the common case: the other threads are a few hundred ns away
    if (done()) return;
    cpu_relax();
  }
  const auto start = clock::now();
  for (uint32_t i = 0;; ++i) {
    if (done()) return;
    const int64_t waited = std::chrono::duration_cast<std::chrono::microseconds>(clock::now() - start).count();
    if (waited < spin_us) {
      for (int j = 0; j < 16; ++j) cpu_relax();
    } else if (word == nullptr || waited < yield_us) {
      sched_yield();
    } else {
      word->wait(seen, std::memory_order_acquire);
    }
  }
}

// A team of `size` threads that runs one job at a time; the calling thread is thread 0.
// Workers live as long as the team. Between jobs they spin briefly, then yield, then sleep,
// so an idle server costs nothing and back-to-back decode steps pay no wake-up.
// Jobs must tolerate running on fewer threads (take work from shared counters, never by
// thread index): after a fork() the child runs every job on its calling thread alone.
class SpinTeam {
 public:
  using Job = void (*)(void* ctx, int thread);

  explicit SpinTeam(int size) : size_(size < 1 ? 1 : size), pid_(getpid()) {
    for (int t = 1; t < size_; ++t) workers_.emplace_back([this, t] { work(t); });
  }

  ~SpinTeam() {
    if (getpid() != pid_) {  // a forked child owns no worker threads
      for (auto& w : workers_) w.detach();
      return;
    }
    stop_.store(true, std::memory_order_release);
    job_generation_.fetch_add(1, std::memory_order_acq_rel);
    job_generation_.notify_all();
    for (auto& w : workers_) w.join();
  }

  SpinTeam(const SpinTeam&) = delete;
  SpinTeam& operator=(const SpinTeam&) = delete;

  int size() const { return size_; }

  // Runs job(ctx, t) on every thread t of the team; returns once all have finished.
  void run(Job job, void* ctx) {
    std::lock_guard<std::mutex> lock(run_mutex_);
    if (size_ == 1 || getpid() != pid_) {
      active_ = 1;
      job(ctx, 0);
      active_ = size_;
      return;
    }
    job_ = job;
    ctx_ = ctx;
    job_generation_.fetch_add(1, std::memory_order_acq_rel);
    job_generation_.notify_all();  // only a syscall when a worker sleeps
    job(ctx, 0);
    barrier();  // every worker has finished its part
  }

  // Inside a job: no thread continues before all have arrived.
  void barrier() {
    if (active_ == 1) return;
    const uint32_t generation = barrier_generation_.load(std::memory_order_acquire);
    if (barrier_count_.fetch_add(1, std::memory_order_acq_rel) == active_ - 1) {
      barrier_count_.store(0, std::memory_order_relaxed);
      barrier_generation_.store(generation + 1, std::memory_order_release);
    } else {
      // in-step waits are short unless a thread lost its core: then yield it the CPU
      wait_until([&] { return barrier_generation_.load(std::memory_order_acquire) != generation; }, 50, 0);
    }
  }

 private:
  void work(int thread) {
    uint32_t seen = 0;
    for (;;) {
      // idle between steps: spin 100 us, yield up to 2 ms, then sleep until the next job
      wait_until([&] { return job_generation_.load(std::memory_order_acquire) != seen; }, 100, 2000,
                 &job_generation_, seen);
      seen = job_generation_.load(std::memory_order_acquire);
      if (stop_.load(std::memory_order_acquire)) return;
      job_(ctx_, thread);
      barrier();
    }
  }

  const int size_;
  const pid_t pid_;
  int active_ = size_;
  std::mutex run_mutex_;
  Job job_ = nullptr;
  void* ctx_ = nullptr;
  std::atomic<bool> stop_{false};
  alignas(64) std::atomic<uint32_t> job_generation_{0};
  alignas(64) std::atomic<int> barrier_count_{0};
  alignas(64) std::atomic<uint32_t> barrier_generation_{0};
  std::vector<std::thread> workers_;
};

// One team per size, shared by every decoder and linear of the process while any holds it.
inline std::shared_ptr<SpinTeam> shared_team(int size) {
  static std::mutex mutex;
  static std::map<int, std::weak_ptr<SpinTeam>>* teams = new std::map<int, std::weak_ptr<SpinTeam>>();
  std::lock_guard<std::mutex> lock(mutex);
  std::shared_ptr<SpinTeam> team = (*teams)[size].lock();
  if (!team) {
    team = std::make_shared<SpinTeam>(size);
    (*teams)[size] = team;
  }
  return team;
}

// Work items of one phase, handed out in order from a shared counter (own cache line).
struct alignas(64) ItemCounter {
  std::atomic<int64_t> next{0};
  int64_t take() { return next.fetch_add(1, std::memory_order_relaxed); }
};

}  // namespace qs
