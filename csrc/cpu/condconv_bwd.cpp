// CPU backward. With G_b the per-example kernel gradient (what conv2d's grad_weight would be for
// example b alone):
//   grad_x[b]          = conv_transpose(grad_out[b], W_b)   (W_b mixed again into scratch)
//   grad_routing[b, e] = <G_b, W[e]> + <sum_hw grad_out[b], bias[e]>
//   grad_weight[e]     = sum_b routing[b, e] G_b
//   grad_bias[e]       = sum_b routing[b, e] sum_hw grad_out[b]
// The batch is walked in chunks of as many examples as there are threads: each thread writes
// its examples' G_b into a (chunk x |W|) buffer, then one GEMM adds routing^T G into
// grad_weight in a fixed order. Memory stays O(E |W| + threads |W|) and the result does not
// depend on scheduling (deterministic).
#include "kernel_utils.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

namespace condconv {
namespace cpu {
namespace {

// One example of a depthwise convolution (Cin/g == 1). wmix/dx may be null (no grad_x), G may
// be null (no kernel gradient). dx is contiguous (Cin, H, W).
template <typename scalar_t, typename acc_t>
void depthwise_backward_one(const scalar_t* x, const Strides& xs, const scalar_t* gout,
                            const Strides& gs, const acc_t* wmix, acc_t* G, acc_t* dx,
                            const Geometry& g) {
  const int64_t taps = g.kernel_h * g.kernel_w;
  const int64_t plane = g.height * g.width;
  for (int64_t co = 0; co < g.out_channels; ++co) {
    const int64_t ci = co / g.out_per_group();
    for (int64_t i = 0; i < g.kernel_h; ++i) {
      const int64_t off_h = i * g.dilation_h - g.pad_top;
      for (int64_t j = 0; j < g.kernel_w; ++j) {
        const int64_t off_w = j * g.dilation_w - g.pad_left;
        int64_t lo, hi;
        valid_range(off_w, g.stride_w, g.width, g.out_w, lo, hi);
        const acc_t tap = wmix ? wmix[co * taps + i * g.kernel_w + j] : acc_t(0);
        const int64_t xstep = g.stride_w * xs.w;
        acc_t sum = 0;
        for (int64_t oh = 0; oh < g.out_h; ++oh) {
          const int64_t ih = oh * g.stride_h + off_h;
          if (ih < 0 || ih >= g.height) continue;
          const scalar_t* gr = gout + co * gs.c + oh * gs.h;
          if (G) {
            const scalar_t* xr = x + ci * xs.c + ih * xs.h + off_w * xs.w;
            for (int64_t ow = lo; ow < hi; ++ow) {
              sum += static_cast<acc_t>(gr[ow * gs.w]) * static_cast<acc_t>(xr[ow * xstep]);
            }
          }
          if (dx) {
            acc_t* dr = dx + ci * plane + ih * g.width + off_w;
            for (int64_t ow = lo; ow < hi; ++ow) {
              dr[ow * g.stride_w] += tap * static_cast<acc_t>(gr[ow * gs.w]);
            }
          }
        }
        if (G) G[co * taps + i * g.kernel_w + j] = sum;
      }
    }
  }
}

template <typename scalar_t>
void backward_typed(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& routing,
                    const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                    const Geometry& g, std::array<bool, 4> mask, at::Tensor& grad_x,
                    at::Tensor& grad_routing, at::Tensor& grad_weight, at::Tensor& grad_bias) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
  const auto acc_opts = x.options().dtype(acc_type);
  const bool need_dx = mask[0], need_dr = mask[1], need_dw = mask[2], need_db = mask[3];
  const bool need_kernel_grad = need_dr || need_dw;
  const int64_t N = g.kernel_numel();
  const int64_t K = g.k();
  const int64_t L = g.out_pixels();
  const int64_t cin_g = g.in_per_group();
  const int64_t cout_g = g.out_per_group();

  const at::Tensor r = routing.to(acc_type).contiguous();
  const at::Tensor w = weight.to(acc_type).contiguous().view({g.experts, N});

  // The bias terms only need grad_out summed over pixels: (B, Cout).
  at::Tensor gsum;
  if (bias.has_value() && (need_dr || need_db)) gsum = grad_out.sum({2, 3}, false, acc_type);
  if (need_db) grad_bias.copy_(at::mm(r.t(), gsum));
  at::Tensor gr_acc;
  if (need_dr) {
    gr_acc = bias.has_value() ? at::mm(gsum, bias->to(acc_type).t()).contiguous()
                              : at::zeros({g.batch, g.experts}, acc_opts);
  }
  at::Tensor gw_acc = need_dw ? at::zeros({g.experts, N}, acc_opts) : at::Tensor();

  const int64_t chunk = std::max<int64_t>(1, std::min<int64_t>(g.batch, at::get_num_threads()));
  at::Tensor kgrad = need_kernel_grad ? at::empty({chunk, N}, acc_opts) : at::Tensor();

