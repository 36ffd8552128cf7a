// The dense 1x1 kernel gradient of 16-bit channels_last tensors on Hopper (sm_90): grad_weight[e]
// = sum_b r[b,e] G_b and grad_routing[b,e] = <G_b, W_e>, with G_b (Cout x Cin) = grad_out_b^T .
// x_b over the example's pixels, never written to memory.
//
// A block owns a (64 output channels) x (32 input channels) tile of every expert's gradient and a
// slice of the batch. For each example of its slice it computes its tile of G_b on the tensor
// cores (ldmatrix and mma.sync m16n8k16, each warp 16 x 16 of it, over the example's pixels in
// steps of 64: the example's tiles of grad_out (64 pixels x 64 channels, the 128-byte swizzle)
// and x (64 x 32, the 64-byte swizzle) copied by TMA `stages` steps ahead), then folds it on the
// CUDA cores: its E experts'
// gradient tiles (float32, in registers for the whole slice) take r[b,e] G_b, and the E dot
// products <G_b, W_e> (the experts' tiles in registers, copied once) are reduced over the block
// into the example's partial grad_routing of this tile. Each block writes its slice's partial
// grad_weight (E x tile, float32) once at the end and a partial grad_routing row per example: the
// host sums the slices and the tiles (deterministic: no atomics).
//
// Against the Triton kernel gradient: G_b stays in registers, the experts' tiles are read from
// memory once a block instead of once an example. What bounds it: the fragment loads and copies
// of a step (~350 cycles of shared memory, against ~130 of tensor cores) and the fold, 2 E
// multiply-adds an element of G_b an example on the CUDA cores (~256 cycles an example at 8
// experts): ~93 us for s6.b1.expand at batch 256 by bench/cluster_model.py --kgrad, where the
// Triton kernel measured 282 (gpu-h200-analysis.md, item 51).
#pragma once

#include "cluster.cuh"
#include "fragments.cuh"
#include "kernels.cuh"
#include "pointwise_cluster.cuh"

#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>

