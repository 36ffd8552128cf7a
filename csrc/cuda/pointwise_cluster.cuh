// The dense 1x1 forward and grad_x of 16-bit channels_last tensors on Hopper (sm_90): blocks of
// four examples, clusters of four blocks that share every load of the experts.
//
// Both passes are, per example b, out_b (P x R) = in_b (P x D) . W_b^T with W_b = sum_e r[b,e]
// W_e: the forward R = Cout, D = Cin, in = x; grad_x R = Cin, D = Cout, in = grad_out, and W_b
// read transposed. A block computes the (R-tile of 64) x (pixel tile of 64) outputs of four
// examples. Per step of 32 along D it needs the E experts' (64 x 32) tiles and each example's
// (64 pixels x 32) input tile; the four blocks of a cluster (consecutive blocks of examples, the
// same output tile) need the same expert tiles, so block `rank` copies the experts e = rank,
// rank + 4, ... once from L2 into the shared memory of all four (TMA multicast), and each its
// own input tiles: the experts come from L2 once for 16 examples instead of once a block of 4.
// Every thread then mixes 8 elements of the experts' tiles for the four examples at once (the
// experts read from shared memory once a step, in registers for the four mixes) into the
// examples' mixed tiles, and each warp multiplies one example's mixed tile by half its input
// tile on the tensor cores (64 rows x 32 pixels): through ldmatrix and mma.sync on input tiles
// copied with the 64-byte swizzle (FragmentProducts: conflict-free fragment loads, the
// default), or through wmma on plain ones (WmmaProducts).
//
// The copies run `stages` steps ahead. A stage is released to the cluster once every thread of
// the block is past the step that read it (the barrier after the next step's mix), by one
// arrival on each block's `empty` barrier of that stage (after the next step's products); a
// block's thread 0 refills a stage once all four blocks have released it. Outputs go through
// shared memory to 16-byte stores along the channels.
#pragma once

#include "cluster.cuh"
#include "fragments.cuh"
#include "kernels.cuh"

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>
#include <type_traits>

