// The CUDA execution model on the CPU, for testing kernels written in the CUDA language on a
// machine without a GPU. Include it before the kernels' header, in a translation unit compiled
// by the host compiler (no __CUDACC__).
//
// The threads of a block are fibers (ucontext) of one OS thread, switched at barriers; blocks run
// one after another (a cluster's blocks together: launch_cluster), so __shared__ arrays can be
// function statics (clustered kernels keep theirs in dynamic shared memory, one per block). What
// is emulated, and checked where CUDA would fail or misbehave:
//   - threadIdx / blockIdx / blockDim / gridDim (1-D blocks), launch limits (block size, grid
//     y/z, dynamic shared memory), dynamic shared memory poisoned with NaN bytes per block;
//   - __syncthreads (a barrier of the whole block; one thread missing it aborts with a message
//     instead of hanging), __shfl_down_sync and __shfl_xor_sync over the full warp, __syncwarp;
//   - ldmatrix and mma.sync m16n8k16 (csrc/cuda/fragments.cuh), the values moved between a
//     warp's lanes as the hardware's fragment layouts say;
//   - nvcuda::wmma 16x16xK fragments, row- or column-major: every lane holds the whole tile, the
//     warp-wide operations are computed per lane, and load/store check the pointer alignment
//     (32 bytes) and leading dimension (a multiple of 16 bytes) that the hardware requires;
//   - wgmma m64n64k16 with A in registers (csrc/cuda/warpgroup.cuh): A taken when issued, the
//     products computed when their group is waited for, B read from shared memory then through
//     its descriptor and swizzle (a stage overwritten before the wait shows in the results, and
//     so do accumulators read before it); a thread ending with wgmma in flight aborts;
//   - Hopper clusters (launch_cluster; csrc/cuda/cluster.cuh's functions): the blocks of a
//     cluster run together, their threads fibers of one scheduler, each block with its own
//     shared memory; the cluster barrier; shared-memory barriers (mbarrier) with their phases,
//     arrival counts and transaction bytes, arrivals on another block's barrier; tile copies
//     (TMA), plain and multicast, which land, zero-filled past the tensor, at the end of the
//     scheduler's round rather than when issued (or, with land_at_issue, when issued: a stage
//     refilled while a thread still reads it shows), checked for the alignments the hardware
//     needs. One block of each cluster of several runs one round in four, so that the others
//     run ahead of it as far as the kernel's barriers let them: a stage overwritten before every
//     block is done with it shows in the results. A barrier used before its initialisation, or a
//     round in which nothing can move, aborts with a message. Dynamic shared memory starts
//     256 bytes past a 1024-byte boundary, and swizzled copies permute by the address.
// Races other than at barriers are not detected (but for the stage refilled early that
// land_at_issue shows): compute-sanitizer on a GPU is for that.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <tuple>
#include <ucontext.h>
#include <type_traits>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))
#define CONDCONV_DYNAMIC_SHARED(name) unsigned char* name = ::emu::dynamic_shared()
#include <map>

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
using cudaStream_t = struct EmulatedStream*;  // one stream: launches run to completion in order

// One OS thread runs every CUDA thread as a fiber, so these are plain globals, set by the
// scheduler before it resumes a fiber.
inline dim3 threadIdx, blockIdx, blockDim, gridDim;

namespace emu {

[[noreturn]] inline void fail(const std::string& what) {
  std::fprintf(stderr, "emulated CUDA: %s\n", what.c_str());
  std::abort();
}

// The fibers of one block and their scheduler: round-robin, each fiber running until it waits
// at a barrier or returns.
struct Scheduler {
  static constexpr size_t kStackBytes = 128 * 1024;
  ucontext_t main;
  std::vector<ucontext_t> fibers;
  std::vector<std::unique_ptr<char[]>> stacks;
  std::vector<bool> finished;
  unsigned running = 0;
  uint64_t events = 0;  // arrivals at barriers, releases and returns: what counts as progress
  std::function<void()> body;

  void yield() { swapcontext(&fibers[running], &main); }
};
inline Scheduler* scheduler = nullptr;

// A reusable barrier for n fibers. If a whole round of the scheduler passes without an arrival,
// a release or a return, some fiber of the group never arrives: CUDA would hang (or worse), the
// emulation aborts with a message.
class Barrier {
 public:
  explicit Barrier(unsigned n) : n_(n) {}
  void wait(const char* what) {
    Scheduler& sched = *scheduler;
    ++sched.events;
    if (++arrived_ == n_) {
      arrived_ = 0;
      ++generation_;
      return;
    }
    const uint64_t generation = generation_;
    waiting_for_ = what;
    while (generation_ == generation) sched.yield();
  }
  const char* waiting_for() const { return waiting_for_; }

