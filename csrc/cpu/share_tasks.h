// Work sharing that a busy machine cannot stall (the CPU kernels' one way to use several threads).
//
// A fork/join region (OpenMP, at::parallel_for) ends with a barrier that waits for every thread
// of the team, also for one the OS has not scheduled yet: with other processes on the cores, that
// wait is a scheduler time slice (ms), and measured 10-80x slowdowns for kernels that run many
// short regions. Here the calling thread starts at once and takes tasks from a shared counter
// until none is left; helpers from torch's inter-op pool take tasks too when (if) the OS runs
// them. The caller waits only for tasks a helper has already started, never for a helper that has
// not started: on a loaded machine the call costs about its single-thread time, on an idle one
// the helpers share the work. Tasks should be short (tens of us), so that a helper descheduled in
// the middle of one rarely holds up the caller. Which thread runs a task never changes its
// result: kernels write per-task (or per-worker integer) partial results and combine them in a
// fixed order.
#pragma once

#include <ATen/Parallel.h>

#include "namedmask/spinning_team.h"

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <memory>
#include <mutex>

namespace namedmask {

// Helpers worth starting for `work` units when one helper should have at least `min_work` of
// them: torch's thread count (minus the caller), but none for small calls (an inline call costs
// no wake-up and no cache transfer).
inline int helpers_for(int64_t work, int64_t min_work) {
  const int64_t wanted = work / std::max<int64_t>(1, min_work) - 1;
  return static_cast<int>(std::clamp<int64_t>(wanted, 0, at::get_num_threads() - 1));
}

// Helpers for work that pays for them only on cores nobody else is using right now: the cores
// idle at this instant (Linux: online CPUs minus the runnable threads in /proc/loadavg, this one
// included), capped by torch's thread count and by work / min_work - 1. 0 where that cannot be
// read. A call costs a few us (one small read), so callers ask once per call, not per region.
inline int idle_helpers_for(int64_t work, int64_t min_work) {
  const int wanted = helpers_for(work, min_work);
  if (wanted == 0) return 0;
  std::FILE* f = std::fopen("/proc/loadavg", "r");
  if (!f) return 0;
  int running = 0, total = 0;
  double a1, a5, a15;
  const bool read = std::fscanf(f, "%lf %lf %lf %d/%d", &a1, &a5, &a15, &running, &total) == 5;
  std::fclose(f);
  const long cpus = sysconf(_SC_NPROCESSORS_ONLN);
  if (!read || running < 1 || cpus < 1) return 0;
  return static_cast<int>(std::clamp<long>(cpus - running, 0, wanted));
}

// helpers_for(work, min_work), or where that gives none (small work), the helpers for cores idle
// right now with idle_min_work per helper.
inline int helpers_or_idle(int64_t work, int64_t min_work, int64_t idle_min_work) {
  const int helpers = helpers_for(work, min_work);
  return helpers > 0 ? helpers : idle_helpers_for(work, idle_min_work);
}

// Runs f(task, worker) for every task in [0, tasks): worker 0 is the calling thread, 1..helpers
// the helpers (a worker runs its tasks one after another, so per-worker buffers need no lock).
template <typename F>
void share_tasks(int64_t tasks, int helpers, F&& f) {
  helpers = static_cast<int>(std::min<int64_t>(helpers, tasks - 1));
  if (helpers <= 0 || detail::in_shared_tasks || at::in_parallel_region()) {
    for (int64_t i = 0; i < tasks; ++i) f(i, 0);
    return;
  }
  // Shared with the helpers, which may start after this call returned: they then find no task
  // left and never touch `f` (a task is only claimed while the caller waits for it).
  struct State {
    std::atomic<int64_t> next{0}, done{0};
    std::atomic<int> joined{0};
    int64_t tasks = 0;
    detail::TaskFn task;
    detail::FirstError errors;
  };
  auto state = std::make_shared<State>();
  state->tasks = tasks;
  state->task.bind(f);
  auto work = [](State& s, int worker) {
    detail::in_shared_tasks = true;
    for (int64_t i; (i = s.next.fetch_add(1)) < s.tasks; s.done.fetch_add(1), s.done.notify_all())
      s.errors.run(s.task, i, worker);
    detail::in_shared_tasks = false;
  };
  for (int h = 0; h < helpers; ++h)
    at::launch([state, work] { work(*state, 1 + state->joined.fetch_add(1)); });
  work(*state, 0);
  // Sleep, not spin: a spinning caller takes the CPU from the helper it waits for.
  for (int64_t d; (d = state->done.load()) < tasks;) state->done.wait(d);
  state->errors.rethrow();
}

// A SpinningTeam (namedmask/spinning_team.h) whose helpers come from torch's inter-op pool; none
// inside a parallel region or a shared task (nested work runs inline).
inline SpinningTeam torch_team(int helpers) {
  return SpinningTeam(at::in_parallel_region() ? 0 : helpers, [](auto&& help) { at::launch(std::move(help)); });
}

}  // namespace namedmask
