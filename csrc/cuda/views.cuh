// Index arithmetic of the CUDA kernels, written once as host+device functions so that the C++
// test (tests/cpp/test_cuda_views.cpp) checks it on the CPU against at::conv2d.
//
// Every dense pass is one implicit GEMM, C[z](M x N) = A[z](M x K) . B[z](K x N), where z
// enumerates (example, group) and the operands are gathered on the fly:
//
//   pass             M            N              K                  A                    B
//   forward          Cout/g       Ho*Wo          Cin/g*kh*kw        mixed kernel W_b     im2col(x_b)
//   grad_x           Cin/g        H*W            Cout/g*kh*kw       mixed kernel W_b^T   gathered grad_out
//   kernel grad G_b  Cout/g       Cin/g*kh*kw    Ho*Wo              grad_out_b           im2col(x_b)^T
//
// A View supplies lhs(z, m, k) = A, rhs(z, k, n) = B and store(z, m, n, value); the kernel
// (kernels.cuh) stages K-slices of A and B in shared memory. The forward and grad_x views
// mix the experts as they load a tile of A: W_b[co, k] = sum_e routing[b, e] * weight[e, co, k],
// so the B x |W| mixed kernels never exist in memory. Offsets are index_t: 32-bit where every
// offset of the call fits (Shape), 64-bit otherwise.
//
// Depthwise (Cin/g == 1) has direct per-pixel kernels with the taps of a block's (example, tile of
// channels) mixed once into shared memory; their per-pixel sums are also here.
#pragma once

#include "../condconv.h"

#include <cstdint>
#include <initializer_list>
#include <limits>

#ifdef __CUDACC__
#define CONDCONV_HD __host__ __device__ __forceinline__
#else
#define CONDCONV_HD inline
#endif

namespace condconv {
namespace cuda {

// The sizes and strides of one call, copied by value into every kernel. index_t is int32_t
// where every offset of the call fits (faster index arithmetic on the GPU), else int64_t.
template <typename index_t>
struct Shape {
  index_t batch, in_channels, height, width;
  index_t experts, out_channels, kernel_h, kernel_w, groups;
  index_t stride_h, stride_w, pad_top, pad_left, dilation_h, dilation_w;
  index_t out_h, out_w;
  index_t x_stride[4];     // x (n, c, h, w), in elements
  index_t out_stride[4];   // out / grad_out (n, c, h, w)
  index_t dx_stride[4];    // grad_x (n, c, h, w)

