// Device code of the condconv CUDA backend, forward and backward side by side, and the launch
// geometry of each kernel. The host launchers are in typed.cuh; the index arithmetic is in
// views.cuh. Nothing here needs the CUDA runtime beyond the kernel language, so
// tests/cpp/test_cuda_kernels.cpp runs these same kernels on the CPU under an emulation of the
// execution model (tests/cpp/cuda_emulation.h).
//
// Dense convolutions (Cin/g > 1): one tiled implicit-GEMM kernel, instantiated with the forward,
// grad_x and kernel-gradient views. A block computes a 64 x 64 tile of C for one (example, group)
// (the tensor-core forward and grad_x: for four examples of a group), staging K-slices of A and
// B in shared memory; the forward and grad_x views mix the E expert tiles of A as they stage
// them.
//   - implicit_gemm_kernel: CUDA cores, acc_t operands (float32, or float64 for float64).
//   - tensor_core_gemm_kernel: warp MMA (nvcuda::wmma) on float16/bfloat16 operands, or TF32
//     for float32 where PyTorch allows TF32 in convolutions; float32 accumulation.
// Depthwise (Cin/g == 1): a block owns an example, a tile of channels and a chunk of their planes,
// and mixes the tile's taps into shared memory once; its threads take the channels first where
// they are contiguous in memory (channels_last), else the pixels. The kernel gradient reduces
// each tap over the block's pixels (warp shuffles, then shared memory), in slices of the plane
// whose partials are summed after.
// No atomics: every result is the same from run to run.
#pragma once

#include "views.cuh"

#include <algorithm>
#include <cstdint>
#include <limits>

#ifdef __CUDACC__
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#endif

// Dynamic shared memory of a kernel, as a byte array aligned for double.
#ifndef CONDCONV_DYNAMIC_SHARED
#define CONDCONV_DYNAMIC_SHARED(name) \
  extern __shared__ __align__(sizeof(double)) unsigned char name[]
#endif

