// Execution model of the CPU harness: every GPU thread is a fiber with its own stack.
//
// A worker OS thread runs one threadgroup at a time. Its fibers run until they block at a sync
// point: a SIMD-group function (all live lanes of the 32-lane group meet there, then the op is
// evaluated over the lanes present) or threadgroup_barrier (all threads of the threadgroup meet).
// The schedule is SIMD-group-major: one SIMD group runs as far as it can (to a barrier or the end)
// before the next starts, which is the largest skew a GPU may show between SIMD groups, so a
// missing barrier reads another group's not-yet-written data. Threadgroup memory and outputs
// without init_value start as 0xFF bytes (NaN / -1), so such reads are visible. Schedules:
// 0 forward (groups and lanes in index order), 1 reverse, 2 seeded random.
// Errors (barrier divergence, invalid memory access, division by zero, too much threadgroup
// memory) stop the launch and come back as a message.
#pragma once
#include <setjmp.h>
#include <signal.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <source_location>
#include <string>
#include <thread>
#include <vector>

#include "msim_types.h"

// Switching fibers: a dozen instructions on x86-64 Linux (callee-saved registers, MXCSR and the
// x87 control word, on the fiber's own stack); ucontext elsewhere, which also saves the signal
// mask with a system call on each switch (~20x slower).
#if defined(__x86_64__) && defined(__linux__) && !defined(MSIM_PORTABLE_SWITCH)
#define MSIM_FAST_SWITCH 1
extern "C" void msim_ctx_switch(void** save_sp, void* load_sp);
asm(".text\n.p2align 4\n.globl msim_ctx_switch\n.hidden msim_ctx_switch\n.type msim_ctx_switch,@function\n"
    "msim_ctx_switch:\n"
    "  pushq %rbp\n  pushq %rbx\n  pushq %r12\n  pushq %r13\n  pushq %r14\n  pushq %r15\n"
    "  subq $8, %rsp\n  stmxcsr (%rsp)\n  fnstcw 4(%rsp)\n"
    "  movq %rsp, (%rdi)\n  movq %rsi, %rsp\n"
    "  ldmxcsr (%rsp)\n  fldcw 4(%rsp)\n  addq $8, %rsp\n"
    "  popq %r15\n  popq %r14\n  popq %r13\n  popq %r12\n  popq %rbx\n  popq %rbp\n  ret\n"
    ".size msim_ctx_switch, .-msim_ctx_switch\n");
#endif

namespace msim {

struct Context {
#ifdef MSIM_FAST_SWITCH
  void* sp = nullptr;
#else
  ucontext_t uc;
#endif
};

// Prepare `c` to start `fn` (which never returns) on the given stack.
inline void make_context(Context& c, char* stack, size_t size, void (*fn)()) {
#ifdef MSIM_FAST_SWITCH
  auto* top = reinterpret_cast<unsigned long*>(reinterpret_cast<unsigned long>(stack + size) & ~15ul);
  top[-1] = 0;                                    // fn is entered as if called: rsp = 8 mod 16
  top[-2] = reinterpret_cast<unsigned long>(fn);  // popped by `ret`
  for (int i = 3; i <= 8; ++i) top[-i] = 0;       // rbp rbx r12 r13 r14 r15
  unsigned mxcsr;
  unsigned short fpucw;
  asm volatile("stmxcsr %0\n fnstcw %1" : "=m"(mxcsr), "=m"(fpucw));
  std::memcpy(&top[-9], &mxcsr, 4);
  std::memcpy(reinterpret_cast<char*>(&top[-9]) + 4, &fpucw, 2);
  c.sp = &top[-9];
#else
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = stack;
  c.uc.uc_stack.ss_size = size;
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, fn, 0);
#endif
}

inline void switch_context(Context& from, Context& to) {
#ifdef MSIM_FAST_SWITCH
  msim_ctx_switch(&from.sp, to.sp);
#else
  swapcontext(&from.uc, &to.uc);
#endif
}

using uint3 = metal::vec<unsigned, 3>;

struct Ids {  // the values of Metal's thread attributes; field names = attribute names
  uint3 thread_position_in_grid, thread_position_in_threadgroup, threadgroup_position_in_grid,
      threads_per_threadgroup, dispatch_threads_per_threadgroup, threadgroups_per_grid, threads_per_grid,
      grid_size, grid_origin;
  unsigned thread_index_in_threadgroup, simdgroup_index_in_threadgroup, thread_index_in_simdgroup,
      simdgroups_per_threadgroup, dispatch_simdgroups_per_threadgroup, quadgroup_index_in_threadgroup,
      thread_index_in_quadgroup, quadgroups_per_threadgroup, dispatch_quadgroups_per_threadgroup,
      threads_per_simdgroup, thread_execution_width;
};