  CONDCONV_HD index_t taps() const { return kernel_h * kernel_w; }
  CONDCONV_HD index_t in_per_group() const { return in_channels / groups; }
  CONDCONV_HD index_t out_per_group() const { return out_channels / groups; }
  // Elements of one output channel's kernel: Cin/g * kh * kw (weight is contiguous).
  CONDCONV_HD index_t kernel_row() const { return in_per_group() * taps(); }
  CONDCONV_HD index_t out_pixels() const { return out_h * out_w; }
  CONDCONV_HD index_t in_pixels() const { return height * width; }
};

// a / d, skipping the division (a subroutine on the GPU) when d is 1: groups for ungrouped
// layers, taps and kernel width for 1x1 ones. d is the same across a launch, so the branch is too.
template <typename index_t>
CONDCONV_HD index_t quot(index_t a, index_t d) {
  return d == 1 ? a : a / d;
}

// The Shape of a call: checked sizes from g, strides from the tensors (grad_x may be null).
template <typename index_t>
Shape<index_t> make_shape(const Geometry& g, const at::Tensor& x, const at::Tensor& out,
                          const at::Tensor* grad_x) {
  Shape<index_t> s{};
  s.batch = static_cast<index_t>(g.batch);
  s.in_channels = static_cast<index_t>(g.in_channels);
  s.height = static_cast<index_t>(g.height);
  s.width = static_cast<index_t>(g.width);
  s.experts = static_cast<index_t>(g.experts);
  s.out_channels = static_cast<index_t>(g.out_channels);
  s.kernel_h = static_cast<index_t>(g.kernel_h);
  s.kernel_w = static_cast<index_t>(g.kernel_w);
  s.groups = static_cast<index_t>(g.groups);
  s.stride_h = static_cast<index_t>(g.stride_h);
  s.stride_w = static_cast<index_t>(g.stride_w);
  s.pad_top = static_cast<index_t>(g.pad_top);
  s.pad_left = static_cast<index_t>(g.pad_left);
  s.dilation_h = static_cast<index_t>(g.dilation_h);
  s.dilation_w = static_cast<index_t>(g.dilation_w);
  s.out_h = static_cast<index_t>(g.out_h);
  s.out_w = static_cast<index_t>(g.out_w);
  for (int d = 0; d < 4; ++d) {
    s.x_stride[d] = static_cast<index_t>(x.stride(d));
    s.out_stride[d] = static_cast<index_t>(out.stride(d));
    s.dx_stride[d] = grad_x ? static_cast<index_t>(grad_x->stride(d)) : 0;
  }
  return s;
}

// Whether every offset a kernel computes for these tensors fits int32_t: the largest element
// offset of each (sum of (size - 1) * stride) and its element count below 2^31.
inline bool fits_int32(std::initializer_list<const at::Tensor*> tensors) {
  constexpr int64_t kMax = std::numeric_limits<int32_t>::max();
  for (const at::Tensor* t : tensors) {
    if (t == nullptr || !t->defined()) continue;
    int64_t last = 0;
    for (int64_t d = 0; d < t->dim(); ++d) last += (t->size(d) - 1) * t->stride(d);
    if (t->numel() >= kMax || last >= kMax) return false;
  }
  return true;
}

// W_b[co, k] for the NB examples b[j]: the experts weight[e, co, k] (contiguous, (E, Cout,
// row)) mixed by routing[b[j], :] (contiguous (B, E), accumulation dtype), each expert element
// read once for all of them.
template <typename scalar_t, typename acc_t, typename index_t, int NB>
CONDCONV_HD void mixed_weights(const scalar_t* weight, const acc_t* routing,
                               const Shape<index_t>& s, const index_t (&b)[NB], index_t co,
                               index_t k, acc_t (&out)[NB]) {
  const index_t expert_numel = s.out_channels * s.kernel_row();
  const scalar_t* w = weight + co * s.kernel_row() + k;
#pragma unroll
  for (int j = 0; j < NB; ++j) out[j] = 0;
  for (index_t e = 0; e < s.experts; ++e) {
    const acc_t we = static_cast<acc_t>(w[e * expert_numel]);
#pragma unroll
    for (int j = 0; j < NB; ++j) out[j] += routing[b[j] * s.experts + e] * we;
  }
}

// W_b[co, k] for example b.
template <typename scalar_t, typename acc_t, typename index_t>
CONDCONV_HD acc_t mixed_weight(const scalar_t* weight, const acc_t* routing,
                               const Shape<index_t>& s, index_t b, index_t co, index_t k) {
  const index_t examples[1] = {b};
  acc_t out[1];
  mixed_weights(weight, routing, s, examples, co, k, out);
  return out[0];
}

// The examples b of the batch indices z = b * groups + g of a block of views' batches.
template <typename index_t, int NB>
CONDCONV_HD void examples_of(const Shape<index_t>& s, const index_t (&z)[NB], index_t (&b)[NB]) {
#pragma unroll
  for (int j = 0; j < NB; ++j) b[j] = quot(z[j], s.groups);
}

// x[b, c, ih, iw] with zeros outside the image.
template <typename scalar_t, typename acc_t, typename index_t>
CONDCONV_HD acc_t load_x(const scalar_t* x, const Shape<index_t>& s, index_t b, index_t c,
                         index_t ih, index_t iw) {
  if (ih < 0 || ih >= s.height || iw < 0 || iw >= s.width) return acc_t(0);
  return static_cast<acc_t>(x[b * s.x_stride[0] + c * s.x_stride[1] + ih * s.x_stride[2] +
                              iw * s.x_stride[3]]);
}

// im2col(x_b)[k, p] for group gi: k = (ci, i, j) in the group, p = (oh, ow).
template <typename scalar_t, typename acc_t, typename index_t>
CONDCONV_HD acc_t im2col(const scalar_t* x, const Shape<index_t>& s, index_t b, index_t gi,
                         index_t k, index_t p) {
  const index_t taps = s.taps();
  const index_t ci = quot(k, taps), t = k - ci * taps;
  const index_t i = quot(t, s.kernel_w), j = t - i * s.kernel_w;
  const index_t oh = p / s.out_w, ow = p - oh * s.out_w;
  return load_x<scalar_t, acc_t>(x, s, b, gi * s.in_per_group() + ci,
                                 oh * s.stride_h - s.pad_top + i * s.dilation_h,
                                 ow * s.stride_w - s.pad_left + j * s.dilation_w);
}

// grad_out[b, co, oh, ow] that reaches input pixel (ih, iw) through tap (i, j), or 0 when no
// output pixel does (stride skips it or it falls outside the output).
template <typename scalar_t, typename acc_t, typename index_t>
CONDCONV_HD acc_t grad_through_tap(const scalar_t* grad_out, const Shape<index_t>& s, index_t b,
                                   index_t co, index_t ih, index_t iw, index_t i, index_t j) {
  const index_t h = ih + s.pad_top - i * s.dilation_h;
  const index_t w = iw + s.pad_left - j * s.dilation_w;
  if (h < 0 || w < 0) return acc_t(0);
  const index_t oh = quot(h, s.stride_h), ow = quot(w, s.stride_w);
  if (oh * s.stride_h != h || ow * s.stride_w != w || oh >= s.out_h || ow >= s.out_w) {
    return acc_t(0);  // the stride skips this pixel, or it lies outside the output
  }
  return static_cast<acc_t>(grad_out[b * s.out_stride[0] + co * s.out_stride[1] +
                                     oh * s.out_stride[2] + ow * s.out_stride[3]]);
}

// Whether the reduction index k of a 1x1 layer runs along a tensor's channels in memory: its
// channel stride is 1 (channels_last), so that staging k fastest reads consecutive addresses.
// (Past 1x1, k steps over the taps first, a pixel apart: neither order is contiguous there.)
// Each view also says which index of its operands and its output is the contiguous one, for the
// order in which a block's threads stage them and tensor_core_gemm_kernel stores the output
// (implicit_gemm_kernel, float64 and IEEE float32, stores in its accumulators' order).
template <typename index_t>
CONDCONV_HD bool k_along_channels(const index_t (&stride)[4], index_t taps) {
  return taps == 1 && stride[1] == 1;
}

// out[b, co, oh, ow] = sum_k W_b[co, k] im2col(x_b)[k, p] + bias_b[co];  z = b * groups + gi.
template <typename scalar_t, typename acc_t, typename index_t>
struct ForwardView {
  static constexpr bool kMixes = true;  // lhs mixes the experts (lhs_block: for several examples)
  using index = index_t;
  Shape<index_t> s;
  const scalar_t* x;
  const scalar_t* weight;
  const acc_t* routing;
  const acc_t* bias;  // mixed bias (B, Cout), or null
  scalar_t* out;