namespace condconv {
namespace cuda {

constexpr int kTileM = 64, kTileN = 64, kTileK = 16;
constexpr int kThreads = 256;           // 16 x 16 threads, 4 x 4 outputs each
constexpr int64_t kMaxGridYZ = 65535;  // CUDA's limit on gridDim.y and gridDim.z

// ---------------------------------------------------------------------------------------------
// Dense: C[z] = A[z] B[z] through a View (views.cuh). Blocks: x = the output tile, z = the
// (example, group) batches, or (block of examples, group) pairs (gemm_grid), striding when there
// are more than gridDim.z.

// Staging of one K-slice for the first `count` of NB examples z[0 ..]: A's tile of example j at
// As + j * stride_a, B's at Bs + j * stride_b. Consecutive threads take consecutive indices
// along the one the view says is contiguous in memory (a_contiguous_in_k, b_contiguous_in_k);
// A comes from lhs_block, which reads what the examples share (the experts) once for all of
// them. T is the shared tile's element type, convert maps acc_t to it.
template <class View, int TileK, int Threads, typename T, int LdA, int LdB, int NB = 1,
          class Convert>
__device__ __forceinline__ void stage_tiles(const View& v, const typename View::index (&z)[NB],
                                            int count, typename View::index m0,
                                            typename View::index n0, typename View::index k0,
                                            T* As, T* Bs, int stride_a, int stride_b,
                                            Convert convert) {
  using index_t = typename View::index;
  using acc_t = decltype(v.lhs(z[0], m0, k0));
  const index_t M = v.m(), N = v.n(), K = v.k();
  const bool a_k = v.a_contiguous_in_k(), b_k = v.b_contiguous_in_k();
  // As is (TileK x kTileM) with row length LdA when A is stored k-major, Bs (TileK x kTileN).
  for (int i = threadIdx.x; i < TileK * kTileM; i += Threads) {
    const int kk = a_k ? i % TileK : i / kTileM;
    const int mm = a_k ? i / TileK : i % kTileM;
    const index_t m = m0 + mm, k = k0 + kk;
    acc_t values[NB];
    if (m < M && k < K) {
      v.template lhs_block<NB>(z, m, k, values);
    } else {
#pragma unroll
      for (int j = 0; j < NB; ++j) values[j] = acc_t(0);
    }
#pragma unroll
    for (int j = 0; j < NB; ++j) As[j * stride_a + mm * LdA + kk] = convert(values[j]);
  }
  for (int j = 0; j < count; ++j) {
    for (int i = threadIdx.x; i < TileK * kTileN; i += Threads) {
      const int kk = b_k ? i % TileK : i / kTileN;
      const int nn = b_k ? i / TileK : i % kTileN;
      const index_t n = n0 + nn, k = k0 + kk;
      Bs[j * stride_b + kk * LdB + nn] =
          convert((n < N && k < K) ? v.rhs(z[j], k, n) : acc_t(0));
    }
  }
}

template <class View, typename acc_t>
__global__ void __launch_bounds__(kThreads) implicit_gemm_kernel(View v) {
  using index_t = typename View::index;
  constexpr int kLdA = kTileK + 1;  // As[m][k]: the +1 spreads a column over the banks
  constexpr int kLdB = kTileN + 1;
  __shared__ acc_t As[kTileM * kLdA];
  __shared__ acc_t Bs[kTileK * kLdB];
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const index_t M = v.m(), N = v.n(), K = v.k();
  const index_t tiles_n = (N + kTileN - 1) / kTileN;
  const index_t m0 = index_t(blockIdx.x / tiles_n) * kTileM;
  const index_t n0 = index_t(blockIdx.x % tiles_n) * kTileN;
  const auto keep = [](acc_t value) { return value; };
  for (int64_t zz = blockIdx.z; zz < v.batches(); zz += gridDim.z) {
    const index_t z = static_cast<index_t>(zz);
    acc_t acc[4][4];
#pragma unroll
    for (int r = 0; r < 4; ++r) {
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[r][c] = acc_t(0);
    }
    for (index_t k0 = 0; k0 < K; k0 += kTileK) {
      const index_t zs[1] = {z};
      stage_tiles<View, kTileK, kThreads, acc_t, kLdA, kLdB>(v, zs, 1, m0, n0, k0, As, Bs, 0, 0,
                                                             keep);
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < kTileK; ++kk) {
        acc_t a[4], b[4];
#pragma unroll
        for (int r = 0; r < 4; ++r) a[r] = As[(ty + 16 * r) * kLdA + kk];
#pragma unroll
        for (int c = 0; c < 4; ++c) b[c] = Bs[kk * kLdB + tx + 16 * c];
#pragma unroll
        for (int r = 0; r < 4; ++r) {
#pragma unroll
          for (int c = 0; c < 4; ++c) acc[r][c] += a[r] * b[c];
        }
      }
      __syncthreads();
    }
#pragma unroll
    for (int r = 0; r < 4; ++r) {
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const index_t m = m0 + ty + 16 * r, n = n0 + tx + 16 * c;
        if (m < M && n < N) v.store(z, m, n, acc[r][c]);
      }
    }
  }
}

// Tensor cores. The operand type and MMA shape for scalar_t: float16 and bfloat16 as they are
// (16x16x16), float32 rounded to TF32 as it is staged (16x16x8). Mixing and accumulation stay
// in float32; the mixed kernel is rounded to the operand type, as cuDNN rounds its kernels.
template <typename scalar_t>
struct TensorCoreOperand;

// float16 and bfloat16: rounded to nearest as they are staged (overloads on the type).
__device__ inline __half round_operand(float v, const __half*) { return __float2half_rn(v); }
__device__ inline __nv_bfloat16 round_operand(float v, const __nv_bfloat16*) {
  return __float2bfloat16_rn(v);
}

template <typename T>
struct SixteenBitOperand {
  using type = T;
  using mma = T;
  static constexpr int kK = 16;
  __device__ static type from(float v) { return round_operand(v, static_cast<const T*>(nullptr)); }
};

template <>
struct TensorCoreOperand<at::Half> : SixteenBitOperand<__half> {};

template <>
struct TensorCoreOperand<at::BFloat16> : SixteenBitOperand<__nv_bfloat16> {};

template <>
struct TensorCoreOperand<float> {
  using type = float;
  using mma = nvcuda::wmma::precision::tf32;
  static constexpr int kK = 8;
  __device__ static type from(float v) { return nvcuda::wmma::__float_to_tf32(v); }
};

// Examples a block of tensor_core_gemm_kernel serves: the views that mix the experts as they
// stage A (forward, grad_x) stage it for a block of examples at once, each expert element read
// once for all of them (views.cuh: lhs_block), so that the experts are read from memory a
// quarter as often; the kernel gradient's A (grad_out) belongs to one example.
template <class View>
constexpr int kTensorCoreExamples = View::kMixes ? 4 : 1;