namespace condconv {
namespace cuda {
namespace pointwise {

constexpr int kRows = 64;         // outputs (channels) of a block's tile
constexpr int kPixels = 64;       // pixels of a block's tile
constexpr int kDepth = 32;        // the reduction a step
constexpr int kExamples = 4;      // examples a block
constexpr int kClusterSize = 4;   // blocks of a cluster, along the blocks of examples
constexpr int kBlockThreads = kThreads;
constexpr int kMaxExperts = 8;
constexpr int kMaxStages = 4;
constexpr int kTileElements = kRows * kDepth;  // an expert's tile, or an input tile (kPixels)
constexpr int kTileBytes = 2 * kTileElements;
constexpr int kLdForward = kDepth + 8;  // mixed tile, forward: [row][depth], padded 16 bytes
constexpr int kLdGradX = kRows + 8;     // mixed tile, grad_x: [depth][row]
constexpr int kMixedElements = kRows * kLdForward;  // >= kDepth * kLdGradX
constexpr int kLdOut = kRows + 4;       // the accumulators in shared memory: [pixel][row], float
constexpr int kBarrierBytes = 1024;     // the barriers, ahead of the tiles (1024-byte aligned:
                                        // whole atoms of the 64-byte swizzle)
constexpr int kAlignSlack = 1024;       // the dynamic shared memory aligned up to 1024 bytes
constexpr int kSharedLimit = 227 * 1024;
static_assert(kTileElements == kBlockThreads * 8, "a thread mixes 8 elements of a tile");
static_assert(kDepth * kLdGradX <= kMixedElements, "mixed tile size");
static_assert(kExamples * kPixels * kLdOut * 4 <=
                  2 * (4 + kExamples) * kTileBytes + 2 * kExamples * kMixedElements * 2,
              "the accumulators fit over two stages and the mixed tiles");

// The experts' tiles a stage holds: E padded to 4 or 8 (the mix loop's length).
constexpr int padded_experts(int64_t experts) { return experts <= 4 ? 4 : 8; }

struct Plan {
  unsigned row_tiles, pixel_tiles, example_blocks;  // example_blocks: a multiple of the cluster
  int stages;
  int64_t shared_bytes;
};

static_assert(kAlignSlack + kBarrierBytes + 2 * kExamples * kMixedElements * 2 +
                      2 * (kMaxExperts + kExamples) * kTileBytes <=
                  kSharedLimit,
              "two stages fit at the most experts");

// The launch of a call: stages as many as fit in 227 KB (at most 4, at least 2).
inline Plan plan(int64_t batch, int64_t rows, int64_t pixels, int64_t experts) {
  Plan p{};
  p.row_tiles = static_cast<unsigned>((rows + kRows - 1) / kRows);
  p.pixel_tiles = static_cast<unsigned>((pixels + kPixels - 1) / kPixels);
  const int64_t blocks = (batch + kExamples - 1) / kExamples;
  p.example_blocks =
      static_cast<unsigned>((blocks + kClusterSize - 1) / kClusterSize * kClusterSize);
  const int64_t stage = int64_t(padded_experts(experts) + kExamples) * kTileBytes;
  const int64_t fixed = kAlignSlack + kBarrierBytes + 2 * kExamples * kMixedElements * 2;
  int64_t stages = (kSharedLimit - fixed) / stage;
  stages = stages > kMaxStages ? kMaxStages : stages;
  p.stages = static_cast<int>(stages);
  p.shared_bytes = fixed + stages * stage;
  return p;
}

struct Args {
  int batch, rows, depth, pixels, experts, stages;
  const float* routing;  // (batch, experts)
  const float* bias;     // (batch, rows), the mixed bias, or null
  void* out;             // (batch, pixels, rows): channels_last
};

#if CONDCONV_SM90_DEVICE
// Eight 16-bit values, one 16-byte access.
template <typename T>
struct alignas(16) Pack8 {
  T v[8];
};

__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ __half from_float(float v, const __half*) { return __float2half_rn(v); }
__device__ __forceinline__ __nv_bfloat16 from_float(float v, const __nv_bfloat16*) {
  return __float2bfloat16_rn(v);
}

// The examples of the block whose first is `first` (none for the empty blocks that fill a
// cluster, at most kExamples).
__device__ __forceinline__ int block_examples(const Args& a, int first) {
  const int left = a.batch - first;
  return left < 0 ? 0 : (left < kExamples ? left : kExamples);
}

// The routing weights of the block's `count` examples from `first`, zero past them and past
// the experts.
template <int EP>
__device__ __forceinline__ void load_routing(float (&r)[kExamples][EP], const Args& a, int first,
                                             int count) {
#pragma unroll
  for (int j = 0; j < kExamples; ++j) {
#pragma unroll
    for (int e = 0; e < EP; ++e) {
      r[j][e] = (j < count && e < a.experts) ? a.routing[int64_t(first + j) * a.experts + e] : 0.f;
    }
  }
}

// Thread 0: the stages' barriers (`full`: thread 0's arrival and the copies' bytes; `empty`: one
// arrival from each block of the cluster), then, every thread, the cluster barrier: every
// block's barriers ready before any copy or arrival reaches them.
__device__ __forceinline__ void init_barriers(uint64_t* full, uint64_t* empty, int stages) {
  using namespace sm90;
  if (threadIdx.x == 0) {
    for (int s = 0; s < stages; ++s) {
      barrier_init(&full[s], 1);
      barrier_init(&empty[s], kClusterSize);
    }
    fence_barrier_init();
  }
  cluster_sync();
}

// Four floats, one 16-byte access.
struct alignas(16) Float4 {
  float v[4];
};

// The epilogue: the block's outputs (kTileRows rows from r0 x kPixels pixels from p0, of `count`
// examples from `first`) from the accumulators in shared memory, [example][pixel][row] with rows
// of `ld` floats (a multiple of 4, and 4 mod 32 in banks: 68 or 132), plus the mixed bias,
// rounded to T, in 16-byte stores along the channels. A thread reads its 8 floats as two 16-byte
// halves, vectors 4-7 of each 8 the upper half first: the first (and the second) reads of 8
// consecutive lanes then cover the 32 banks once.
template <typename T, int kTileRows>
__device__ __forceinline__ void store_outputs(const float* acc_tile, int ld, const Args& a,
                                              int first, int count, int r0, int p0) {
  T* out = static_cast<T*>(a.out);
  constexpr int kVectors = kTileRows / 8;
  for (int idx = threadIdx.x; idx < count * kPixels * kVectors; idx += kBlockThreads) {
    const int j = idx / (kPixels * kVectors), p = idx / kVectors % kPixels, v = idx % kVectors;
    const int pixel = p0 + p, row = r0 + 8 * v;
    if (pixel >= a.pixels || row >= a.rows) continue;
    const float* src = acc_tile + (j * kPixels + p) * ld + 8 * v;
    const bool upper = (v >> 2) & 1;
    const Float4 x = *reinterpret_cast<const Float4*>(src + (upper ? 4 : 0));
    const Float4 y = *reinterpret_cast<const Float4*>(src + (upper ? 0 : 4));
    const float* bias = a.bias != nullptr ? a.bias + int64_t(first + j) * a.rows + row : nullptr;
    Pack8<T> o;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const float acc = (i < 4) != upper ? x.v[i % 4] : y.v[i % 4];
      o.v[i] = from_float(acc + (bias != nullptr ? bias[i] : 0.f), static_cast<const T*>(nullptr));
    }
    *reinterpret_cast<Pack8<T>*>(out + (int64_t(first + j) * a.pixels + pixel) * a.rows + row) = o;
  }
}

// Thread 0, once every thread of the block is past step `done`: that step's stage back to the
// cluster (one arrival on its `empty` barrier in each block, after a fence that orders the
// block's reads of it before them), and, once all the cluster's blocks have given it back,
// refilled with step done + stages (issue), if there is one.
template <class Issue>
__device__ __forceinline__ void release_stage(uint64_t* empty, int done, int stages, int steps,
                                              const Issue& issue) {
  using namespace sm90;
  const int s = done % stages;
  fence_cluster();
  for (uint32_t c = 0; c < kClusterSize; ++c) barrier_arrive_remote(&empty[s], c);
  const int next = done + stages;
  if (next < steps) {
    barrier_wait<true>(&empty[s], uint32_t(next / stages - 1) & 1u);
    issue(next);
  }
}
#endif

#if CONDCONV_SM90_DEVICE
// A warp's products of a step: one example's mixed tile (kRows x kDepth, forward [row][depth]
// with rows of kLdForward, grad_x [depth][row] with rows of kLdGradX) by half its input tile
// (kPixels x kDepth, [pixel][depth], 64-byte rows), into the accumulators of its 64 rows x 32
// pixels; store() puts them in shared memory, [pixel][row] with rows of kLdOut floats.
//
// Through wmma: the input tiles as copied (the fragment loads of 64-byte rows 4-way
// bank-conflicted; the compiler makes them generic 32-bit loads).
template <typename T, bool kGradX>
struct WmmaProducts {
  static constexpr bool kSwizzledInput = false;
  using ALayout = typename std::conditional<kGradX, nvcuda::wmma::col_major,
                                            nvcuda::wmma::row_major>::type;
  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> acc[4][2];

