// The dense 1x1 forward and grad_x of 16-bit channels_last tensors on Hopper through wgmma
// (sm_90a): pointwise_cluster.cuh's clusters and copies, with each example's mixed weights made
// in registers as wgmma's A operand instead of through shared memory, and blocks of 128 rows.
//
// The passes are pointwise_cluster.cuh's: out_b (P x R) = in_b (P x D) . W_b^T, W_b = sum_e
// r[b,e] W_e (grad_x: R = Cin, D = Cout, W_b read transposed). A block computes the (128 rows) x
// (64 pixels) outputs of four examples in two warpgroups, warpgroup h the rows 64 h .. 64 h + 63.
// Per step along D (step_depth: 16 at 8 experts, 32 at up to 4) a stage holds the E experts'
// (128 x step) tiles, copied by the four blocks of the cluster a quarter each and multicast to
// all four, and the block's four (64 x step) input tiles. Per 16 along D, every thread loads its
// A fragment (8 values) of each expert's tile (ldmatrix on the swizzled tiles, conflict-free),
// mixes it for the four examples in float32 and rounds it into the four examples' A fragments;
// the warpgroup then issues one wgmma an example (64 rows x 64 pixels x 16), B the example's
// input tile in shared memory, and the next 16's mix runs while they do. Against
// pointwise_cluster_kernel: no mixed tiles written and read back, the input tiles read once a
// warpgroup by the tensor cores instead of through registers, and half the blocks (the input
// read from L2 once for 128 rows).
//
// The copies run `stages` steps ahead; a block gives a stage back to the cluster (one arrival on
// each block's `empty` barrier) once its wgmma of that step have completed and all its threads
// are past it, and thread 0 refills it once all four blocks have. Outputs go through shared
// memory to 16-byte stores along the channels.
#pragma once

#include "pointwise_cluster.cuh"
#include "warpgroup.cuh"

#include <cstring>