enum State : unsigned char { kRun, kBarrier, kSimd, kDone };
struct Site { unsigned line, col; };
struct Lane;
using Resolver = void (*)(Lane** by_lane);  // 32 slots, nullptr = lane not taking part
using Entry = void (*)(const Ids&, void* const*);
constexpr int kSimdWidth = 32, kMaxThreads = 1024, kThreadgroupBytes = 32768;
constexpr size_t kStack = 64 * 1024;

struct Lane {
  Context ctx;
  State state;
  Site site;
  Resolver resolve;
  int arg;
  alignas(16) unsigned char in[64];
  alignas(16) unsigned char out[64];
  Ids ids;
};

struct Launch {
  Entry entry;
  void* const* bufs;
  unsigned grid[3], tg[3], groups[3];
  long total;
  int schedule;
  unsigned seed;
  std::atomic<long> next{0};
  std::atomic<bool> failed{false};
  std::mutex mu;
  std::string error;
};

struct Worker {
  Launch* L = nullptr;
  std::vector<Lane> lanes;
  char* stacks = nullptr;
  size_t stacks_bytes = 0;
  Context sched;
  Lane* cur = nullptr;
  sigjmp_buf jb;
  volatile bool armed = false;
  int fault_sig = 0;
  void* fault_addr = nullptr;
  unsigned long epoch = 0;
  size_t tg_bytes = 0;
  std::vector<std::pair<void*, unsigned long>> tg_seen;
  std::string error;
};
inline thread_local Worker* tw = nullptr;

inline void lane_main() {
  Worker* w = tw;
  w->L->entry(w->cur->ids, w->L->bufs);
  w->cur->state = kDone;
  switch_context(w->cur->ctx, w->sched);
}

inline void block(State s, Site site) {
  Worker* w = tw;
  Lane* l = w->cur;
  l->state = s;
  l->site = site;
  switch_context(l->ctx, w->sched);
}

// Stop the launch from inside a kernel thread with a message (the fiber is never resumed).
inline void fail(const std::string& msg) {
  tw->error = msg;
  block(kDone, {0, 0});
}

// Threadgroup variables are rewritten to per-worker statics; the first thread of each threadgroup
// to reach the declaration poisons them (Metal gives no initial value).
inline void tg_declare(void* p, size_t bytes) {
  Worker* w = tw;
  auto it = w->tg_seen.begin();
  while (it != w->tg_seen.end() && it->first != p) ++it;
  if (it == w->tg_seen.end()) it = w->tg_seen.insert(it, {p, 0});
  if (it->second == w->epoch) return;
  it->second = w->epoch;
  std::memset(p, 0xFF, bytes);
  w->tg_bytes += bytes;
  if (w->tg_bytes > size_t(kThreadgroupBytes))
    fail("threadgroup memory of " + std::to_string(w->tg_bytes) + " bytes exceeds Metal's 32 KiB");
}

inline std::string fmt3(const uint3& v) {
  return "(" + std::to_string(v.x) + ", " + std::to_string(v.y) + ", " + std::to_string(v.z) + ")";
}

inline unsigned next_rand(unsigned& s) { s ^= s << 13; s ^= s >> 17; s ^= s << 5; return s; }
inline void order(int* o, int n, int schedule, unsigned& rng) {
  for (int i = 0; i < n; ++i) o[i] = schedule == 1 ? n - 1 - i : i;
  if (schedule == 2)
    for (int i = n - 1; i > 0; --i) std::swap(o[i], o[next_rand(rng) % unsigned(i + 1)]);
}

inline bool site_less(Site a, Site b) { return a.line != b.line ? a.line < b.line : a.col < b.col; }
inline bool site_eq(Site a, Site b) { return a.line == b.line && a.col == b.col; }

inline bool abort_group(Worker* w) {
  w->armed = false;
  return false;
}

