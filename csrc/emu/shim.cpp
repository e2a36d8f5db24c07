// Fiber scheduler behind csrc/emu/shim.h. One OS thread runs a whole launch; each CUDA thread of
// the current block is a fiber that runs until it reaches a barrier or returns.
//
// Context switch: on x86-64 a 14-instruction switch of the callee-saved registers (Context below);
// elsewhere ucontext. swapcontext saves the signal mask with a system call on every switch and, under
// ASan, its interceptor clears the shadow of the whole target stack: the emulated tests spent most of
// their time there. The ASan fiber annotations (start/finish_switch_fiber) cover either switch.
#include "shim.h"
#include "tsan_hooks.h"

#include <sys/mman.h>
#include <unistd.h>
#if !defined(__x86_64__)
#include <ucontext.h>
#endif

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <map>
#include <mutex>
#include <new>
#include <stdexcept>
#include <string>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define MK_EMU_ASAN 1
#endif

namespace mk::emu {

namespace {
#if defined(MK_EMU_ASAN) || defined(MK_EMU_TSAN)
constexpr size_t kStackBytes = 512 * 1024;  // sanitizer frames are much larger
#else
constexpr size_t kStackBytes = 128 * 1024;
#endif
}  // namespace

enum class State { Ready, AtBlockBarrier, AtWarpBarrier, Done };

#if defined(__x86_64__)
}  // namespace mk::emu
// mk_emu_switch(&from_sp, to_sp): push the System V callee-saved registers, save the stack pointer
// to *from_sp, load to_sp, pop that context's registers and return into it.
extern "C" void mk_emu_switch(void** from_sp, void* to_sp);
asm(R"(
  .text
  .globl mk_emu_switch
  .type mk_emu_switch, @function
mk_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size mk_emu_switch, .-mk_emu_switch
  .section .note.GNU-stack,"",@progbits
  .text
)");
namespace mk::emu {

struct Context {
  void* sp = nullptr;
  // A fresh stack whose first switch "returns" into entry() with the ABI's call alignment.
  void init(unsigned char* stack, size_t bytes, void (*entry)()) {
#if defined(MK_EMU_ASAN)
    // The previous fiber on this stack never returned from fiber_main: its frames near the top are
    // still poisoned (swapcontext's interceptor used to clear the whole stack at every switch).
    const size_t used = bytes < 64 * 1024 ? bytes : 64 * 1024;
    ASAN_UNPOISON_MEMORY_REGION(stack + bytes - used, used);
#endif
    auto top = reinterpret_cast<uintptr_t>(stack + bytes) & ~uintptr_t(15);
    auto* slot = reinterpret_cast<void**>(top - 64);  // 6 registers, entry, a null return address
    for (int i = 0; i < 6; ++i) slot[i] = nullptr;
    slot[6] = reinterpret_cast<void*>(entry);
    slot[7] = nullptr;
    sp = slot;
  }
};
inline void switch_context(Context& from, Context& to) { mk_emu_switch(&from.sp, to.sp); }
#else
struct Context {
  ucontext_t uc{};
  void init(unsigned char* stack, size_t bytes, void (*entry)()) {
    getcontext(&uc);
    uc.uc_stack.ss_sp = stack;
    uc.uc_stack.ss_size = bytes;
    uc.uc_link = nullptr;
    makecontext(&uc, entry, 0);
  }
};
inline void switch_context(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
#endif

struct ThreadState {
  uint3 idx{};
  int warp = 0;
  int lane = 0;
  State state = State::Done;
  const char* collective = nullptr;  // the warp collective this fiber waits at
  const char* sync_file = nullptr;   // the __syncthreads call site this fiber waits at
  unsigned sync_line = 0;
  // cp.async (per thread, as in the PTX ISA): copies issued but not yet committed, then committed
  // groups oldest first. None is performed before its wait (or the block's end).
  struct AsyncCopy {
    void* dst;
    const void* src;
    unsigned cp_bytes, src_bytes;
  };
  std::vector<AsyncCopy> async_open;
  std::deque<std::vector<AsyncCopy>> async_groups;
  Context ctx;
  unsigned char* stack = nullptr;  // mmap'ed, lowest page is a guard page
  void* fiber = nullptr;           // its TSan fiber (TSan build only; fresh for every block)
  unsigned block_syncs = 0, warp_syncs = 0;  // barriers passed (their parity picks the TSan sync object)
};

struct BlockState {
  dim3 grid, block;
  uint3 bidx{};
  int nthreads = 0;
  std::vector<ThreadState> threads;
  std::vector<unsigned char> exchange;  // [warps][32][kExchangeBytes]
  void* smem = nullptr;
  size_t smem_bytes = 0;
  // Static shared arrays of the current block (MK_SHARED_ARRAY): declaration-site tag -> allocation.
  struct StaticShared {
    const void* tag;
    void* ptr;
    size_t bytes, align;
  };
  std::vector<StaticShared> static_smem;
  size_t static_smem_total = 0;  // this block's static shared bytes so far
  // The launch's shared-memory budget (smem_limits() and the kernel's opt-in, if any)
  SmemLimits limits{};
  size_t optin = 0;  // the kernel's MaxDynamicSharedMemorySize, 0: no opt-in
  bool forward_first = false;  // scheduling order of the first pass (then alternating)
  const std::function<void()>* body = nullptr;
  Context sched;
  std::string error;
  const void* sched_stack_bottom = nullptr;
  size_t sched_stack_size = 0;
  // TSan build: the host's fiber, this block's sync objects, launch start/end objects, and the
  // dynamic shared memory of finished blocks (freed after the launch, once the host has acquired it).
  void* host_fiber = nullptr;
  tsan::BlockSync sync;
  char* launch_sync = nullptr;  // [0]: launch start, [1]: launch end
  struct Retired {
    void* ptr;
    size_t align;
  };
  std::vector<Retired> retired;  // TSan build: shared memory of finished blocks, freed after the launch
};

thread_local ThreadState* tls_thread = nullptr;
thread_local BlockState* tls_block = nullptr;

namespace {

BlockState& cur_block() {
  if (tls_block == nullptr || tls_thread == nullptr)
    throw std::runtime_error("mokernels emulator: a device intrinsic was called outside a launch");
  return *tls_block;
}

void set_error(BlockState& b, const std::string& what) {
  if (b.error.empty()) b.error = what;
}

// Fiber -> scheduler. `dying` tells ASan that this fiber's fake stack can be released.
void switch_to_scheduler(bool dying) {
  BlockState* b = tls_block;
  ThreadState* t = tls_thread;
#if defined(MK_EMU_ASAN)
  void* fake = nullptr;
  __sanitizer_start_switch_fiber(dying ? nullptr : &fake, b->sched_stack_bottom, b->sched_stack_size);
#else
  (void)dying;
#endif
  tsan::switch_to(b->host_fiber);
  switch_context(t->ctx, b->sched);
#if defined(MK_EMU_ASAN)
  __sanitizer_finish_switch_fiber(fake, &b->sched_stack_bottom, &b->sched_stack_size);
#endif
}

void fiber_main() {
  BlockState* b = tls_block;
#if defined(MK_EMU_ASAN)
  __sanitizer_finish_switch_fiber(nullptr, &b->sched_stack_bottom, &b->sched_stack_size);
#endif
  if (tsan::kEnabled) tsan::acquire(b->launch_sync);  // launch start: host -> thread
  try {
    (*b->body)();
  } catch (const std::exception& e) {
    set_error(*b, std::string("C++ exception escaped the kernel: ") + e.what());
  } catch (...) {
    set_error(*b, "C++ exception escaped the kernel");
  }
  tls_thread->state = State::Done;
  if (tsan::kEnabled) tsan::release(b->launch_sync + 1);  // launch end: thread -> host
  switch_to_scheduler(/*dying=*/true);
  std::abort();  // a finished fiber is never resumed
}

// Scheduler -> fiber, until the fiber parks at a barrier or finishes.
void run_fiber(BlockState& b, ThreadState& t) {
  tls_thread = &t;
#if defined(MK_EMU_ASAN)
  void* fake = nullptr;
  __sanitizer_start_switch_fiber(&fake, t.stack, kStackBytes);
#endif
  tsan::switch_to(t.fiber);
  switch_context(b.sched, t.ctx);
#if defined(MK_EMU_ASAN)
  __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
  tls_thread = nullptr;
}

std::string warp_str(int w) { return "warp " + std::to_string(w); }

// Runs warp `w` alone until every live lane of it waits at the block barrier or has exited, releasing
// its warp collectives as they complete. Lane order alternates at every pass (`lane_forward` carries the
// alternation across warps and phases). False: an error was recorded.
bool run_warp(BlockState& b, int w, bool& lane_forward) {
  const int first = w * kWarpSize, end = std::min(b.nthreads, first + kWarpSize), n = end - first;
  for (;;) {
    for (int k = 0; k < n; ++k) {
      ThreadState& t = b.threads[first + (lane_forward ? k : n - 1 - k)];
      if (t.state == State::Ready) run_fiber(b, t);
      if (!b.error.empty()) return false;
    }
    lane_forward = !lane_forward;
    int at_warp = 0, at_block = 0, exited = -1;
    for (int i = first; i < end; ++i) {
      const State s = b.threads[i].state;
      if (s == State::Done) exited = i - first;
      at_warp += s == State::AtWarpBarrier;
      at_block += s == State::AtBlockBarrier;
    }
    if (at_warp == 0) return true;  // the warp is done with this phase
    const ThreadState* waiter = nullptr;
    for (int i = first; i < end && waiter == nullptr; ++i)
      if (b.threads[i].state == State::AtWarpBarrier) waiter = &b.threads[i];
    if (exited >= 0) {
      set_error(b, "warp collective (" + std::string(waiter->collective) + ") in " + warp_str(w) +
                       " while lane " + std::to_string(exited) + " has exited (undefined behaviour on a GPU)");
      return false;
    }
    if (at_block > 0) {
      set_error(b, "deadlock: lanes of " + warp_str(w) + " wait at a warp collective (" + waiter->collective +
                       ") while others wait at __syncthreads (divergent __syncthreads or a warp collective not "
                       "reached by the whole warp)");
      return false;
    }
    for (int i = first; i < end; ++i)
      if (std::strcmp(b.threads[i].collective, waiter->collective) != 0) {
        set_error(b, "lanes of " + warp_str(w) + " meet at different warp collectives (" + waiter->collective +
                         " and " + b.threads[i].collective + ")");
        return false;
      }
    for (int i = first; i < end; ++i) b.threads[i].state = State::Ready;
  }
}

// An mmap'ed fiber stack of kStackBytes above a PROT_NONE guard page (a stack overflow faults).
unsigned char* map_stack(size_t page) {
  void* mem = mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                   -1, 0);
  if (mem == MAP_FAILED) throw std::runtime_error("emulated launch: cannot map fiber stacks");
  if (mprotect(mem, page, PROT_NONE) != 0)
    throw std::runtime_error("emulated launch: cannot protect a fiber stack guard page");
  return static_cast<unsigned char*>(mem) + page;
}

void unmap_stack(unsigned char* stack, size_t page) {
#if defined(MK_EMU_ASAN)
  // a fiber abandoned by a failed launch leaves poisoned frames behind; mmap may reuse the pages
  ASAN_UNPOISON_MEMORY_REGION(stack, kStackBytes);
#endif
  munmap(stack - page, kStackBytes + page);
}

// TSan build: every block gets new fibers, sync objects, stacks (munmap drops TSan's shadow, so the
// frames of block k do not race with those of block k+1); run_block gives it fresh dynamic shared memory.
void tsan_fresh_block(BlockState& b, bool first) {
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  delete[] b.sync.bytes;
  b.sync.bytes = new char[2 + 2 * ceil_div_host(b.nthreads, kWarpSize)];
  for (auto& t : b.threads) {
    t.block_syncs = t.warp_syncs = 0;
    tsan::destroy(t.fiber);
    t.fiber = tsan::create();
    if (!first) {
      unmap_stack(t.stack, page);
      t.stack = nullptr;
      t.stack = map_stack(page);
    }
  }
  tsan::release(b.launch_sync);  // the host's work so far (poisoning the block's memory) -> threads
}

void perform(const std::vector<ThreadState::AsyncCopy>& group) {
  for (const auto& c : group) {
    std::memcpy(c.dst, c.src, c.src_bytes);
    std::memset(static_cast<unsigned char*>(c.dst) + c.src_bytes, 0, c.cp_bytes - c.src_bytes);
  }
}

// At block end: copies still pending when their thread exited land now (committed groups in order,
// then the uncommitted ones), as they would on a GPU; after a failed block they are dropped.
void finish_async_copies(BlockState& b, bool perform_them) {
  for (auto& t : b.threads) {
    if (perform_them) {
      for (const auto& g : t.async_groups) perform(g);
      perform(t.async_open);
    }
    t.async_groups.clear();
    t.async_open.clear();
  }
}

// TSan build: kept until the launch ends, when the host has acquired every thread's accesses (a free
// now would race with them: the host is not ordered after the block).
void free_static_shared(BlockState& b) {
  for (auto& a : b.static_smem)
    if (tsan::kEnabled)
      b.retired.push_back({a.ptr, a.align});
    else
      ::operator delete(a.ptr, std::align_val_t{a.align});
  b.static_smem.clear();
  b.static_smem_total = 0;
}

std::string site(const ThreadState& t) { return std::string(t.sync_file) + ":" + std::to_string(t.sync_line); }

// Warp-serial schedule: a phase is the interval between two block barriers; in each phase every warp
// runs alone through all of its collectives up to the block barrier, warps in alternating order
// (reverse first by default), so no warp ever sees another warp's writes of the same phase.
void run_block_fibers(BlockState& b, bool first) {
  if (tsan::kEnabled && !first && b.smem_bytes) {
    b.retired.push_back({b.smem, 16});
    b.smem = ::operator new(b.smem_bytes, std::align_val_t{16});
  }
  // Uninitialised shared memory reads as 0xFF bytes (NaN for floats), never as a previous block's data.
  if (b.smem_bytes) std::memset(b.smem, 0xFF, b.smem_bytes);
  if (tsan::kEnabled) tsan_fresh_block(b, first);
  for (auto& t : b.threads) {
    t.state = State::Ready;
    t.ctx.init(t.stack, kStackBytes, fiber_main);
  }
  const int nwarps = static_cast<int>(ceil_div_host(b.nthreads, kWarpSize));
  bool lane_forward = b.forward_first;
  for (bool warp_forward = b.forward_first;; warp_forward = !warp_forward) {
    for (int k = 0; k < nwarps; ++k)
      if (!run_warp(b, warp_forward ? k : nwarps - 1 - k, lane_forward)) return;
    // Every live thread now waits at a block barrier: the same one (call site), or the kernel diverged.
    const ThreadState* first = nullptr;
    for (auto& t : b.threads) {
      if (t.state == State::Done) continue;
      if (first == nullptr) {
        first = &t;
      } else if (t.sync_line != first->sync_line || std::strcmp(t.sync_file, first->sync_file) != 0) {
        set_error(b, "threads meet at different __syncthreads (" + site(*first) + " vs " + site(t) +
                         "): divergent barriers");
        return;
      }
      t.state = State::Ready;
    }
    if (first == nullptr) return;
  }
}

// One block: its fibers, then the release of its static shared memory (a fresh allocation per block:
// never the previous block's data, and fresh shadow memory for the sanitizers).
void run_block(BlockState& b, bool first) {
  run_block_fibers(b, first);
  // TSan: the copies land in this block's shared memory on behalf of threads that have exited
  tsan::ignore_begin();
  finish_async_copies(b, b.error.empty());
  tsan::ignore_end();
  free_static_shared(b);
}

}  // namespace

int64_t ceil_div_host(int64_t a, int64_t b) { return (a + b - 1) / b; }

const uint3& thread_idx() { return cur_block(), tls_thread->idx; }
const uint3& block_idx() { return cur_block().bidx; }
const dim3& block_dim() { return cur_block().block; }
const dim3& grid_dim() { return cur_block().grid; }
int lane_id() { return cur_block(), tls_thread->lane; }
void* dynamic_shared() { return cur_block().smem; }

void cp_async(void* dst, const void* src, unsigned cp_bytes, unsigned src_bytes) {
  cur_block();
  if (src_bytes > cp_bytes) fail("cp.async: src-size larger than cp-size");
  require_aligned(dst, cp_bytes, "cp.async shared-memory destination is not aligned to the copy size");
  require_aligned(src, cp_bytes, "cp.async global source is not aligned to the copy size");
  // Poison now: a read of the destination before the matching wait sees 0xFF bytes (NaN).
  std::memset(dst, 0xFF, cp_bytes);
  tls_thread->async_open.push_back({dst, src, cp_bytes, src_bytes});
}

void cp_async_commit() {
  cur_block();
  tls_thread->async_groups.push_back(std::move(tls_thread->async_open));
  tls_thread->async_open.clear();
}

void cp_async_wait(int pending) {
  cur_block();
  auto& groups = tls_thread->async_groups;
  while (static_cast<int>(groups.size()) > pending) {
    perform(groups.front());
    groups.pop_front();
  }
}

void* static_shared(const void* tag, size_t bytes, size_t align) {
  BlockState& b = cur_block();
  for (auto& a : b.static_smem)
    if (a.tag == tag) {
      if (a.bytes != bytes) fail("one static shared array declared with two sizes");
      return a.ptr;
    }
  align = std::max(align, alignof(std::max_align_t));
  // The hardware's shared-memory limits, with the static size now known (SmemLimits in shim.h).
  const size_t total = b.static_smem_total + bytes;
  const SmemLimits& L = b.limits;
  // the message lives outside the fiber's stack (fail() never returns to destroy a temporary)
  static thread_local std::string msg;
  if (total > L.static_max)
    fail((msg = "static shared memory of " + std::to_string(total) + " bytes exceeds the 48 KiB static limit "
          "(ptxas rejects it; use dynamic shared memory with MK_SET_MAX_DYNAMIC_SMEM)").c_str());
  if (b.optin == 0 && total + b.smem_bytes > L.default_max)
    fail((msg = "static (" + std::to_string(total) + ") + dynamic (" + std::to_string(b.smem_bytes) +
          ") shared memory bytes exceed the 48 KiB default limit; above it the kernel must opt in with "
          "MK_SET_MAX_DYNAMIC_SMEM (cudaFuncSetAttribute MaxDynamicSharedMemorySize)").c_str());
  if (b.optin != 0 && total + b.optin > L.optin_max)
    fail((msg = "static (" + std::to_string(total) + ") + MaxDynamicSharedMemorySize (" + std::to_string(b.optin) +
          ") shared memory bytes exceed the " + L.arch + " opt-in limit of " + std::to_string(L.optin_max) +
          " (cudaFuncSetAttribute fails on the GPU)").c_str());
  b.static_smem_total = total;
  // Exactly `bytes`: an access one past the end is a heap-buffer-overflow under ASan.
  // TSan: allocated and poisoned by whichever thread asks first, but on behalf of the block (no access
  // of that thread for the others to race with).
  tsan::ignore_begin();
  void* p = ::operator new(bytes, std::align_val_t{align});
  std::memset(p, 0xFF, bytes);  // poison: uninitialised shared memory reads as 0xFF bytes (NaN)
  tsan::ignore_end();
  b.static_smem.push_back({tag, p, bytes, align});
  return p;
}

// TSan: barrier n releases into and acquires from sync object n % 2. One object would let a thread
// that already arrived at barrier n + 1 release into what a slower thread acquires when it leaves
// barrier n, ordering accesses that the GPU leaves unordered; barrier n + 2 cannot open before every
// thread has left barrier n, so two objects suffice.
void block_sync(const char* file, unsigned line) {
  BlockState& b = cur_block();
  ThreadState& t = *tls_thread;
  const void* obj = tsan::kEnabled ? b.sync.barrier(t.block_syncs++ & 1) : nullptr;
  if (tsan::kEnabled) {
    tsan::release(obj);
    tsan::release(b.launch_sync + 1);
  }
  t.sync_file = file;
  t.sync_line = line;
  t.state = State::AtBlockBarrier;
  switch_to_scheduler(false);
  if (tsan::kEnabled) tsan::acquire(obj);
}

void warp_sync(const char* kind) {
  BlockState& b = cur_block();
  ThreadState& t = *tls_thread;
  const void* obj = tsan::kEnabled ? b.sync.warp(t.warp, t.warp_syncs++ & 1) : nullptr;
  const bool order = tsan::kEnabled && !tsan::strict();
  if (order) tsan::release(obj);
  if (tsan::kEnabled) tsan::release(b.launch_sync + 1);
  t.state = State::AtWarpBarrier;
  t.collective = kind;
  switch_to_scheduler(false);
  if (order) tsan::acquire(obj);
}

namespace {
unsigned char* exchange_slot(int lane) {
  BlockState& b = cur_block();
  const size_t slot = static_cast<size_t>(tls_thread->warp) * kWarpSize + lane;
  return b.exchange.data() + slot * kExchangeBytes;
}
}  // namespace

void exchange_put(const void* src, size_t n) {
  if (n > kExchangeBytes) fail("warp exchange of more than kExchangeBytes");
  unsigned char* dst = exchange_slot(lane_id());
  tsan::ignore_begin();
  std::memcpy(dst, src, n);
  tsan::ignore_end();
}

void exchange_get(int lane, void* dst, size_t n) {
  if (n > kExchangeBytes) fail("warp exchange of more than kExchangeBytes");
  const unsigned char* src = exchange_slot(lane);
  tsan::ignore_begin();
  std::memcpy(dst, src, n);
  tsan::ignore_end();
}

bool lane_exists(int lane) {
  BlockState& b = cur_block();
  return tls_thread->warp * kWarpSize + lane < b.nthreads;
}

namespace {
std::string& mutation() {
  static std::string m = [] {
    const char* v = std::getenv("MOKERNELS_EMU_MUTATION");
    return std::string(v ? v : "");
  }();
  return m;
}
}  // namespace

bool mutation_on(const char* name) { return !mutation().empty() && mutation() == name; }
void set_mutation(const char* name) { mutation() = name; }

void fail(const char* what) {
  if (tls_thread == nullptr || tls_block == nullptr) throw std::runtime_error(what);
  set_error(*tls_block, what);
  if (tsan::kEnabled) tsan::release(tls_block->launch_sync + 1);
  tls_thread->state = State::Done;
  switch_to_scheduler(/*dying=*/true);
  std::abort();  // never resumed
}

namespace {
std::mutex& attr_mutex() {
  static std::mutex mu;
  return mu;
}
std::map<const void*, size_t>& max_dynamic_smem() {  // kernel -> MaxDynamicSharedMemorySize (opted in)
  static std::map<const void*, size_t> m;
  return m;
}
}  // namespace

SmemLimits smem_limits() {
  const char* s = std::getenv("MOKERNELS_EMU_ARCH");
  const std::string arch = s != nullptr ? s : "";
  if (arch == "sm_90" || arch == "sm_90a")
    return {"sm_90", 48 * 1024, 48 * 1024, 232448};
  if (!arch.empty() && arch != "sm_80")
    throw std::runtime_error("MOKERNELS_EMU_ARCH must be sm_80 or sm_90, got " + arch);
  return {"sm_80", 48 * 1024, 48 * 1024, 166912};
}

void set_max_dynamic_smem(const void* kernel, size_t bytes) {
  const SmemLimits L = smem_limits();
  if (bytes > L.optin_max)
    throw std::runtime_error("emulated cudaFuncSetAttribute: MaxDynamicSharedMemorySize " + std::to_string(bytes) +
                             " exceeds the " + L.arch + " opt-in limit of " + std::to_string(L.optin_max) + " bytes");
  std::lock_guard<std::mutex> lock(attr_mutex());
  max_dynamic_smem()[kernel] = bytes;
}

void launch(dim3 grid, dim3 block, size_t smem_bytes, const std::function<void()>& body, const void* kernel) {
  static std::mutex mu;  // one emulated launch at a time (the shim's thread-locals, the kernels' tags)
  std::lock_guard<std::mutex> lock(mu);
  const SmemLimits limits = smem_limits();
  size_t optin = 0;
  if (kernel != nullptr) {
    std::lock_guard<std::mutex> attr_lock(attr_mutex());
    auto it = max_dynamic_smem().find(kernel);
    if (it != max_dynamic_smem().end()) optin = it->second;
  }
  // The limits a GPU enforces at launch (cudaErrorInvalidConfiguration there).
  const int64_t nthreads = static_cast<int64_t>(block.x) * block.y * block.z;
  if (nthreads <= 0 || nthreads > 1024 || block.x > 1024 || block.y > 1024 || block.z > 64)
    throw std::runtime_error("emulated launch: invalid block (" + std::to_string(block.x) + "," +
                             std::to_string(block.y) + "," + std::to_string(block.z) + ")");
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 2147483647u || grid.y > 65535 || grid.z > 65535)
    throw std::runtime_error("emulated launch: invalid grid dimensions");
  // Dynamic shared memory: <= 48 KiB without an opt-in (static + dynamic is checked when the static
  // arrays are declared), <= the kernel's MaxDynamicSharedMemorySize with one.
  if (optin == 0 && smem_bytes > limits.default_max)
    throw std::runtime_error("emulated launch: " + std::to_string(smem_bytes) +
                             " bytes of dynamic shared memory exceed the 48 KiB default limit (the kernel has not "
                             "opted in with MK_SET_MAX_DYNAMIC_SMEM)");
  if (optin != 0 && smem_bytes > optin)
    throw std::runtime_error("emulated launch: " + std::to_string(smem_bytes) +
                             " bytes of dynamic shared memory exceed the kernel's MaxDynamicSharedMemorySize of " +
                             std::to_string(optin));
  // Read at every launch, so a test can run one kernel under both schedules.
  const bool forward_first = [] {
    const char* s = std::getenv("MOKERNELS_EMU_SCHEDULE");
    return s != nullptr && std::string(s) == "forward";
  }();
  const bool reverse_blocks = [] {
    const char* s = std::getenv("MOKERNELS_EMU_BLOCK_ORDER");
    return s != nullptr && std::string(s) == "reverse";
  }();

