// The Hopper (sm_90) features the clustered kernels use, each a small function: a block's rank in
// its cluster and the cluster barrier, shared-memory barriers (mbarrier) with transaction
// counts, and the tensor memory accelerator's tile copies (TMA), plain or multicast to every
// block of a cluster. On the GPU each is one or two PTX instructions; compiled by the host
// compiler (tests/cpp, no __CUDACC__) each calls the emulation of tests/cpp/cuda_emulation.h,
// which keeps the same semantics (barrier phases, transaction bytes, copies that land later than
// they are issued, zero fill outside the tensor) and checks the alignments the hardware needs.
//
// A TileMap describes a 3-D tensor of 16-bit elements (dims innermost first, strides in bytes)
// and the box one copy moves; boxes past the tensor's end are filled with zeros and still count
// their whole size in transaction bytes. make_tile_map (host) builds it: the driver's
// cuTensorMapEncodeTiled on the GPU.
#pragma once

#include <cstdint>
#include <string>

#ifdef __CUDACC__
#include <cuda.h>
#include <cuda_runtime.h>
#endif

namespace condconv {
namespace cuda {
namespace sm90 {

#ifdef __CUDACC__
using TileMap = CUtensorMap;
#define CONDCONV_GRID_CONSTANT __grid_constant__
#else
using TileMap = emu::TileMap;
#define CONDCONV_GRID_CONSTANT
#endif

// Whether the device code below is compiled in (an sm_90+ pass, or the host emulation).
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900
#define CONDCONV_SM90_DEVICE 1
#else
#define CONDCONV_SM90_DEVICE 0
#endif

#if CONDCONV_SM90_DEVICE
#ifdef __CUDACC__
__device__ __forceinline__ uint32_t shared_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
#endif

// The bytes from p (in shared memory) up to the next multiple of `align` (a power of 2), read
// from its shared-memory address so that p + the result is still known to be shared memory.
__device__ __forceinline__ uint32_t shared_padding(const void* p, uint32_t align) {
#ifdef __CUDACC__
  return (align - static_cast<uint32_t>(__cvta_generic_to_shared(p)) % align) % align;
#else
  return static_cast<uint32_t>((align - reinterpret_cast<uintptr_t>(p) % align) % align);
#endif
}

// This block's rank in its cluster (0 .. cluster size - 1).
__device__ __forceinline__ uint32_t cluster_rank() {
#ifdef __CUDACC__
  uint32_t r;
  asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(r));
  return r;
#else
  return emu::cluster_rank();
#endif
}

// Every thread of every block of the cluster arrives; memory written before is visible after.
__device__ __forceinline__ void cluster_sync() {
#ifdef __CUDACC__
  __syncwarp();  // (the .aligned barrier wants each warp converged; callers follow divergent code)
  asm volatile(
      "barrier.cluster.arrive.release.aligned;\n\t"
      "barrier.cluster.wait.acquire.aligned;" ::: "memory");
#else
  emu::cluster_sync();
#endif
}

// A barrier in shared memory that completes a phase when `count` threads have arrived and the
// bytes they announced have landed.
__device__ __forceinline__ void barrier_init(uint64_t* bar, uint32_t count) {
#ifdef __CUDACC__
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(shared_address(bar)), "r"(count)
               : "memory");
#else
  emu::barrier_init(bar, count);
#endif
}

// Makes the initialised barriers visible to the cluster's copies and remote arrivals (then a
// cluster_sync before any of them).
__device__ __forceinline__ void fence_barrier_init() {
#ifdef __CUDACC__
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
#endif
}

// One arrival that also announces `bytes` more to land before the phase completes.
__device__ __forceinline__ void barrier_arrive_expect(uint64_t* bar, uint32_t bytes) {
#ifdef __CUDACC__
  asm volatile("mbarrier.arrive.expect_tx.release.cta.shared::cta.b64 _, [%0], %1;" ::"r"(
                   shared_address(bar)),
               "r"(bytes)
               : "memory");
#else
  emu::barrier_arrive_expect(bar, bytes);
#endif
}

// Orders this thread's earlier memory accesses before its later ones for the whole cluster:
// once before a round of barrier_arrive_remote (one fence instead of a release at each).
__device__ __forceinline__ void fence_cluster() {
#ifdef __CUDACC__
  asm volatile("fence.acq_rel.cluster;" ::: "memory");
#endif
}

// One arrival on the barrier at the same place in block `rank` of the cluster (this block's
// own included); after fence_cluster, ordered after this thread's earlier memory accesses.
__device__ __forceinline__ void barrier_arrive_remote(uint64_t* bar, uint32_t rank) {
#ifdef __CUDACC__
  uint32_t remote;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;"
               : "=r"(remote)
               : "r"(shared_address(bar)), "r"(rank));
  asm volatile("mbarrier.arrive.shared::cluster.b64 _, [%0];" ::"r"(remote) : "memory");
#else
  emu::barrier_arrive_remote(bar, rank);
#endif
}

