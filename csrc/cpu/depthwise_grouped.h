// Depthwise CondConv on NCHW-contiguous float32 inputs through ATen's grouped convolution
// (oneDNN on x86), forward and backward side by side.
//
// A depthwise expert kernel is C x kh x kw: the B mixed kernels together are the size of B
// output pixels per channel, so storing them costs nothing next to x. With x viewed (no copy) as
// one image of B*C channels, the whole batch is then a single depthwise convolution with B*C
// groups, which runs at the speed of the static depthwise convolution of the same shape: faster
// than the direct kernels of condconv_fwd.cpp / condconv_bwd.cpp, which remain the path for
// other dtypes and layouts. The backward is one convolution_backward on the same view; the kernel
// gradients G (B x C x kh x kw) then fold into grad_weight = r^T G and grad_routing = G W^T.
#pragma once

#include "../condconv.h"

#include <ATen/ATen.h>

#include <tuple>

namespace condconv {
namespace cpu {

// Whether the grouped path applies: depthwise, float32, x NCHW-contiguous, one output channel
// per input channel or more (channel multiplier), ATen built with oneDNN.
inline bool grouped_depthwise_applies(const at::Tensor& x, const Geometry& g) {
  return g.depthwise() && x.scalar_type() == at::kFloat && x.is_contiguous() &&
         at::hasMKLDNN() && g.batch > 0;
}

// The (1, B*C, H', W') view of x and the convolution's symmetric padding. Asymmetric padding
// (TensorFlow SAME with an odd total) is applied to x explicitly, as timm's conv2d_same does.
inline std::tuple<at::Tensor, std::array<int64_t, 2>> grouped_input(const at::Tensor& x,
                                                                    const Geometry& g) {
  at::Tensor xv = x.view({1, g.batch * g.in_channels, g.height, g.width});
  if (g.pad_top == g.pad_bottom && g.pad_left == g.pad_right) {
    return {xv, {g.pad_top, g.pad_left}};
  }
  return {at::constant_pad_nd(xv, {g.pad_left, g.pad_right, g.pad_top, g.pad_bottom}, 0),
          {0, 0}};
}

// (B*Cout, 1, kh, kw) mixed taps: routing (B, E) @ weight (E, |W|), both float32.
inline at::Tensor grouped_taps(const at::Tensor& routing, const at::Tensor& weight,
                               const Geometry& g) {
  return at::mm(routing, weight).view({g.batch * g.out_channels, 1, g.kernel_h, g.kernel_w});
}

// Forward: returns (B, Cout, Ho, Wo), NCHW. bias_mix: (B, Cout) float32 or undefined.
inline at::Tensor grouped_depthwise_forward(const at::Tensor& x, const at::Tensor& routing,
                                            const at::Tensor& weight, const at::Tensor& bias_mix,
                                            const Geometry& g) {
  auto [xv, pad] = grouped_input(x, g);
  const at::Tensor bias = bias_mix.defined() ? bias_mix.reshape({-1}) : at::Tensor();
  at::Tensor y = at::convolution(xv, grouped_taps(routing, weight, g), bias,
                                 {g.stride_h, g.stride_w}, {pad[0], pad[1]},
                                 {g.dilation_h, g.dilation_w}, false, {0, 0},
                                 g.batch * g.in_channels);
  return y.view({g.batch, g.out_channels, g.out_h, g.out_w});
}

// Backward: writes grad_x (if defined) and returns G as (B, |W|) float32 (undefined unless
// need_g). routing and weight as for the forward.
inline at::Tensor grouped_depthwise_backward(const at::Tensor& grad_out, const at::Tensor& x,
                                             const at::Tensor& routing, const at::Tensor& weight,
                                             const Geometry& g, at::Tensor* grad_x, bool need_g) {
  auto [xv, pad] = grouped_input(x, g);
  const at::Tensor go = grad_out.contiguous().view(
      {1, g.batch * g.out_channels, g.out_h, g.out_w});
  auto [gx, gk, gb] = at::convolution_backward(
      go, xv, grouped_taps(routing, weight, g), c10::nullopt, {g.stride_h, g.stride_w},
      {pad[0], pad[1]}, {g.dilation_h, g.dilation_w}, false, {0, 0}, g.batch * g.in_channels,
      {grad_x != nullptr, need_g, false});
  if (grad_x != nullptr) {
    const bool padded = xv.size(2) != g.height || xv.size(3) != g.width;
    at::Tensor full = gx.view({g.batch, g.in_channels, xv.size(2), xv.size(3)});
    if (padded) {  // drop the gradient of the explicit padding
      grad_x->copy_(full.narrow(2, g.pad_top, g.height).narrow(3, g.pad_left, g.width));
    } else {
      *grad_x = full;  // already NCHW-contiguous, as x
    }
  }
  return need_g ? gk.view({g.batch, g.kernel_numel()}) : at::Tensor();
}

}  // namespace cpu
}  // namespace condconv
