// SpinningTeam (namedmask/spinning_team.h) with plain threads: every task of every region runs
// exactly once, on a valid worker, whatever the helpers do — start at once, start late, never
// start, outnumber the cores; a task's exception reaches the caller once, and the team works on.
#include <chrono>
#include <cstdio>
#include <random>
#include <stdexcept>
#include <thread>
#include <vector>

#include "expect.h"
#include "namedmask/spinning_team.h"

using namespace namedmask;

// Runs `regions` regions of 0..max_tasks tasks; checks that each task ran once, on worker 0..helpers.
static void run_regions(SpinningTeam& team, int helpers, int regions, int max_tasks, unsigned seed) {
  std::mt19937 rng(seed);
  std::vector<std::atomic<int>> hits(max_tasks);
  std::atomic<int> bad_worker{0};
  long long wrong = 0;
  for (int r = 0; r < regions; ++r) {
    const int tasks = static_cast<int>(rng() % (max_tasks + 1));
    for (int i = 0; i < tasks; ++i) hits[i].store(0);
    team.share(tasks, [&](int64_t i, int worker) {
      if (worker < 0 || worker > helpers) bad_worker.fetch_add(1);
      hits[i].fetch_add(1);
      volatile int spin = 0;  // a little work, so that helpers get some of the tasks
      for (int k = 0; k < 200; ++k) spin = spin + k;
    });
    for (int i = 0; i < tasks; ++i) wrong += hits[i].load() != 1;
  }
  EXPECT_EQ(wrong, 0);
  EXPECT_EQ(bad_worker.load(), 0);
}

// A launcher on plain threads, joined after the team has gone (its helpers leave once it closes).
struct Threads {
  std::vector<std::thread> threads;
  std::chrono::microseconds delay{0};
  bool start = true;
  auto launcher() {
    return [this](auto&& help) {
      if (!start) return;  // a helper that never starts
      threads.emplace_back([help = std::move(help), d = delay] {
        std::this_thread::sleep_for(d);
        help();
      });
    };
  }
  ~Threads() {
    for (auto& t : threads) t.join();
  }
};

int main() {
  for (int helpers : {0, 1, 3, 8}) {  // 8: more threads than this machine's cores
    Threads pool;
    SpinningTeam team(helpers, pool.launcher());
    run_regions(team, helpers, 20000, 40, 1u + helpers);
  }
  {  // helpers that start 2 ms late, after many regions have ended, and then join in
    Threads pool;
    pool.delay = std::chrono::microseconds(2000);
    SpinningTeam team(2, pool.launcher());
    run_regions(team, 2, 20000, 40, 11);
  }
  {  // helpers that never start: the caller does everything
    Threads pool;
    pool.start = false;
    SpinningTeam team(2, pool.launcher());
    run_regions(team, 2, 2000, 40, 12);
  }
  {  // a pause longer than the helpers' patience (500 us) between regions: they leave, the team works on
    Threads pool;
    SpinningTeam team(2, pool.launcher());
    run_regions(team, 2, 1000, 40, 13);
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
    run_regions(team, 2, 1000, 40, 14);
  }
  {  // a task's exception reaches the caller after the region, once
    Threads pool;
    SpinningTeam team(2, pool.launcher());
    int caught = 0;
    for (int r = 0; r < 100; ++r) {
      try {
        team.share(30, [&](int64_t i, int) {
          if (i == r % 30) throw std::runtime_error("task failed");
        });
      } catch (const std::runtime_error&) {
        ++caught;
      }
    }
    EXPECT_EQ(caught, 100);
    run_regions(team, 2, 1000, 40, 15);  // and regions without errors raise nothing
  }
  {  // inside any task (the caller's or a helper's: nested work), a new team starts no helper
    Threads pool;
    SpinningTeam team(1, pool.launcher());
    std::atomic<int> nested_helpers{0};
    team.share(64, [&](int64_t, int) {
      Threads inner;
      SpinningTeam nested(3, inner.launcher());
      nested_helpers.fetch_add(static_cast<int>(inner.threads.size()));
    });
    EXPECT_EQ(nested_helpers.load(), 0);
    SpinningTeam outside(1, pool.launcher());  // and outside a task it does again
    EXPECT_EQ(static_cast<long long>(pool.threads.size()), 2);
  }
  {  // after close(), regions run on the caller alone
    Threads pool;
    SpinningTeam team(2, pool.launcher());
    run_regions(team, 2, 100, 40, 16);
    team.close();
    std::atomic<int> on_helpers{0};
    for (int r = 0; r < 100; ++r) team.share(40, [&](int64_t, int worker) { on_helpers.fetch_add(worker != 0); });
    EXPECT_EQ(on_helpers.load(), 0);
  }
  return finish("test_spinning_team");
}