inline bool run_group(Worker* w, long gid) {
  Launch* L = w->L;
  unsigned g[3] = {unsigned(gid % L->groups[0]), unsigned(gid / L->groups[0] % L->groups[1]),
                   unsigned(gid / (long(L->groups[0]) * L->groups[1]))};
  unsigned a[3];
  for (int d = 0; d < 3; ++d) a[d] = std::min(L->tg[d], L->grid[d] - g[d] * L->tg[d]);
  const int n = int(a[0] * a[1] * a[2]), nsg = (n + kSimdWidth - 1) / kSimdWidth;
  const unsigned dispatch_n = L->tg[0] * L->tg[1] * L->tg[2];
  ++w->epoch;
  w->tg_bytes = 0;
  for (int i = 0; i < n; ++i) {
    Lane& l = w->lanes[i];
    Ids& t = l.ids;
    unsigned x = i % a[0], y = i / a[0] % a[1], z = i / (a[0] * a[1]);
    t.thread_position_in_threadgroup = uint3(x, y, z);
    t.threadgroup_position_in_grid = uint3(g[0], g[1], g[2]);
    t.thread_position_in_grid = uint3(g[0] * L->tg[0] + x, g[1] * L->tg[1] + y, g[2] * L->tg[2] + z);
    t.threads_per_threadgroup = uint3(a[0], a[1], a[2]);
    t.dispatch_threads_per_threadgroup = uint3(L->tg[0], L->tg[1], L->tg[2]);
    t.threadgroups_per_grid = uint3(L->groups[0], L->groups[1], L->groups[2]);
    t.threads_per_grid = t.grid_size = uint3(L->grid[0], L->grid[1], L->grid[2]);
    t.grid_origin = uint3(0u);
    t.thread_index_in_threadgroup = i;
    t.simdgroup_index_in_threadgroup = i / kSimdWidth;
    t.thread_index_in_simdgroup = i % kSimdWidth;
    t.simdgroups_per_threadgroup = nsg;
    t.dispatch_simdgroups_per_threadgroup = (dispatch_n + kSimdWidth - 1) / kSimdWidth;
    t.quadgroup_index_in_threadgroup = i / 4;
    t.thread_index_in_quadgroup = i % 4;
    t.quadgroups_per_threadgroup = (n + 3) / 4;
    t.dispatch_quadgroups_per_threadgroup = (dispatch_n + 3) / 4;
    t.threads_per_simdgroup = t.thread_execution_width = kSimdWidth;
    make_context(l.ctx, w->stacks + size_t(i) * (kStack + 4096) + 4096, kStack, lane_main);  // guard page below
    l.state = kRun;
  }
  unsigned rng = L->seed * 2654435761u + unsigned(gid) * 40503u + 1u;
  int sg_order[kMaxThreads / kSimdWidth], lane_order[kSimdWidth];
  order(sg_order, nsg, L->schedule, rng);
  w->armed = true;
  if (sigsetjmp(w->jb, 1) != 0) {
    w->armed = false;
    const char* what = w->fault_sig == SIGFPE ? "arithmetic fault (integer division by zero?)"
                                              : "invalid memory access (out of bounds?)";
    char addr[32];
    std::snprintf(addr, sizeof addr, "%p", w->fault_addr);
    w->error = std::string(what) + " at address " + addr + " in thread " +
               fmt3(w->cur->ids.thread_position_in_threadgroup);
    return false;
  }
  for (;;) {
    for (int si = 0; si < nsg; ++si) {
      const int s0 = sg_order[si] * kSimdWidth, m = std::min(kSimdWidth, n - s0);
      order(lane_order, m, L->schedule, rng);
      for (;;) {
        for (int k = 0; k < m; ++k) {
          Lane* l = &w->lanes[s0 + lane_order[k]];
          if (l->state != kRun) continue;
          w->cur = l;
          switch_context(w->sched, l->ctx);
          if (!w->error.empty()) return abort_group(w);
        }
        // Every lane of this SIMD group waits: evaluate the earliest SIMD-group call site (in
        // source order), over the lanes waiting at it; divergent lanes elsewhere wait their turn.
        Lane* first = nullptr;
        for (int k = 0; k < m; ++k) {
          Lane* l = &w->lanes[s0 + k];
          if (l->state == kSimd && (!first || site_less(l->site, first->site))) first = l;
        }
        if (!first) break;
        Lane* by[kSimdWidth] = {};
        for (int k = 0; k < m; ++k) {
          Lane* l = &w->lanes[s0 + k];
          if (l->state == kSimd && site_eq(l->site, first->site)) by[k] = l;
        }
        first->resolve(by);
        for (Lane* l : by)
          if (l) l->state = kRun;
        if (!w->error.empty()) return abort_group(w);
      }
    }
    int waiting = 0, done = 0;
    Lane* at = nullptr;
    for (int i = 0; i < n; ++i) {
      Lane& l = w->lanes[i];
      if (l.state == kDone) { ++done; continue; }
      ++waiting;
      if (!at) at = &l;
      else if (!site_eq(at->site, l.site)) {
        w->error = "threads of one threadgroup wait at different threadgroup_barrier calls (lines " +
                   std::to_string(at->site.line) + " and " + std::to_string(l.site.line) + ")";
        return abort_group(w);
      }
    }
    if (waiting == 0) {
      w->armed = false;
      return true;
    }
    if (done > 0) {
      w->error = "threadgroup_barrier at line " + std::to_string(at->site.line) + " is reached by " +
                 std::to_string(waiting) + " threads while " + std::to_string(done) +
                 " threads of the threadgroup have returned (undefined behaviour on Metal)";
      return abort_group(w);
    }
    for (int i = 0; i < n; ++i) w->lanes[i].state = kRun;
  }
}