namespace condconv {
namespace cuda {
namespace pointwise {
namespace wgmma {

constexpr int kRows = 128;                      // outputs (channels) of a block's tile
constexpr int kLdOut = kRows + 4;               // the accumulators in shared memory: [pixel][row]
constexpr int kMaxStagesW = 6;                  // the barrier area holds full[6] and empty[6]
static_assert(kBlockThreads == 256, "two warpgroups");
static_assert(2 * kMaxStagesW * 8 <= kBarrierBytes, "the barriers fit");

// The reduction a step takes with EP experts a stage: 16 at 8 (stages of 40 KB, 5 of them: the
// copies for a step issued 3-4 steps before it), 32 at 4 (48 KB, 4 stages). At 32 with 8
// experts a stage would be 80 KB, 2 of them: a refill issued half a step before it is read.
constexpr int step_depth(int ep) { return ep == 8 ? 16 : 32; }
// Bytes of an expert's tile (kRows x depth) and of an input tile (kPixels x depth).
constexpr int expert_tile_bytes(int ep) { return kRows * step_depth(ep) * 2; }
constexpr int input_tile_bytes(int ep) { return kPixels * step_depth(ep) * 2; }

constexpr int64_t stage_bytes(int ep) {
  return ep * expert_tile_bytes(ep) + kExamples * input_tile_bytes(ep);
}

// Stages as many as fit in 227 KB, at most kMaxStagesW: 5 at 8 experts, 4 at up to 4.
constexpr int stages_for(int ep) {
  return (kSharedLimit - kAlignSlack - kBarrierBytes) / stage_bytes(ep) > kMaxStagesW
             ? kMaxStagesW
             : int((kSharedLimit - kAlignSlack - kBarrierBytes) / stage_bytes(ep));
}
static_assert(stages_for(8) >= 4 && stages_for(4) >= 4, "copies issued steps ahead");
static_assert(kExamples * kPixels * kLdOut * 4 <= stages_for(8) * stage_bytes(8) &&
                  kExamples * kPixels * kLdOut * 4 <= stages_for(4) * stage_bytes(4),
              "the accumulators fit over the stages");

// The launch of a call.
inline Plan plan(int64_t batch, int64_t rows, int64_t pixels, int64_t experts) {
  Plan p = pointwise::plan(batch, rows, pixels, experts);
  const int ep = padded_experts(experts);
  p.row_tiles = static_cast<unsigned>((rows + kRows - 1) / kRows);
  p.stages = stages_for(ep);
  p.shared_bytes = kAlignSlack + kBarrierBytes + p.stages * stage_bytes(ep);
  return p;
}

#if CONDCONV_SM90_DEVICE && CONDCONV_WGMMA_DEVICE
// Two 16-bit values of a register (the lower-indexed in the low half) as floats, and back.
template <typename T>
__device__ __forceinline__ void unpack2(uint32_t v, float& lo, float& hi) {
  T h[2];
  memcpy(h, &v, 4);
  lo = to_float(h[0]);
  hi = to_float(h[1]);
}
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  const T h[2] = {from_float(lo, static_cast<const T*>(nullptr)),
                  from_float(hi, static_cast<const T*>(nullptr))};
  uint32_t v;
  memcpy(&v, h, 4);
  return v;
}

// Where a swizzle of `width` bytes (cluster.cuh: make_tile_map; rows of `width` bytes, the tile
// 1024-byte aligned) put 16-byte chunk `chunk` of row `row`: the chunk's bits XOR the row's
// address bits from 7 on.
__device__ __forceinline__ int swizzled_chunk(int row, int chunk, int width) {
  return chunk ^ ((row * width >> 7) & (width / 16 - 1));
}

// The A fragment (warpgroup.cuh) of an expert's tile at `tile` for this thread, rows `row0` ..
// row0 + 15 of the block's 128 (its warp's), k = kk .. kk + 15 of the step (kDepthW along the
// reduction): forward, the tile is [row][kDepthW] with the swizzle of its rows (2 kDepthW
// bytes); grad_x, two boxes of [kDepthW][64 rows] (rows 0-63, 64-127) with the 128-byte
// swizzle, read transposed.
template <bool kGradX, int kDepthW>
__device__ __forceinline__ void load_a(uint32_t (&a)[4], const unsigned char* tile, int row0,
                                       int kk, int lane) {
  using fragments::ldmatrix_x4;
  if (kGradX) {
    const unsigned char* box = tile + (row0 / 64) * (kRows / 2 * kDepthW * 2);
    const int k = kk + lane % 8 + lane / 16 * 8;
    const int chunk = (row0 % 64) / 8 + lane / 8 % 2;
    ldmatrix_x4<true>(a, box + k * 128 + 16 * swizzled_chunk(k, chunk, 128));
  } else {
    const int row = row0 + lane % 8 + lane / 8 % 2 * 8;
    const int chunk = kk / 8 + lane / 16;
    ldmatrix_x4(a, tile + row * 2 * kDepthW + 16 * swizzled_chunk(row, chunk, 2 * kDepthW));
  }
}

// Thread 0 of a block: the copies of step kt into stage kt % stages, announced on its `full`
// barrier: the experts e = rank, rank + kClusterSize, ... multicast to the cluster (grad_x: two
// boxes of 64 rows each), and this block's `count` examples' input tiles.
template <int EP, bool kGradX>
__device__ __forceinline__ void issue_step(const sm90::TileMap* experts_map,
                                           const sm90::TileMap* in_map, unsigned char* tiles,
                                           uint64_t* full, int kt, int stages, int experts,
                                           int count, int first, int r0, int p0, uint32_t rank) {
  using namespace sm90;
  constexpr int kExpertBytes = expert_tile_bytes(EP), kInputBytes = input_tile_bytes(EP);
  const int s = kt % stages;
  unsigned char* stage = tiles + s * stage_bytes(EP);
  barrier_arrive_expect(&full[s], uint32_t(experts * kExpertBytes + count * kInputBytes));
  const int d0 = kt * step_depth(EP);
  const uint16_t all = uint16_t((1u << kClusterSize) - 1);
  for (int e = int(rank); e < experts; e += kClusterSize) {
    unsigned char* dst = stage + e * kExpertBytes;
    if (kGradX) {
      tile_load_multicast(dst, experts_map, r0, d0, e, &full[s], all);
      tile_load_multicast(dst + kExpertBytes / 2, experts_map, r0 + 64, d0, e, &full[s], all);
    } else {
      tile_load_multicast(dst, experts_map, d0, r0, e, &full[s], all);
    }
  }
  unsigned char* inputs = stage + EP * kExpertBytes;
  for (int j = 0; j < count; ++j) {
    tile_load(inputs + j * kInputBytes, in_map, d0, p0, first + j, &full[s]);
  }
}
#endif

// T: __half or __nv_bfloat16; EP: experts a stage holds (4 or 8); kGradX: grad_x instead of the
// forward. Grid: x = row tile + row_tiles x pixel tile, y = block of examples (clusters of
// kClusterSize along y); kBlockThreads threads.
template <typename T, int EP, bool kGradX>
__global__ void __launch_bounds__(kBlockThreads, 1)
    pointwise_wgmma_kernel(const CONDCONV_GRID_CONSTANT sm90::TileMap experts_map,
                           const CONDCONV_GRID_CONSTANT sm90::TileMap in_map, const Args a) {
#if CONDCONV_SM90_DEVICE && CONDCONV_WGMMA_DEVICE
  using namespace sm90;
  using namespace warpgroup;
  constexpr bool kBFloat16 = std::is_same<T, __nv_bfloat16>::value;
  constexpr int kDepthW = step_depth(EP), kStageBytes = int(stage_bytes(EP));
  constexpr int kExpertBytes = expert_tile_bytes(EP), kInputBytes = input_tile_bytes(EP);
  CONDCONV_DYNAMIC_SHARED(raw);
  unsigned char* base = raw + shared_padding(raw, kAlignSlack);
  const int S = a.stages;
  uint64_t* full = reinterpret_cast<uint64_t*>(base);
  uint64_t* empty = full + kMaxStagesW;
  unsigned char* tiles = base + kBarrierBytes;

  const int tid = threadIdx.x, lane = tid % 32;
  const int row_tiles = (a.rows + kRows - 1) / kRows;
  const int r0 = (blockIdx.x % row_tiles) * kRows;
  const int p0 = (blockIdx.x / row_tiles) * kPixels;
  const int first = blockIdx.y * kExamples;
  const int count = block_examples(a, first);
  const uint32_t rank = cluster_rank();
  const int steps = (a.depth + kDepthW - 1) / kDepthW;
  // This warp's 16 rows of the block's 128: warpgroup tid / 128 the rows 64 (tid / 128) ..
  const int row0 = tid / 32 * 16;

  float r[kExamples][EP];
  load_routing(r, a, first, count);
  init_barriers(full, empty, S);

  const auto issue = [&](int kt) {
    issue_step<EP, kGradX>(&experts_map, &in_map, tiles, full, kt, S, a.experts, count, first,
                           r0, p0, rank);
  };
  if (tid == 0) {
    for (int kt = 0; kt < S && kt < steps; ++kt) issue(kt);
  }

  float acc[kExamples][32] = {};
  float m[kExamples][8];
  // The mix of half-step kk of a stage into m: every expert's A fragment, times each example's
  // routing weight.
  const auto mix = [&](const unsigned char* stage, int kk) {
#pragma unroll
    for (int j = 0; j < kExamples; ++j) {
#pragma unroll
      for (int i = 0; i < 8; ++i) m[j][i] = 0.f;
    }
#pragma unroll
    for (int e = 0; e < EP; ++e) {
      if (e < a.experts) {
        uint32_t w[4];
        load_a<kGradX, kDepthW>(w, stage + e * kExpertBytes, row0, kk, lane);
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          float lo, hi;
          unpack2<T>(w[q], lo, hi);
#pragma unroll
          for (int j = 0; j < kExamples; ++j) {
            m[j][2 * q] += r[j][e] * lo;
            m[j][2 * q + 1] += r[j][e] * hi;
          }
        }
      }
    }
  };
  // The wgmma of half-step kk: the mixes rounded into A fragments, one product an example.
  const auto multiply = [&](const unsigned char* stage, int kk) {
    uint32_t am[kExamples][4];
#pragma unroll
    for (int j = 0; j < kExamples; ++j) {
#pragma unroll
      for (int q = 0; q < 4; ++q) am[j][q] = pack2<T>(m[j][2 * q], m[j][2 * q + 1]);
    }
    // All four, whatever the block's count (uniform, so no branch between them): an example
    // past the batch multiplies zeros by a stale tile into accumulators never stored.
    wgmma_fence();
#pragma unroll
    for (int j = 0; j < kExamples; ++j) {
      const unsigned char* in = stage + EP * kExpertBytes + j * kInputBytes;
      wgmma_64x64x16<kBFloat16>(acc[j], am[j], descriptor(in + 2 * kk, 2 * kDepthW, 16 * kDepthW));
    }
    wgmma_commit();
  };