 private:
  unsigned n_, arrived_ = 0;
  uint64_t generation_ = 0;
  const char* waiting_for_ = "";
};

// A thread's wgmma (csrc/cuda/warpgroup.cuh) issued and not yet waited for: its accumulators,
// the two rows of A it needs (taken when issued), B's descriptor.
struct WgmmaOp {
  float* d;
  float a[2][16];
  uint64_t b;
  bool bfloat16;
};
struct WgmmaState {
  std::vector<WgmmaOp> open;                 // since the last commit
  std::vector<std::vector<WgmmaOp>> groups;  // committed, oldest first
};

// The state of the running launch.
struct Launch {
  // Dynamic shared memory starts 256 bytes past a 1024-byte boundary: aligned for every access
  // the hardware checks (32 bytes for wmma), not for the 1024-byte tiles a kernel aligns itself
  // (its padding is exercised), and the addresses' low bits stand for shared-memory addresses.
  static constexpr size_t kAlign = 1024, kOffset = 256;
  explicit Launch(unsigned threads, size_t shared_bytes)
      : block(threads),
        slots(threads),
        wgmma(threads),
        storage(shared_bytes + kAlign + kOffset),
        size(shared_bytes) {
    for (unsigned w = 0; w * 32 < threads; ++w) {
      warps.emplace_back(new Barrier(std::min(32u, threads - 32 * w)));
    }
  }
  unsigned char* dynamic() { return aligned() + kOffset; }
  // The 1024-byte boundary below the dynamic shared memory: where shared addresses count from.
  unsigned char* aligned() {
    const uintptr_t at = reinterpret_cast<uintptr_t>(storage.data());
    return storage.data() + (kAlign - at % kAlign) % kAlign;
  }
  void poison() {
    if (size > 0) std::memset(dynamic(), 0xff, size);  // NaN in every float
  }
  Barrier block;
  std::vector<std::unique_ptr<Barrier>> warps;
  std::vector<std::array<unsigned char, 64>> slots;  // exchanges within a warp, one per thread
  std::vector<WgmmaState> wgmma;                      // one per thread
  std::vector<unsigned char> storage;
  size_t size;
};
inline Launch* current = nullptr;

inline unsigned char* dynamic_shared() { return current->dynamic(); }

inline void fiber_entry() {
  scheduler->body();
  const WgmmaState& w = current->wgmma[threadIdx.x];
  if (!w.open.empty() || !w.groups.empty()) fail("wgmma still in flight when the thread ended");
  scheduler->finished[scheduler->running] = true;
  ++scheduler->events;
}  // returns to the scheduler through uc_link

// Runs `count` fibers to their ends, round-robin; enter(f, round) sets the globals fiber f sees
// (threadIdx, blockIdx, the block's state) before it resumes, or returns false to leave it
// waiting this round (every fourth round resumes them all), and end_round() runs after each
// round (returning whether it made progress). A full round without progress is a deadlock.
inline void run_fibers(Scheduler& sched, unsigned count,
                       const std::function<bool(unsigned, uint64_t)>& enter,
                       const std::function<bool()>& end_round,
                       const std::function<std::string()>& stuck) {
  for (unsigned t = 0; t < count; ++t) {
    getcontext(&sched.fibers[t]);
    sched.fibers[t].uc_stack.ss_sp = sched.stacks[t].get();
    sched.fibers[t].uc_stack.ss_size = Scheduler::kStackBytes;
    sched.fibers[t].uc_link = &sched.main;
    makecontext(&sched.fibers[t], fiber_entry, 0);
    sched.finished[t] = false;
  }
  for (uint64_t round = 0, live = count; live > 0; ++round) {
    const uint64_t before = sched.events;
    const bool full = round % 4 == 3;
    live = 0;
    for (unsigned t = 0; t < count; ++t) {
      if (sched.finished[t]) continue;
      ++live;
      sched.running = t;
      if (!enter(t, full ? ~uint64_t(0) : round)) continue;
      swapcontext(&sched.main, &sched.fibers[t]);
      live -= sched.finished[t] ? 1 : 0;
    }
    const bool landed = end_round();
    if (full && live > 0 && sched.events == before && !landed) fail(stuck() + " (deadlock)");
  }
}

// Runs one block: every fiber to its end.
inline void run_block(Scheduler& sched, unsigned threads) {
  run_fibers(
      sched, threads,
      [](unsigned t, uint64_t) {
        threadIdx = dim3(t);
        return true;
      },
      [] { return false; },
      [] {
        return std::string(current->block.waiting_for()) + " in block (" +
               std::to_string(blockIdx.x) + ", " + std::to_string(blockIdx.y) + ", " +
               std::to_string(blockIdx.z) + ") was not reached by every thread";
      });
}

// A fiber scheduler with `count` stacks.
inline void make_fibers(Scheduler& sched, unsigned count) {
  sched.fibers.resize(count);
  sched.finished.resize(count);
  for (unsigned t = 0; t < count; ++t) sched.stacks.emplace_back(new char[Scheduler::kStackBytes]);
}

inline void check_grid(dim3 grid, dim3 block) {
  if (block.y != 1 || block.z != 1) fail("only 1-D blocks are emulated");
  if (block.x == 0 || block.x > 1024) fail("block size " + std::to_string(block.x));
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 2147483647u || grid.y > 65535 ||
      grid.z > 65535) {
    fail("invalid grid (" + std::to_string(grid.x) + ", " + std::to_string(grid.y) + ", " +
         std::to_string(grid.z) + ")");
  }
}