namespace condconv {
namespace cuda {
namespace pointwise_kgrad {

constexpr int kTileO = 64;         // output channels of a block's tile
constexpr int kTileI = 32;         // input channels (at 64, 8 experts' tiles spill)
constexpr int kPixelTile = 64;     // pixels a step
constexpr int kBlockThreads = kThreads;
constexpr int kWarps = kBlockThreads / 32;
constexpr int kMaxStages = 6;
constexpr int kGoBytes = kTileO * kPixelTile * 2;      // grad_out's tile of a step, 8 KB
constexpr int kXBytes = kTileI * kPixelTile * 2;       // x's, 4 KB
constexpr int kStepBytes = kGoBytes + kXBytes;
constexpr int kExpertTileBytes = kTileO * kTileI * 2;  // an expert's tile, 4 KB
using pointwise::kAlignSlack;    // the clustered kernels' shared-memory layout and limit
using pointwise::kBarrierBytes;
using pointwise::kSharedLimit;
using pointwise::padded_experts;
static_assert(kBlockThreads == 256, "8 warps of 16 x 16");
static_assert(2 * (kMaxStages + 1) * 8 <= kBarrierBytes, "the barriers fit");

struct Args {
  int batch, cin, cout, pixels, experts, per_slice;
  const float* routing;   // (batch, experts)
  float* grad_weight;     // (slices, experts, cout, cin): each slice's sums
  float* grad_routing;    // (tiles, batch, experts): each tile's sums
};

struct Plan {
  unsigned tiles, slices;
  int per_slice, stages;
  int64_t shared_bytes;
};

// The launch of a call: of the slices of the batch that keep the blocks within two waves (one
// block an SM; each slice's partial sums are float32 copies of every expert's gradient), those
// that take the fewest examples a block times waves, the fewest of them; stages as many as fit
// (at most kMaxStages). A slice's routing weights sit in shared memory: where a slice of half
// the batch leaves no room for 2 stages (batches of ~5400 and more at 8 experts), the fewest
// slices that do, however many waves.
inline Plan plan(int64_t batch, int64_t cin, int64_t cout, int64_t experts, int sms = 132) {
  Plan p{};
  p.tiles = static_cast<unsigned>(((cout + kTileO - 1) / kTileO) * ((cin + kTileI - 1) / kTileI));
  const int64_t routing_bytes = padded_experts(experts) * 4;  // an example's, in shared memory
  const int64_t base = kAlignSlack + kBarrierBytes + padded_experts(experts) * kExpertTileBytes +
                       2 * kWarps * routing_bytes;
  const int64_t max_per = (kSharedLimit - base - 2 * kStepBytes) / routing_bytes;
  int64_t best = -1;
  for (int64_t slices = 1; slices <= batch; ++slices) {
    const int64_t per = (batch + slices - 1) / slices;
    const int64_t used = (batch + per - 1) / per;  // slices that have examples
    if (best >= 0 && used > 1 && int64_t(p.tiles) * used > 2 * sms) break;
    if (per > max_per) continue;
    const int64_t waves = (int64_t(p.tiles) * used + sms - 1) / sms;
    if (best < 0 || waves * per < best) {
      best = waves * per;
      p.per_slice = static_cast<int>(per);
      p.slices = static_cast<unsigned>(used);
    }
  }
  const int64_t fixed = base + p.per_slice * routing_bytes;
  int64_t stages = (kSharedLimit - fixed) / kStepBytes;
  p.stages = static_cast<int>(stages > kMaxStages ? kMaxStages : stages);
  p.shared_bytes = fixed + p.stages * kStepBytes;
  return p;
}

#if CONDCONV_SM90_DEVICE
// The place of 16-byte chunk `chunk` of row `row` of a tile (1024-byte aligned) copied with the
// swizzle of its rows: 128-byte rows, chunk ^ (row % 8); 64-byte rows, chunk ^ (row / 2 % 4).
__device__ __forceinline__ int swizzle128(int row, int chunk) { return chunk ^ (row & 7); }
__device__ __forceinline__ int swizzle64(int row, int chunk) { return chunk ^ ((row >> 1) & 3); }

// The issuing thread: the copies of a step into stage `st`: example b's (64 pixels from p0 x 64
// output channels) tile of grad_out and its (64 x 32 input channels) tile of x, announced on the
// stage's barrier.
__device__ __forceinline__ void issue_step(const sm90::TileMap* go_map, const sm90::TileMap* x_map,
                                           unsigned char* stages, uint64_t* full, int st, int b,
                                           int p0, int o0, int i0) {
  using namespace sm90;
  unsigned char* go = stages + st * kStepBytes;
  barrier_arrive_expect(&full[st], kStepBytes);
  tile_load(go, go_map, o0, p0, b, &full[st]);
  tile_load(go + kGoBytes, x_map, i0, p0, b, &full[st]);
}

// The steps of a block in order (example after example, pixel tile after pixel tile, stage after
// stage), stepped forward by counters rather than divisions.
struct StepCounter {
  int st = 0, parity = 0, pixel_tile = 0, example = 0;
  __device__ __forceinline__ void next(int n_stages, int pixel_tiles) {
    if (++st == n_stages) {
      st = 0;
      parity ^= 1;
    }
    if (++pixel_tile == pixel_tiles) {
      pixel_tile = 0;
      ++example;
    }
  }
};

// The sums of v[0..EP) over the warp, one expert a lane group: afterwards lane l holds the sum
// of v[scatter_expert(l)]; EP - 1 + log2(32 / EP) shuffles (9 at 8 experts, 7 at 4).
template <int EP>
__device__ __forceinline__ float warp_scatter_sum(float (&v)[EP], int lane) {
  // Halve the values per lane at each step: lanes with the step's bit set keep the upper half.
#pragma unroll
  for (int half = EP / 2, bit = 16; half >= 1; half /= 2, bit /= 2) {
    const bool upper = (lane & bit) != 0;
#pragma unroll
    for (int k = 0; k < half; ++k) {
      const float send = upper ? v[k] : v[k + half];
      const float keep = upper ? v[k + half] : v[k];
      v[k] = keep + __shfl_xor_sync(0xffffffffu, send, bit);
    }
  }
  float sum = v[0];
  // the lanes that share the kept bits: sum over the bits below them
#pragma unroll
  for (int bit = 16 / EP; bit >= 1; bit /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, bit);
  return sum;
}

// The expert a lane's warp_scatter_sum is of: lane bit 4 (then 3, 2 at 8 experts) chose the
// upper half at each step.
template <int EP>
__device__ __forceinline__ int scatter_expert(int lane) {
  int e = 0;
#pragma unroll
  for (int half = EP / 2, bit = 16; half >= 1; half /= 2, bit /= 2) {
    if (lane & bit) e += half;
  }
  return e;
}
#endif

// T: __half or __nv_bfloat16; EP: experts padded (4 or 8). Grid: x = tile (output-channel tile x
// tiles of input channels + input-channel tile), y = slice of the batch; kBlockThreads threads,
// launched as clusters of one (the TMA copies complete on shared-memory barriers).
template <typename T, int EP>
__global__ void __launch_bounds__(kBlockThreads, EP == 4 ? 2 : 1)
    pointwise_kgrad_kernel(const CONDCONV_GRID_CONSTANT sm90::TileMap w_map,
                           const CONDCONV_GRID_CONSTANT sm90::TileMap go_map,
                           const CONDCONV_GRID_CONSTANT sm90::TileMap x_map, const Args a,
                           const int n_stages) {
#if CONDCONV_SM90_DEVICE
  using namespace sm90;
  using fragments::ldmatrix_x4;
  using fragments::mma_16816;
  constexpr bool kBFloat16 = std::is_same<T, __nv_bfloat16>::value;
  CONDCONV_DYNAMIC_SHARED(raw);
  unsigned char* base = raw + shared_padding(raw, kAlignSlack);
  uint64_t* full = reinterpret_cast<uint64_t*>(base);
  uint64_t* w_full = full + kMaxStages;
  unsigned char* experts = base + kBarrierBytes;
  unsigned char* stages = experts + EP * kExpertTileBytes;
  float* red = reinterpret_cast<float*>(stages + n_stages * kStepBytes);  // [2][warps][EP]

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32, g = lane / 4, c = lane % 4;
  const int tiles_i = (a.cin + kTileI - 1) / kTileI;
  const int o0 = (blockIdx.x / tiles_i) * kTileO, i0 = (blockIdx.x % tiles_i) * kTileI;
  const int first = blockIdx.y * a.per_slice;
  const int count = a.batch - first < a.per_slice ? a.batch - first : a.per_slice;
  const int pixel_tiles = (a.pixels + kPixelTile - 1) / kPixelTile;
  const int steps = count * pixel_tiles;
  const int wr = (warp % 4) * 16, wc = (warp / 4) * 16;  // the warp's rows and columns of G
  // The copies are issued by the last warp's first lane, so that warp 0's threads, which sum
  // grad_routing's partials after each step's barrier, do not hold them up.
  const bool issuer = tid == kBlockThreads - 32;
  float* routing = red + 2 * kWarps * EP;  // [count][EP]: the slice's routing weights

  if (tid == 0) {
    for (int s = 0; s < n_stages; ++s) barrier_init(&full[s], 1);
    barrier_init(w_full, 1);
    fence_barrier_init();
  }
  __syncthreads();
  StepCounter issued;  // the issuer's next step
  if (issuer) {
    barrier_arrive_expect(w_full, uint32_t(a.experts * kExpertTileBytes));
    for (int e = 0; e < a.experts; ++e) {
      tile_load(experts + e * kExpertTileBytes, &w_map, i0, o0, e, w_full);
    }
    for (int s = 0; s < n_stages && s < steps; ++s) {
      issue_step(&go_map, &x_map, stages, full, issued.st, first + issued.example,
                 issued.pixel_tile * kPixelTile, o0, i0);
      issued.next(n_stages, pixel_tiles);
    }
  }
  for (int k = tid; k < count * EP; k += kBlockThreads) {  // read after the first step's barrier
    const int j = k / EP, e = k % EP;
    routing[k] = e < a.experts ? a.routing[int64_t(first + j) * a.experts + e] : 0.f;
  }

  // The experts' values at this thread's 8 elements of G (pairs along the input channels):
  // w[e][2 nt + h] at row wr + g + 8 h, columns wc + 8 nt + 2 c and the next.
  uint32_t w[EP][4];
  barrier_wait(w_full, 0);
#pragma unroll
  for (int e = 0; e < EP; ++e) {
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int o = wr + g + 8 * h, i = wc + 8 * nt + 2 * c;
        w[e][2 * nt + h] =
            e < a.experts ? *reinterpret_cast<const uint32_t*>(
                                experts + e * kExpertTileBytes + o * 64 +
                                16 * swizzle64(o, i / 8) + (i % 8) * 2)
                          : 0u;
      }
    }
  }

