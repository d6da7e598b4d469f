// SpinningTeam: work sharing for a call that runs many short regions back to back, without ever
// waiting for a thread the OS has not scheduled (the rule of share_tasks, csrc/cpu/share_tasks.h,
// which makes one from torch's inter-op pool). Torch-free, so that ctest can run it with plain
// threads (csrc/tests/test_spinning_team.cpp).
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <exception>
#include <memory>
#include <mutex>
#include <thread>
#include <type_traits>
#include <utility>

namespace namedmask {

namespace detail {
inline thread_local bool in_shared_tasks = false;  // set on helpers: nested calls run inline

// The caller's task function f(task, worker) behind one pointer: it lives on the caller's stack,
// and the caller waits until every claimed task is done.
struct TaskFn {
  void* fn = nullptr;
  void (*call)(void*, int64_t, int) = nullptr;

  template <typename F>
  void bind(F& f) {
    fn = const_cast<void*>(static_cast<const void*>(&f));  // F may be const; call casts it back
    call = [](void* p, int64_t task, int worker) { (*static_cast<F*>(p))(task, worker); };
  }
};

// Keeps the first exception a task threw (the others are dropped) for the caller to rethrow.
class FirstError {
 public:
  void run(const TaskFn& f, int64_t task, int worker) {
    try {
      f.call(f.fn, task, worker);
    } catch (...) {
      std::lock_guard<std::mutex> guard(lock_);
      if (!error_) error_ = std::current_exception();
    }
  }
  // Once every task is done (no writer left): rethrows the first exception, once.
  void rethrow() {
    if (error_) std::rethrow_exception(std::exchange(error_, nullptr));
  }

 private:
  std::mutex lock_;
  std::exception_ptr error_;
};
}  // namespace detail

// A team for a call that runs many short regions back to back (a CG solve: two regions per
// iteration, tens of us each). share_tasks wakes helpers per region, which costs more than such a
// region; here helpers are woken once per call and then spin between regions, so a region's
// tasks start on them at once. Same rule as share_tasks: the caller takes tasks itself and waits
// only for tasks a helper has already claimed, never for a helper; a helper that is descheduled,
// starts late or has left (after kSpinLimit without a region) just leaves its share to the
// caller. Spinning takes a core, so callers start a team only on cores idle at the time of the
// call (idle_helpers_for in share_tasks.h) or for regions long enough to pay for it anyway. The destructor sends
// the helpers away; a late helper finds the team closed and returns at once.
class SpinningTeam {
 public:
  // launch(f) runs the helper f() on another thread, now, later or never (the team works alike).
  template <typename Launch>
  SpinningTeam(int helpers, Launch&& launch) : state_(std::make_shared<State>()) {
    helpers_ = detail::in_shared_tasks ? 0 : helpers;
    for (int h = 0; h < helpers_; ++h) launch([state = state_] { help(*state); });
  }
  SpinningTeam(const SpinningTeam&) = delete;
  SpinningTeam& operator=(const SpinningTeam&) = delete;
  ~SpinningTeam() { close(); }

  // Sends the helpers away (their cores and threads are free for other work); later regions run
  // on the caller alone.
  void close() {
    state_->closed.store(true, std::memory_order_relaxed);
    helpers_ = 0;
  }

  // Runs f(task, worker) for every task in [0, tasks), as share_tasks does.
  template <typename F>
  void share(int64_t tasks, F&& f) {
    if (helpers_ == 0 || tasks < 2 || tasks > kMaxTasks) {
      for (int64_t i = 0; i < tasks; ++i) f(i, 0);
      return;
    }
    State& s = *state_;
    const uint64_t generation = ++generation_;
    Region& region = s.region[generation & 1];
    region.task.bind(f);
    region.done.store(0, std::memory_order_relaxed);
    // Publishing the word releases the region: a helper that claims a task of it sees fn and call.
    s.word.store(generation << 40 | uint64_t(tasks) << 20, std::memory_order_release);
    // The caller's tasks, like the helpers', run nested work inline.
    const bool nested = std::exchange(detail::in_shared_tasks, true);
    while (run_one(s, 0)) {
    }
    detail::in_shared_tasks = nested;
    // Spin, then yield: a helper holds a claimed task for a few us unless it was descheduled.
    for (int spins = 0; region.done.load(std::memory_order_acquire) < tasks; ++spins) {
      if (spins < kCallerSpins)
        pause();
      else
        std::this_thread::yield();
    }
    s.errors.rethrow();
  }

 private:
  static constexpr int64_t kMaxTasks = (1 << 20) - 1;  // tasks and the next task share a word
  static constexpr int kCallerSpins = 1 << 12;
  static constexpr std::chrono::microseconds kSpinLimit{500};

  struct Region {
    detail::TaskFn task;
    std::atomic<int64_t> done{0};
  };
  // word = generation (24 bits) | tasks (20 bits) | next task (20 bits): a claim (a compare and
  // swap of the word) names the region and the task together, so a helper holding a stale word
  // can never claim a task of a region that has ended. A region's slot (generation & 1) is only
  // reused two regions later, after every task of this one is done.
  struct State {
    std::atomic<uint64_t> word{0};
    std::atomic<bool> closed{false};
    std::atomic<int> joined{0};
    Region region[2];
    detail::FirstError errors;
  };

  static void pause() {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    asm volatile("yield");
#endif
  }

  // Claims and runs one task of the current region; false when none is left.
  static bool run_one(State& s, int worker) {
    uint64_t w = s.word.load(std::memory_order_acquire);
    for (;;) {
      const int64_t next = int64_t(w & 0xFFFFF), tasks = int64_t(w >> 20 & 0xFFFFF);
      if (next >= tasks) return false;
      if (!s.word.compare_exchange_weak(w, w + 1, std::memory_order_acq_rel, std::memory_order_acquire)) continue;
      Region& region = s.region[(w >> 40) & 1];
      s.errors.run(region.task, next, worker);
      region.done.fetch_add(1, std::memory_order_release);
      return true;
    }
  }

  static void help(State& s) {
    const int worker = 1 + s.joined.fetch_add(1);
    detail::in_shared_tasks = true;
    // The clock is read every 256 spins; the first reading after a task starts the idle time.
    std::chrono::steady_clock::time_point idle_since;
    for (int spins = 0; !s.closed.load(std::memory_order_relaxed);) {
      if (run_one(s, worker)) {
        spins = 0;
        continue;
      }
      pause();
      if (++spins % 256 != 0) continue;
      const auto now = std::chrono::steady_clock::now();
      if (spins == 256)
        idle_since = now;
      else if (now - idle_since > kSpinLimit)
        break;  // no region for a while: give the core back
    }
    detail::in_shared_tasks = false;
  }

  std::shared_ptr<State> state_;
  int helpers_ = 0;
  uint64_t generation_ = 0;
};

}  // namespace namedmask