// Runs kernel<<<grid, block, shared_bytes>>>(args...) to completion, blocks in order. The
// arguments are converted to the kernel's parameter types once and copied into every thread's
// call, as CUDA does.
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared_bytes,
            Args&&... args) {
  check_grid(grid, block);
  if (shared_bytes > 48 * 1024) fail("dynamic shared memory above 48 KiB needs an opt-in");
  const std::tuple<Params...> params(std::forward<Args>(args)...);
  Launch state(block.x, shared_bytes);
  Scheduler sched;
  make_fibers(sched, block.x);
  sched.body = [&] { std::apply(kernel, params); };
  current = &state;
  scheduler = &sched;
  gridDim = grid;
  blockDim = block;
  for (unsigned z = 0; z < grid.z; ++z) {
    for (unsigned y = 0; y < grid.y; ++y) {
      for (unsigned x = 0; x < grid.x; ++x) {
        state.poison();
        blockIdx = dim3(x, y, z);
        run_block(sched, block.x);
      }
    }
  }
  current = nullptr;
  scheduler = nullptr;
}


// ---------------------------------------------------------------------------------------------
// Hopper clusters: csrc/cuda/cluster.cuh's functions on the CPU.

// A 3-D tensor of 16-bit elements and the box one copy moves (cluster.cuh: TileMap).
struct TileMap {
  const unsigned char* base;
  uint64_t dims[3];     // innermost first
  uint64_t strides[3];  // bytes: 2, then dims 1 and 2
  uint32_t box[3];
  int swizzle;          // 32: address bit 4 XOR bit 7; 64: bits 4-5 XOR 7-8; 128: 4-6 XOR 7-9
};

inline bool make_tile_map(TileMap* map, const void* base, const uint64_t dims[3],
                          const uint64_t strides[2], const uint32_t box[3], int swizzle,
                          std::string* error) {
  std::string why;
  if (reinterpret_cast<uintptr_t>(base) % 16 != 0) why = "base not 16-byte aligned";
  for (int d = 0; d < 2; ++d) {
    if (strides[d] % 16 != 0) {
      why = "stride of dim " + std::to_string(d + 1) + " not a multiple of 16";
    }
  }
  for (int d = 0; d < 3; ++d) {
    if (dims[d] == 0 || box[d] == 0 || box[d] > 256) why = "dim or box " + std::to_string(d);
  }
  if (box[0] * 2 % 16 != 0) why = "box's inner bytes not a multiple of 16";
  if (swizzle != 0 && swizzle != 32 && swizzle != 64 && swizzle != 128) {
    why = "swizzle " + std::to_string(swizzle);
  }
  if (swizzle != 0 && box[0] * 2 > uint32_t(swizzle)) {
    why = "a " + std::to_string(swizzle) + "-byte swizzle with longer rows";
  }
  if (!why.empty()) {
    *error = why;
    return false;
  }
  *map = TileMap{static_cast<const unsigned char*>(base),
                 {dims[0], dims[1], dims[2]},
                 {2, strides[0], strides[1]},
                 {box[0], box[1], box[2]},
                 swizzle};
  return true;
}

// The state of one shared-memory barrier (the hardware keeps it in its 8 bytes).
struct MBarrier {
  uint32_t count = 0, pending = 0, phase = 0;  // phase: phases completed
  int64_t bytes = 0;                            // announced and not yet landed
};

// A copy issued and not yet landed.
struct PendingCopy {
  const TileMap* map;
  int c[3];
  unsigned rank;    // the block it lands in
  size_t dst, bar;  // offsets in that block's shared memory
};

// The cluster being run: its blocks' states, barriers and copies in flight.
struct ClusterRun {
  std::vector<Launch*> blocks;
  std::vector<dim3> block_ids;
  unsigned threads = 0, rank = 0;  // rank: the running fiber's block
  std::map<const void*, MBarrier> barriers;
  std::vector<PendingCopy> copies;
  std::unique_ptr<Barrier> sync;
};
inline ClusterRun* cluster = nullptr;
// Whether a tile copy lands as soon as it is issued (the earliest the hardware may complete it)
// instead of at the end of the scheduler's round, and one warp of each block (not the first)
// runs one round in four: a stage refilled while some thread still reads it then shows in the
// results, where the late landing shows reads before the barrier's wait.
inline bool land_at_issue = false;
bool land_copies();