// The same 64 x 64 tiles as implicit_gemm_kernel, with K-slices of two MMA steps, for NB
// examples of one group at a time (z = b * groups + g for b = NB zb .. NB zb + NB - 1). Warp w
// owns rows 16 (w % 4) .. +15 and two 16-column fragments from 32 (w / 4) of every example;
// the accumulators go through shared memory (over the staged tiles, free by then) to the view's
// store (which scatters to NCHW / channels_last / G), one example after another. Shared rows are
// padded by 16 bytes (bank spread), which keeps every fragment pointer 32-byte aligned and
// every leading dimension a multiple of 16 bytes, as wmma requires. Two blocks an SM: at most
// 128 registers a thread, which the 32-bit-index kernels fit without spilling (the 64-bit-index
// ones, for tensors past 2^31 elements, spill 116-160 bytes; unbounded they took 162 registers,
// one block an SM).
template <class View, class Op>
__global__ void __launch_bounds__(kThreads, 2) tensor_core_gemm_kernel(View v) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  namespace wmma = nvcuda::wmma;
  using index_t = typename View::index;
  using T = typename Op::type;
  constexpr int NB = kTensorCoreExamples<View>;
  // The two-level sums below are one example's (acc[0] into total).
  static_assert(!kLongK<View> || NB == 1, "a view with a long K serves one example a block");
  constexpr int kMmaK = Op::kK, kSliceK = 2 * Op::kK;
  constexpr int kPad = 16 / int(sizeof(T));
  constexpr int kLdA = kSliceK + kPad, kLdB = kTileN + kPad, kLdC = kTileN + 4;
  constexpr int kTileA = kTileM * kLdA, kTileB = kSliceK * kLdB;
  constexpr size_t kStaged = NB * (kTileA + kTileB) * sizeof(T);
  constexpr size_t kOut = kTileM * kLdC * sizeof(float);
  __shared__ __align__(32) unsigned char smem[kStaged > kOut ? kStaged : kOut];
  T* const As = reinterpret_cast<T*>(smem);  // NB tiles of A, then NB of B
  T* const Bs = As + NB * kTileA;
  float* const Cs = reinterpret_cast<float*>(smem);
  const int warp = threadIdx.x / 32, wm = 16 * (warp % 4), wn = 32 * (warp / 4);
  const index_t M = v.m(), N = v.n(), K = v.k();
  const index_t tiles_n = (N + kTileN - 1) / kTileN;
  const index_t m0 = index_t(blockIdx.x / tiles_n) * kTileM;
  const index_t n0 = index_t(blockIdx.x % tiles_n) * kTileN;
  const index_t groups = v.groups(), examples = v.examples();
  const auto convert = [](float value) { return Op::from(value); };
  for (int64_t zz = blockIdx.z; zz < (int64_t(examples) + NB - 1) / NB * groups;
       zz += gridDim.z) {
    const index_t gi = static_cast<index_t>(zz % groups);
    const index_t b0 = static_cast<index_t>(zz / groups) * NB;
    const int count = examples - b0 < NB ? int(examples - b0) : NB;
    index_t z[NB];
#pragma unroll
    for (int j = 0; j < NB; ++j) z[j] = (b0 + (j < count ? j : 0)) * groups + gi;
    // Views whose K may be long (the kernel gradient's, over pixels) sum in two levels: the
    // MMAs accumulate kChainSlices K-slices into acc, which is then added into total on the
    // CUDA cores and cleared. Tensor cores do not round their float32 sums to nearest: over one
    // chain of millions of MMAs (a kernel gradient over 2.7e8 pixels) the sum drifts toward
    // zero by tens of percent. The other views' K (channels x taps) stays short.
    constexpr index_t kChainSlices = 128;
    wmma::fragment<wmma::accumulator, 16, 16, kMmaK, float> acc[NB][2], total[2];
#pragma unroll
    for (int j = 0; j < 2; ++j) {
#pragma unroll
      for (int i = 0; i < NB; ++i) wmma::fill_fragment(acc[i][j], 0.0f);
      if constexpr (kLongK<View>) wmma::fill_fragment(total[j], 0.0f);
    }
    index_t chained = 0;
    for (index_t k0 = 0; k0 < K; k0 += kSliceK) {
      if constexpr (kLongK<View>) {
        if (++chained == kChainSlices) {
          chained = 0;
#pragma unroll
          for (int j = 0; j < 2; ++j) {
#pragma unroll
            for (int e = 0; e < total[j].num_elements; ++e) total[j].x[e] += acc[0][j].x[e];
            wmma::fill_fragment(acc[0][j], 0.0f);
          }
        }
      }
      stage_tiles<View, kSliceK, kThreads, T, kLdA, kLdB, NB>(v, z, count, m0, n0, k0, As, Bs,
                                                              kTileA, kTileB, convert);
      __syncthreads();
      // (count is the same for the whole block: every warp takes the same examples)
#pragma unroll
      for (int i = 0; i < NB; ++i) {
        if (i < count) {
#pragma unroll
          for (int kk = 0; kk < kSliceK; kk += kMmaK) {
            wmma::fragment<wmma::matrix_a, 16, 16, kMmaK, typename Op::mma, wmma::row_major> a;
            wmma::load_matrix_sync(a, As + i * kTileA + wm * kLdA + kk, kLdA);
#pragma unroll
            for (int j = 0; j < 2; ++j) {
              wmma::fragment<wmma::matrix_b, 16, 16, kMmaK, typename Op::mma, wmma::row_major>
                  b;
              wmma::load_matrix_sync(b, Bs + i * kTileB + kk * kLdB + wn + 16 * j, kLdB);
              wmma::mma_sync(acc[i][j], a, b, acc[i][j]);
            }
          }
        }
      }
      __syncthreads();
    }
    const bool m_inner = v.store_contiguous_in_m();
#pragma unroll
    for (int i = 0; i < NB; ++i) {
      if (i >= count) continue;
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        if constexpr (kLongK<View>) {
#pragma unroll
          for (int e = 0; e < total[j].num_elements; ++e) total[j].x[e] += acc[i][j].x[e];
          wmma::store_matrix_sync(Cs + wm * kLdC + wn + 16 * j, total[j], kLdC,
                                  wmma::mem_row_major);
        } else {
          wmma::store_matrix_sync(Cs + wm * kLdC + wn + 16 * j, acc[i][j], kLdC,
                                  wmma::mem_row_major);
        }
      }
      __syncthreads();
      for (int t = threadIdx.x; t < kTileM * kTileN; t += kThreads) {
        const int mm = m_inner ? t % kTileM : t / kTileN, nn = m_inner ? t / kTileM : t % kTileN;
        const index_t m = m0 + mm, n = n0 + nn;
        if (m < M && n < N) v.store(z[i], m, n, Cs[mm * kLdC + nn]);
      }
      __syncthreads();  // Cs (over the staged tiles) is free for the next example or batch
    }
  }