  for (int kt = 0; kt < steps; ++kt) {
    const int s = kt % S;
    barrier_wait(&full[s], uint32_t(kt / S) & 1u);
    const unsigned char* stage = tiles + s * kStageBytes;
    if (count > 0) mix(stage, 0);
    wgmma_wait<0>();  // step kt - 1's products done: its stage and the A registers free
    __syncthreads();  // every thread of the block past step kt - 1
    // Step kt - 1's stage back to the cluster, and refilled once all its blocks have given it
    // back. With no wgmma in flight: where some are, ptxas puts a wait of its own on the
    // divergent path and then serializes every wgmma of the kernel (its advice C7518).
    if (tid == 0 && kt >= 1) release_stage(empty, kt - 1, S, steps, issue);
    __syncwarp();
    if (count > 0) multiply(stage, 0);
#pragma unroll
    for (int kk = 16; kk < kDepthW; kk += 16) {
      if (count > 0) {
        mix(stage, kk);
        wgmma_wait<0>();
        multiply(stage, kk);
      }
    }
  }
  wgmma_wait<0>();

  // Every copy this block was sent has landed (each step's barrier was waited for) and every
  // product is done: the stages are free for the accumulators, [example][pixel][row].
  __syncthreads();
  float* acc_tile = reinterpret_cast<float*>(tiles);
  {
    const int g = lane / 4, c = lane % 4;
#pragma unroll
    for (int j = 0; j < kExamples; ++j) {
      if (j < count) {
#pragma unroll
        for (int t = 0; t < 8; ++t) {
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            const int row = row0 + g + 8 * (i / 2), px = 8 * t + 2 * c + i % 2;
            acc_tile[(j * kPixels + px) * kLdOut + row] = acc[j][4 * t + i];
          }
        }
      }
    }
  }
  __syncthreads();
  store_outputs<T, kRows>(acc_tile, kLdOut, a, first, count, r0, p0);
  cluster_sync();  // no block leaves while another may still arrive on its barriers
#else
  __trap();  // compiled without sm_90a: never launched there (the host checks CONDCONV_SM90A)
#endif
}

// The maps, arguments and grid of a call that fits (pointwise::fits), as pointwise::prepare's:
// with D the step's depth (step_depth), the experts' boxes of D (along Cin) x 128 rows with the
// swizzle of their 2D-byte rows (forward) or of 64 rows (Cin) x D (along Cout) with the 128-byte
// swizzle (grad_x, two a tile), the input's of D x 64 pixels with the swizzle of their rows.
inline bool prepare(bool grad_x, bool bfloat16, const void* experts, const void* in, void* out,
                    const float* routing, const float* bias, int64_t batch, int64_t cin,
                    int64_t cout, int64_t pixels, int64_t num_experts, Pass* p,
                    std::string* error) {
  const uint32_t d = uint32_t(step_depth(padded_experts(num_experts)));
  const uint32_t expert_box[3] = {grad_x ? 64u : d, grad_x ? d : uint32_t(kRows), 1};
  const uint32_t in_box[3] = {d, kPixels, 1};
  p->fragments = true;
  return prepare_pass(grad_x, bfloat16, experts, in, out, routing, bias, batch, cin, cout, pixels,
                      num_experts, expert_box, grad_x ? 128 : int(2 * d), in_box, int(2 * d),
                      plan(batch, grad_x ? cin : cout, pixels, num_experts), p, error);
}

// launch(kernel, grid, shared_bytes, experts_map, in_map, args) with the kernel instance of p.
template <typename T, class LaunchFn>
void dispatch(const Pass& p, LaunchFn&& launch) {
  const auto go = [&](auto kernel) {
    launch(kernel, p.grid(), size_t(p.plan.shared_bytes), p.experts, p.in, p.args);
  };
  if (padded_experts(p.args.experts) == 4) {
    p.grad_x ? go(&pointwise_wgmma_kernel<T, 4, true>) : go(&pointwise_wgmma_kernel<T, 4, false>);
  } else {
    p.grad_x ? go(&pointwise_wgmma_kernel<T, 8, true>) : go(&pointwise_wgmma_kernel<T, 8, false>);
  }
}

}  // namespace wgmma
}  // namespace pointwise
}  // namespace cuda
}  // namespace condconv
