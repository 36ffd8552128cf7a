// condconv_kernels: conditionally parameterised convolution (CondConv) and its family.
//
//   W_b = s_b * sum_e routing[b, e] * weight[e]
//   bias_b = out_scale[b] * sum_e routing[b, e] * bias[e]
//   out[b] = conv2d(x[b], W_b, bias_b, stride, padding, dilation, groups)
//
// with the optional per-example scales (ODConv's attentions; 1 where absent)
//   s_b[co, ci, i, j] = out_scale[b, co] * in_scale[b, group(co) * Cin/groups + ci]
//                       * tap_scale[b, i, j].
//
// The dense expert mix is done per chunk of examples into scratch memory that belongs to one
// thread at a time, so the B x |W| tensor of mixed kernels is never allocated for dense layers.
// Depthwise layers on the CPU's ATen path store their B mixed kernels (B x C x kh x kw, the
// size of B output pixels per channel: csrc/cpu/aten_grouped.h).
//
// Operators (namespace `condconv`, defined in ops.cpp, kernels bound per dispatch key):
//   native_forward(x, routing, weight, bias?, stride[2], padding[4], dilation[2], groups,
//                  in_scale?, out_scale?, tap_scale?)
//   native_backward(grad_out, x, routing, weight, bias?, stride[2], padding[4],
//                   dilation[2], groups, output_mask[4], in_scale?, out_scale?, tap_scale?,
//                   scale_mask[3] = all)
//       -> (grad_x, grad_routing, grad_weight, grad_bias, grad_in_scale, grad_out_scale,
//           grad_tap_scale)
// padding is (top, bottom, left, right). Gradients not asked for by output_mask or scale_mask,
// and those of absent scales (scale_mask's entry for one is ignored), are empty tensors.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <array>
#include <string>
#include <vector>

namespace condconv {

// Blocks of b that cover a (a >= 0, b > 0).
constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Sizes of one call, checked once at the boundary (check_inputs) and trusted by the kernels.
struct Geometry {
  int64_t batch, in_channels, height, width;
  int64_t experts, out_channels, kernel_h, kernel_w, groups;
  int64_t stride_h, stride_w, pad_top, pad_bottom, pad_left, pad_right, dilation_h, dilation_w;
  int64_t out_h, out_w;