  CONDCONV_HD index_t examples() const { return s.batch; }
  CONDCONV_HD index_t groups() const { return s.groups; }
  CONDCONV_HD index_t batches() const { return s.batch * s.groups; }
  CONDCONV_HD index_t m() const { return s.out_per_group(); }
  CONDCONV_HD index_t n() const { return s.out_pixels(); }
  CONDCONV_HD index_t k() const { return s.kernel_row(); }
  // lhs(z, m, k) is contiguous in k (weight rows); rhs(z, k, n) in n (pixels), or in k for a
  // 1x1 layer's channels_last x; out in m for a channels_last out.
  CONDCONV_HD bool a_contiguous_in_k() const { return true; }
  CONDCONV_HD bool b_contiguous_in_k() const { return k_along_channels(s.x_stride, s.taps()); }
  CONDCONV_HD bool store_contiguous_in_m() const { return s.out_stride[1] == 1; }
  CONDCONV_HD acc_t lhs(index_t z, index_t m, index_t k) const {
    const index_t b = quot(z, s.groups), gi = z - b * s.groups;
    return mixed_weight(weight, routing, s, b, gi * s.out_per_group() + m, k);
  }
  // lhs(z[j], m, k) for NB batch indices of one group (the group read off z[0]).
  template <int NB>
  CONDCONV_HD void lhs_block(const index_t (&z)[NB], index_t m, index_t k,
                             acc_t (&out)[NB]) const {
    index_t b[NB];
    examples_of(s, z, b);
    mixed_weights(weight, routing, s, b, (z[0] - b[0] * s.groups) * s.out_per_group() + m, k,
                  out);
  }
  CONDCONV_HD acc_t rhs(index_t z, index_t k, index_t n) const {
    const index_t b = quot(z, s.groups);
    return im2col<scalar_t, acc_t>(x, s, b, z - b * s.groups, k, n);
  }
  CONDCONV_HD void store(index_t z, index_t m, index_t n, acc_t value) const {
    const index_t b = quot(z, s.groups), co = (z - b * s.groups) * s.out_per_group() + m;
    const index_t oh = n / s.out_w, ow = n - oh * s.out_w;
    if (bias) value += bias[b * s.out_channels + co];
    out[b * s.out_stride[0] + co * s.out_stride[1] + oh * s.out_stride[2] +
        ow * s.out_stride[3]] = static_cast<scalar_t>(value);
  }
};

// grad_x[b, ci, ih, iw] = sum_{co, i, j} W_b[co, ci, i, j] grad_out[b, co, oh, ow] over the
// output pixels (oh, ow) that read (ih, iw) through tap (i, j);  z = b * groups + gi.
template <typename scalar_t, typename acc_t, typename index_t>
struct GradInputView {
  static constexpr bool kMixes = true;
  using index = index_t;
  Shape<index_t> s;
  const scalar_t* grad_out;
  const scalar_t* weight;
  const acc_t* routing;
  scalar_t* grad_x;