  BlockState b;
  b.grid = grid;
  b.block = block;
  b.nthreads = static_cast<int>(nthreads);
  b.body = &body;
  b.threads.resize(nthreads);
  b.exchange.assign(ceil_div_host(nthreads, kWarpSize) * kWarpSize * kExchangeBytes, 0);
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  struct Cleanup {
    BlockState& b;
    size_t page;
    ~Cleanup() {
      // launch end: every thread -> host, before the host frees what the threads touched
      if (tsan::kEnabled && b.launch_sync) tsan::acquire(b.launch_sync + 1);
      for (auto& t : b.threads) {
        if (t.stack) unmap_stack(t.stack, page);
        tsan::destroy(t.fiber);
      }
      ::operator delete(b.smem, std::align_val_t{16});
      free_static_shared(b);
      for (const auto& r : b.retired) ::operator delete(r.ptr, std::align_val_t{r.align});
      delete[] b.sync.bytes;
      delete[] b.launch_sync;
      tls_block = nullptr;
      tls_thread = nullptr;
    }
  } cleanup{b, page};
  for (int i = 0; i < nthreads; ++i) {
    ThreadState& t = b.threads[i];
    t.stack = map_stack(page);
    t.idx = uint3{static_cast<unsigned>(i % block.x), static_cast<unsigned>((i / block.x) % block.y),
                  static_cast<unsigned>(i / (block.x * block.y))};
    t.warp = i / kWarpSize;
    t.lane = i % kWarpSize;
  }
  // Exactly smem_bytes: an access one past the end is a heap-buffer-overflow under ASan.
  b.smem = ::operator new(smem_bytes, std::align_val_t{16});
  b.smem_bytes = smem_bytes;
  b.limits = limits;
  b.optin = optin;
  b.forward_first = forward_first;
  if (tsan::kEnabled) {
    b.host_fiber = tsan::current();
    b.launch_sync = new char[2];  // run_block releases [0] (launch start: host -> every thread)
  }
  tls_block = &b;
  // Blocks run one after another, in linear order x fastest (last to first with
  // MOKERNELS_EMU_BLOCK_ORDER=reverse): a kernel whose blocks depend on each other's order is wrong.
  const uint64_t nblocks = static_cast<uint64_t>(grid.x) * grid.y * grid.z;
  for (uint64_t i = 0; i < nblocks; ++i) {
    const uint64_t lin = reverse_blocks ? nblocks - 1 - i : i;
    const auto x = static_cast<unsigned>(lin % grid.x), y = static_cast<unsigned>((lin / grid.x) % grid.y),
               z = static_cast<unsigned>(lin / (static_cast<uint64_t>(grid.x) * grid.y));
    b.bidx = uint3{x, y, z};
    run_block(b, i == 0);
    if (!b.error.empty())
      throw std::runtime_error("emulated kernel failed in block (" + std::to_string(x) + "," + std::to_string(y) +
                               "," + std::to_string(z) + "): " + b.error);
  }
}

}  // namespace mk::emu