  __device__ __forceinline__ WmmaProducts() {
#pragma unroll
    for (int mi = 0; mi < 4; ++mi) {
#pragma unroll
      for (int pj = 0; pj < 2; ++pj) nvcuda::wmma::fill_fragment(acc[mi][pj], 0.0f);
    }
  }
  __device__ __forceinline__ void step(const T* mixed, const T* in, int half) {
    namespace wmma = nvcuda::wmma;
#pragma unroll
    for (int kk = 0; kk < kDepth; kk += 16) {
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b[2];
#pragma unroll
      for (int pj = 0; pj < 2; ++pj) {
        wmma::load_matrix_sync(b[pj], in + (32 * half + 16 * pj) * kDepth + kk, kDepth);
      }
#pragma unroll
      for (int mi = 0; mi < 4; ++mi) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, ALayout> am;
        if (kGradX) {
          wmma::load_matrix_sync(am, mixed + kk * kLdGradX + 16 * mi, kLdGradX);
        } else {
          wmma::load_matrix_sync(am, mixed + 16 * mi * kLdForward + kk, kLdForward);
        }
#pragma unroll
        for (int pj = 0; pj < 2; ++pj) wmma::mma_sync(acc[mi][pj], am, b[pj], acc[mi][pj]);
      }
    }
  }
  __device__ __forceinline__ void store(float* tile, int half) const {
#pragma unroll
    for (int mi = 0; mi < 4; ++mi) {
#pragma unroll
      for (int pj = 0; pj < 2; ++pj) {
        nvcuda::wmma::store_matrix_sync(tile + (32 * half + 16 * pj) * kLdOut + 16 * mi,
                                        acc[mi][pj], kLdOut, nvcuda::wmma::mem_col_major);
      }
    }
  }
};

// Through ldmatrix and mma.sync (fragments.cuh): the input tiles copied with the 64-byte
// swizzle (16-byte chunk q of pixel p's row at chunk q ^ ((p >> 1) & 3)), so that the 8 rows
// one ldmatrix reads fall in 8 different bank groups; the mixed tiles' padded rows are
// conflict-free as they are (grad_x's read transposed).
template <typename T, bool kGradX>
struct FragmentProducts {
  static constexpr bool kSwizzledInput = true;
  float acc[4][4][4] = {};  // [row tile of 16][pixel tile of 8][fragment element]