inline ClusterRun& running_cluster(const char* what) {
  if (cluster == nullptr) fail(std::string(what) + " outside a cluster launch");
  return *cluster;
}

// The offset of p in the running block's shared memory (checked to lie inside it).
inline size_t shared_offset(const void* p, size_t bytes, const char* what) {
  const unsigned char* base = current->dynamic();
  const auto* q = static_cast<const unsigned char*>(p);
  if (q < base || q + bytes > base + current->size) {
    fail(std::string(what) + ": address outside the block's shared memory");
  }
  return static_cast<size_t>(q - base);
}

inline MBarrier& barrier_at(const void* bar, const char* what) {
  ClusterRun& run = running_cluster(what);
  auto it = run.barriers.find(bar);
  if (it == run.barriers.end()) fail(std::string(what) + " on an uninitialised barrier");
  return it->second;
}

inline void complete_if_done(MBarrier& b) {
  if (b.pending == 0 && b.bytes == 0) {
    ++b.phase;
    b.pending = b.count;
  }
}

inline uint32_t cluster_rank() { return running_cluster("cluster_rank").rank; }

inline void cluster_sync() { running_cluster("cluster_sync").sync->wait("cluster_sync"); }

inline void barrier_init(uint64_t* bar, uint32_t count) {
  ClusterRun& run = running_cluster("barrier_init");
  if (reinterpret_cast<uintptr_t>(bar) % 8 != 0) fail("barrier_init: barrier not 8-byte aligned");
  shared_offset(bar, 8, "barrier_init");
  if (count == 0) fail("barrier_init: a count of 0");
  run.barriers[bar] = MBarrier{count, count, 0, 0};
  ++scheduler->events;
}

inline void arrive(MBarrier& b, const char* what) {
  if (b.pending == 0) fail(std::string(what) + ": more arrivals than the barrier's count");
  --b.pending;
  complete_if_done(b);
  ++scheduler->events;
}

inline void barrier_arrive_expect(uint64_t* bar, uint32_t bytes) {
  MBarrier& b = barrier_at(bar, "barrier_arrive_expect");
  b.bytes += bytes;
  arrive(b, "barrier_arrive_expect");
}

inline void barrier_arrive_remote(uint64_t* bar, uint32_t rank) {
  ClusterRun& run = running_cluster("barrier_arrive_remote");
  if (rank >= run.blocks.size()) fail("barrier_arrive_remote: rank outside the cluster");
  const size_t at = shared_offset(bar, 8, "barrier_arrive_remote");
  MBarrier& b = barrier_at(run.blocks[rank]->dynamic() + at, "barrier_arrive_remote");
  arrive(b, "barrier_arrive_remote");
}

inline void barrier_wait(uint64_t* bar, uint32_t parity) {
  while ((barrier_at(bar, "barrier_wait").phase & 1u) == parity) scheduler->yield();
}

// Queues the copy of map's box at (c0, c1, c2) to dst in this block (mask 0) or in every block
// of the cluster whose rank is set in mask.
inline void tile_load(void* dst, const TileMap* map, int c0, int c1, int c2, uint64_t* bar,
                      uint16_t mask) {
  ClusterRun& run = running_cluster("tile_load");
  // A swizzled box: the kernels' tiles whole 1024-byte atoms (stricter than the hardware, which
  // takes the pattern from the absolute address: what the kernels' tile-relative XOR needs).
  const uintptr_t align = map->swizzle != 0 ? 1024 : 128;
  if (reinterpret_cast<uintptr_t>(dst) % align != 0) {
    fail("tile_load: destination not " + std::to_string(align) + "-byte aligned");
  }
  const size_t bytes = size_t(map->box[0]) * map->box[1] * map->box[2] * 2;
  const size_t at = shared_offset(dst, bytes, "tile_load");
  const size_t bar_at = shared_offset(bar, 8, "tile_load");
  barrier_at(bar, "tile_load");
  if (mask >> run.blocks.size() != 0) fail("tile_load: multicast mask past the cluster");
  for (unsigned r = 0; r < run.blocks.size(); ++r) {
    if (mask == 0 ? r == run.rank : ((mask >> r) & 1u) != 0) {
      run.copies.push_back(PendingCopy{map, {c0, c1, c2}, r, at, bar_at});
    }
  }
  ++scheduler->events;
  if (land_at_issue) land_copies();
}

// The address a swizzle of `bytes` (0, 32, 64 or 128; cluster.cuh: make_tile_map) puts the byte
// at address `at` of a tile at.
inline uintptr_t swizzled(uintptr_t at, int bytes) {
  if (bytes == 32) return at ^ (((at >> 7) & 1) << 4);
  if (bytes == 64) return at ^ (((at >> 7) & 3) << 4);
  if (bytes == 128) return at ^ (((at >> 7) & 7) << 4);
  return at;
}