  float gw[EP][8] = {};
  float acc[8];
  int pending = -1;  // the example (of the slice) whose grad_routing partials wait in red
  StepCounter at;
  for (int s = 0; s < steps; ++s) {
    barrier_wait(&full[at.st], uint32_t(at.parity));
    if (at.pixel_tile == 0) {
#pragma unroll
      for (int i = 0; i < 8; ++i) acc[i] = 0.f;
    }
    const unsigned char* go = stages + at.st * kStepBytes;
    const unsigned char* x = go + kGoBytes;
#pragma unroll
    for (int kk = 0; kk < kPixelTile; kk += 16) {
      uint32_t am[4];
      {
        const int k = kk + lane % 8 + lane / 16 * 8;  // grad_out's rows (pixels), read transposed
        ldmatrix_x4<true>(am, go + k * 128 + 16 * swizzle128(k, wr / 8 + lane / 8 % 2));
      }
      uint32_t b[2][2];
      {
        const int k = kk + lane % 8 + lane / 8 % 2 * 8;  // x's rows (pixels), read transposed
        uint32_t r[4];
        ldmatrix_x4<true>(r, x + k * 64 + 16 * swizzle64(k, wc / 8 + lane / 16));
        b[0][0] = r[0];
        b[0][1] = r[1];
        b[1][0] = r[2];
        b[1][1] = r[3];
      }
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) {
        float(&d)[4] = *reinterpret_cast<float(*)[4]>(&acc[4 * nt]);
        mma_16816<kBFloat16>(d, am, b[nt]);
      }
    }
    __syncthreads();  // the stage read by every warp; the last example's partials in red
    if (pending >= 0 && tid < a.experts) {
      float sum = 0.f;
      for (int wp = 0; wp < kWarps; ++wp) sum += red[((pending & 1) * kWarps + wp) * EP + tid];
      a.grad_routing[(int64_t(blockIdx.x) * a.batch + first + pending) * a.experts + tid] = sum;
    }
    pending = -1;
    if (issuer && s + n_stages < steps) {
      issue_step(&go_map, &x_map, stages, full, issued.st, first + issued.example,
                 issued.pixel_tile * kPixelTile, o0, i0);
      issued.next(n_stages, pixel_tiles);
    }
    if (at.pixel_tile == pixel_tiles - 1) {
      // The example's G tile is complete: fold it.
      const int j = at.example;
      float dots[EP];
#pragma unroll
      for (int e = 0; e < EP; ++e) {
        const float r = routing[j * EP + e];
        float dot = 0.f;
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          T pair[2];
          memcpy(pair, &w[e][q], 4);
          const int idx = 4 * (q / 2) + 2 * (q % 2);
          dot = fmaf(acc[idx], pointwise::to_float(pair[0]), dot);
          dot = fmaf(acc[idx + 1], pointwise::to_float(pair[1]), dot);
          gw[e][idx] = fmaf(r, acc[idx], gw[e][idx]);
          gw[e][idx + 1] = fmaf(r, acc[idx + 1], gw[e][idx + 1]);
        }
        dots[e] = dot;
      }
      const float sum = warp_scatter_sum<EP>(dots, lane);
      if ((lane & (32 / EP - 1)) == 0) {  // one lane of each group holding an expert's sum
        red[((j & 1) * kWarps + warp) * EP + scatter_expert<EP>(lane)] = sum;
      }
      pending = j;
    }
    at.next(n_stages, pixel_tiles);
  }
  __syncthreads();
  if (pending >= 0 && tid < a.experts) {
    float sum = 0.f;
    for (int wp = 0; wp < kWarps; ++wp) sum += red[((pending & 1) * kWarps + wp) * EP + tid];
    a.grad_routing[(int64_t(blockIdx.x) * a.batch + first + pending) * a.experts + tid] = sum;
  }

  // This slice's partial grad_weight: the thread's 8 elements of each expert's tile.
