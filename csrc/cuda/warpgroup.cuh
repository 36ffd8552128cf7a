// Hopper's warpgroup tensor-core products (wgmma, sm_90a): the four warps of a warpgroup (128
// threads, warps 4 i .. 4 i + 3) multiply a 64 x 16 A operand held in their registers by a
// 16 x N B operand in shared memory, described by a 64-bit descriptor, into 64 x N float
// accumulators in their registers, asynchronously: issued after wgmma_fence, committed as a
// group, waited for with wgmma_wait. Until then neither the accumulators nor A's registers may
// be touched, nor B's shared memory written.
//
// Layouts (warp w of the warpgroup, lane = 4 g + c):
//   A (64 x 16, rows x k): warp w holds rows 16 w .. 16 w + 15 as mma.sync m16n8k16's A
//     (fragments.cuh): a[0] (g, 2c..), a[1] (g + 8, 2c..), a[2] (g, 2c + 8..), a[3] (g + 8,
//     2c + 8..), pairs of 16-bit values, the lower-indexed first;
//   D (64 x 64): d[4 t + i] at row 16 w + g + 8 (i / 2), column 8 t + 2 c + i % 2;
//   B (16 x 64, k x n) "K-major": each column n's 16 values of k contiguous, the columns rows of
//     a swizzled tile (make_tile_map's 32-, 64- or 128-byte swizzle: rows of that many bytes, 8
//     rows an atom of 256, 512 or 1024 bytes, the atoms `stride` bytes apart); the descriptor's
//     start is column 0's k = 0, and k = 16 .. of the same rows starts 32 bytes further (the
//     swizzle is applied to the address after the offset, as the copies applied it).
// Compiled by the host compiler, each calls the emulation of tests/cpp/cuda_emulation.h, which
// computes a group's products when it is waited for (reading B's shared memory then).
#pragma once

#include <cstdint>

namespace condconv {
namespace cuda {
namespace warpgroup {

// Whether wgmma is compiled in: the sm_90a pass (TORCH_CUDA_ARCH_LIST with 9.0a), or the host
// emulation. A build for plain sm_90 has no wgmma; its kernels trap and the host never launches
// them (CONDCONV_SM90A, set by setup.py with the same list).
#if !defined(__CUDA_ARCH__) || defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define CONDCONV_WGMMA_DEVICE 1
#else
#define CONDCONV_WGMMA_DEVICE 0
#endif

#if CONDCONV_WGMMA_DEVICE

// The descriptor of a K-major B operand whose rows (columns n) of `swizzle` (32, 64 or 128) bytes
// start at `start` in shared memory, the atoms of 8 rows `stride` bytes apart.
__device__ __forceinline__ uint64_t descriptor(const void* start, int swizzle, uint32_t stride) {
#ifdef __CUDACC__
  const uint32_t at = static_cast<uint32_t>(__cvta_generic_to_shared(start));
#else
  const uint32_t at = emu::shared_address(start);
#endif
  const uint64_t layout = swizzle == 128 ? 1 : swizzle == 64 ? 2 : 3;  // 3: 32-byte
  return uint64_t((at >> 4) & 0x3fff) | uint64_t(1) << 16 |
         uint64_t((stride >> 4) & 0x3fff) << 32 | layout << 62;
}

// Orders this thread's register writes (A, the accumulators) before the wgmma that follow.
__device__ __forceinline__ void wgmma_fence() {
#ifdef __CUDACC__
  asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
#endif
}

// Closes the group of the wgmma issued since the last commit.
__device__ __forceinline__ void wgmma_commit() {
#ifdef __CUDACC__
  asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
#else
  emu::wgmma_commit();
#endif
}

// Waits until at most kPending committed groups are still in flight.
template <int kPending>
__device__ __forceinline__ void wgmma_wait() {
#ifdef __CUDACC__
  asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(kPending) : "memory");
#else
  emu::wgmma_wait(kPending);
#endif
}

// d (64 x 64) += a (64 x 16, registers) . b (16 x 64, the descriptor's), 16-bit operands
// (bfloat16 where kBFloat16, else float16), float accumulators.
template <bool kBFloat16>
__device__ __forceinline__ void wgmma_64x64x16(float (&d)[32], const uint32_t (&a)[4],
                                               uint64_t b) {
#ifdef __CUDACC__
#define CONDCONV_WGMMA(type)                                                                   \
  asm volatile(                                                                                \
      "{\n\t.reg .pred p;\n\tsetp.ne.b32 p, 1, 0;\n\t"                                         \
      "wgmma.mma_async.sync.aligned.m64n64k16.f32." type "." type " "                          \
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "                \
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "      \
      "{%32, %33, %34, %35}, %36, p, 1, 1, 0;\n\t}"                                            \
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),    \
        "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]),             \
        "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]),          \
        "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]),          \
        "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]),          \
        "+f"(d[31])                                                                            \
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b))
  if (kBFloat16) {
    CONDCONV_WGMMA("bf16");
  } else {
    CONDCONV_WGMMA("f16");
  }
#undef CONDCONV_WGMMA
#else
  emu::wgmma_64x64x16(d, a, b, kBFloat16);
#endif
}

#endif  // CONDCONV_WGMMA_DEVICE

}  // namespace warpgroup
}  // namespace cuda
}  // namespace condconv
