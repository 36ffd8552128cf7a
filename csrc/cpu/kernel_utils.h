// Building blocks shared by the CPU forward and backward kernels: work partitioning, the expert
// mix into scratch, im2col / col2im reading and writing through arbitrary strides, padded planes
// for the depthwise kernels, and strided stores.
#pragma once

#include "../condconv.h"
#include "../epilogue.h"
#include "../operands.h"

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/accumulate.h>

#include <algorithm>
#include <cmath>
#include <array>

namespace condconv {
namespace cpu {

// A 4-D tensor's element strides; (n, c, h, w).
struct Strides {
  int64_t n, c, h, w;
  explicit Strides(const at::Tensor& t)
      : n(t.stride(0)), c(t.stride(1)), h(t.stride(2)), w(t.stride(3)) {}
};

// Mixed kernels (or per-example kernel gradients) are materialised for a chunk of examples at a
// time: as many as there are threads, or more while they fit this budget. Memory stays
// O(E |W| + threads |W|) and the mix is one GEMM per chunk: routing[chunk] (n x E) @ W (E x |W|).
constexpr int64_t kChunkBytes = 16 * 1024 * 1024;

inline int64_t batch_chunk(const Geometry& g, int64_t elem_size) {
  const int64_t fit = kChunkBytes / std::max<int64_t>(1, g.kernel_numel() * elem_size);
  const int64_t n = std::max<int64_t>(at::get_num_threads(), fit);
  return std::max<int64_t>(1, std::min(g.batch, n));
}

// The chunk buffers are kept by the calling thread between calls (bounded by kChunkBytes, or
// threads x |W| for larger kernels): freshly allocated, a buffer of that size would be mapped
// and page-faulted in on every call.
enum class Slot { kMixed = 0, kKernelGrad = 1 };

inline at::Tensor workspace(Slot slot, at::IntArrayRef sizes, const at::TensorOptions& opts) {
  static thread_local std::array<at::Tensor, 2> buffers;
  at::Tensor& buf = buffers[static_cast<int>(slot)];
  const int64_t n = c10::multiply_integers(sizes);
  if (!buf.defined() || buf.numel() < n || buf.scalar_type() != opts.dtype().toScalarType()) {
    buf = at::empty({n}, opts);
  }
  return buf.narrow(0, 0, n).view(sizes);
}

// sum_q a[q] b[q]. The simd reduction lets the compiler vectorise it (on its own it may not
// reorder a floating-point sum); the order is fixed at compile time, so results are deterministic.
template <typename T>
inline T dot(const T* a, const T* b, int64_t n) {
  T sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t q = 0; q < n; ++q) sum += a[q] * b[q];
  return sum;
}

// sum_q a[q] b[q] over a (rows, len) block stored with row pitch `pitch` (len <= pitch) in both:
// the pitched dot product `dot(a, b, (rows - 1) * pitch + len)` without the columns between
// rows. The depthwise kernel gradients take the pitched form (one long vectorised dot, a's gap
// columns zero) and fall back to this one when it comes out non-finite: a NaN/Inf pixel of x in
// a gap column, outside every window of the tap, meets a zero there (0 * Inf = NaN).
template <typename T>
inline T pitched_dot(const T* a, const T* b, int64_t rows, int64_t pitch, int64_t len) {
  const int64_t span = (rows - 1) * pitch + len;
  const T sum = dot(a, b, span);
  if (std::isfinite(sum) || pitch == len) return sum;
  T exact = 0;
  for (int64_t r = 0; r < rows; ++r) exact += dot(a + r * pitch, b + r * pitch, len);
  return exact;
}

// Output positions o in [lo, hi) with 0 <= o * stride + offset < size. No intermediate
// overflows for any stride up to 2**63 - 1 (ceil(a / s) is taken as (a - 1) / s + 1).
inline void valid_range(int64_t offset, int64_t stride, int64_t size, int64_t out_size,
                        int64_t& lo, int64_t& hi) {
  lo = offset >= 0 ? 0 : (-offset - 1) / stride + 1;
  hi = offset > size - 1 ? 0 : (size - 1 - offset) / stride + 1;
  hi = std::min(hi, out_size);
  lo = std::min(lo, hi);
}

// Calls fn(i, j, off_h, off_w, lo, hi) for every kernel tap (i, j): the input offsets of the
// tap relative to output (0, 0) and the range [lo, hi) of output columns that read inside x.
template <typename Fn>
inline void for_each_tap(const Geometry& g, Fn&& fn) {
  for (int64_t i = 0; i < g.kernel_h; ++i) {
    const int64_t off_h = i * g.dilation_h - g.pad_top;
    for (int64_t j = 0; j < g.kernel_w; ++j) {
      const int64_t off_w = j * g.dilation_w - g.pad_left;
      int64_t lo, hi;
      valid_range(off_w, g.stride_w, g.width, g.out_w, lo, hi);
      fn(i, j, off_h, off_w, lo, hi);
    }
  }
}

// out[i] = sum_e r[e] * w[e * expert_stride + i] for i < n: a few mixed depthwise taps.
template <typename acc_t>
void mix_experts(const acc_t* w, int64_t expert_stride, const acc_t* r, int64_t experts,
                 int64_t n, acc_t* out) {
  constexpr int64_t kBlock = 1024;
  for (int64_t i0 = 0; i0 < n; i0 += kBlock) {
    const int64_t i1 = std::min(n, i0 + kBlock);
    const acc_t r0 = r[0];
    for (int64_t i = i0; i < i1; ++i) out[i] = r0 * w[i];
    for (int64_t e = 1; e < experts; ++e) {
      const acc_t re = r[e];
      const acc_t* we = w + e * expert_stride;
      for (int64_t i = i0; i < i1; ++i) out[i] += re * we[i];
    }
  }
}

// col[k, l] for `channels` input channels of one example, k = (c, i, j) over (channels, kh, kw)
// and l = (oh, ow): the input patch values (zero in the padding). x points at the first channel.
template <typename scalar_t, typename acc_t>
void im2col(const scalar_t* x, const Strides& s, const Geometry& g, int64_t channels, acc_t* col) {
  const int64_t L = g.out_pixels();
  for (int64_t c = 0; c < channels; ++c) {
    for_each_tap(g, [&](int64_t i, int64_t j, int64_t off_h, int64_t off_w, int64_t lo,
                        int64_t hi) {
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
        // (ow * stride_w) * s.w: an offset inside x; stride_w * s.w alone may overflow when a
        // huge stride leaves one output column.
        for (int64_t ow = lo; ow < hi; ++ow) r[ow] = static_cast<acc_t>(xr[ow * g.stride_w * s.w]);
      }
    });
  }
}

