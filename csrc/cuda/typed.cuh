// Host launchers of the condconv CUDA backend for one dtype and index type: allocation, grids
// and launches on the current stream, with a launch check after every kernel. Each dtype is
// instantiated in a translation unit of its own (instantiate_<dtype>.cu, CONDCONV_INSTANTIATE),
// so that a parallel build compiles them side by side; condconv_cuda.cu dispatches to them.
//
// The dense passes are implicit GEMMs (tensor cores for float16/bfloat16, and for float32 where
// PyTorch allows TF32 in convolutions; CUDA cores otherwise); on Hopper, the 1x1 forward and
// grad_x of float16/bfloat16 channels_last calls take the clustered kernel of
// pointwise_cluster.cuh instead. grad_weight = routing^T G and
// grad_routing = G W^T, G = the per-example kernel gradients, are two GEMMs per chunk of
// examples, the chunk bounded so G stays within kKernelGradBytes. Index arithmetic is int32_t
// where every offset of the call fits (views.cuh: fits_int32), else int64_t.
#pragma once

#include "../condconv.h"
#include "../epilogue.h"
#include "../operands.h"
#include "kernels.cuh"
#include "pointwise_kgrad.cuh"
#include "pointwise_wgmma.cuh"
#include "runtime.cuh"

#include <ATen/Context.h>
#include <torch/version.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>

#include <algorithm>
#include <string>
#include <type_traits>