// A wait for a barrier's phase that is still open after this long traps (an unspecified launch
// failure) instead of hanging: in these kernels a phase completes within microseconds (within
// milliseconds under compute-sanitizer), so only a broken protocol gets there. Counted on the
// GPU's global timer, read every 1024 tries: a count of tries alone is no bound on the time
// (each try may suspend the thread for a time the hardware chooses).
constexpr uint64_t kMaxWaitNanoseconds = 5000000000ull;

#ifdef __CUDACC__
__device__ __forceinline__ uint64_t global_timer_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}
#endif

// Waits until the barrier's phase of parity `parity` has completed: with kCluster, acquiring
// what the cluster's threads did before their arrivals (a barrier that other blocks arrive on;
// it invalidates the L1 cache), else what this block's threads did and the copies that
// completed on it (the copies' bytes need no more than that).
template <bool kCluster = false>
__device__ __forceinline__ void barrier_wait(uint64_t* bar, uint32_t parity) {
#ifdef __CUDACC__
  const uint32_t at = shared_address(bar);
  uint64_t since = 0;
  for (uint32_t tries = 0;; ++tries) {
    uint32_t done;
    if (kCluster) {
      asm volatile(
          "{\n\t"
          ".reg .pred p;\n\t"
          "mbarrier.try_wait.parity.acquire.cluster.shared::cta.b64 p, [%1], %2;\n\t"
          "selp.u32 %0, 1, 0, p;\n\t"
          "}"
          : "=r"(done)
          : "r"(at), "r"(parity)
          : "memory");
    } else {
      asm volatile(
          "{\n\t"
          ".reg .pred p;\n\t"
          "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n\t"
          "selp.u32 %0, 1, 0, p;\n\t"
          "}"
          : "=r"(done)
          : "r"(at), "r"(parity)
          : "memory");
    }
    if (done) return;
    if ((tries & 1023u) == 0) {
      const uint64_t now = global_timer_ns();
      if (tries == 0) {
        since = now;
      } else if (now - since > kMaxWaitNanoseconds) {
        __trap();
      }
    }
  }
#else
  emu::barrier_wait(bar, parity);
#endif
}

// Copies the box at (c0, c1, c2) of `map` into this block's shared memory at dst (128-byte
// aligned); its bytes complete on `bar`.
__device__ __forceinline__ void tile_load(void* dst, const TileMap* map, int c0, int c1, int c2,
                                          uint64_t* bar) {
#ifdef __CUDACC__
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%3, %4, %5}], [%2];" ::"r"(shared_address(dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(shared_address(bar)), "r"(c0), "r"(c1), "r"(c2)
      : "memory");
#else
  emu::tile_load(dst, map, c0, c1, c2, bar, 0);
#endif
}

