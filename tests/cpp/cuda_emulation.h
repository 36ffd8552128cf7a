// The CUDA execution model on the CPU, for testing kernels written in the CUDA language on a
// machine without a GPU. Include it before the kernels' header, in a translation unit compiled
// by the host compiler (no __CUDACC__).
//
// The threads of a block are fibers (ucontext) of one OS thread, switched at barriers; blocks run
// one after another, so __shared__ arrays can be function statics. What is emulated, and checked where CUDA would fail or misbehave:
//   - threadIdx / blockIdx / blockDim / gridDim (1-D blocks), launch limits (block size, grid
//     y/z, dynamic shared memory), dynamic shared memory poisoned with NaN bytes per block;
//   - __syncthreads (a barrier of the whole block; one thread missing it aborts with a message
//     instead of hanging) and __shfl_down_sync over the full warp;
//   - nvcuda::wmma 16x16xK fragments, row-major: every lane holds the whole tile, the warp-wide
//     operations are computed per lane, and load/store check the pointer alignment (32 bytes)
//     and leading dimension (a multiple of 16 bytes) that the hardware requires.
// Races other than at barriers are not detected: compute-sanitizer on a GPU is for that.
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

// The state of the running launch.
struct Launch {
  explicit Launch(unsigned threads, size_t shared_bytes)
      : block(threads), slots(threads), dynamic(shared_bytes) {
    for (unsigned w = 0; w * 32 < threads; ++w) {
      warps.emplace_back(new Barrier(std::min(32u, threads - 32 * w)));
    }
  }
  Barrier block;
  std::vector<std::unique_ptr<Barrier>> warps;
  std::vector<std::array<unsigned char, 16>> slots;  // shuffle exchange, one per thread
  std::vector<unsigned char> dynamic;
};
inline Launch* current = nullptr;

inline unsigned char* dynamic_shared() { return current->dynamic.data(); }

inline void fiber_entry() {
  scheduler->body();
  scheduler->finished[scheduler->running] = true;
  ++scheduler->events;
}  // returns to the scheduler through uc_link

// Runs one block: every fiber to its end.
inline void run_block(Scheduler& sched, unsigned threads) {
  for (unsigned t = 0; t < threads; ++t) {
    getcontext(&sched.fibers[t]);
    sched.fibers[t].uc_stack.ss_sp = sched.stacks[t].get();
    sched.fibers[t].uc_stack.ss_size = Scheduler::kStackBytes;
    sched.fibers[t].uc_link = &sched.main;
    makecontext(&sched.fibers[t], fiber_entry, 0);
    sched.finished[t] = false;
  }
  for (unsigned live = threads; live > 0;) {
    const uint64_t before = sched.events;
    live = 0;
    for (unsigned t = 0; t < threads; ++t) {
      if (sched.finished[t]) continue;
      sched.running = t;
      threadIdx = dim3(t);
      swapcontext(&sched.main, &sched.fibers[t]);
      live += sched.finished[t] ? 0 : 1;
    }
    if (live > 0 && sched.events == before) {
      fail(std::string(current->block.waiting_for()) + " in block (" + std::to_string(blockIdx.x) +
           ", " + std::to_string(blockIdx.y) + ", " + std::to_string(blockIdx.z) +
           ") was not reached by every thread (deadlock)");
    }
  }
}

// Runs kernel<<<grid, block, shared_bytes>>>(args...) to completion, blocks in order. The
// arguments are converted to the kernel's parameter types once and copied into every thread's
// call, as CUDA does.
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared_bytes,
            Args&&... args) {
  if (block.y != 1 || block.z != 1) fail("only 1-D blocks are emulated");
  if (block.x == 0 || block.x > 1024) fail("block size " + std::to_string(block.x));
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 2147483647u || grid.y > 65535 ||
      grid.z > 65535) {
    fail("invalid grid (" + std::to_string(grid.x) + ", " + std::to_string(grid.y) + ", " +
         std::to_string(grid.z) + ")");
  }
  if (shared_bytes > 48 * 1024) fail("dynamic shared memory above 48 KiB needs an opt-in");
  const std::tuple<Params...> params(std::forward<Args>(args)...);
  Launch state(block.x, shared_bytes);
  Scheduler sched;
  sched.fibers.resize(block.x);
  sched.finished.resize(block.x);
  for (unsigned t = 0; t < block.x; ++t) sched.stacks.emplace_back(new char[Scheduler::kStackBytes]);
  sched.body = [&] { std::apply(kernel, params); };
  current = &state;
  scheduler = &sched;
  gridDim = grid;
  blockDim = block;
  for (unsigned z = 0; z < grid.z; ++z) {
    for (unsigned y = 0; y < grid.y; ++y) {
      for (unsigned x = 0; x < grid.x; ++x) {
        if (!state.dynamic.empty())  // (memset of the null data() of an empty vector: UB)
          std::memset(state.dynamic.data(), 0xff, state.dynamic.size());  // NaN in every float
        blockIdx = dim3(x, y, z);
        run_block(sched, block.x);
      }
    }
  }
  current = nullptr;
  scheduler = nullptr;
}

}  // namespace emu

inline void __syncthreads() { emu::current->block.wait("__syncthreads"); }

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

// CUDA's 16-bit types and their conversions, as c10's (the same bits and rounding).
using __half = c10::Half;
using __nv_bfloat16 = c10::BFloat16;
inline __half __float2half_rn(float v) { return __half(v); }
inline __nv_bfloat16 __float2bfloat16_rn(float v) { return __nv_bfloat16(v); }

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
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

template <class Use, int M, int N, int K, class T, class S>
void load_matrix_sync(fragment<Use, M, N, K, T, row_major>& f, const S* p, unsigned ldm) {
  using F = fragment<Use, M, N, K, T, row_major>;
  static_assert(std::is_same<S, typename F::element>::value, "operand type mismatch");
  check_operand(p, ldm, sizeof(S), "load_matrix_sync");
  for (int r = 0; r < F::rows; ++r) {
    for (int c = 0; c < F::cols; ++c) f.x[r * F::cols + c] = p[r * ldm + c];
  }
}

template <int M, int N, int K, class T>
void mma_sync(fragment<accumulator, M, N, K, float>& d,
              const fragment<matrix_a, M, N, K, T, row_major>& a,
              const fragment<matrix_b, M, N, K, T, row_major>& b,
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
  if (layout != mem_row_major) emu::fail("store_matrix_sync: only mem_row_major is emulated");
  if (threadIdx.x % 32 != 0) return;  // one lane writes the warp's tile
  for (int r = 0; r < M; ++r) {
    for (int c = 0; c < N; ++c) p[r * ldm + c] = f.x[r * N + c];
  }
}

}  // namespace wmma
}  // namespace nvcuda