namespace condconv {
namespace cuda {

// The smallest architecture this file is compiled for (nvcc's __CUDA_ARCH_LIST__, e.g. 900 for
// TORCH_CUDA_ARCH_LIST=9.0); 0 where unknown (the host emulation).
constexpr int min_cuda_arch() {
#ifdef __CUDA_ARCH_LIST__
  constexpr int archs[] = {__CUDA_ARCH_LIST__};
  int low = archs[0];
  for (int a : archs) low = a < low ? a : low;
  return low;
#else
  return 0;
#endif
}
// Whether every GPU this build can run on has tensor cores (sm_80 and newer).
constexpr bool kTensorCoresEverywhere = min_cuda_arch() >= 800;

// The bound on one chunk of per-example kernel gradients (the host test sets it small).
#ifndef CONDCONV_KERNEL_GRAD_BYTES
#define CONDCONV_KERNEL_GRAD_BYTES (int64_t(256) << 20)
#endif
constexpr int64_t kKernelGradBytes = CONDCONV_KERNEL_GRAD_BYTES;

// Whether TF32 is allowed for convolutions: cuDNN's convolution precision
// (torch.backends.cudnn.conv.fp32_precision, or the legacy torch.backends.cudnn.allow_tf32). The
// getter without an operator raises once the per-operator settings have set cuDNN's
// convolutions, RNNs and the legacy flag apart. From PyTorch 2.13 (the earliest whose headers
// were checked to have it) the getter for convolutions is asked; before, IEEE float32 where the
// plain getter raises.
inline bool conv_tf32() {
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 13)
  return at::globalContext().allowTF32CuDNN(at::Float32Op::CONV);
#else
  try {
    return at::globalContext().allowTF32CuDNN();
  } catch (const c10::Error&) {
    return false;
  }
#endif
}

// Whether the dense passes of scalar_t run on tensor cores: float16/bfloat16 always, float32
// when TF32 is allowed for convolutions (conv_tf32), on sm_80 and newer.
template <typename scalar_t>
bool use_tensor_cores() {
  if (kTensorCoresEverywhere) return !std::is_same<scalar_t, double>::value &&
                                     (!std::is_same<scalar_t, float>::value || conv_tf32());
  if (compute_capability_major() < 8) return false;
  if (std::is_same<scalar_t, at::Half>::value || std::is_same<scalar_t, at::BFloat16>::value) {
    return true;
  }
  return std::is_same<scalar_t, float>::value && conv_tf32();
}

template <typename scalar_t, typename acc_t, class View>
void launch_gemm(const View& v, cudaStream_t stream) {
  if (v.m() == 0 || v.n() == 0 || v.batches() == 0) return;
  if constexpr (!std::is_same<scalar_t, double>::value) {
    if (use_tensor_cores<scalar_t>()) {
      launch(tensor_core_gemm_kernel<View, TensorCoreOperand<scalar_t>>,
             gemm_grid(v, kTensorCoreExamples<View>), 0, stream, v);
      return;
    }
  }
  const dim3 grid = gemm_grid(v);
  // Every GPU this build runs on has tensor cores: float16/bfloat16 never take the CUDA-core
  // kernel, which is then not compiled for them.
  if constexpr (!kTensorCoresEverywhere || std::is_same<scalar_t, float>::value ||
                std::is_same<scalar_t, double>::value) {
    launch(implicit_gemm_kernel<View, acc_t>, grid, 0, stream, v);
  }
}

// The dense 1x1 forward (grad_x false: in = x) or grad_x (in = grad_out) through
// pointwise_cluster_kernel (or, in mode kClusterWgmma, pointwise_wgmma_kernel), where the switch
// is on, the call fits it (pointwise::fits) and the device is a Hopper GPU this build has the
// kernel for; false where not (the caller launches the tiled kernels). bias: the mixed bias
// (B, Cout), forward only, or null.
template <typename scalar_t>
bool launch_pointwise_cluster(bool grad_x, const Geometry& g, const at::Tensor& in,
                              at::Tensor& out, const Operands<scalar_t>& ops,
                              const at::opmath_type<scalar_t>* bias, cudaStream_t stream) {
  if constexpr (!std::is_same<scalar_t, at::Half>::value &&
                !std::is_same<scalar_t, at::BFloat16>::value) {
    return false;
  } else {
    using T = typename TensorCoreOperand<scalar_t>::type;
    const ClusterMode mode = pointwise_cluster();
    if (mode == kClusterOff || !pointwise::fits(g, in, out, ops.weight) ||
        !runs_sm90(&pointwise::pointwise_cluster_kernel<T, 8, false, true>)) {
      return false;
    }
    pointwise::Pass pass;
    std::string error;
    const bool bfloat16 = std::is_same<scalar_t, at::BFloat16>::value;
    const auto launch_pass = [&](auto kernel, dim3 grid, size_t bytes, const auto&... args) {
      launch_cluster(kernel, grid, pointwise::kClusterSize, bytes, stream, args...);
    };
#if defined(CONDCONV_SM90A) || !defined(__CUDACC__)
    if (mode == kClusterWgmma) {
      if (!pointwise::wgmma::prepare(grad_x, bfloat16, ops.weight.const_data_ptr(),
                                     in.const_data_ptr(), out.mutable_data_ptr(),
                                     ops.routing_ptr(), bias, g.batch, g.in_channels,
                                     g.out_channels, g.out_pixels(), g.experts, &pass, &error)) {
        return false;  // a map the driver refused: the tiled kernels take the call
      }
      pointwise::wgmma::dispatch<T>(pass, launch_pass);
      return true;
    }
#endif
    if (!pointwise::prepare(grad_x, bfloat16, mode == kClusterFragments,
                            ops.weight.const_data_ptr(), in.const_data_ptr(),
                            out.mutable_data_ptr(), ops.routing_ptr(), bias, g.batch,
                            g.in_channels, g.out_channels, g.out_pixels(), g.experts, &pass,
                            &error)) {
      return false;  // a map the driver refused: the tiled kernels take the call
    }
    pointwise::dispatch<T>(pass, launch_pass);
    return true;
  }
}

// The dense 1x1 kernel gradient through pointwise_kgrad_kernel, where its switch is on, the call
// fits it (pointwise_kgrad::fits) and the device is a Hopper GPU this build has the kernel for:
// gw (E, |W|) and gr (B, E), float32, from the kernel's partial sums (each of the two where
// asked for); false where not (the caller takes the chunked path).
template <typename scalar_t>
bool launch_pointwise_kgrad(const Geometry& g, const at::Tensor& grad_out, const at::Tensor& x,
                            const Operands<scalar_t>& ops, at::Tensor* gw, at::Tensor* gr,
                            cudaStream_t stream) {
  if constexpr (!std::is_same<scalar_t, at::Half>::value &&
                !std::is_same<scalar_t, at::BFloat16>::value) {
    return false;
  } else {
    using T = typename TensorCoreOperand<scalar_t>::type;
    namespace kg = pointwise_kgrad;
    if (!pointwise_kgrad_on() || !kg::fits(g, grad_out, x, ops.weight) ||
        !runs_sm90(&kg::pointwise_kgrad_kernel<T, 8>)) {
      return false;
    }
    const kg::Plan plan = kg::plan(g.batch, g.in_channels, g.out_channels, g.experts);
    if (plan.stages < 2) return false;  // (plan keeps 2 stages: a guard, the chunked path)
    const at::TensorOptions f32 = ops.acc_opts.dtype(at::kFloat);
    at::Tensor w_part = at::empty(
        {int64_t(plan.slices), g.experts, g.out_channels, g.in_channels}, f32);
    at::Tensor r_part = at::empty({int64_t(plan.tiles), g.batch, g.experts}, f32);
    kg::Pass pass;
    std::string error;
    if (!kg::prepare(std::is_same<scalar_t, at::BFloat16>::value, ops.weight.const_data_ptr(),
                     grad_out.const_data_ptr(), x.const_data_ptr(), ops.routing_ptr(),
                     w_part.mutable_data_ptr<float>(), r_part.mutable_data_ptr<float>(),
                     g.batch, g.in_channels, g.out_channels, g.out_pixels(), g.experts, plan,
                     &pass, &error)) {
      return false;  // a map the driver refused: the chunked path takes the call
    }
    kg::dispatch<T>(pass, [&](auto kernel, dim3 grid, size_t bytes, const auto&... args) {
      launch_cluster(kernel, grid, 1, bytes, stream, args...);
    });
    if (gw != nullptr) *gw = w_part.sum(0).view({g.experts, -1});
    if (gr != nullptr) *gr = r_part.sum(0);
    return true;
  }
}

// ---------------------------------------------------------------------------------------------
// Host side.

// Whether a depthwise kernel's threads should take consecutive channels: in t (the tensor it
// reads most, taps times per element) the channels lie closer together than the pixels
// (channels_last, or channels_last sliced along the channels).
inline bool channels_inner(const at::Tensor& t) {
  if (t.size(1) == 1) return false;
  for (int64_t d = 2; d < 4; ++d) {
    if (t.size(d) > 1 && t.stride(d) <= t.stride(1)) return false;
  }
  return true;
}

// G (B, |W|), folded into grad_weight and grad_routing by the caller.
template <typename scalar_t, typename index_t>
at::Tensor depthwise_kernel_grad(const at::Tensor& grad_out, const at::Tensor& x,
                                 const Shape<index_t>& s, const at::TensorOptions& acc_opts,
                                 cudaStream_t stream) {
  using acc_t = at::opmath_type<scalar_t>;
  DepthwiseGrid dw = depthwise_grid(s.batch, s.out_channels, s.out_pixels(), 0, sizeof(acc_t),
                                    channels_inner(x));
  dw.grid.y = static_cast<unsigned>(kernel_grad_slices(dw.grid.x, s.out_pixels()));
  at::Tensor G = at::empty({int64_t(dw.grid.y), int64_t(s.batch),
                            int64_t(s.out_channels) * s.taps()}, acc_opts);
  launch(depthwise_kernel_grad_kernel<scalar_t, acc_t, index_t>, dw.grid, 0, stream, s, dw.tile,
         grad_out.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
         G.mutable_data_ptr<acc_t>());
  return dw.grid.y == 1 ? G.select(0, 0) : G.sum(0);
}

template <typename scalar_t, typename index_t>
void forward_typed(const at::Tensor& x, const at::Tensor& routing, const at::Tensor& weight,
                   const c10::optional<at::Tensor>& bias, const Geometry& g, at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const Operands<scalar_t> ops(routing, weight, weight.scalar_type());
  const scalar_t* w_ptr = ops.weight.template const_data_ptr<scalar_t>();
  // The mixed bias is (B, Cout): tiny next to the kernels, so it is mixed up front.
  at::Tensor mixed_bias;
  if (bias.has_value()) mixed_bias = at::mm(ops.routing, bias->to(ops.acc_type));
  const acc_t* bias_ptr = bias.has_value() ? mixed_bias.const_data_ptr<acc_t>() : nullptr;
  const Shape<index_t> s = make_shape<index_t>(g, x, out, nullptr);
  const cudaStream_t stream = current_stream();
  const scalar_t* x_ptr = x.const_data_ptr<scalar_t>();
  if (g.depthwise()) {
    const DepthwiseGrid dw = depthwise_grid(g.batch, g.out_channels, g.out_pixels(), s.taps(),
                                            sizeof(acc_t), channels_inner(x));
    launch(depthwise_forward_kernel<scalar_t, acc_t, index_t>, dw.grid, dw.shared_bytes, stream,
           s, dw.tile, x_ptr, w_ptr, ops.routing_ptr(), bias_ptr,
           out.mutable_data_ptr<scalar_t>());
    return;
  }
  if (launch_pointwise_cluster<scalar_t>(false, g, x, out, ops, bias_ptr, stream)) return;
  const ForwardView<scalar_t, acc_t, index_t> view{s, x_ptr, w_ptr, ops.routing_ptr(),
                                                   bias_ptr, out.mutable_data_ptr<scalar_t>()};
  launch_gemm<scalar_t, acc_t>(view, stream);
}

template <typename scalar_t, typename index_t>
void backward_typed(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& routing,
                    const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                    const Geometry& g, std::array<bool, 4> mask, at::Tensor& grad_x,
                    at::Tensor& grad_routing, at::Tensor& grad_weight, at::Tensor& grad_bias) {
  using acc_t = at::opmath_type<scalar_t>;
  const Operands<scalar_t> ops(routing, weight, weight.scalar_type());
  const scalar_t* w_ptr = ops.weight.template const_data_ptr<scalar_t>();
  const Shape<index_t> s = make_shape<index_t>(g, x, grad_out, mask[0] ? &grad_x : nullptr);
  const cudaStream_t stream = current_stream();
  const scalar_t* go_ptr = grad_out.const_data_ptr<scalar_t>();
  const scalar_t* x_ptr = x.const_data_ptr<scalar_t>();
  const int64_t N = g.kernel_numel();

  if (mask[0]) {
    scalar_t* dx_ptr = grad_x.mutable_data_ptr<scalar_t>();
    if (g.depthwise()) {
      const DepthwiseGrid dw =
          depthwise_grid(g.batch, g.in_channels, g.height * g.width,
                         g.out_per_group() * s.taps(), sizeof(acc_t), channels_inner(grad_out));
      launch(depthwise_grad_input_kernel<scalar_t, acc_t, index_t>, dw.grid, dw.shared_bytes,
             stream, s, dw.tile, go_ptr, w_ptr, ops.routing_ptr(), dx_ptr);
    } else if (!launch_pointwise_cluster<scalar_t>(true, g, grad_out, grad_x, ops, nullptr,
                                                   stream)) {
      const GradInputView<scalar_t, acc_t, index_t> view{s, go_ptr, w_ptr,
                                                         ops.routing_ptr(), dx_ptr};
      launch_gemm<scalar_t, acc_t>(view, stream);
    }
  }

  at::Tensor gw, gr;
  if (mask[1] || mask[2]) {
    at::Tensor experts;  // the experts in the accumulation dtype, for the folds of G
    const auto fold = [&](const at::Tensor& G, int64_t first, int64_t count) {
      if (!experts.defined()) experts = ops.weight.to(ops.acc_type);
      if (first == 0) {
        if (mask[1]) gr = at::empty({g.batch, g.experts}, ops.acc_opts);
        if (mask[2]) gw = at::empty({g.experts, N}, ops.acc_opts);
      }
      at::Tensor gr_chunk = mask[1] ? gr.narrow(0, first, count) : at::Tensor();
      fold_kernel_grads(G, ops.routing.narrow(0, first, count), experts,
                        mask[2] ? &gw : nullptr, first > 0, mask[1] ? &gr_chunk : nullptr);
    };
    if (g.depthwise()) {
      fold(depthwise_kernel_grad<scalar_t, index_t>(grad_out, x, s, ops.acc_opts, stream), 0,
           g.batch);
    } else if (launch_pointwise_kgrad<scalar_t>(g, grad_out, x, ops, mask[2] ? &gw : nullptr,
                                                mask[1] ? &gr : nullptr, stream)) {
      // gw and gr from the kernel's partial sums
    } else {
      const int64_t chunk = std::max<int64_t>(
          1, std::min<int64_t>(g.batch, kKernelGradBytes / (N * int64_t(sizeof(acc_t)))));
      at::Tensor G = at::empty({chunk, N}, ops.acc_opts);
      for (int64_t first = 0; first < g.batch; first += chunk) {
        const int64_t count = std::min(chunk, g.batch - first);
        const KernelGradView<scalar_t, acc_t, index_t> view{
            s, static_cast<index_t>(first), static_cast<index_t>(count), go_ptr, x_ptr,
            G.mutable_data_ptr<acc_t>()};
        launch_gemm<scalar_t, acc_t>(view, stream);
        fold(G.narrow(0, 0, count), first, count);
      }
    }
  }

  bias_epilogue(grad_out, ops.routing, bias, mask[1], mask[3], grad_bias, gr, ops.scales,
                at::Tensor());
  if (mask[2]) grad_weight.copy_(gw.view(weight.sizes()));
  if (mask[1]) grad_routing.copy_(gr);
}

// Explicit instantiations of both launchers of one dtype, for both index types.
#define CONDCONV_INSTANTIATE(scalar_t)                                                            \
  template void forward_typed<scalar_t, int32_t>(const at::Tensor&, const at::Tensor&,            \
                                                 const at::Tensor&,                               \
                                                 const c10::optional<at::Tensor>&,                \
                                                 const Geometry&, at::Tensor&);                   \
  template void forward_typed<scalar_t, int64_t>(const at::Tensor&, const at::Tensor&,            \
                                                 const at::Tensor&,                               \
                                                 const c10::optional<at::Tensor>&,                \
                                                 const Geometry&, at::Tensor&);                   \
  template void backward_typed<scalar_t, int32_t>(                                                \
      const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,                 \
      const c10::optional<at::Tensor>&, const Geometry&, std::array<bool, 4>, at::Tensor&,        \
      at::Tensor&, at::Tensor&, at::Tensor&);                                                     \
  template void backward_typed<scalar_t, int64_t>(                                                \
      const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,                 \
      const c10::optional<at::Tensor>&, const Geometry&, std::array<bool, 4>, at::Tensor&,        \
      at::Tensor&, at::Tensor&, at::Tensor&);

}  // namespace cuda
}  // namespace condconv