  const Strides xs(x), gs(grad_out);
  const Strides dxs = need_dx ? Strides(grad_x) : xs;
  const scalar_t* x_ptr = x.const_data_ptr<scalar_t>();
  const scalar_t* g_ptr = grad_out.const_data_ptr<scalar_t>();
  scalar_t* dx_ptr = need_dx ? grad_x.mutable_data_ptr<scalar_t>() : nullptr;
  const acc_t* r_ptr = r.const_data_ptr<acc_t>();
  const acc_t* w_ptr = w.const_data_ptr<acc_t>();
  acc_t* gr_ptr = need_dr ? gr_acc.mutable_data_ptr<acc_t>() : nullptr;
  acc_t* kg_ptr = need_kernel_grad ? kgrad.mutable_data_ptr<acc_t>() : nullptr;

  for (int64_t c0 = 0; c0 < g.batch; c0 += chunk) {
    const int64_t c1 = std::min(g.batch, c0 + chunk);
    at::parallel_for(c0, c1, 1, [&](int64_t b0, int64_t b1) {
      // Dispatch state is thread-local: worker threads need the guard of their own.
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      const bool dense = !g.depthwise();
      at::Tensor wmix = need_dx ? at::empty({g.out_channels, K}, acc_opts) : at::Tensor();
      at::Tensor col = (dense && need_kernel_grad) ? at::empty({K, L}, acc_opts) : at::Tensor();
      at::Tensor colg = (dense && need_dx) ? at::empty({K, L}, acc_opts) : at::Tensor();
      at::Tensor dx = need_dx ? at::empty({g.in_channels * g.height * g.width}, acc_opts)
                              : at::Tensor();
      acc_t* wmix_ptr = need_dx ? wmix.mutable_data_ptr<acc_t>() : nullptr;
      acc_t* dx_acc = need_dx ? dx.mutable_data_ptr<acc_t>() : nullptr;
      for (int64_t b = b0; b < b1; ++b) {
        acc_t* G = need_kernel_grad ? kg_ptr + (b - c0) * N : nullptr;
        if (need_dx) {
          mix_experts<acc_t>(w_ptr, r_ptr + b * g.experts, g.experts, N, wmix_ptr);
          dx.zero_();
        }
        if (!dense) {
          depthwise_backward_one<scalar_t, acc_t>(x_ptr + b * xs.n, xs, g_ptr + b * gs.n, gs,
                                                  wmix_ptr, G, dx_acc, g);
        } else {
          for (int64_t gi = 0; gi < g.groups; ++gi) {
            const at::Tensor gmat =
                as_matrix(grad_out.select(0, b).narrow(0, gi * cout_g, cout_g), cout_g, L, acc_type);
            if (need_kernel_grad) {
              im2col<scalar_t, acc_t>(x_ptr + b * xs.n + gi * cin_g * xs.c, xs, g,
                                      col.mutable_data_ptr<acc_t>());
              at::Tensor G_group =
                  kgrad.select(0, b - c0).narrow(0, gi * cout_g * K, cout_g * K).view({cout_g, K});
              at::mm_out(G_group, gmat, col.t());
            }
            if (need_dx) {
              at::mm_out(colg, wmix.narrow(0, gi * cout_g, cout_g).t(), gmat);
              col2im_add<acc_t>(colg.const_data_ptr<acc_t>(), g,
                                dx_acc + gi * cin_g * g.height * g.width);
            }
          }
        }
        if (need_dx) {
          store_plane<scalar_t, acc_t>(dx_acc, nullptr, g.in_channels, g.height, g.width,
                                       dx_ptr + b * dxs.n, dxs.c, dxs.h, dxs.w);
        }
        if (need_dr) {
          for (int64_t e = 0; e < g.experts; ++e) {
            const acc_t* we = w_ptr + e * N;
            acc_t dot = 0;
            for (int64_t i = 0; i < N; ++i) dot += G[i] * we[i];
            gr_ptr[b * g.experts + e] += dot;
          }
        }
      }
    });
    if (need_dw) gw_acc.addmm_(r.narrow(0, c0, c1 - c0).t(), kgrad.narrow(0, 0, c1 - c0));
  }
  if (need_dw) grad_weight.copy_(gw_acc.view(weight.sizes()));
  if (need_dr) grad_routing.copy_(gr_acc);
}

}  // namespace

void backward(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& routing,
              const at::Tensor& weight, const c10::optional<at::Tensor>& bias, const Geometry& g,
              std::array<bool, 4> output_mask, at::Tensor& grad_x, at::Tensor& grad_routing,
              at::Tensor& grad_weight, at::Tensor& grad_bias) {
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "condconv2d_backward_cpu", [&] {
        backward_typed<scalar_t>(grad_out, x, routing, weight, bias, g, output_mask, grad_x,
                                 grad_routing, grad_weight, grad_bias);
      });
}

}  // namespace cpu
}  // namespace condconv