  __device__ __forceinline__ void step(const T* mixed, const T* in, int half) {
    using namespace fragments;
    const int lane = threadIdx.x % 32;
    const auto* in_bytes = reinterpret_cast<const unsigned char*>(in);
#pragma unroll
    for (int kk = 0; kk < kDepth; kk += 16) {
      uint32_t b[4][2];  // the warp's 4 tiles of 8 pixels
#pragma unroll
      for (int q = 0; q < 2; ++q) {
        const int px = 32 * half + 16 * q + lane % 8 + lane / 16 * 8;
        const int chunk = (kk + lane / 8 % 2 * 8) / 8;
        uint32_t r[4];
        ldmatrix_x4(r, in_bytes + px * 2 * kDepth + 16 * (chunk ^ ((px >> 1) & 3)));
        b[2 * q][0] = r[0];
        b[2 * q][1] = r[1];
        b[2 * q + 1][0] = r[2];
        b[2 * q + 1][1] = r[3];
      }
#pragma unroll
      for (int mi = 0; mi < 4; ++mi) {
        uint32_t am[4];
        if (kGradX) {
          ldmatrix_x4<true>(am, mixed + (kk + lane % 8 + lane / 16 * 8) * kLdGradX + 16 * mi +
                                  lane / 8 % 2 * 8);
        } else {
          ldmatrix_x4(am, mixed + (16 * mi + lane % 8 + lane / 8 % 2 * 8) * kLdForward + kk +
                              lane / 16 * 8);
        }
#pragma unroll
        for (int nt = 0; nt < 4; ++nt) {
          mma_16816<std::is_same<T, __nv_bfloat16>::value>(acc[mi][nt], am, b[nt]);
        }
      }
    }
  }
  __device__ __forceinline__ void store(float* tile, int half) const {
    const int lane = threadIdx.x % 32, g = lane / 4, c = lane % 4;
#pragma unroll
    for (int mi = 0; mi < 4; ++mi) {
#pragma unroll
      for (int nt = 0; nt < 4; ++nt) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int row = 16 * mi + g + 8 * (i / 2), px = 32 * half + 8 * nt + 2 * c + i % 2;
          tile[px * kLdOut + row] = acc[mi][nt][i];
        }
      }
    }
  }
};