#endif
}

// The grid of either dense kernel: one block per output tile, on z the (block of examples,
// group) pairs: `examples` a block (kTensorCoreExamples for tensor_core_gemm_kernel, 1 for
// implicit_gemm_kernel), striding when there are more than gridDim.z.
template <class View>
dim3 gemm_grid(const View& v, int examples = 1) {
  const int64_t tiles = ceil_div(v.m(), kTileM) * ceil_div(v.n(), kTileN);
  TORCH_CHECK(tiles <= std::numeric_limits<int32_t>::max(),
              "condconv2d (cuda): too many output tiles for one launch: ", tiles);
  const int64_t batches = ceil_div(v.examples(), examples) * int64_t(v.groups());
  return dim3(static_cast<unsigned>(tiles), 1,
              static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(batches,
                                                                          kMaxGridYZ))));
}

// ---------------------------------------------------------------------------------------------
// Depthwise. A block owns one example, a tile of `tile` channels (a power of two, at most 32)
// and a chunk of the plane's pixels: thread i takes channel i % tile of the tile and every
// (kThreads / tile)-th pixel of the chunk from i / tile. With tile 1 the threads stride over one
// plane (consecutive threads read consecutive pixels: NCHW); with 32, a warp reads 32
// consecutive channels of a pixel (channels_last: 64-256 contiguous bytes a warp and tap, where
// one channel a block read a 32-byte sector per element). Loop counters over pixels are 64-bit
// (they step past the end); the index arithmetic is index_t.

// The launch geometry of a depthwise kernel; see depthwise_grid.
struct DepthwiseGrid {
  dim3 grid;
  int tile;             // channels a block
  size_t shared_bytes;  // the tile's mixed taps (forward and grad_x)
};