#pragma unroll
  for (int e = 0; e < EP; ++e) {
    if (e >= a.experts) continue;
    float* dst = a.grad_weight + (int64_t(blockIdx.y) * a.experts + e) * a.cout * a.cin;
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {  // columns col and col + 1 (Cin even: both or neither)
        const int o = o0 + wr + g + 8 * h, col = i0 + wc + 8 * nt + 2 * c;
        if (o < a.cout && col < a.cin) {
          *reinterpret_cast<float2*>(dst + int64_t(o) * a.cin + col) =
              make_float2(gw[e][4 * nt + 2 * h], gw[e][4 * nt + 2 * h + 1]);
        }
      }
    }
  }
#else
  __trap();  // compiled for a GPU before sm_90: never launched there (runs_sm90)
#endif
}

// ---------------------------------------------------------------------------------------------
// Host side.

// Whether a call's dense kernel gradient can take pointwise_kgrad_kernel, the device aside: the
// clustered forward's conditions (pointwise::fits: 1x1, stride 1, unpadded, ungrouped, at most 8
// experts, 16-bit channels_last, channel counts multiples of 8, 16-byte aligned), for grad_out
// and x.
inline bool fits(const Geometry& g, const at::Tensor& grad_out, const at::Tensor& x,
                 const at::Tensor& experts) {
  return pointwise::fits(g, x, grad_out, experts);
}