// Thread 0 of a block: the copies of step kt into stage kt % stages (tiles of kStageElements),
// announced on its `full` barrier: the experts e = rank, rank + kClusterSize, ... multicast to
// the cluster, and this block's `count` examples' input tiles.
template <int EP, bool kGradX, typename T>
__device__ __forceinline__ void issue_step(const sm90::TileMap* experts_map,
                                           const sm90::TileMap* in_map, T* tiles, uint64_t* full,
                                           int kt, int stages, int experts, int count, int first,
                                           int r0, int p0, uint32_t rank) {
  using namespace sm90;
  constexpr int kStageElements = (EP + kExamples) * kTileElements;
  const int s = kt % stages;
  T* stage = tiles + s * kStageElements;
  barrier_arrive_expect(&full[s], uint32_t(experts + count) * kTileBytes);
  const int d0 = kt * kDepth;
  for (int e = int(rank); e < experts; e += kClusterSize) {
    tile_load_multicast(stage + e * kTileElements, experts_map, kGradX ? r0 : d0,
                        kGradX ? d0 : r0, e, &full[s], uint16_t((1u << kClusterSize) - 1));
  }
  for (int j = 0; j < count; ++j) {
    tile_load(stage + (EP + j) * kTileElements, in_map, d0, p0, first + j, &full[s]);
  }
}
#endif

// T: __half or __nv_bfloat16; EP: experts a stage holds (4 or 8); kGradX: grad_x (the experts'
// tiles read transposed) instead of the forward; kFragments: the products through ldmatrix and
// mma.sync on swizzled input tiles (FragmentProducts), else wmma (WmmaProducts). Grid: x = row
// tile + row_tiles x pixel tile, y = block of examples (clusters of kClusterSize along y);
// kBlockThreads threads.
template <typename T, int EP, bool kGradX, bool kFragments>
__global__ void __launch_bounds__(kBlockThreads, 1)
    pointwise_cluster_kernel(const CONDCONV_GRID_CONSTANT sm90::TileMap experts_map,
                             const CONDCONV_GRID_CONSTANT sm90::TileMap in_map, const Args a) {
#if CONDCONV_SM90_DEVICE
  using namespace sm90;
  CONDCONV_DYNAMIC_SHARED(raw);
  unsigned char* base = raw + shared_padding(raw, kAlignSlack);
  const int S = a.stages;
  uint64_t* full = reinterpret_cast<uint64_t*>(base);
  uint64_t* empty = full + kMaxStages;
  T* tiles = reinterpret_cast<T*>(base + kBarrierBytes);
  constexpr int kStageElements = (EP + kExamples) * kTileElements;
  T* mixed_base = tiles + S * kStageElements;

  const int tid = threadIdx.x;
  const int row_tiles = (a.rows + kRows - 1) / kRows;
  const int r0 = (blockIdx.x % row_tiles) * kRows;
  const int p0 = (blockIdx.x / row_tiles) * kPixels;
  const int first = blockIdx.y * kExamples;
  const int count = block_examples(a, first);
  const uint32_t rank = cluster_rank();
  const int steps = (a.depth + kDepth - 1) / kDepth;

  float r[kExamples][EP];
  load_routing(r, a, first, count);
  init_barriers(full, empty, S);

  // Thread 0: the copies of step kt into its stage.
  const auto issue = [&](int kt) {
    issue_step<EP, kGradX>(&experts_map, &in_map, tiles, full, kt, S, a.experts, count, first,
                           r0, p0, rank);
  };
  if (tid == 0) {
    for (int kt = 0; kt < S && kt < steps; ++kt) issue(kt);
  }

  // Warp w multiplies example w / 2's mixed tile by pixels 32 (w % 2) .. + 31 of its input.
  const int warp = tid / 32, j_mma = warp / 2, half = warp % 2;
  typename std::conditional<kFragments, FragmentProducts<T, kGradX>,
                            WmmaProducts<T, kGradX>>::type products;
  // The thread's 8 elements of every tile (linear 8 tid ..), and their place in a mixed tile.
  const int lin = 8 * tid;
  const int mixed_at = kGradX ? (lin / kRows) * kLdGradX + lin % kRows
                              : (lin / kDepth) * kLdForward + lin % kDepth;

  for (int kt = 0; kt < steps; ++kt) {
    const int s = kt % S;
    barrier_wait(&full[s], uint32_t(kt / S) & 1u);
    const T* stage = tiles + s * kStageElements;
    T* mixed = mixed_base + (kt & 1) * kExamples * kMixedElements;
    if (count > 0) {
      float m[kExamples][8];
#pragma unroll
      for (int j = 0; j < kExamples; ++j) {
#pragma unroll
        for (int i = 0; i < 8; ++i) m[j][i] = 0.f;
      }
#pragma unroll
      for (int e = 0; e < EP; ++e) {
        if (e < a.experts) {
          const Pack8<T> w = *reinterpret_cast<const Pack8<T>*>(stage + e * kTileElements + lin);
#pragma unroll
          for (int i = 0; i < 8; ++i) {
            const float we = to_float(w.v[i]);
#pragma unroll
            for (int j = 0; j < kExamples; ++j) m[j][i] += r[j][e] * we;
          }
        }
      }
#pragma unroll
      for (int j = 0; j < kExamples; ++j) {
        if (j < count) {
          Pack8<T> out;
#pragma unroll
          for (int i = 0; i < 8; ++i) {
            out.v[i] = from_float(m[j][i], static_cast<const T*>(nullptr));
          }
          *reinterpret_cast<Pack8<T>*>(mixed + j * kMixedElements + mixed_at) = out;
        }
      }
    }
    __syncthreads();  // the mixed tiles written; every thread past step kt - 1's products
    if (j_mma < count) {
      products.step(mixed + j_mma * kMixedElements, stage + (EP + j_mma) * kTileElements, half);
    }
    // Step kt - 1's stage back to the cluster (every thread of the block was past it at the
    // barrier above), and refilled once all the cluster's blocks have given it back: after this
    // warp's products. Thread 0 waits there for the slowest block, and the next step's
    // __syncthreads waits for thread 0: the blocks of a cluster keep within about a step of
    // each other (harmless at 3-4 stages; a producer warp would take the wait off them).
    if (tid == 0 && kt >= 1) release_stage(empty, kt - 1, S, steps, issue);
  }

  // Every copy this block was sent has landed (each step's barrier was waited for): the stages
  // are free for the accumulators, [example][pixel][row].
  __syncthreads();
  float* acc_tile = reinterpret_cast<float*>(tiles);
  if (j_mma < count) products.store(acc_tile + j_mma * kPixels * kLdOut, half);
  __syncthreads();
  store_outputs<T, kRows>(acc_tile, kLdOut, a, first, count, r0, p0);
  cluster_sync();  // no block leaves while another may still arrive on its barriers
#else
  __trap();  // compiled for a GPU before sm_90: never launched there (runs_sm90)
#endif
}

