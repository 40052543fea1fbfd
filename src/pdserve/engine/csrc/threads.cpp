// Pins each thread of the calling thread's intra-op team to a core of its own (engine/cores.py: an engine stepping
// with a core borrowed from an idle replica). Python cannot run code on OpenMP's worker threads, and a worker the
// runtime starts later inherits its creator's affinity, so the team pins itself, from inside a parallel region: the
// engine thread (thread 0) to its own core, each worker to a borrowed one. Threads may also be replaced whenever the
// team shrinks and grows again; the caller pins again whenever the team changes.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <sched.h>

#include <atomic>
#include <cstdint>
#include <vector>

namespace {

// cpus[i]: the core of the team's thread i; the team is as large as the list (torch's thread count must equal it).
// Returns the threads pinned (fewer when the runtime ran fewer threads, or a core is not allowed).
int64_t pin_threads(std::vector<int64_t> cpus) {
  const int64_t n = static_cast<int64_t>(cpus.size());
  if (at::get_num_threads() != n) return 0;  // the team is not one thread per core: pin nothing
  std::atomic<int64_t> pinned{0};
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    // One index per thread, its own: a smaller team than asked (OMP_THREAD_LIMIT, OMP_DYNAMIC) would hand a
    // thread another's index — pin nothing rather than the wrong thread.
    if (end - begin != 1 || at::get_thread_num() != begin) return;
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(static_cast<int>(cpus[begin]), &set);
    if (sched_setaffinity(0, sizeof(set), &set) == 0) pinned.fetch_add(1);
  });
  return pinned.load();
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pdserve, m) { m.def("pin_threads(int[] cpus) -> int", &pin_threads); }