// The adjoint of im2col: adds col[k, l] into dx, a contiguous (channels, H, W) buffer.
template <typename acc_t>
void col2im_add(const acc_t* col, const Geometry& g, int64_t channels, acc_t* dx) {
  const int64_t L = g.out_pixels();
  const int64_t plane = g.height * g.width;
  for (int64_t c = 0; c < channels; ++c) {
    for_each_tap(g, [&](int64_t i, int64_t j, int64_t off_h, int64_t off_w, int64_t lo,
                        int64_t hi) {
      const acc_t* row = col + ((c * g.kernel_h + i) * g.kernel_w + j) * L;
      for (int64_t oh = 0; oh < g.out_h; ++oh) {
        const int64_t ih = oh * g.stride_h + off_h;
        if (ih < 0 || ih >= g.height) continue;
        const acc_t* r = row + oh * g.out_w;
        acc_t* d = dx + c * plane + ih * g.width + off_w;
        for (int64_t ow = lo; ow < hi; ++ow) d[ow * g.stride_w] += r[ow];
      }
    });
  }
}

// The padded input plane of one channel, (Hp, Wp) = (H + pad_top + pad_bottom, W + pad_left +
// pad_right), contiguous, zero in the padding: the depthwise kernels then index without bounds
// checks.
template <typename scalar_t, typename acc_t>
void padded_plane(const scalar_t* x, int64_t sh, int64_t sw, const Geometry& g, acc_t* plane) {
  const int64_t wp = g.width + g.pad_left + g.pad_right;
  const int64_t hp = g.height + g.pad_top + g.pad_bottom;
  std::fill(plane, plane + g.pad_top * wp, acc_t(0));
  for (int64_t h = 0; h < g.height; ++h) {
    acc_t* row = plane + (h + g.pad_top) * wp;
    std::fill(row, row + g.pad_left, acc_t(0));
    const scalar_t* xr = x + h * sh;
    for (int64_t w = 0; w < g.width; ++w) row[g.pad_left + w] = static_cast<acc_t>(xr[w * sw]);
    std::fill(row + g.pad_left + g.width, row + wp, acc_t(0));
  }
  std::fill(plane + (g.pad_top + g.height) * wp, plane + hp * wp, acc_t(0));
}

