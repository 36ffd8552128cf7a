// CUDA kernels of the condconv operators, forward and backward side by side. Inputs were checked
// in ops.cpp (the one place for checks); the index arithmetic is in views.cuh.
//
// Dense convolutions (Cin/g > 1): one tiled implicit-GEMM kernel, instantiated with the forward,
// grad_x and kernel-gradient views. A block computes a 64 x 64 tile of C for one (example, group),
// staging 16-deep slices of A and B in shared memory; the forward and grad_x views mix the E
// expert tiles of A as they stage them (float32 accumulation, float64 for float64).
//   grad_weight = routing^T G and grad_routing = G W^T, G = the per-example kernel gradients, are
//   two GEMMs per chunk of examples, the chunk bounded so G stays within kKernelGradBytes.
// Depthwise (Cin/g == 1): a block owns one (example, channel) plane and mixes its taps into shared
// memory once; threads stride over the pixels. The kernel gradient reduces each tap over the plane
// (warp shuffles, then shared memory), in slices of the plane whose partials are summed after.
// Index arithmetic is int32_t where every offset of the call fits (views.cuh: fits_int32), else
// int64_t. No atomics: every result is the same from run to run.
#include "../condconv.h"
#include "views.cuh"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <limits>

namespace condconv {
namespace cuda {
namespace {

constexpr int kTileM = 64, kTileN = 64, kTileK = 16;
constexpr int kThreads = 256;           // 16 x 16 threads, 4 x 4 outputs each
constexpr int64_t kMaxGridYZ = 65535;  // CUDA's limit on gridDim.y and gridDim.z
constexpr int64_t kKernelGradBytes = int64_t(256) << 20;

__host__ __device__ inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ---------------------------------------------------------------------------------------------
// Dense: C[z] = A[z] B[z] through a View (views.cuh).

template <class View, typename acc_t>
__global__ void __launch_bounds__(kThreads) implicit_gemm_kernel(View v) {
  using index_t = typename View::index;
  __shared__ acc_t As[kTileK][kTileM + 1];
  __shared__ acc_t Bs[kTileK][kTileN + 1];
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const index_t M = v.m(), N = v.n(), K = v.k();
  const index_t tiles_n = (N + kTileN - 1) / kTileN;
  const index_t m0 = index_t(blockIdx.x / tiles_n) * kTileM;
  const index_t n0 = index_t(blockIdx.x % tiles_n) * kTileN;
  for (int64_t zz = blockIdx.z; zz < v.batches(); zz += gridDim.z) {
    const index_t z = static_cast<index_t>(zz);
    acc_t acc[4][4];
#pragma unroll
    for (int r = 0; r < 4; ++r) {
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[r][c] = acc_t(0);
    }
    for (index_t k0 = 0; k0 < K; k0 += kTileK) {
      // Consecutive threads take consecutive addresses of the operand in global memory.
      for (int i = tid; i < kTileK * kTileM; i += kThreads) {
        const int kk = View::kAContiguousInK ? i % kTileK : i / kTileM;
        const int mm = View::kAContiguousInK ? i / kTileK : i % kTileM;
        const index_t m = m0 + mm, k = k0 + kk;
        As[kk][mm] = (m < M && k < K) ? v.lhs(z, m, k) : acc_t(0);
      }
      for (int i = tid; i < kTileK * kTileN; i += kThreads) {
        const int kk = View::kBContiguousInK ? i % kTileK : i / kTileN;
        const int nn = View::kBContiguousInK ? i / kTileK : i % kTileN;
        const index_t n = n0 + nn, k = k0 + kk;
        Bs[kk][nn] = (n < N && k < K) ? v.rhs(z, k, n) : acc_t(0);
      }
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < kTileK; ++kk) {
        acc_t a[4], b[4];
#pragma unroll
        for (int r = 0; r < 4; ++r) a[r] = As[kk][ty + 16 * r];
#pragma unroll
        for (int c = 0; c < 4; ++c) b[c] = Bs[kk][tx + 16 * c];
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

template <typename acc_t, class View>
void launch_gemm(const View& v, cudaStream_t stream) {
  const int64_t tiles = ceil_div(v.m(), kTileM) * ceil_div(v.n(), kTileN);
  if (tiles == 0 || v.batches() == 0) return;
  TORCH_CHECK(tiles <= std::numeric_limits<int32_t>::max(),
              "condconv2d (cuda): too many output tiles for one launch: ", tiles);
  const dim3 grid(static_cast<unsigned>(tiles), 1,
                  static_cast<unsigned>(std::min<int64_t>(v.batches(), kMaxGridYZ)));
  implicit_gemm_kernel<View, acc_t><<<grid, kThreads, 0, stream>>>(v);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---------------------------------------------------------------------------------------------
// Depthwise. Loop counters over pixels are 64-bit (they step past the end); the index
// arithmetic is index_t.

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

// blockIdx.x = b * Cout + co; threads stride over the output plane from blockIdx.y.
template <typename scalar_t, typename acc_t, typename index_t>
__global__ void depthwise_forward_kernel(Shape<index_t> s, const scalar_t* x,
                                         const scalar_t* weight, const acc_t* routing,
                                         const acc_t* bias, scalar_t* out) {
  extern __shared__ __align__(sizeof(double)) unsigned char smem[];
  acc_t* taps = reinterpret_cast<acc_t*>(smem);
  const index_t bc = blockIdx.x, b = bc / s.out_channels, co = bc % s.out_channels;
  mix_taps(weight, routing, s, b, co, index_t(1), taps);
  const acc_t shift = bias ? bias[bc] : acc_t(0);
  for (int64_t pp = int64_t(blockIdx.y) * blockDim.x + threadIdx.x; pp < s.out_pixels();
       pp += int64_t(gridDim.y) * blockDim.x) {
    const index_t p = static_cast<index_t>(pp), oh = p / s.out_w, ow = p % s.out_w;
    out[b * s.out_stride[0] + co * s.out_stride[1] + oh * s.out_stride[2] +
        ow * s.out_stride[3]] =
        static_cast<scalar_t>(depthwise_output(x, s, taps, b, co, oh, ow) + shift);
  }
}

// blockIdx.x = b * Cin + c; threads stride over the input plane from blockIdx.y.
template <typename scalar_t, typename acc_t, typename index_t>
__global__ void depthwise_grad_input_kernel(Shape<index_t> s, const scalar_t* grad_out,
                                            const scalar_t* weight, const acc_t* routing,
                                            scalar_t* grad_x) {
  extern __shared__ __align__(sizeof(double)) unsigned char smem[];
  acc_t* taps = reinterpret_cast<acc_t*>(smem);
  const index_t bc = blockIdx.x, b = bc / s.in_channels, c = bc % s.in_channels;
  const index_t mult = s.out_per_group();
  mix_taps(weight, routing, s, b, index_t(c * mult), mult, taps);
  for (int64_t pp = int64_t(blockIdx.y) * blockDim.x + threadIdx.x; pp < s.in_pixels();
       pp += int64_t(gridDim.y) * blockDim.x) {
    const index_t p = static_cast<index_t>(pp), ih = p / s.width, iw = p % s.width;
    grad_x[b * s.dx_stride[0] + c * s.dx_stride[1] + ih * s.dx_stride[2] + iw * s.dx_stride[3]] =
        static_cast<scalar_t>(depthwise_grad_input(grad_out, s, taps, b, c, ih, iw));
  }
}

// Sum over the block; the result is valid in thread 0. scratch holds 32 values.
template <typename acc_t>
__device__ acc_t block_sum(acc_t v, acc_t* scratch) {
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < int(blockDim.x / 32) ? scratch[lane] : acc_t(0);
    for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  }
  __syncthreads();  // scratch is free for the next call
  return v;
}

// G[slice, b, co, t] = sum over the slice's pixels p of grad_out[b, co, p] x[b, c, p read by t];
// blockIdx.x = b * Cout + co, blockIdx.y = the slice of the output plane.
template <typename scalar_t, typename acc_t, typename index_t>
__global__ void __launch_bounds__(kThreads)
    depthwise_kernel_grad_kernel(Shape<index_t> s, const scalar_t* grad_out, const scalar_t* x,
                                 int64_t slice_pixels, acc_t* G) {
  __shared__ acc_t scratch[32];
  const index_t bc = blockIdx.x, b = bc / s.out_channels, co = bc % s.out_channels;
  const int64_t begin = int64_t(blockIdx.y) * slice_pixels;
  const int64_t end =
      begin + slice_pixels < s.out_pixels() ? begin + slice_pixels : s.out_pixels();
  const index_t T = s.taps();
  acc_t* dst = G + (int64_t(blockIdx.y) * gridDim.x + bc) * T;
  for (index_t t = 0; t < T; ++t) {
    acc_t sum = 0;
    for (int64_t p = begin + threadIdx.x; p < end; p += blockDim.x) {
      sum += depthwise_kernel_grad_term<scalar_t, acc_t>(grad_out, x, s, b, co, t,
                                                         static_cast<index_t>(p));
    }
    sum = block_sum(sum, scratch);
    if (threadIdx.x == 0) dst[t] = sum;
  }
}

// gridDim.x for one block per (example, channel) plane; CUDA allows 2^31 - 1.
unsigned plane_blocks(int64_t planes) {
  TORCH_CHECK(planes <= std::numeric_limits<int32_t>::max(),
              "condconv2d (cuda): batch x channels = ", planes,
              " is more planes than one launch can cover (2^31 - 1)");
  return static_cast<unsigned>(planes);
}

unsigned pixel_blocks(int64_t pixels) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min(ceil_div(pixels, kThreads),
                                                             kMaxGridYZ)));
}

// ---------------------------------------------------------------------------------------------
// Host side.

// The per-call operands in the kernels' layouts: routing in the accumulation dtype and the
// experts contiguous, as (E, Cout, Cin/g * kh * kw).
template <typename scalar_t>
struct Operands {
  using acc_t = at::opmath_type<scalar_t>;
  static constexpr at::ScalarType kAcc = c10::CppTypeToScalarType<acc_t>::value;
  at::Tensor routing, weight;
  at::TensorOptions acc_opts;
  Operands(const at::Tensor& r, const at::Tensor& w)
      : routing(r.to(kAcc).contiguous()),
        weight(w.contiguous()),
        acc_opts(r.options().dtype(kAcc)) {}
  const acc_t* routing_ptr() const { return routing.template const_data_ptr<acc_t>(); }
  const scalar_t* weight_ptr() const { return weight.template const_data_ptr<scalar_t>(); }
};

template <typename scalar_t, typename index_t>
void forward_typed(const at::Tensor& x, const at::Tensor& routing, const at::Tensor& weight,
                   const c10::optional<at::Tensor>& bias, const Geometry& g, at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const Operands<scalar_t> ops(routing, weight);
  // The mixed bias is (B, Cout): tiny next to the kernels, so it is mixed up front.
  at::Tensor mixed_bias;
  if (bias.has_value()) mixed_bias = at::mm(ops.routing, bias->to(ops.kAcc));
  const acc_t* bias_ptr = bias.has_value() ? mixed_bias.const_data_ptr<acc_t>() : nullptr;
  const Shape<index_t> s = make_shape<index_t>(g, x, out, nullptr);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const scalar_t* x_ptr = x.const_data_ptr<scalar_t>();
  if (g.depthwise()) {
    const dim3 grid(plane_blocks(g.batch * g.out_channels),
                    pixel_blocks(g.out_pixels()));
    depthwise_forward_kernel<scalar_t, acc_t, index_t>
        <<<grid, kThreads, s.taps() * sizeof(acc_t), stream>>>(
            s, x_ptr, ops.weight_ptr(), ops.routing_ptr(), bias_ptr,
            out.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  const ForwardView<scalar_t, acc_t, index_t> view{s, x_ptr, ops.weight_ptr(), ops.routing_ptr(),
                                                   bias_ptr, out.mutable_data_ptr<scalar_t>()};
  launch_gemm<acc_t>(view, stream);
}

// G (B, |W|) or a chunk of it, in the accumulation dtype, folded into grad_weight and
// grad_routing by the caller.
template <typename scalar_t, typename index_t>
at::Tensor depthwise_kernel_grad(const at::Tensor& grad_out, const at::Tensor& x,
                                 const Shape<index_t>& s, const at::TensorOptions& acc_opts,
                                 cudaStream_t stream) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t planes = int64_t(s.batch) * s.out_channels;
  // Enough (plane, slice) blocks to fill the device, slices of at least 2048 pixels.
  const int64_t slices = std::max<int64_t>(
      1, std::min({ceil_div(4096, planes), ceil_div(s.out_pixels(), 2048), kMaxGridYZ}));
  const int64_t slice_pixels = std::max<int64_t>(1, ceil_div(s.out_pixels(), slices));
  at::Tensor G = at::empty({slices, int64_t(s.batch), int64_t(s.out_channels) * s.taps()},
                           acc_opts);
  const dim3 grid(plane_blocks(planes), static_cast<unsigned>(slices));
  depthwise_kernel_grad_kernel<scalar_t, acc_t, index_t><<<grid, kThreads, 0, stream>>>(
      s, grad_out.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), slice_pixels,
      G.mutable_data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return slices == 1 ? G.select(0, 0) : G.sum(0);
}

template <typename scalar_t, typename index_t>
void backward_typed(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& routing,
                    const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                    const Geometry& g, std::array<bool, 4> mask, at::Tensor& grad_x,
                    at::Tensor& grad_routing, at::Tensor& grad_weight, at::Tensor& grad_bias) {
  using acc_t = at::opmath_type<scalar_t>;
  const Operands<scalar_t> ops(routing, weight);
  const Shape<index_t> s = make_shape<index_t>(g, x, grad_out, mask[0] ? &grad_x : nullptr);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const scalar_t* go_ptr = grad_out.const_data_ptr<scalar_t>();
  const scalar_t* x_ptr = x.const_data_ptr<scalar_t>();
  const int64_t N = g.kernel_numel();

  if (mask[0]) {
    scalar_t* dx_ptr = grad_x.mutable_data_ptr<scalar_t>();
    if (g.depthwise()) {
      const dim3 grid(plane_blocks(g.batch * g.in_channels),
                      pixel_blocks(g.height * g.width));
      const size_t smem = g.out_per_group() * s.taps() * sizeof(acc_t);
      depthwise_grad_input_kernel<scalar_t, acc_t, index_t><<<grid, kThreads, smem, stream>>>(
          s, go_ptr, ops.weight_ptr(), ops.routing_ptr(), dx_ptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else {
      const GradInputView<scalar_t, acc_t, index_t> view{s, go_ptr, ops.weight_ptr(),
                                                         ops.routing_ptr(), dx_ptr};
      launch_gemm<acc_t>(view, stream);
    }
  }

  at::Tensor gw, gr;
  if (mask[1] || mask[2]) {
    const at::Tensor experts = ops.weight.view({g.experts, N}).to(ops.kAcc);
    if (mask[1]) gr = at::empty({g.batch, g.experts}, ops.acc_opts);
    const auto fold = [&](const at::Tensor& G, int64_t first, int64_t count) {
      const at::Tensor r = ops.routing.narrow(0, first, count);
      if (mask[2]) gw = first == 0 ? at::mm(r.t(), G) : gw.addmm_(r.t(), G);
      if (mask[1]) gr.narrow(0, first, count).copy_(at::mm(G, experts.t()));
    };
    if (g.depthwise()) {
      fold(depthwise_kernel_grad<scalar_t, index_t>(grad_out, x, s, ops.acc_opts, stream), 0,
           g.batch);
    } else {
      const int64_t chunk = std::max<int64_t>(
          1, std::min<int64_t>(g.batch, kKernelGradBytes / (N * int64_t(sizeof(acc_t)))));
      at::Tensor G = at::empty({chunk, N}, ops.acc_opts);
      for (int64_t first = 0; first < g.batch; first += chunk) {
        const int64_t count = std::min(chunk, g.batch - first);
        const KernelGradView<scalar_t, acc_t, index_t> view{
            s, static_cast<index_t>(first), static_cast<index_t>(count), go_ptr, x_ptr,
            G.mutable_data_ptr<acc_t>()};
        launch_gemm<acc_t>(view, stream);
        fold(G.narrow(0, 0, count), first, count);
      }
    }
  }

  if (bias.has_value() && (mask[1] || mask[3])) {
    const at::Tensor gsum = at::sum(grad_out, at::IntArrayRef{2, 3}, false, ops.kAcc);
    if (mask[3]) grad_bias.copy_(at::mm(ops.routing.t(), gsum));
    if (mask[1]) gr.add_(at::mm(gsum, bias->to(ops.kAcc).t()));
  }
  if (mask[2]) grad_weight.copy_(gw.view(weight.sizes()));
  if (mask[1]) grad_routing.copy_(gr);
}

}  // namespace

at::Tensor forward(const at::Tensor& x, const at::Tensor& routing, const at::Tensor& weight,
                   const c10::optional<at::Tensor>& bias, const Geometry& g) {
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty({g.batch, g.out_channels, g.out_h, g.out_w},
                             x.options().memory_format(x.suggest_memory_format()));
  const bool narrow = fits_int32({&x, &out, &weight});
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "condconv2d_forward_cuda", [&] {
        if (narrow) {
          forward_typed<scalar_t, int32_t>(x, routing, weight, bias, g, out);
        } else {
          forward_typed<scalar_t, int64_t>(x, routing, weight, bias, g, out);
        }
      });
  return out;
}

void backward(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& routing,
              const at::Tensor& weight, const c10::optional<at::Tensor>& bias, const Geometry& g,
              std::array<bool, 4> output_mask, at::Tensor& grad_x, at::Tensor& grad_routing,
              at::Tensor& grad_weight, at::Tensor& grad_bias) {
  const c10::cuda::CUDAGuard guard(x.device());
  const bool narrow =
      fits_int32({&x, &grad_out, &weight, output_mask[0] ? &grad_x : nullptr});
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "condconv2d_backward_cuda", [&] {
        if (narrow) {
          backward_typed<scalar_t, int32_t>(grad_out, x, routing, weight, bias, g, output_mask,
                                            grad_x, grad_routing, grad_weight, grad_bias);
        } else {
          backward_typed<scalar_t, int64_t>(grad_out, x, routing, weight, bias, g, output_mask,
                                            grad_x, grad_routing, grad_weight, grad_bias);
        }
      });
}

}  // namespace cuda
}  // namespace condconv