// ---------------------------------------------------------------------------------------------
// Host side: which calls take the kernel, its maps and arguments, and the choice of instance.

// Whether a dense pass of a call can take pointwise_cluster_kernel, the device aside: a 1x1
// ungrouped layer, stride 1, unpadded, at most kMaxExperts experts, channel counts multiples of 8
// (16-byte rows for the copies and the stores), `in` (x, or grad_out for grad_x) and `out`
// channels_last and contiguous, every pointer 16-byte aligned, and few enough blocks of
// examples for the grid.
inline bool fits(const Geometry& g, const at::Tensor& in, const at::Tensor& out,
                 const at::Tensor& experts) {
  const auto aligned = [](const at::Tensor& t) {
    return reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0;
  };
  const bool half = in.scalar_type() == at::kHalf || in.scalar_type() == at::kBFloat16;
  return half && experts.scalar_type() == in.scalar_type() &&
         out.scalar_type() == in.scalar_type() &&
         g.pointwise() && g.groups == 1 && g.experts <= kMaxExperts &&
         g.in_channels % 8 == 0 && g.out_channels % 8 == 0 &&
         in.is_contiguous(at::MemoryFormat::ChannelsLast) &&
         out.is_contiguous(at::MemoryFormat::ChannelsLast) && experts.is_contiguous() &&
         aligned(in) && aligned(out) && aligned(experts) &&
         (g.batch + kExamples - 1) / kExamples <= 65535 - kClusterSize &&
         g.batch * g.out_pixels() < (int64_t(1) << 31);
}

// One pass, ready to launch: the experts' and the input's maps, the arguments, the grid.
struct Pass {
  sm90::TileMap experts, in;
  Args args;
  Plan plan;
  bool grad_x, bfloat16, fragments;
  dim3 grid() const { return dim3(plan.row_tiles * plan.pixel_tiles, plan.example_blocks); }
};