constexpr size_t kMaxDynamicShared = 48 * 1024;  // without the opt-in attribute
// Pixels of each channel a block, at least (where the plane has them): the tile's taps are mixed
// once a block, E x taps FMAs a channel against taps a pixel.
constexpr int64_t kDepthwiseLanePixels = 256;

// The grid of a depthwise kernel over `batch` examples of `channels` channels (the output
// channels of the forward and the kernel gradient, the input channels of grad_x), each with
// `taps` mixed taps in shared memory (kh * kw, times the multiplier for grad_x; 0 for the kernel
// gradient) of acc_bytes each, over planes of `pixels` pixels, in chunks (grid.y) of at least
// kDepthwiseLanePixels pixels of each channel (the kernel gradient sets its own slices).
// channels_inner: the tensor the kernel reads most has its channels closer together than its
// pixels (channels_last; typed.cuh decides), so consecutive threads take consecutive channels.
inline DepthwiseGrid depthwise_grid(int64_t batch, int64_t channels, int64_t pixels,
                                    int64_t taps, size_t acc_bytes, bool channels_inner) {
  int tile = 1;
  if (channels_inner) {
    while (tile < 32 && tile < channels) tile *= 2;
  }
  while (tile > 1 && size_t(tile) * size_t(taps) * acc_bytes > kMaxDynamicShared) tile /= 2;
  TORCH_CHECK(size_t(taps) * acc_bytes <= kMaxDynamicShared,
              "condconv2d (cuda): the depthwise kernel's ", taps,
              " mixed taps a channel do not fit in shared memory");
  const int64_t tiles = ceil_div(channels, tile);
  TORCH_CHECK(batch * tiles <= std::numeric_limits<int32_t>::max(),
              "condconv2d (cuda): batch x channels = ", batch * channels,
              " is more planes than one launch can cover (2^31 - 1)");
  const int64_t lanes = kThreads / tile;
  const int64_t chunks = std::max<int64_t>(
      1, std::min(ceil_div(pixels, lanes * ceil_div(kDepthwiseLanePixels, lanes)), kMaxGridYZ));
  return {dim3(static_cast<unsigned>(batch * tiles), static_cast<unsigned>(chunks)), tile,
          size_t(tile) * size_t(taps) * acc_bytes};
}

// Slices of the output plane for the kernel gradient over `blocks` (example, channel tile)
// blocks, whose partial sums are added after: enough blocks to fill the device, slices of at
// least 2048 pixels.
inline int64_t kernel_grad_slices(int64_t blocks, int64_t pixels) {
  return std::max<int64_t>(
      1, std::min({ceil_div(4096, blocks), ceil_div(pixels, 2048), kMaxGridYZ}));
}

// The block's place: example b, first channel c0 and channel count of its tile, its thread's
// channel lane and pixel lane, and its chunk [begin, end) of the plane's pixels.
template <typename index_t>
struct DepthwiseBlock {
  index_t b, c0, count;
  int lane, row, rows;
  int64_t begin, end;

  __device__ DepthwiseBlock(index_t channels, int tile, int64_t pixels) {
    const index_t tiles = static_cast<index_t>((int64_t(channels) + tile - 1) / tile);
    b = static_cast<index_t>(int64_t(blockIdx.x) / tiles);
    c0 = static_cast<index_t>(int64_t(blockIdx.x) % tiles) * tile;
    count = channels - c0 < tile ? channels - c0 : static_cast<index_t>(tile);
    lane = threadIdx.x % tile;
    row = threadIdx.x / tile;
    rows = blockDim.x / tile;
    const int64_t chunk = (pixels + gridDim.y - 1) / gridDim.y;
    begin = int64_t(blockIdx.y) * chunk;
    end = begin + chunk < pixels ? begin + chunk : pixels;
  }
  __device__ bool active() const { return lane < count; }
};

// Mixed taps of output channels co0 .. co0 + count - 1 of example b into shared memory.
template <typename scalar_t, typename acc_t, typename index_t>
__device__ void mix_taps(const scalar_t* weight, const acc_t* routing, const Shape<index_t>& s,
                         index_t b, index_t co0, index_t count, acc_t* taps) {
  const index_t T = s.taps();
  for (index_t i = threadIdx.x; i < count * T; i += blockDim.x) {
    taps[i] = mixed_weight(weight, routing, s, b, index_t(co0 + i / T), index_t(i % T));
  }
  __syncthreads();
}