// The same copy, landing at dst in every block of the cluster whose rank is set in `mask`, its
// bytes completing on each one's barrier at bar's place.
__device__ __forceinline__ void tile_load_multicast(void* dst, const TileMap* map, int c0, int c1,
                                                    int c2, uint64_t* bar, uint16_t mask) {
#ifdef __CUDACC__
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes"
      ".multicast::cluster [%0], [%1, {%3, %4, %5}], [%2], %6;" ::"r"(shared_address(dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(shared_address(bar)), "r"(c0), "r"(c1), "r"(c2),
      "h"(mask)
      : "memory");
#else
  emu::tile_load(dst, map, c0, c1, c2, bar, mask);
#endif
}
#endif  // CONDCONV_SM90_DEVICE

// Host: the map of a 3-D tensor of 16-bit elements at `base` (16-byte aligned) with sizes
// dims[0..2] (innermost first), byte strides strides[0..1] of dims 1 and 2 (multiples of 16),
// and copies of box[0..2] elements (box[0] x 2 bytes a multiple of 16). With `swizzle` 32, 64 or
// 128 (rows of at most that many bytes) a copy lands with the 16-byte chunks of each row permuted
// by the absolute shared-memory address: bit 4 XOR bit 7 (32; a pattern that repeats every 256
// bytes), bits 4-5 XOR bits 7-8 (64; every 512), bits 4-6 XOR bits 7-9 (128; every 1024). The
// kernels align their tiles to 1024, so that the XOR is the same taken from the tile's start: 8
// rows of that many bytes read at the same column then fall in 8 different bank groups. 0: no
// swizzle.
// Returns false, with the reason in *error, where the driver refuses it.
#ifdef __CUDACC__
inline bool make_tile_map(TileMap* map, const void* base, bool bfloat16, const uint64_t dims[3],
                          const uint64_t strides[2], const uint32_t box[3], int swizzle,
                          std::string* error) {
  using Encode = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*,
                              const cuuint64_t*, const cuuint64_t*, const cuuint32_t*,
                              const cuuint32_t*, CUtensorMapInterleave, CUtensorMapSwizzle,
                              CUtensorMapL2promotion, CUtensorMapFloatOOBfill);
  static Encode encode = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult found{};
#if CUDART_VERSION >= 12050
    const cudaError_t err = cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn,
                                                             12000, cudaEnableDefault, &found);
#else
    const cudaError_t err =
        cudaGetDriverEntryPoint("cuTensorMapEncodeTiled", &fn, cudaEnableDefault, &found);
#endif
    if (err != cudaSuccess || found != cudaDriverEntryPointSuccess) {
      (void)cudaGetLastError();
      fn = nullptr;
    }
    return reinterpret_cast<Encode>(fn);
  }();
  if (encode == nullptr) {
    *error = "the driver has no cuTensorMapEncodeTiled";
    return false;
  }
  const cuuint32_t element_strides[3] = {1, 1, 1};
  const CUresult r = encode(
      map, bfloat16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16, 3,
      const_cast<void*>(base), dims, strides, box, element_strides,
      CU_TENSOR_MAP_INTERLEAVE_NONE,
      swizzle == 128  ? CU_TENSOR_MAP_SWIZZLE_128B
      : swizzle == 64 ? CU_TENSOR_MAP_SWIZZLE_64B
      : swizzle == 32 ? CU_TENSOR_MAP_SWIZZLE_32B
                      : CU_TENSOR_MAP_SWIZZLE_NONE,
      CU_TENSOR_MAP_L2_PROMOTION_L2_128B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS) {
    *error = "cuTensorMapEncodeTiled failed with error " + std::to_string(int(r));
    return false;
  }
  return true;
}
#else
inline bool make_tile_map(TileMap* map, const void* base, bool /*bfloat16*/,
                          const uint64_t dims[3], const uint64_t strides[2], const uint32_t box[3],
                          int swizzle, std::string* error) {
  return emu::make_tile_map(map, base, dims, strides, box, swizzle, error);
}
#endif

}  // namespace sm90
}  // namespace cuda
}  // namespace condconv