  CONDCONV_HD index_t examples() const { return s.batch; }
  CONDCONV_HD index_t groups() const { return s.groups; }
  CONDCONV_HD index_t batches() const { return s.batch * s.groups; }
  CONDCONV_HD index_t m() const { return s.in_per_group(); }
  CONDCONV_HD index_t n() const { return s.in_pixels(); }
  CONDCONV_HD index_t k() const { return s.out_per_group() * s.taps(); }
  // lhs(z, m, k) (k = (co, tap), m = ci) is contiguous in m for a 1x1 layer; rhs(z, k, n) in n
  // (input pixels), or in k for a 1x1 layer's channels_last grad_out; grad_x in m for a
  // channels_last grad_x.
  CONDCONV_HD bool a_contiguous_in_k() const { return false; }
  CONDCONV_HD bool b_contiguous_in_k() const { return k_along_channels(s.out_stride, s.taps()); }
  CONDCONV_HD bool store_contiguous_in_m() const { return s.dx_stride[1] == 1; }
  CONDCONV_HD acc_t lhs(index_t z, index_t m, index_t k) const {
    const index_t b = quot(z, s.groups), gi = z - b * s.groups;
    const index_t co = quot(k, s.taps()), t = k - co * s.taps();
    return mixed_weight(weight, routing, s, b, gi * s.out_per_group() + co, m * s.taps() + t);
  }
  template <int NB>
  CONDCONV_HD void lhs_block(const index_t (&z)[NB], index_t m, index_t k,
                             acc_t (&out)[NB]) const {
    index_t b[NB];
    examples_of(s, z, b);
    const index_t gi = z[0] - b[0] * s.groups;
    const index_t co = quot(k, s.taps()), t = k - co * s.taps();
    mixed_weights(weight, routing, s, b, gi * s.out_per_group() + co, m * s.taps() + t, out);
  }
  CONDCONV_HD acc_t rhs(index_t z, index_t k, index_t n) const {
    const index_t b = quot(z, s.groups), gi = z - b * s.groups;
    const index_t co = quot(k, s.taps()), t = k - co * s.taps();
    const index_t i = quot(t, s.kernel_w), j = t - i * s.kernel_w;
    const index_t ih = n / s.width, iw = n - ih * s.width;
    return grad_through_tap<scalar_t, acc_t>(grad_out, s, b, gi * s.out_per_group() + co, ih,
                                             iw, i, j);
  }
  CONDCONV_HD void store(index_t z, index_t m, index_t n, acc_t value) const {
    const index_t b = quot(z, s.groups), ci = (z - b * s.groups) * s.in_per_group() + m;
    const index_t ih = n / s.width, iw = n - ih * s.width;
    grad_x[b * s.dx_stride[0] + ci * s.dx_stride[1] + ih * s.dx_stride[2] +
           iw * s.dx_stride[3]] = static_cast<scalar_t>(value);
  }
};

// G_b[co, k] = sum_p grad_out[b, co, p] im2col(x_b)[k, p], for the examples first .. first +
// count - 1 of a chunk; z = (b - first) * groups + gi; G is (count, Cout, Cin/g*kh*kw).
template <typename scalar_t, typename acc_t, typename index_t>
struct KernelGradView {
  static constexpr bool kMixes = false;
  using index = index_t;
  Shape<index_t> s;
  index_t first, count;
  const scalar_t* grad_out;
  const scalar_t* x;
  acc_t* G;