template <typename scalar_t, typename acc_t, typename index_t>
__global__ void depthwise_forward_kernel(Shape<index_t> s, int tile, const scalar_t* x,
                                         const scalar_t* weight, const acc_t* routing,
                                         const acc_t* bias, scalar_t* out) {
  CONDCONV_DYNAMIC_SHARED(smem);
  acc_t* taps = reinterpret_cast<acc_t*>(smem);
  const DepthwiseBlock<index_t> k(s.out_channels, tile, s.out_pixels());
  mix_taps(weight, routing, s, k.b, k.c0, k.count, taps);
  if (!k.active()) return;
  const index_t co = k.c0 + k.lane;
  const acc_t shift = bias ? bias[k.b * s.out_channels + co] : acc_t(0);
  for (int64_t pp = k.begin + k.row; pp < k.end; pp += k.rows) {
    const index_t p = static_cast<index_t>(pp), oh = p / s.out_w, ow = p % s.out_w;
    out[k.b * s.out_stride[0] + co * s.out_stride[1] + oh * s.out_stride[2] +
        ow * s.out_stride[3]] = static_cast<scalar_t>(
        depthwise_output(x, s, taps + k.lane * s.taps(), k.b, co, oh, ow) + shift);
  }
}

// Channels are the input channels; each has the multiplier's output channels' taps.
template <typename scalar_t, typename acc_t, typename index_t>
__global__ void depthwise_grad_input_kernel(Shape<index_t> s, int tile, const scalar_t* grad_out,
                                            const scalar_t* weight, const acc_t* routing,
                                            scalar_t* grad_x) {
  CONDCONV_DYNAMIC_SHARED(smem);
  acc_t* taps = reinterpret_cast<acc_t*>(smem);
  const DepthwiseBlock<index_t> k(s.in_channels, tile, s.in_pixels());
  const index_t mult = s.out_per_group();
  mix_taps(weight, routing, s, k.b, index_t(k.c0 * mult), index_t(k.count * mult), taps);
  if (!k.active()) return;
  const index_t c = k.c0 + k.lane;
  for (int64_t pp = k.begin + k.row; pp < k.end; pp += k.rows) {
    const index_t p = static_cast<index_t>(pp), ih = p / s.width, iw = p % s.width;
    grad_x[k.b * s.dx_stride[0] + c * s.dx_stride[1] + ih * s.dx_stride[2] +
           iw * s.dx_stride[3]] = static_cast<scalar_t>(
        depthwise_grad_input(grad_out, s, taps + k.lane * mult * s.taps(), k.b, c, ih, iw));
  }
}

// The sum of v over the threads of the block that share a channel lane (threadIdx.x % tile;
// tile a power of two <= 32), in a fixed order; valid in threads 0 .. tile - 1. scratch holds
// kThreads values.
template <typename acc_t>
__device__ acc_t lane_sum(acc_t v, int tile, acc_t* scratch) {
  for (int offset = 16; offset >= tile; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane < tile) scratch[warp * tile + lane] = v;
  __syncthreads();
  if (int(threadIdx.x) < tile) {
    for (int w = 1; w < int(blockDim.x / 32); ++w) v += scratch[w * tile + threadIdx.x];
  }
  __syncthreads();  // scratch is free for the next call
  return v;
}

// G[slice, b, co, t] = sum over the slice's pixels p of grad_out[b, co, p] x[b, c, p read by t];
// grid.y = the slices of the output plane.
template <typename scalar_t, typename acc_t, typename index_t>
__global__ void __launch_bounds__(kThreads)
    depthwise_kernel_grad_kernel(Shape<index_t> s, int tile, const scalar_t* grad_out,
                                 const scalar_t* x, acc_t* G) {
  __shared__ acc_t scratch[kThreads];
  const DepthwiseBlock<index_t> k(s.out_channels, tile, s.out_pixels());
  const index_t T = s.taps(), co = k.c0 + k.lane;
  for (index_t t = 0; t < T; ++t) {
    acc_t sum = 0;
    if (k.active()) {
      for (int64_t p = k.begin + k.row; p < k.end; p += k.rows) {
        sum += depthwise_kernel_grad_term<scalar_t, acc_t>(grad_out, x, s, k.b, co, t,
                                                           static_cast<index_t>(p));
      }
    }
    sum = lane_sum(sum, tile, scratch);
    if (int(threadIdx.x) < tile && k.active()) {
      G[((int64_t(blockIdx.y) * s.batch + k.b) * s.out_channels + co) * T + t] = sum;
    }
  }
}

}  // namespace cuda
}  // namespace condconv