// Lands every queued copy: the box, zeros past the tensor, then its bytes on the barrier.
inline bool land_copies() {
  ClusterRun& run = *cluster;
  if (run.copies.empty()) return false;
  for (const PendingCopy& c : run.copies) {
    const TileMap& m = *c.map;
    // The element's address: the swizzle permutes by its absolute bits, as the hardware's.
    uintptr_t at = reinterpret_cast<uintptr_t>(run.blocks[c.rank]->dynamic() + c.dst);
    for (uint32_t z = 0; z < m.box[2]; ++z) {
      for (uint32_t y = 0; y < m.box[1]; ++y) {
        for (uint32_t x = 0; x < m.box[0]; ++x, at += 2) {
          auto* dst = reinterpret_cast<unsigned char*>(swizzled(at, m.swizzle));
          const int64_t i[3] = {int64_t(c.c[0]) + x, int64_t(c.c[1]) + y, int64_t(c.c[2]) + z};
          bool inside = true;
          for (int d = 0; d < 3; ++d) inside = inside && i[d] >= 0 && uint64_t(i[d]) < m.dims[d];
          if (inside) {
            std::memcpy(dst,
                        m.base + i[0] * m.strides[0] + i[1] * m.strides[1] + i[2] * m.strides[2],
                        2);
          } else {
            std::memset(dst, 0, 2);
          }
        }
      }
    }
    MBarrier& b = barrier_at(run.blocks[c.rank]->dynamic() + c.bar, "a copy landing");
    b.bytes -= int64_t(m.box[0]) * m.box[1] * m.box[2] * 2;
    complete_if_done(b);
  }
  run.copies.clear();
  return true;
}

// Runs kernel<<<grid, block, shared_bytes>>>(args...) in clusters of (1, cluster_y, 1) blocks,
// cluster after cluster; shared memory up to 227 KiB (the launcher's opt-in).
template <typename... Params, typename... Args>
void launch_cluster(void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared_bytes,
                    unsigned cluster_y, Args&&... args) {
  check_grid(grid, block);
  if (cluster_y == 0 || cluster_y > 8 || grid.y % cluster_y != 0) {
    fail("cluster of " + std::to_string(cluster_y) + " blocks along a grid of " +
         std::to_string(grid.y));
  }
  if (shared_bytes > 227 * 1024) fail("dynamic shared memory above 227 KiB");
  const std::tuple<Params...> params(std::forward<Args>(args)...);
  std::vector<std::unique_ptr<Launch>> states;
  ClusterRun run;
  for (unsigned r = 0; r < cluster_y; ++r) {
    states.emplace_back(new Launch(block.x, shared_bytes));
    run.blocks.push_back(states.back().get());
  }
  run.threads = block.x;
  Scheduler sched;
  make_fibers(sched, cluster_y * block.x);
  sched.body = [&] { std::apply(kernel, params); };
  scheduler = &sched;
  cluster = &run;
  gridDim = grid;
  blockDim = block;
  for (unsigned z = 0; z < grid.z; ++z) {
    for (unsigned y0 = 0; y0 < grid.y; y0 += cluster_y) {
      for (unsigned x = 0; x < grid.x; ++x) {
        run.block_ids.clear();
        run.barriers.clear();
        run.copies.clear();
        run.sync.reset(new Barrier(cluster_y * block.x));
        for (unsigned r = 0; r < cluster_y; ++r) {
          run.blocks[r]->poison();
          run.block_ids.push_back(dim3(x, y0 + r, z));
        }
        const unsigned slow = (x + y0 / cluster_y + z) % cluster_y;
        run_fibers(
            sched, cluster_y * block.x,
            [&](unsigned f, uint64_t round) {
              // One block of each cluster of several (a different one from cluster to cluster)
              // runs one round in four, so that the others run ahead of it as far as the kernel
              // lets them.
              run.rank = f / block.x;
              if (cluster_y > 1 && run.rank == slow && round != ~uint64_t(0)) return false;
              // With copies landing at issue, one warp of each block but the first (thread 0's,
              // which issues them) lags as well.
              if (land_at_issue && block.x > 32 && round != ~uint64_t(0) &&
                  (f % block.x) / 32 == 1 + (x + y0) % (block.x / 32 - 1)) {
                return false;
              }
              current = run.blocks[run.rank];
              blockIdx = run.block_ids[run.rank];
              threadIdx = dim3(f % block.x);
              return true;
            },
            land_copies,
            [&] {
              return "cluster at block (" + std::to_string(x) + ", " + std::to_string(y0) + ", " +
                     std::to_string(z) + "): no thread can move";
            });
        if (!run.copies.empty()) fail("copies still in flight when the cluster ended");
      }
    }
  }
  current = nullptr;
  scheduler = nullptr;
  cluster = nullptr;
}

}  // namespace emu