// One launch, ready: the experts', grad_out's and x's maps, the arguments, the plan.
struct Pass {
  sm90::TileMap w, go, x;
  Args args;
  Plan plan;
  bool bfloat16;
  dim3 grid() const { return dim3(plan.tiles, plan.slices); }
};

// The maps and arguments of a call that fits: experts (E, Cout, Cin), grad_out (B, P, Cout) and
// x (B, P, Cin) channels_last, routing (B, E) float32; grad_weight (plan.slices, E, Cout, Cin)
// and grad_routing (plan.tiles, B, E) float32, for the partial sums. False, with the reason,
// where the driver refuses a map.
inline bool prepare(bool bfloat16, const void* experts, const void* grad_out, const void* x,
                    const float* routing, float* grad_weight, float* grad_routing,
                    int64_t batch, int64_t cin, int64_t cout, int64_t pixels,
                    int64_t num_experts, const Plan& plan, Pass* p, std::string* error) {
  const uint64_t w_dims[3] = {uint64_t(cin), uint64_t(cout), uint64_t(num_experts)};
  const uint64_t w_strides[2] = {uint64_t(cin) * 2, uint64_t(cin * cout) * 2};
  const uint64_t go_dims[3] = {uint64_t(cout), uint64_t(pixels), uint64_t(batch)};
  const uint64_t go_strides[2] = {uint64_t(cout) * 2, uint64_t(pixels * cout) * 2};
  const uint64_t x_dims[3] = {uint64_t(cin), uint64_t(pixels), uint64_t(batch)};
  const uint64_t x_strides[2] = {uint64_t(cin) * 2, uint64_t(pixels * cin) * 2};
  const uint32_t go_box[3] = {kTileO, kPixelTile, 1}, x_box[3] = {kTileI, kPixelTile, 1};
  const uint32_t w_box[3] = {kTileI, kTileO, 1};
  if (!sm90::make_tile_map(&p->w, experts, bfloat16, w_dims, w_strides, w_box, 64, error) ||
      !sm90::make_tile_map(&p->go, grad_out, bfloat16, go_dims, go_strides, go_box, 128, error) ||
      !sm90::make_tile_map(&p->x, x, bfloat16, x_dims, x_strides, x_box, 64, error)) {
    return false;
  }
  p->plan = plan;
  p->args = Args{int(batch), int(cin), int(cout), int(pixels), int(num_experts), plan.per_slice,
                 routing, grad_weight, grad_routing};
  p->bfloat16 = bfloat16;
  return true;
}

// launch(kernel, grid, shared_bytes, w_map, go_map, x_map, args, stages) with p's instance.
template <typename T, class LaunchFn>
void dispatch(const Pass& p, LaunchFn&& launch) {
  const auto go = [&](auto kernel) {
    launch(kernel, p.grid(), size_t(p.plan.shared_bytes), p.w, p.go, p.x, p.args,
           p.plan.stages);
  };
  padded_experts(p.args.experts) == 4 ? go(&pointwise_kgrad_kernel<T, 4>)
                                      : go(&pointwise_kgrad_kernel<T, 8>);
}

}  // namespace pointwise_kgrad
}  // namespace cuda
}  // namespace condconv