// The maps and arguments of a pass, either kernel's: the experts (E, Cout, Cin) in boxes of
// `expert_box` copied with `expert_swizzle`, the input (B, P, D) in boxes of `in_box` with
// `in_swizzle` (cluster.cuh: make_tile_map), the launch `plan`. False, with the reason, where
// the driver refuses a map.
inline bool prepare_pass(bool grad_x, bool bfloat16, const void* experts, const void* in,
                         void* out, const float* routing, const float* bias, int64_t batch,
                         int64_t cin, int64_t cout, int64_t pixels, int64_t num_experts,
                         const uint32_t (&expert_box)[3], int expert_swizzle,
                         const uint32_t (&in_box)[3], int in_swizzle, const Plan& plan, Pass* p,
                         std::string* error) {
  const int64_t rows = grad_x ? cin : cout, depth = grad_x ? cout : cin;
  const uint64_t expert_dims[3] = {uint64_t(cin), uint64_t(cout), uint64_t(num_experts)};
  const uint64_t expert_strides[2] = {uint64_t(cin) * 2, uint64_t(cin * cout) * 2};
  const uint64_t in_dims[3] = {uint64_t(depth), uint64_t(pixels), uint64_t(batch)};
  const uint64_t in_strides[2] = {uint64_t(depth) * 2, uint64_t(pixels * depth) * 2};
  if (!sm90::make_tile_map(&p->experts, experts, bfloat16, expert_dims, expert_strides,
                           expert_box, expert_swizzle, error) ||
      !sm90::make_tile_map(&p->in, in, bfloat16, in_dims, in_strides, in_box, in_swizzle,
                           error)) {
    return false;
  }
  p->plan = plan;
  p->args = Args{int(batch), int(rows), int(depth), int(pixels), int(num_experts),
                 plan.stages, routing, grad_x ? nullptr : bias, out};
  p->grad_x = grad_x;
  p->bfloat16 = bfloat16;
  return true;
}

// The forward (out = x . W_b^T, rows Cout) or grad_x (rows Cin, `in` = grad_out) of a call that
// fits: experts (E, Cout, Cin), in (B, P, D) and out (B, P, rows), both channels_last;
// routing (B, E) and bias (B, rows, or null) float32. False, with the reason, where the driver
// refuses a map.
inline bool prepare(bool grad_x, bool bfloat16, bool fragments, const void* experts,
                    const void* in, void* out, const float* routing, const float* bias,
                    int64_t batch, int64_t cin, int64_t cout, int64_t pixels,
                    int64_t num_experts, Pass* p, std::string* error) {
  const uint32_t expert_box[3] = {uint32_t(grad_x ? kRows : kDepth),
                                  uint32_t(grad_x ? kDepth : kRows), 1};
  const uint32_t in_box[3] = {kDepth, kPixels, 1};
  p->fragments = fragments;
  return prepare_pass(grad_x, bfloat16, experts, in, out, routing, bias, batch, cin, cout, pixels,
                      num_experts, expert_box, 0, in_box, fragments ? 64 : 0,
                      plan(batch, grad_x ? cin : cout, pixels, num_experts), p, error);
}

// launch(kernel, grid, shared_bytes, experts_map, in_map, args) with the kernel instance of p.
template <typename T, class LaunchFn>
void dispatch(const Pass& p, LaunchFn&& launch) {
  const auto go = [&](auto kernel) {
    launch(kernel, p.grid(), size_t(p.plan.shared_bytes), p.experts, p.in, p.args);
  };
  const auto by_pass = [&](auto fragments) {
    constexpr bool kF = decltype(fragments)::value;
    if (padded_experts(p.args.experts) == 4) {
      p.grad_x ? go(&pointwise_cluster_kernel<T, 4, true, kF>)
               : go(&pointwise_cluster_kernel<T, 4, false, kF>);
    } else {
      p.grad_x ? go(&pointwise_cluster_kernel<T, 8, true, kF>)
               : go(&pointwise_cluster_kernel<T, 8, false, kF>);
    }
  };
  p.fragments ? by_pass(std::true_type{}) : by_pass(std::false_type{});
}

}  // namespace pointwise
}  // namespace cuda
}  // namespace condconv