inline void __syncthreads() { emu::current->block.wait("__syncthreads"); }

// Every lane of the warp arrives (the whole warp: partial masks are not emulated).
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  if (mask != 0xffffffffu) emu::fail("__syncwarp with a partial mask is not emulated");
  emu::current->warps[threadIdx.x / 32]->wait("__syncwarp");
}

template <typename T>
T __shfl_down_sync(unsigned mask, T value, unsigned delta) {
  static_assert(sizeof(T) <= 16, "shuffle of a type larger than 16 bytes");
  if (mask != 0xffffffffu) emu::fail("__shfl_down_sync with a partial mask is not emulated");
  emu::Launch& state = *emu::current;
  const unsigned t = threadIdx.x, lane = t % 32;
  std::memcpy(state.slots[t].data(), &value, sizeof(T));
  state.warps[t / 32]->wait("__shfl_down_sync");
  T result = value;
  if (lane + delta < 32 && t + delta < blockDim.x) {
    std::memcpy(&result, state.slots[t + delta].data(), sizeof(T));
  }
  state.warps[t / 32]->wait("__shfl_down_sync");
  return result;
}

// The value of lane (lane ^ mask_bits) of the warp (the whole warp takes part).
template <typename T>
T __shfl_xor_sync(unsigned mask, T value, int lane_mask) {
  static_assert(sizeof(T) <= 16, "shuffle of a type larger than 16 bytes");
  if (mask != 0xffffffffu) emu::fail("__shfl_xor_sync with a partial mask is not emulated");
  emu::Launch& state = *emu::current;
  const unsigned t = threadIdx.x, first = t - t % 32;
  if (first + 32 > blockDim.x) emu::fail("__shfl_xor_sync in a partial warp");
  std::memcpy(state.slots[t].data(), &value, sizeof(T));
  state.warps[t / 32]->wait("__shfl_xor_sync");
  T result;
  std::memcpy(&result, state.slots[first + ((t % 32) ^ unsigned(lane_mask & 31))].data(),
              sizeof(T));
  state.warps[t / 32]->wait("__shfl_xor_sync");
  return result;
}

namespace emu {

// Every lane of the running thread's warp deposits `bytes` of `mine`; all[lane] gets each one's.
// The whole warp must take part.
template <size_t kBytes>
void warp_exchange(const void* mine, std::array<std::array<unsigned char, kBytes>, 32>& all,
                   const char* what) {
  static_assert(kBytes <= 64, "a lane's deposit is at most 64 bytes");
  Launch& state = *current;
  const unsigned t = threadIdx.x, first = t - t % 32;
  if (first + 32 > blockDim.x) fail(std::string(what) + " in a partial warp");
  std::memcpy(state.slots[t].data(), mine, kBytes);
  state.warps[t / 32]->wait(what);
  for (unsigned l = 0; l < 32; ++l) {
    std::memcpy(all[l].data(), state.slots[first + l].data(), kBytes);
  }
  state.warps[t / 32]->wait(what);
}

inline uint16_t read16(const unsigned char* p) {
  uint16_t v;
  std::memcpy(&v, p, 2);
  return v;
}

// ldmatrix.x4 (fragments.cuh): lane 8 i + r points at row r of matrix i (16 bytes, 16-byte
// aligned, in shared memory); register i of lane 4 g + c gets row g's columns 2c, 2c + 1 of
// matrix i, or with trans rows 2c, 2c + 1 of its column g.
inline void ldmatrix_x4(uint32_t (&r)[4], const void* row, bool trans) {
  if (reinterpret_cast<uintptr_t>(row) % 16 != 0) fail("ldmatrix: row address not 16-byte aligned");
  shared_offset(row, 16, "ldmatrix");
  std::array<std::array<unsigned char, sizeof(void*)>, 32> rows;
  warp_exchange(&row, rows, "ldmatrix");
  const unsigned lane = threadIdx.x % 32, g = lane / 4, c = lane % 4;
  const auto at = [&](unsigned i, unsigned rr, unsigned col) {
    const unsigned char* p;
    std::memcpy(&p, rows[8 * i + rr].data(), sizeof(p));
    return uint32_t(read16(p + 2 * col));
  };
  for (unsigned i = 0; i < 4; ++i) {
    r[i] = trans ? at(i, 2 * c, g) | at(i, 2 * c + 1, g) << 16
                 : at(i, g, 2 * c) | at(i, g, 2 * c + 1) << 16;
  }
}

inline float from16(uint32_t bits, bool bfloat16) {
  const uint16_t b = static_cast<uint16_t>(bits);
  if (bfloat16) return static_cast<float>(c10::BFloat16(b, c10::BFloat16::from_bits()));
  return static_cast<float>(c10::Half(b, c10::Half::from_bits()));
}

// mma.sync m16n8k16, float accumulators (fragments.cuh has the lanes' layout).
inline void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                      bool bfloat16) {
  struct Lane {
    uint32_t a[4], b[2];
  } mine{{a[0], a[1], a[2], a[3]}, {b[0], b[1]}};
  std::array<std::array<unsigned char, sizeof(Lane)>, 32> raw;
  warp_exchange(&mine, raw, "mma_16816");
  Lane lanes[32];
  for (unsigned l = 0; l < 32; ++l) std::memcpy(&lanes[l], raw[l].data(), sizeof(Lane));
  const auto A = [&](unsigned row, unsigned k) {
    const uint32_t reg = lanes[(row % 8) * 4 + (k % 8) / 2].a[row / 8 + 2 * (k / 8)];
    return from16(k % 2 ? reg >> 16 : reg, bfloat16);
  };
  const auto B = [&](unsigned k, unsigned n) {
    const uint32_t reg = lanes[n * 4 + (k % 8) / 2].b[k / 8];
    return from16(k % 2 ? reg >> 16 : reg, bfloat16);
  };
  const unsigned lane = threadIdx.x % 32, g = lane / 4, c = lane % 4;
  for (unsigned i = 0; i < 4; ++i) {
    const unsigned row = g + 8 * (i / 2), col = 2 * c + i % 2;
    float sum = d[i];
    for (unsigned k = 0; k < 16; ++k) sum += A(row, k) * B(k, col);
    d[i] = sum;
  }
}

