// The CPU paths through ATen's grouped convolution (oneDNN on x86), forward and backward side by
// side: depthwise layers (float32/bfloat16 NCHW) and dense k x k layers (chunks of examples as
// one grouped convolution), and the guards around ATen's convolutions (aten_convolution).
//
// A depthwise expert kernel is C x kh x kw: the B mixed kernels together are the size of B
// output pixels per channel, so storing them costs nothing next to x. With x viewed (no copy) as
// one image of B*C channels, the whole batch is then a single depthwise convolution with B*C
// groups, which runs at the speed of the static depthwise convolution of the same shape: faster
// than the direct kernels of condconv_fwd.cpp / condconv_bwd.cpp, which remain the path for
// other dtypes and layouts. The backward takes grad_x from convolution_backward on the same view
// and computes the kernel gradients G (B x C x kh x kw) directly (depthwise_kernel_grad); they
// fold into grad_weight = r^T G and grad_routing = G W^T.
#pragma once

#include "kernel_utils.h"

#include <ATen/ATen.h>

#include <tuple>
#include <vector>

namespace condconv {
namespace cpu {

// Whether the backward's grouped path applies: depthwise, float32, x NCHW-contiguous (a
// channel multiplier is fine), ATen built with oneDNN.
inline bool grouped_depthwise_applies(const at::Tensor& x, const Geometry& g) {
  return g.depthwise() && x.scalar_type() == at::kFloat && x.is_contiguous() &&
         at::hasMKLDNN() && g.batch > 0;
}

// The forward's: also bfloat16 (mixed in float32, taps rounded to bfloat16, accumulated in
// float32 by oneDNN). channels_last inputs stay on the direct kernel: (B, H, W, C) memory has no
// (1, B*C, H, W) view, and one convolution per example would copy every output slice (measured
// no faster than the direct kernel).
inline bool grouped_depthwise_forward_applies(const at::Tensor& x, const Geometry& g) {
  const bool dtype_ok = x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16;
  return g.depthwise() && dtype_ok && x.is_contiguous() && at::hasMKLDNN() && g.batch > 0;
}

// The (1, n*C, H', W') view of examples [c0, c0 + n) of x and the convolution's symmetric
// padding. Asymmetric padding (TensorFlow SAME with an odd total) is applied to x explicitly, as
// timm's conv2d_same does.
inline std::tuple<at::Tensor, std::array<int64_t, 2>> grouped_input(const at::Tensor& x,
                                                                    int64_t c0, int64_t n,
                                                                    const Geometry& g) {
  at::Tensor xv = x.narrow(0, c0, n).view({1, n * g.in_channels, g.height, g.width});
  if (g.pad_top == g.pad_bottom && g.pad_left == g.pad_right) {
    return {xv, {g.pad_top, g.pad_left}};
  }
  return {at::constant_pad_nd(xv, {g.pad_left, g.pad_right, g.pad_top, g.pad_bottom}, 0),
          {0, 0}};
}

// The gradient of x[c0 : c0 + n] from the gradient of its grouped_input view.
inline at::Tensor grouped_input_grad(const at::Tensor& gx, const at::Tensor& xv, int64_t n,
                                     const Geometry& g) {
  at::Tensor full = gx.view({n, g.in_channels, xv.size(2), xv.size(3)});
  if (xv.size(2) == g.height && xv.size(3) == g.width) return full;
  return full.narrow(2, g.pad_top, g.height).narrow(3, g.pad_left, g.width);
}

// The one place the CPU kernels call ATen's convolution forward (the grouped paths below; their
// backward runs in float32 only). kernels and bias come in float32 (mixed in float32) and are
// cast to x's dtype here, except where an ATen CPU convolution bug (torch 2.13, oneDNN 3.x) would
// reach the result; there the convolution runs in float32 (x upcast) and is rounded once:
// - bfloat16, one convolution group (groups == 1 in this call: a single example and groups == 1,
//   or a chunk of one) and an odd Cin/groups: oneDNN's jit_bf16 "first convolution" kernel (plain
//   source layout) pairs the last input channel with the neighbouring pixel times a zero weight,
//   so a NaN/Inf in x reaches outputs whose window does not contain it (0 * NaN = NaN);
// - bfloat16 inputs 1 or 2 pixels high or wide: reported to come back 60-150% off with 3x3/5x5
//   kernels, stride 2 and padding k/2 on some CPUs (not reproduced on AVX512-BF16 without AMX).
// float32 and float16 never take these paths' bfloat16 cases (float16 uses the direct kernels).
inline bool aten_conv_needs_float32(const at::Tensor& x, int64_t groups, int64_t cin_g) {
  if (x.scalar_type() != at::kBFloat16) return false;
  return (groups == 1 && cin_g % 2 == 1) || x.size(2) <= 2 || x.size(3) <= 2;
}

inline at::Tensor aten_convolution(const at::Tensor& x, const at::Tensor& kernels,
                                   const at::Tensor& bias, const Geometry& g,
                                   std::array<int64_t, 2> pad, int64_t groups) {
  const bool upcast = aten_conv_needs_float32(x, groups, kernels.size(1));
  const at::ScalarType dtype = upcast ? at::kFloat : x.scalar_type();
  at::Tensor y = at::convolution(upcast ? x.to(at::kFloat) : x, kernels.to(dtype),
                                 bias.defined() ? bias.to(dtype) : at::Tensor(),
                                 {g.stride_h, g.stride_w}, {pad[0], pad[1]},
                                 {g.dilation_h, g.dilation_w}, false, {0, 0}, groups);
  return upcast ? y.to(x.scalar_type()) : y;
}

// Dense k x k (not the 1x1 GEMM path), float32/bfloat16, x NCHW-contiguous: chunks of examples
// run as one grouped convolution each over the (1, n*Cin, H, W) view, their kernels mixed into
// reused scratch (at most batch_chunk examples: bounded memory). ATen's direct convolution
// beats im2col + GEMM per example here (measured 1.2-1.8x on 3x3 layers).
inline bool grouped_dense_applies(const at::Tensor& x, const Geometry& g) {
  const bool dtype_ok = x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16;
  return !g.depthwise() && !g.pointwise() && dtype_ok && x.is_contiguous() && at::hasMKLDNN() &&
         g.batch > 0;
}

inline at::Tensor grouped_dense_forward(const at::Tensor& x, const at::Tensor& routing,
                                        const at::Tensor& weight, const Scales& scales,
                                        const at::Tensor& bias_mix, const Geometry& g) {
  const int64_t chunk = batch_chunk(g, sizeof(float));
  at::Tensor wmix = workspace(Slot::kMixed, {chunk, g.kernel_numel()}, weight.options());
  at::Tensor out;
  for (int64_t c0 = 0; c0 < g.batch; c0 += chunk) {
    const int64_t n = std::min(chunk, g.batch - c0);
    at::Tensor mixed = wmix.narrow(0, 0, n);
    mix_kernels(mixed, routing, weight, scales, c0, n, g);
    auto [xv, pad] = grouped_input(x, c0, n, g);
    const at::Tensor kernels =
        mixed.view({n * g.out_channels, g.in_per_group(), g.kernel_h, g.kernel_w});
    const at::Tensor bias =
        bias_mix.defined() ? bias_mix.narrow(0, c0, n).reshape({-1}) : at::Tensor();
    at::Tensor y = aten_convolution(xv, kernels, bias, g, pad, n * g.groups)
                       .view({n, g.out_channels, g.out_h, g.out_w});
    if (n == g.batch) return y;  // one chunk: the convolution's output is the output
    if (!out.defined()) {
      out = at::empty({g.batch, g.out_channels, g.out_h, g.out_w}, x.options());
    }
    out.narrow(0, c0, n).copy_(y);
  }
  return out;
}

// Backward of grouped_dense_forward (float32 only): per chunk one convolution_backward gives
// grad_x and the kernel gradients G (n x |W|), folded at once (fold, chunk order). routing and
// weight are float32; grad_x may be null.
inline void grouped_dense_backward(const at::Tensor& grad_out, const at::Tensor& x,
                                   const at::Tensor& routing, const at::Tensor& weight,
                                   const Scales& scales, const Geometry& g, at::Tensor* grad_x,
                                   const KernelGradFold& fold) {
  const int64_t chunk = batch_chunk(g, sizeof(float));
  at::Tensor wmix = workspace(Slot::kMixed, {chunk, g.kernel_numel()}, weight.options());
  for (int64_t c0 = 0; c0 < g.batch; c0 += chunk) {
    const int64_t n = std::min(chunk, g.batch - c0);
    at::Tensor mixed = wmix.narrow(0, 0, n);
    mix_kernels(mixed, routing, weight, scales, c0, n, g);
    auto [xv, pad] = grouped_input(x, c0, n, g);
    const at::Tensor go = grad_out.narrow(0, c0, n).contiguous().view(
        {1, n * g.out_channels, g.out_h, g.out_w});
    auto [gx, gk, gb] = at::convolution_backward(
        go, xv, mixed.view({n * g.out_channels, g.in_per_group(), g.kernel_h, g.kernel_w}),
        c10::nullopt, {g.stride_h, g.stride_w}, {pad[0], pad[1]}, {g.dilation_h, g.dilation_w},
        false, {0, 0}, n * g.groups, {grad_x != nullptr, fold.wanted(), false});
    if (grad_x != nullptr) grad_x->narrow(0, c0, n).copy_(grouped_input_grad(gx, xv, n, g));
    if (fold.wanted()) fold(gk.view({n, g.kernel_numel()}), c0);
  }
}

// (B*Cout, 1, kh, kw) mixed taps: routing (B, E) @ weight (E, |W|), both float32, scaled.
inline at::Tensor grouped_taps(const at::Tensor& routing, const at::Tensor& weight,
                               const Scales& scales, const Geometry& g) {
  at::Tensor taps = at::empty({g.batch, g.kernel_numel()}, weight.options());
  mix_kernels(taps, routing, weight, scales, 0, g.batch, g);
  return taps.view({g.batch * g.out_channels, 1, g.kernel_h, g.kernel_w});
}

// Forward: returns (B, Cout, Ho, Wo), NCHW as x. routing, weight and bias_mix
// ((B, Cout) or undefined) are float32; taps and bias are cast to x's dtype.
inline at::Tensor grouped_depthwise_forward(const at::Tensor& x, const at::Tensor& routing,
                                            const at::Tensor& weight, const Scales& scales,
                                            const at::Tensor& bias_mix, const Geometry& g) {
  const at::Tensor taps = grouped_taps(routing, weight, scales, g);
  const at::Tensor bias = bias_mix.defined() ? bias_mix.reshape({-1}) : at::Tensor();
  auto [xv, pad] = grouped_input(x, 0, g.batch, g);
  at::Tensor y = aten_convolution(xv, taps, bias, g, pad, g.batch * g.in_channels);
  return y.view({g.batch, g.out_channels, g.out_h, g.out_w});
}

// G[b, co, i, j] = sum_{oh, ow} grad_out[b, co, oh, ow] x_pad[b, ci, oh*sh + i*dh, ow*sw + j*dw]
// (ci = co / multiplier), all float32 contiguous; returns (B, Cout * kh * kw). ATen's depthwise
// weight gradient is 15-25x slower than its forward on CPU, so this one is direct: a task per
// (example, output channel) pads the input plane and copies grad_out with the padded row pitch
// (zeros between rows), after which each tap is one contiguous dot product (stride 1).
inline at::Tensor depthwise_kernel_grad(const at::Tensor& grad_out, const at::Tensor& x,
                                        const Geometry& g) {
  const int64_t taps = g.kernel_h * g.kernel_w, mult = g.out_per_group();
  const int64_t wp = g.width + g.pad_left + g.pad_right;
  const int64_t hp = g.height + g.pad_top + g.pad_bottom;
  at::Tensor G = at::empty({g.batch, g.out_channels * taps}, x.options());
  const float* x_ptr = x.const_data_ptr<float>();
  const float* go_ptr = grad_out.const_data_ptr<float>();
  float* G_ptr = G.mutable_data_ptr<float>();
  const int64_t plane_in = g.height * g.width, plane_out = g.out_h * g.out_w;
  at::parallel_for(0, g.batch * g.out_channels, 16, [&](int64_t t0, int64_t t1) {
    std::vector<float> plane(hp * wp), gp(g.out_h * wp, 0.f);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / g.out_channels, co = t % g.out_channels, ci = co / mult;
      padded_plane<float, float>(x_ptr + (b * g.in_channels + ci) * plane_in, g.width, 1, g,
                                 plane.data());
      const float* go = go_ptr + t * plane_out;
      float* out = G_ptr + t * taps;
      if (g.stride_h == 1 && g.stride_w == 1) {
        for (int64_t oh = 0; oh < g.out_h; ++oh) {
          std::copy(go + oh * g.out_w, go + (oh + 1) * g.out_w, gp.data() + oh * wp);
        }
        for (int64_t i = 0; i < g.kernel_h; ++i) {
          for (int64_t j = 0; j < g.kernel_w; ++j) {
            const float* src = plane.data() + i * g.dilation_h * wp + j * g.dilation_w;
            out[i * g.kernel_w + j] = pitched_dot(gp.data(), src, g.out_h, wp, g.out_w);
          }
        }
      } else {
        for (int64_t i = 0; i < g.kernel_h; ++i) {
          for (int64_t j = 0; j < g.kernel_w; ++j) {
            float acc = 0.f;
            for (int64_t oh = 0; oh < g.out_h; ++oh) {
              const float* src = plane.data() + (oh * g.stride_h + i * g.dilation_h) * wp +
                                 j * g.dilation_w;
              const float* gr = go + oh * g.out_w;
              const int64_t sw = g.stride_w;
#pragma omp simd reduction(+ : acc)
              for (int64_t ow = 0; ow < g.out_w; ++ow) acc += gr[ow] * src[ow * sw];
            }
            out[i * g.kernel_w + j] = acc;
          }
        }
      }
    }
  });
  return G;
}

// Backward: writes grad_x (if defined) and returns G as (B, |W|) float32 (undefined unless
// need_g). routing and weight as for the forward.
inline at::Tensor grouped_depthwise_backward(const at::Tensor& grad_out, const at::Tensor& x,
                                             const at::Tensor& routing, const at::Tensor& weight,
                                             const Scales& scales, const Geometry& g,
                                             at::Tensor* grad_x, bool need_g) {
  // ATen's depthwise weight gradient is competitive for 3x3 kernels only (measured on x86 with
  // oneDNN: 5x5 runs 15-25x slower than the forward); larger kernels use the direct one.
  const bool aten_g = need_g && g.kernel_h * g.kernel_w <= 9;
  const at::Tensor go_nchw = grad_out.contiguous();
  at::Tensor G = need_g && !aten_g ? depthwise_kernel_grad(go_nchw, x, g) : at::Tensor();
  if (grad_x == nullptr && !aten_g) return G;
  auto [xv, pad] = grouped_input(x, 0, g.batch, g);
  const at::Tensor go = go_nchw.view({1, g.batch * g.out_channels, g.out_h, g.out_w});
  auto [gx, gk, gb] = at::convolution_backward(
      go, xv, grouped_taps(routing, weight, scales, g), c10::nullopt, {g.stride_h, g.stride_w},
      {pad[0], pad[1]}, {g.dilation_h, g.dilation_w}, false, {0, 0}, g.batch * g.in_channels,
      {grad_x != nullptr, aten_g, false});
  if (aten_g) G = gk.view({g.batch, g.kernel_numel()});
  if (grad_x != nullptr) {
    const at::Tensor full = grouped_input_grad(gx, xv, g.batch, g);
    if (full.is_contiguous()) {
      *grad_x = full;  // NCHW-contiguous, as x: taken as it is
    } else {
      grad_x->copy_(full);  // the explicit padding's gradient dropped
    }
  }
  return G;
}

}  // namespace cpu
}  // namespace condconv
