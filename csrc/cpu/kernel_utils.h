// Building blocks shared by the CPU forward and backward kernels: the expert mix into scratch,
// im2col / col2im reading and writing through arbitrary strides, and strided stores.
#pragma once

#include "../condconv.h"

#include <algorithm>

namespace condconv {
namespace cpu {

// A 4-D tensor's element strides; (n, c, h, w).
struct Strides {
  int64_t n, c, h, w;
  explicit Strides(const at::Tensor& t) : n(t.stride(0)), c(t.stride(1)), h(t.stride(2)), w(t.stride(3)) {}
};

// Output positions o in [lo, hi) with 0 <= o * stride + offset < size.
inline void valid_range(int64_t offset, int64_t stride, int64_t size, int64_t out_size,
                        int64_t& lo, int64_t& hi) {
  lo = offset >= 0 ? 0 : (-offset + stride - 1) / stride;
  hi = offset > size - 1 ? 0 : (size - 1 - offset) / stride + 1;
  hi = std::min(hi, out_size);
  lo = std::min(lo, hi);
}

// out[i] = sum_e r[e] * w[e * n + i]: one example's mixed kernel, blocked so that the block of
// out being accumulated stays in L1 while the E expert rows stream past.
template <typename acc_t>
void mix_experts(const acc_t* w, const acc_t* r, int64_t experts, int64_t n, acc_t* out) {
  constexpr int64_t kBlock = 1024;
  for (int64_t i0 = 0; i0 < n; i0 += kBlock) {
    const int64_t i1 = std::min(n, i0 + kBlock);
    const acc_t r0 = r[0];
    for (int64_t i = i0; i < i1; ++i) out[i] = r0 * w[i];
    for (int64_t e = 1; e < experts; ++e) {
      const acc_t re = r[e];
      const acc_t* we = w + e * n;
      for (int64_t i = i0; i < i1; ++i) out[i] += re * we[i];
    }
  }
}

// col[k, l] for one group of one example, k = (c, i, j) over (Cin/g, kh, kw) and
// l = (oh, ow): the input patch values (zero in the padding). x points at channel 0 of the group.
template <typename scalar_t, typename acc_t>
void im2col(const scalar_t* x, const Strides& s, const Geometry& g, acc_t* col) {
  const int64_t L = g.out_pixels();
  for (int64_t c = 0; c < g.in_per_group(); ++c) {
    for (int64_t i = 0; i < g.kernel_h; ++i) {
      const int64_t off_h = i * g.dilation_h - g.pad_top;
      for (int64_t j = 0; j < g.kernel_w; ++j) {
        const int64_t off_w = j * g.dilation_w - g.pad_left;
        int64_t lo, hi;
        valid_range(off_w, g.stride_w, g.width, g.out_w, lo, hi);
        acc_t* row = col + ((c * g.kernel_h + i) * g.kernel_w + j) * L;
        for (int64_t oh = 0; oh < g.out_h; ++oh) {
          acc_t* r = row + oh * g.out_w;
          const int64_t ih = oh * g.stride_h + off_h;
          if (ih < 0 || ih >= g.height) {
            std::fill(r, r + g.out_w, acc_t(0));
            continue;
          }
          std::fill(r, r + lo, acc_t(0));
          std::fill(r + hi, r + g.out_w, acc_t(0));
          const scalar_t* xr = x + c * s.c + ih * s.h + off_w * s.w;
          const int64_t step = g.stride_w * s.w;
          for (int64_t ow = lo; ow < hi; ++ow) r[ow] = static_cast<acc_t>(xr[ow * step]);
        }
      }
    }
  }
}

// The adjoint of im2col: adds col[k, l] into the input-shaped buffer dx (contiguous
// (Cin/g, H, W) for this group).
template <typename acc_t>
void col2im_add(const acc_t* col, const Geometry& g, acc_t* dx) {
  const int64_t L = g.out_pixels();
  const int64_t plane = g.height * g.width;
  for (int64_t c = 0; c < g.in_per_group(); ++c) {
    for (int64_t i = 0; i < g.kernel_h; ++i) {
      const int64_t off_h = i * g.dilation_h - g.pad_top;
      for (int64_t j = 0; j < g.kernel_w; ++j) {
        const int64_t off_w = j * g.dilation_w - g.pad_left;
        int64_t lo, hi;
        valid_range(off_w, g.stride_w, g.width, g.out_w, lo, hi);
        const acc_t* row = col + ((c * g.kernel_h + i) * g.kernel_w + j) * L;
        for (int64_t oh = 0; oh < g.out_h; ++oh) {
          const int64_t ih = oh * g.stride_h + off_h;
          if (ih < 0 || ih >= g.height) continue;
          const acc_t* r = row + oh * g.out_w;
          acc_t* d = dx + c * plane + ih * g.width + off_w;
          for (int64_t ow = lo; ow < hi; ++ow) d[ow * g.stride_w] += r[ow];
        }
      }
    }
  }
}

// dst[c, p] (strided, p = (h, w) over a rows x (h_size x w_size) block) = src[c, p] + add[c].
template <typename scalar_t, typename acc_t>
void store_plane(const acc_t* src, const acc_t* add, int64_t channels, int64_t h_size,
                 int64_t w_size, scalar_t* dst, int64_t sc, int64_t sh, int64_t sw) {
  for (int64_t c = 0; c < channels; ++c) {
    const acc_t a = add ? add[c] : acc_t(0);
    for (int64_t h = 0; h < h_size; ++h) {
      const acc_t* s = src + (c * h_size + h) * w_size;
      scalar_t* d = dst + c * sc + h * sh;
      for (int64_t w = 0; w < w_size; ++w) d[w * sw] = static_cast<scalar_t>(s[w] + a);
    }
  }
}

// A (rows x cols) matrix view of one example's group, in the accumulation dtype: a view when
// the dtype already matches and the strides allow it, a converted copy otherwise.
inline at::Tensor as_matrix(const at::Tensor& block, int64_t rows, int64_t cols,
                            at::ScalarType acc) {
  return block.reshape({rows, cols}).to(acc);
}

}  // namespace cpu
}  // namespace condconv