// A shared-memory address as the hardware's (32 bits, counted from the block's 1024-byte
// boundary below its dynamic shared memory, so that the low 10 bits are the pointer's), and back.
inline uint32_t shared_address(const void* p) {
  shared_offset(p, 1, "shared_address");
  return static_cast<uint32_t>(static_cast<const unsigned char*>(p) - current->aligned());
}
inline const unsigned char* shared_pointer(uint32_t at) { return current->aligned() + at; }

// wgmma m64n64k16 (warpgroup.cuh): issued by every lane of a warp (its 16 rows of A exchanged
// now), computed when waited for.
inline void wgmma_64x64x16(float (&d)[32], const uint32_t (&a)[4], uint64_t b, bool bfloat16) {
  if (blockDim.x % 128 != 0) fail("wgmma in a block that is not whole warpgroups");
  std::array<std::array<unsigned char, 16>, 32> raw;
  warp_exchange(a, raw, "wgmma");
  uint32_t lanes[32][4];
  for (unsigned l = 0; l < 32; ++l) std::memcpy(lanes[l], raw[l].data(), 16);
  const unsigned g = threadIdx.x % 32 / 4;
  WgmmaOp op{d, {}, b, bfloat16};
  for (unsigned h = 0; h < 2; ++h) {  // rows g and g + 8 of the warp's 16
    for (unsigned k = 0; k < 16; ++k) {
      const uint32_t reg = lanes[g * 4 + (k % 8) / 2][h + 2 * (k / 8)];
      op.a[h][k] = from16(k % 2 ? reg >> 16 : reg, bfloat16);
    }
  }
  current->wgmma[threadIdx.x].open.push_back(op);
}

inline void wgmma_commit() {
  WgmmaState& w = current->wgmma[threadIdx.x];
  w.groups.push_back(std::move(w.open));
  w.open.clear();
}

// B (k, n) of a descriptor (warpgroup.cuh: K-major, 32-, 64- or 128-byte swizzle), read now.
inline float wgmma_b(uint64_t desc, unsigned k, unsigned n, bool bfloat16) {
  const uint32_t start = uint32_t(desc & 0x3fff) << 4;
  const uint32_t stride = uint32_t((desc >> 32) & 0x3fff) << 4;
  const unsigned layout = unsigned(desc >> 62);
  if (layout == 0) fail("wgmma: only the swizzled layouts are emulated");
  if ((desc >> 49 & 7) != 0) fail("wgmma: a descriptor with a base offset");
  const int width = layout == 1 ? 128 : layout == 2 ? 64 : 32;
  const unsigned char* at = shared_pointer(start + (n / 8) * stride + (n % 8) * width + 2 * k);
  const auto* p = reinterpret_cast<const unsigned char*>(
      swizzled(reinterpret_cast<uintptr_t>(at), width));
  shared_offset(p, 2, "wgmma's B operand");
  return from16(read16(p), bfloat16);
}

// Completes the oldest groups until at most `pending` are left.
inline void wgmma_wait(int pending) {
  WgmmaState& w = current->wgmma[threadIdx.x];
  const unsigned lane = threadIdx.x % 32, c = lane % 4;
  while (w.groups.size() > size_t(pending)) {
    for (const WgmmaOp& op : w.groups.front()) {
      for (unsigned t = 0; t < 8; ++t) {
        for (unsigned i = 0; i < 4; ++i) {
          const unsigned col = 8 * t + 2 * c + i % 2;
          float sum = 0.f;
          for (unsigned k = 0; k < 16; ++k) {
            sum += op.a[i / 2][k] * wgmma_b(op.b, k, col, op.bfloat16);
          }
          op.d[4 * t + i] += sum;
        }
      }
    }
    w.groups.erase(w.groups.begin());
  }
}

}  // namespace emu