inline struct sigaction g_old[3];
inline const int kSignals[3] = {SIGSEGV, SIGBUS, SIGFPE};

inline void on_signal(int sig, siginfo_t* si, void*) {
  Worker* w = tw;
  if (w && w->armed && w->cur) {
    w->fault_sig = sig;
    w->fault_addr = si->si_addr;
    siglongjmp(w->jb, 1);
  }
  for (int k = 0; k < 3; ++k)  // not a kernel thread's fault: the previous handler gets it
    if (kSignals[k] == sig) sigaction(sig, &g_old[k], nullptr);
}

inline void worker_main(Launch* L, int max_threads) {
  Worker w;
  w.L = L;
  w.lanes.resize(max_threads);
  w.stacks_bytes = size_t(max_threads) * (kStack + 4096);
  void* mem = mmap(nullptr, w.stacks_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  stack_t alt{}, old_alt{};
  std::vector<char> alt_mem(64 * 1024);
  if (mem == MAP_FAILED) {
    std::lock_guard<std::mutex> g(L->mu);
    L->error = "cannot allocate fiber stacks";
    L->failed = true;
    return;
  }
  w.stacks = static_cast<char*>(mem);
  for (int i = 0; i < max_threads; ++i) mprotect(w.stacks + size_t(i) * (kStack + 4096), 4096, PROT_NONE);
  alt.ss_sp = alt_mem.data();
  alt.ss_size = alt_mem.size();
  sigaltstack(&alt, &old_alt);
  tw = &w;
  while (!L->failed) {
    long gid = L->next++;
    if (gid >= L->total) break;
    if (!run_group(&w, gid)) {
      std::lock_guard<std::mutex> g(L->mu);
      if (!L->failed.exchange(true)) {
        unsigned gx = gid % L->groups[0], gy = gid / L->groups[0] % L->groups[1],
                 gz = gid / (long(L->groups[0]) * L->groups[1]);
        L->error = w.error + " [threadgroup " + fmt3(uint3(gx, gy, gz)) + "]";
      }
    }
  }
  tw = nullptr;
  sigaltstack(&old_alt, nullptr);
  munmap(mem, w.stacks_bytes);
}

inline std::mutex g_launch_mu;

inline int launch(Entry entry, void* const* bufs, const long* grid, const long* tg, int workers, int schedule,
                  unsigned seed, char* err, int errlen) {
  std::lock_guard<std::mutex> lock(g_launch_mu);  // signal handlers are process-wide
  Launch L;
  L.entry = entry;
  L.bufs = bufs;
  L.schedule = schedule;
  L.seed = seed;
  long tg_total = 1;
  L.total = 1;
  for (int d = 0; d < 3; ++d) {
    if (grid[d] < 1 || tg[d] < 1 || grid[d] > 0xffffffffL) {
      std::snprintf(err, errlen, "grid and threadgroup sizes must be >= 1");
      return 1;
    }
    tg_total *= tg[d];
    L.grid[d] = unsigned(grid[d]);
    L.tg[d] = unsigned(std::min(tg[d], grid[d]));  // as MLX: the threadgroup never exceeds the grid
    L.groups[d] = (L.grid[d] + L.tg[d] - 1) / L.tg[d];
    L.total *= L.groups[d];
  }
  if (tg_total > kMaxThreads) {
    std::snprintf(err, errlen, "threadgroup of %ld threads exceeds the maximum of %d", tg_total, kMaxThreads);
    return 1;
  }
  const int max_threads = int(L.tg[0] * L.tg[1] * L.tg[2]);
  struct sigaction sa{};
  sa.sa_sigaction = on_signal;
  sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
  sigemptyset(&sa.sa_mask);
  for (int k = 0; k < 3; ++k) sigaction(kSignals[k], &sa, &g_old[k]);
  workers = int(std::max(1L, std::min<long>(workers, L.total)));
  std::vector<std::thread> pool;
  for (int i = 1; i < workers; ++i) pool.emplace_back(worker_main, &L, max_threads);
  worker_main(&L, max_threads);
  for (auto& t : pool) t.join();
  for (int k = 0; k < 3; ++k) sigaction(kSignals[k], &g_old[k], nullptr);
  if (L.failed) {
    std::snprintf(err, errlen, "%s", L.error.c_str());
    return 2;
  }
  return 0;
}

}  // namespace msim