  int64_t in_per_group() const { return in_channels / groups; }
  int64_t out_per_group() const { return out_channels / groups; }
  // Reduction length of one group's GEMM: Cin/g * kh * kw.
  int64_t k() const { return in_per_group() * kernel_h * kernel_w; }
  // Elements of one expert kernel: Cout * Cin/g * kh * kw.
  int64_t kernel_numel() const { return out_channels * k(); }
  int64_t out_pixels() const { return out_h * out_w; }
  bool depthwise() const { return in_per_group() == 1; }
  // 1x1, stride 1, unpadded: the output pixels are the input pixels.
  bool pointwise() const {
    return kernel_h == 1 && kernel_w == 1 && stride_h == 1 && stride_w == 1 && !pad_top &&
           !pad_bottom && !pad_left && !pad_right;
  }
};

// The optional per-example scales: in (B, Cin), out (B, Cout), tap (B, kh, kw), each x's dtype
// or float32 (as routing), checked by check_scales.
struct ScaleArgs {
  c10::optional<at::Tensor> in, out, tap;
  bool any() const { return in.has_value() || out.has_value() || tap.has_value(); }
};
// Their gradients, in the scales' shapes and dtypes; undefined where a scale is absent.
struct ScaleGrads {
  at::Tensor in, out, tap;
  bool any() const { return in.defined() || out.defined() || tap.defined(); }
};

// Validates every argument (rank, shape, dtype, device, geometry) and returns the sizes.
// Throws c10::ValueError / c10::TypeError (ValueError / TypeError in Python) naming the
// argument and what was expected.
Geometry check_inputs(const at::Tensor& x, const at::Tensor& routing, const at::Tensor& weight,
                      const c10::optional<at::Tensor>& bias, at::IntArrayRef stride,
                      at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups);
// The scales against the geometry check_inputs returned: shapes, dtypes (x's or float32) and
// devices, each error naming the argument.
void check_scales(const at::Tensor& x, const Geometry& g, const ScaleArgs& scales);
// check_inputs and check_scales, then grad_out (the output's shape, x's dtype and device) and
// output_mask (no grad_bias without a bias).
Geometry check_backward_inputs(const at::Tensor& grad_out, const at::Tensor& x,
                               const at::Tensor& routing, const at::Tensor& weight,
                               const c10::optional<at::Tensor>& bias, at::IntArrayRef stride,
                               at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                               std::array<bool, 4> output_mask, const ScaleArgs& scales);

// The operators, callable from C++ (they go through the dispatcher).
at::Tensor condconv2d(const at::Tensor& x, const at::Tensor& routing, const at::Tensor& weight,
                      const c10::optional<at::Tensor>& bias, at::IntArrayRef stride,
                      at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> condconv2d_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& routing,
    const at::Tensor& weight, const c10::optional<at::Tensor>& bias, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    std::array<bool, 4> output_mask);

// The kernels of one device. forward: inputs already checked, batch and output non-empty;
// returns the output (B, Cout, Ho, Wo) in x's memory format. backward: fills grad_x,
// grad_routing, grad_weight, grad_bias where output_mask says so (the others are left untouched);
// requires batch >= 1; scale_grads holds the scales' gradients asked for (zeros, in the scales'
// shapes and dtypes; undefined for the others), which it fills.
using ForwardKernel = at::Tensor(const at::Tensor& x, const at::Tensor& routing,
                                 const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                                 const ScaleArgs& scales, const Geometry& g);
using BackwardKernel = void(const at::Tensor& grad_out, const at::Tensor& x,
                            const at::Tensor& routing, const at::Tensor& weight,
                            const c10::optional<at::Tensor>& bias, const ScaleArgs& scales,
                            const Geometry& g, std::array<bool, 4> output_mask,
                            at::Tensor& grad_x, at::Tensor& grad_routing,
                            at::Tensor& grad_weight, at::Tensor& grad_bias,
                            ScaleGrads& scale_grads);

namespace cpu {  // csrc/cpu/
ForwardKernel forward;
BackwardKernel backward;
// The paths a call on CPU tensors takes, forward and backward (csrc/cpu/paths.h), and every
// path's name: what tests query (torch.ops.condconv.cpu_paths, cpu_path_names). scaled: with
// per-example scales.
std::vector<std::string> path_names(const at::Tensor& x, const Geometry& g, bool scaled);
std::vector<std::string> all_path_names();
}  // namespace cpu

// csrc/cuda/, built when torch has CUDA: the kernels run on the current stream of x's device.
namespace cuda {
ForwardKernel forward;
BackwardKernel backward;
// Whether the dense 1x1 forward and grad_x of float16/bfloat16 channels_last calls take the
// clustered Hopper kernel where it applies (csrc/cuda/pointwise_cluster.cuh), and which form:
// kClusterOff, kClusterFragments (its products through ldmatrix and mma.sync: the default) or
// kClusterWmma (through wmma) or kClusterWgmma (pointwise_wgmma.cuh: the mix in registers, the
// products through wgmma; a build for sm_90a only, CONDCONV_SM90A). The op
// condconv::cuda_pointwise_cluster reads and sets it (defined in ops.cpp, so that a build
// without CUDA has it too).
enum ClusterMode : int64_t {
  kClusterOff = 0,
  kClusterFragments = 1,
  kClusterWmma = 2,
  kClusterWgmma = 3
};
ClusterMode pointwise_cluster();
// Whether the dense 1x1 kernel gradient of those calls takes pointwise_kgrad.cuh's kernel on a
// Hopper GPU (G_b on the tensor cores, folded in registers): off by default until a GPU run
// has timed it. The op condconv::cuda_pointwise_kgrad reads and sets it (ops.cpp).
bool pointwise_kgrad_on();
// Whether `device` runs the Hopper kernels above (pointwise_cluster.cuh, pointwise_wgmma.cuh,
// pointwise_kgrad.cuh): a GPU of compute capability 9.x and sm_90 code for them in this build
// (runtime.cuh: runs_sm90). The op condconv::cuda_hopper_kernels asks it (ops.cpp; 0 in a build
// without CUDA).
bool hopper_kernels_run(int device);
}  // namespace cuda
}  // namespace condconv