  CONDCONV_HD index_t examples() const { return count; }
  CONDCONV_HD index_t groups() const { return s.groups; }
  CONDCONV_HD index_t batches() const { return count * s.groups; }
  CONDCONV_HD index_t m() const { return s.out_per_group(); }
  CONDCONV_HD index_t n() const { return s.kernel_row(); }
  CONDCONV_HD index_t k() const { return s.out_pixels(); }
  // lhs(z, m, p) (grad_out rows) is contiguous in p, or in m (channels) for a channels_last
  // grad_out; rhs(z, p, n) (im2col rows) in p, or in n for a 1x1 layer's channels_last x; G in n.
  CONDCONV_HD bool a_contiguous_in_k() const { return s.out_stride[1] != 1; }
  CONDCONV_HD bool b_contiguous_in_k() const { return !k_along_channels(s.x_stride, s.taps()); }
  CONDCONV_HD bool store_contiguous_in_m() const { return false; }
  CONDCONV_HD acc_t lhs(index_t z, index_t m, index_t p) const {
    const index_t local = quot(z, s.groups), b = first + local, gi = z - local * s.groups;
    const index_t co = gi * s.out_per_group() + m;
    const index_t oh = p / s.out_w, ow = p - oh * s.out_w;
    return static_cast<acc_t>(grad_out[b * s.out_stride[0] + co * s.out_stride[1] +
                                       oh * s.out_stride[2] + ow * s.out_stride[3]]);
  }
  template <int NB>
  CONDCONV_HD void lhs_block(const index_t (&z)[NB], index_t m, index_t p,
                             acc_t (&out)[NB]) const {
#pragma unroll
    for (int j = 0; j < NB; ++j) out[j] = lhs(z[j], m, p);
  }
  CONDCONV_HD acc_t rhs(index_t z, index_t p, index_t n) const {
    const index_t local = quot(z, s.groups);
    return im2col<scalar_t, acc_t>(x, s, first + local, z - local * s.groups, n, p);
  }
  CONDCONV_HD void store(index_t z, index_t m, index_t n, acc_t value) const {
    const index_t local = quot(z, s.groups), co = (z - local * s.groups) * s.out_per_group() + m;
    G[(local * s.out_channels + co) * s.kernel_row() + n] = value;
  }
};

// Views whose K is the output pixels (any length, unlike the channels x taps of the others):
// tensor_core_gemm_kernel sums their MMA chains in two levels.
template <class View>
constexpr bool kLongK = false;
template <typename scalar_t, typename acc_t, typename index_t>
constexpr bool kLongK<KernelGradView<scalar_t, acc_t, index_t>> = true;

// Depthwise (Cin/g == 1, Cout/g = multiplier). taps points at the mixed taps of output channel
// co = c * multiplier + m for m = 0.., each kh*kw long.

// out[b, co, oh, ow] without bias.
template <typename scalar_t, typename acc_t, typename index_t>
CONDCONV_HD acc_t depthwise_output(const scalar_t* x, const Shape<index_t>& s, const acc_t* taps,
                                   index_t b, index_t co, index_t oh, index_t ow) {
  const index_t c = quot(co, s.out_per_group());
  acc_t sum = 0;
  for (index_t i = 0; i < s.kernel_h; ++i) {
    for (index_t j = 0; j < s.kernel_w; ++j) {
      sum += taps[i * s.kernel_w + j] *
             load_x<scalar_t, acc_t>(x, s, b, c, oh * s.stride_h - s.pad_top + i * s.dilation_h,
                                     ow * s.stride_w - s.pad_left + j * s.dilation_w);
    }
  }
  return sum;
}

// grad_x[b, c, ih, iw] from the multiplier output channels of input channel c.
template <typename scalar_t, typename acc_t, typename index_t>
CONDCONV_HD acc_t depthwise_grad_input(const scalar_t* grad_out, const Shape<index_t>& s,
                                       const acc_t* taps, index_t b, index_t c, index_t ih,
                                       index_t iw) {
  const index_t mult = s.out_per_group();
  acc_t sum = 0;
  for (index_t m = 0; m < mult; ++m) {
    for (index_t i = 0; i < s.kernel_h; ++i) {
      for (index_t j = 0; j < s.kernel_w; ++j) {
        sum += taps[(m * s.kernel_h + i) * s.kernel_w + j] *
               grad_through_tap<scalar_t, acc_t>(grad_out, s, b, c * mult + m, ih, iw, i, j);
      }
    }
  }
  return sum;
}

// One term of G_b[co, tap]: grad_out[b, co, p] times the input pixel tap t reads for p.
template <typename scalar_t, typename acc_t, typename index_t>
CONDCONV_HD acc_t depthwise_kernel_grad_term(const scalar_t* grad_out, const scalar_t* x,
                                             const Shape<index_t>& s, index_t b, index_t co,
                                             index_t t, index_t p) {
  const index_t oh = p / s.out_w, ow = p - oh * s.out_w;
  const index_t i = quot(t, s.kernel_w), j = t - i * s.kernel_w;
  const acc_t g = static_cast<acc_t>(grad_out[b * s.out_stride[0] + co * s.out_stride[1] +
                                              oh * s.out_stride[2] + ow * s.out_stride[3]]);
  return g * load_x<scalar_t, acc_t>(x, s, b, quot(co, s.out_per_group()),
                                     oh * s.stride_h - s.pad_top + i * s.dilation_h,
                                     ow * s.stride_w - s.pad_left + j * s.dilation_w);
}

}  // namespace cuda
}  // namespace condconv