// dst[c, h, w] (strided) = src[c, h, w] (contiguous) + add[c] (add may be null).
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

// Whether the windows read a small part of a large input plane (a stride far past the kernel,
// over a huge input such as a stride-0 view): the direct depthwise kernels copy whole padded
// planes (GBs there), so such calls take the dense kernels, whose im2col reads the windows only.
// Ordinary layers (planes under 4M pixels, or windows covering a quarter of the plane) never do.
inline bool windows_sparse_in_plane(const Geometry& g) {
  const double plane = static_cast<double>(g.height + g.pad_top + g.pad_bottom) *
                       static_cast<double>(g.width + g.pad_left + g.pad_right);
  const double read = 4.0 * static_cast<double>(g.out_pixels()) * g.kernel_h * g.kernel_w;
  return plane > static_cast<double>(int64_t{1} << 22) && plane > read;
}

// Whether an input's (h, w) plane is one run of equal strides (contiguous or channels_last):
// its pixels are then one strided dimension.
inline bool plane_is_one_run(const Geometry& g, const Strides& xs) {
  return g.height == 1 || xs.h == g.width * xs.w;
}

// A pointwise convolution over such a plane reads x as the GEMM operand directly, without
// im2col.
template <typename scalar_t>
bool reads_x_directly(const Geometry& g, const Strides& xs) {
  return std::is_same<scalar_t, at::opmath_type<scalar_t>>::value && g.pointwise() &&
         plane_is_one_run(g, xs);
}

// A batch of 1x1 GEMMs written in place: dst[i] = a[i] @ b[i], plus each row's shift[i] (a
// (n, M) tensor, or undefined) broadcast along the row. dst is a strided (n, M, N) view of an
// activation (NCHW: N contiguous; channels_last: M contiguous); for channels_last the transposed
// product dst^T = b^T a^T is computed, so the batched GEMM always writes contiguous rows.
// Returns false, doing nothing, where dst is neither.
inline bool batched_gemm_into(at::Tensor dst, at::Tensor a, at::Tensor b,
                              const at::Tensor& shift) {
  const int64_t n = dst.size(0), M = dst.size(1), N = dst.size(2);
  const bool rows = dst.stride(2) == 1 && dst.stride(1) == N && dst.stride(0) == M * N;
  const bool cols = dst.stride(1) == 1 && dst.stride(2) == M && dst.stride(0) == M * N;
  if (!rows && !cols) return false;
  at::Tensor bias = shift.defined() ? shift.unsqueeze(2).expand({n, M, N}) : at::Tensor();
  if (cols) {
    std::swap(a, b);
    a = a.transpose(1, 2);
    b = b.transpose(1, 2);
    dst = dst.transpose(1, 2);
    if (bias.defined()) bias = bias.transpose(1, 2);
  }
  if (bias.defined()) {
    dst.copy_(bias);
    dst.baddbmm_(a, b);
  } else {
    at::bmm_out(dst, a, b);
  }
  return true;
}

// The (Cin/g * kh * kw, Ho * Wo) GEMM operand of example b, group gi: a view of x where it
// reads_x_directly, else x's im2col written into col (a (K, L) scratch of the caller's).
template <typename scalar_t, typename acc_t>
at::Tensor gemm_operand(const at::Tensor& x, const Strides& xs, const Geometry& g, bool direct,
                        int64_t b, int64_t gi, at::Tensor& col) {
  const int64_t cin_g = g.in_per_group();
  if (direct) {
    return x.as_strided({g.k(), g.out_pixels()}, {xs.c, xs.w},
                        x.storage_offset() + b * xs.n + gi * cin_g * xs.c);
  }
  im2col<scalar_t, acc_t>(x.const_data_ptr<scalar_t>() + b * xs.n + gi * cin_g * xs.c, xs, g,
                          cin_g, col.mutable_data_ptr<acc_t>());
  return col;
}

}  // namespace cpu
}  // namespace condconv