// CUDA's vector type of two floats.
struct alignas(8) float2 {
  float x, y;
};
inline float2 make_float2(float x, float y) { return float2{x, y}; }

// CUDA's 16-bit types and their conversions, as c10's (the same bits and rounding).
using __half = c10::Half;
using __nv_bfloat16 = c10::BFloat16;
inline __half __float2half_rn(float v) { return __half(v); }
inline __nv_bfloat16 __float2bfloat16_rn(float v) { return __nv_bfloat16(v); }
inline float __half2float(__half v) { return static_cast<float>(v); }
inline float __bfloat162float(__nv_bfloat16 v) { return static_cast<float>(v); }

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
namespace precision {
struct tf32 {};
}
enum layout_t { mem_row_major, mem_col_major };

// float rounded to TF32 (10 explicit mantissa bits), to nearest, ties away from zero.
inline float __float_to_tf32(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  if ((bits & 0x7f800000u) != 0x7f800000u) bits = (bits + 0x1000u) & 0xffffe000u;
  std::memcpy(&v, &bits, sizeof(bits));
  return v;
}

template <class Use, int M, int N, int K, class T, class Layout = void>
struct fragment {
  using element = std::conditional_t<std::is_same<T, precision::tf32>::value, float, T>;
  static constexpr int rows = std::is_same<Use, matrix_b>::value ? K : M;
  static constexpr int cols = std::is_same<Use, matrix_a>::value ? K : N;
  static constexpr int num_elements = rows * cols;
  element x[num_elements];  // the whole tile, row-major, in every lane
};

inline void check_operand(const void* p, unsigned ldm, size_t element_bytes, const char* what) {
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0) {
    emu::fail(std::string(what) + ": pointer not 32-byte aligned");
  }
  if ((ldm * element_bytes) % 16 != 0) {
    emu::fail(std::string(what) + ": leading dimension " + std::to_string(ldm) +
              " is not a multiple of 16 bytes");
  }
}

template <class Use, int M, int N, int K, class T, class Layout>
void fill_fragment(fragment<Use, M, N, K, T, Layout>& f, float value) {
  for (auto& e : f.x) e = value;
}

// Row-major: element (r, c) at p[r * ldm + c]; column-major: at p[c * ldm + r]. The fragment
// holds the tile row-major either way.
template <class Use, int M, int N, int K, class T, class Layout, class S>
void load_matrix_sync(fragment<Use, M, N, K, T, Layout>& f, const S* p, unsigned ldm) {
  using F = fragment<Use, M, N, K, T, Layout>;
  static_assert(std::is_same<S, typename F::element>::value, "operand type mismatch");
  static_assert(std::is_same<Layout, row_major>::value || std::is_same<Layout, col_major>::value,
                "an operand fragment needs a layout");
  constexpr bool rows = std::is_same<Layout, row_major>::value;
  check_operand(p, ldm, sizeof(S), "load_matrix_sync");
  for (int r = 0; r < F::rows; ++r) {
    for (int c = 0; c < F::cols; ++c) f.x[r * F::cols + c] = rows ? p[r * ldm + c] : p[c * ldm + r];
  }
}

template <int M, int N, int K, class T, class LayoutA, class LayoutB>
void mma_sync(fragment<accumulator, M, N, K, float>& d,
              const fragment<matrix_a, M, N, K, T, LayoutA>& a,
              const fragment<matrix_b, M, N, K, T, LayoutB>& b,
              const fragment<accumulator, M, N, K, float>& c) {
  float out[M * N];
  for (int i = 0; i < M; ++i) {
    for (int j = 0; j < N; ++j) {
      float sum = c.x[i * N + j];
      for (int k = 0; k < K; ++k) {
        sum += static_cast<float>(a.x[i * K + k]) * static_cast<float>(b.x[k * N + j]);
      }
      out[i * N + j] = sum;
    }
  }
  std::memcpy(d.x, out, sizeof(out));
}

template <int M, int N, int K>
void store_matrix_sync(float* p, const fragment<accumulator, M, N, K, float>& f, unsigned ldm,
                       layout_t layout) {
  check_operand(p, ldm, sizeof(float), "store_matrix_sync");
  if (threadIdx.x % 32 != 0) return;  // one lane writes the warp's tile
  for (int r = 0; r < M; ++r) {
    for (int c = 0; c < N; ++c) {
      (layout == mem_row_major ? p[r * ldm + c] : p[c * ldm + r]) = f.x[r * N + c];
    }
  }
}

}  // namespace wmma
}  // namespace nvcuda
