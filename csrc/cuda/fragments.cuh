// Warp-wide tensor-core fragments by hand (sm_80 and newer): ldmatrix, which loads four 8 x 8
// matrices of 16-bit elements from shared memory, each lane giving one row's address, and
// mma.sync m16n8k16 with float accumulators. What wmma hides, made explicit so that a kernel
// can read operands in any layout it stores them in (a swizzled tile, a transposed one).
//
// Layouts (lane = 4 g + c, g = lane / 4, c = lane % 4; "pair" = two 16-bit values in a register,
// the lower-indexed first):
//   ldmatrix x4: lane 8 i + r gives the address of row r of matrix i; register i of lane (g, c)
//     gets matrix i's row g, columns 2c and 2c + 1 (trans: rows 2c and 2c + 1 of column g);
//   mma A (16 x 16, rows x k): a[0] (g, 2c..), a[1] (g + 8, 2c..), a[2] (g, 2c + 8..),
//     a[3] (g + 8, 2c + 8..);  B (16 x 8, k x n): b[0] (k 2c.., n g), b[1] (k 2c + 8.., n g);
//     C, D (16 x 8): d[0], d[1] (g, 2c and 2c + 1), d[2], d[3] (g + 8, 2c and 2c + 1).
// Compiled by the host compiler, each calls the emulation of tests/cpp/cuda_emulation.h, which
// moves the same values between lanes.
#pragma once

#include <cstdint>

namespace condconv {
namespace cuda {
namespace fragments {

#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800

// The four matrices whose rows the lanes point at (see above), each transposed with kTrans.
template <bool kTrans = false>
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
#ifdef __CUDACC__
  const uint32_t at = static_cast<uint32_t>(__cvta_generic_to_shared(row));
  if (kTrans) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(at)
                 : "memory");
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(at)
                 : "memory");
  }
#else
  emu::ldmatrix_x4(r, row, kTrans);
#endif
}

// d += a b on 16-bit operands (bfloat16 where kBFloat16, else float16), float accumulators.
template <bool kBFloat16>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4],
                                          const uint32_t (&b)[2]) {
#ifdef __CUDACC__
  if (kBFloat16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
#else
  emu::mma_16816(d, a, b, kBFloat16);
#endif
}

#endif

}  // namespace fragments
}  // namespace cuda
}  // namespace condconv
