// CPU forward: one example per task. Each task mixes its kernel W_b into thread-private scratch
// (E * |W| multiply-adds), then convolves: im2col + GEMM per group for dense convolutions (the
// im2col is skipped for 1x1 / stride 1 / unpadded inputs whose channels are a plain matrix),
// a direct loop with the mixed taps for depthwise ones.
#include "kernel_utils.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

namespace condconv {
namespace cpu {
namespace {

template <typename scalar_t, typename acc_t>
void depthwise_forward_one(const scalar_t* x, const Strides& xs, const acc_t* wmix,
                           const acc_t* bias_mix, const Geometry& g, acc_t* y, scalar_t* out,
                           const Strides& os) {
  const int64_t L = g.out_pixels();
  const int64_t taps = g.kernel_h * g.kernel_w;
  for (int64_t co = 0; co < g.out_channels; ++co) {
    const scalar_t* xc = x + (co / g.out_per_group()) * xs.c;
    const acc_t* w = wmix + co * taps;
    std::fill(y, y + L, acc_t(0));
    for (int64_t i = 0; i < g.kernel_h; ++i) {
      const int64_t off_h = i * g.dilation_h - g.pad_top;
      for (int64_t j = 0; j < g.kernel_w; ++j) {
        const int64_t off_w = j * g.dilation_w - g.pad_left;
        const acc_t tap = w[i * g.kernel_w + j];
        int64_t lo, hi;
        valid_range(off_w, g.stride_w, g.width, g.out_w, lo, hi);
        const int64_t step = g.stride_w * xs.w;
        for (int64_t oh = 0; oh < g.out_h; ++oh) {
          const int64_t ih = oh * g.stride_h + off_h;
          if (ih < 0 || ih >= g.height) continue;
          const scalar_t* xr = xc + ih * xs.h + off_w * xs.w;
          acc_t* yr = y + oh * g.out_w;
          for (int64_t ow = lo; ow < hi; ++ow) yr[ow] += tap * static_cast<acc_t>(xr[ow * step]);
        }
      }
    }
    store_plane<scalar_t, acc_t>(y, bias_mix ? bias_mix + co : nullptr, 1, g.out_h, g.out_w,
                                 out + co * os.c, os.c, os.h, os.w);
  }
}

template <typename scalar_t>
void forward_typed(const at::Tensor& x, const at::Tensor& routing, const at::Tensor& weight,
                   const c10::optional<at::Tensor>& bias, const Geometry& g, at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
  const auto acc_opts = x.options().dtype(acc_type);
  const int64_t N = g.kernel_numel();
  const int64_t K = g.k();
  const int64_t L = g.out_pixels();
  const int64_t cin_g = g.in_per_group();
  const int64_t cout_g = g.out_per_group();

  const at::Tensor r = routing.to(acc_type).contiguous();
  const at::Tensor w = weight.to(acc_type).contiguous().view({g.experts, N});
  // Mixed biases are B x Cout: small, so computed for the whole batch at once.
  const at::Tensor bias_mix =
      bias.has_value() ? at::mm(r, bias->to(acc_type)).contiguous() : at::Tensor();

  const Strides xs(x), os(out);
  const scalar_t* x_ptr = x.const_data_ptr<scalar_t>();
  scalar_t* out_ptr = out.mutable_data_ptr<scalar_t>();
  const acc_t* r_ptr = r.const_data_ptr<acc_t>();
  const acc_t* w_ptr = w.const_data_ptr<acc_t>();
  const acc_t* bm_ptr = bias_mix.defined() ? bias_mix.const_data_ptr<acc_t>() : nullptr;

  // A 1x1, stride-1, unpadded convolution reads its input block as the GEMM operand directly
  // when the (h, w) plane is one run of equal strides (contiguous or channels_last).
  const bool direct_operand = std::is_same<scalar_t, acc_t>::value && g.kernel_h == 1 &&
                              g.kernel_w == 1 && g.stride_h == 1 && g.stride_w == 1 &&
                              g.pad_top == 0 && g.pad_bottom == 0 && g.pad_left == 0 &&
                              g.pad_right == 0 && (g.height == 1 || xs.h == g.width * xs.w);

  at::parallel_for(0, g.batch, 1, [&](int64_t b0, int64_t b1) {
    // Dispatch state is thread-local: worker threads need the guard of their own.
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    at::Tensor wmix = at::empty({g.out_channels, K}, acc_opts);
    at::Tensor y = at::empty({cout_g, L}, acc_opts);
    at::Tensor col = (g.depthwise() || direct_operand) ? at::Tensor() : at::empty({K, L}, acc_opts);
    acc_t* wmix_ptr = wmix.mutable_data_ptr<acc_t>();
    acc_t* y_ptr = y.mutable_data_ptr<acc_t>();
    for (int64_t b = b0; b < b1; ++b) {
      mix_experts<acc_t>(w_ptr, r_ptr + b * g.experts, g.experts, N, wmix_ptr);
      const scalar_t* xb = x_ptr + b * xs.n;
      scalar_t* ob = out_ptr + b * os.n;
      const acc_t* bmb = bm_ptr ? bm_ptr + b * g.out_channels : nullptr;
      if (g.depthwise()) {
        depthwise_forward_one<scalar_t, acc_t>(xb, xs, wmix_ptr, bmb, g, y_ptr, ob, os);
        continue;
      }
      for (int64_t gi = 0; gi < g.groups; ++gi) {
        at::Tensor operand;
        if (direct_operand) {
          operand = x.as_strided({cin_g, L}, {xs.c, xs.w},
                                 x.storage_offset() + b * xs.n + gi * cin_g * xs.c);
        } else {
          im2col<scalar_t, acc_t>(xb + gi * cin_g * xs.c, xs, g, col.mutable_data_ptr<acc_t>());
          operand = col;
        }
        at::mm_out(y, wmix.narrow(0, gi * cout_g, cout_g), operand);
        store_plane<scalar_t, acc_t>(y_ptr, bmb ? bmb + gi * cout_g : nullptr, cout_g, g.out_h,
                                     g.out_w, ob + gi * cout_g * os.c, os.c, os.h, os.w);
      }
    }
  });
}

}  // namespace

void forward(const at::Tensor& x, const at::Tensor& routing, const at::Tensor& weight,
             const c10::optional<at::Tensor>& bias, const Geometry& g, at::Tensor& out) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "condconv2d_cpu",
                                  [&] { forward_typed<scalar_t>(x, routing, weight, bias, g, out); });
}

}  // namespace cpu
}  // namespace condconv
