// CPU backward. With G_b the per-example kernel gradient (what conv2d's grad_weight would be for
// example b alone):
//   grad_x[b]          = conv_transpose(grad_out[b], W_b)
//   grad_routing[b, e] = <G_b, W[e]> + <sum_hw grad_out[b], bias[e]>
//   grad_weight[e]     = sum_b routing[b, e] G_b
//   grad_bias[e]       = sum_b routing[b, e] sum_hw grad_out[b]
// Every result is written by one task, or reduced in a fixed order, so the result does not
// depend on scheduling (deterministic):
// - dense: chunks of examples (batch_chunk); per (example, group) task G_b and grad_x[b]; per
//   chunk two GEMMs fold G into grad_weight and grad_routing (see dense_backward);
// - depthwise, float32 NCHW: one grouped convolution_backward (aten_grouped.h), then
//   grad_weight = r^T G and grad_routing = G W^T as two GEMMs;
// - other depthwise: a task owns an input channel (and its output channels) over the whole batch and
//   writes its own partial of grad_routing, summed in channel order at the end.
// Memory beyond the outputs: the chunk's mixed kernels and G (O(threads |W|), bounded), per-task
// scratch, and (Cin x B x E) partials for depthwise.
#include "paths.h"

#include <ATen/Dispatch.h>

namespace condconv {
namespace cpu {
namespace {

template <typename acc_t>
struct Grads {
  acc_t* routing_parts;  // (tasks, B, E) partials of grad_routing, or null
  acc_t* weight;         // (E, |W|) accumulation-dtype grad_weight, or null
};

// Dense convolutions, a chunk of examples at a time (batch_chunk): per (example, group) task,
// G_b (GEMM of grad_out with the im2col columns) into the chunk's G buffer and grad_x (GEMM of
// the mixed kernel's transpose with grad_out, then col2im); per chunk, grad_weight +=
// routing[chunk]^T @ G and grad_routing[chunk] = G @ W^T (two GEMMs, in chunk order).
template <typename scalar_t>
void dense_backward(const at::Tensor& grad_out, const at::Tensor& x,
                    const Operands<scalar_t>& ops, const Geometry& g, at::Tensor* grad_x,
                    const KernelGradFold& fold) {
  using acc_t = typename Operands<scalar_t>::acc_t;
  const int64_t N = g.kernel_numel(), K = g.k(), L = g.out_pixels();
  const int64_t cin_g = g.in_per_group(), cout_g = g.out_per_group();
  const int64_t plane = g.height * g.width;
  const bool need_kernel_grad = fold.wanted();
  const Strides xs(x);
  const Strides dxs = grad_x ? Strides(*grad_x) : xs;
  const bool direct = reads_x_directly<scalar_t>(g, xs);
  // 1x1: grad_x[b] = W_b^T grad_out[b] is written by the GEMM in place when grad_x's (h, w) is
  // one run of strides with channel or pixel stride 1 (as the forward's output).
  const bool write_dx = grad_x && direct && (g.height == 1 || dxs.h == g.width * dxs.w) &&
                        (dxs.w == 1 || dxs.c == 1);
  const int64_t chunk = batch_chunk(g, sizeof(acc_t));
  at::Tensor wmix = grad_x ? workspace(Slot::kMixed, {chunk, g.out_channels, K}, ops.acc_opts)
                           : at::Tensor();
  at::Tensor G = need_kernel_grad
                     ? workspace(Slot::kKernelGrad, {chunk, g.out_channels, K}, ops.acc_opts)
                     : at::Tensor();
  scalar_t* dx_ptr = grad_x ? grad_x->mutable_data_ptr<scalar_t>() : nullptr;

  // Ungrouped 1x1, grad_out and grad_x NCHW or channels_last: the chunk's GEMMs are batched
  // GEMMs, whose threads share each example, as in the forward.
  const Strides gs(grad_out);
  const auto rows_or_cols = [&](const Strides& t, int64_t channels) {
    return t.n == channels * L && ((t.w == 1 && t.c == L) || (t.c == 1 && t.w == channels));
  };
  const bool batched = direct && g.groups == 1 && rows_or_cols(gs, g.out_channels) &&
                       (!grad_x || (write_dx && rows_or_cols(dxs, K)));
  for (int64_t c0 = 0; c0 < g.batch; c0 += chunk) {
    const int64_t n = std::min(chunk, g.batch - c0);
    if (grad_x) {
      at::Tensor mixed = wmix.narrow(0, 0, n).view({n, N});
      mix_kernels(mixed, ops.routing, ops.weight, ops.scales, c0, n, g);
    }
    if (batched) {
      const at::Tensor go = grad_out.as_strided({n, g.out_channels, L}, {gs.n, gs.c, gs.w},
                                                grad_out.storage_offset() + c0 * gs.n);
      if (need_kernel_grad) {
        const at::Tensor xt = x.as_strided({n, L, K}, {xs.n, xs.w, xs.c},
                                           x.storage_offset() + c0 * xs.n);
        batched_gemm_into(G.narrow(0, 0, n), go, xt, at::Tensor());
      }
      if (grad_x) {
        batched_gemm_into(grad_x->as_strided({n, K, L}, {dxs.n, dxs.c, dxs.w},
                                             grad_x->storage_offset() + c0 * dxs.n),
                          wmix.narrow(0, 0, n).transpose(1, 2), go, at::Tensor());
      }
    } else {
      at::parallel_for(0, n * g.groups, 1, [&](int64_t t0, int64_t t1) {
        at::AutoDispatchBelowADInplaceOrView below_autograd;
        at::Tensor col = (need_kernel_grad && !direct) ? at::empty({K, L}, ops.acc_opts)
                                                        : at::Tensor();
        at::Tensor dcol = grad_x && !write_dx ? at::empty({K, L}, ops.acc_opts) : at::Tensor();
        std::vector<acc_t> dx(grad_x && !write_dx ? cin_g * plane : 0);
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t b = c0 + t / g.groups, gi = t % g.groups;
          const at::Tensor gmat = grad_out.select(0, b).narrow(0, gi * cout_g, cout_g)
                                      .reshape({cout_g, L}).to(ops.acc_opts.dtype());
          if (need_kernel_grad) {
            const at::Tensor operand = gemm_operand<scalar_t, acc_t>(x, xs, g, direct, b, gi, col);
            at::Tensor Gb = G.select(0, b - c0).narrow(0, gi * cout_g, cout_g);
            at::mm_out(Gb, gmat, operand.t());
          }
          if (write_dx) {
            at::Tensor dst = grad_x->as_strided(
                {cin_g, L}, {dxs.c, dxs.w},
                grad_x->storage_offset() + b * dxs.n + gi * cin_g * dxs.c);
            at::mm_out(dst, wmix.select(0, b - c0).narrow(0, gi * cout_g, cout_g).t(), gmat);
          } else if (grad_x) {
            at::mm_out(dcol, wmix.select(0, b - c0).narrow(0, gi * cout_g, cout_g).t(), gmat);
            std::fill(dx.begin(), dx.end(), acc_t(0));
            col2im_add<acc_t>(dcol.const_data_ptr<acc_t>(), g, cin_g, dx.data());
            store_plane<scalar_t, acc_t>(dx.data(), nullptr, cin_g, g.height, g.width,
                                         dx_ptr + b * dxs.n + gi * cin_g * dxs.c, dxs.c, dxs.h,
                                         dxs.w);
          }
        }
      });
    }
    if (need_kernel_grad) fold(G.narrow(0, 0, n).view({n, N}), c0);
  }
}

// A task owns input channel ci and its out_per_group output channels, over the whole batch.
template <typename scalar_t>
void depthwise_backward(const at::Tensor& grad_out, const at::Tensor& x,
                        const Operands<scalar_t>& ops, const Geometry& g, at::Tensor* grad_x,
                        Grads<typename Operands<scalar_t>::acc_t> out) {
  using acc_t = typename Operands<scalar_t>::acc_t;
  const int64_t N = g.kernel_numel(), E = g.experts;
  const int64_t taps = g.kernel_h * g.kernel_w;
  const int64_t wp = g.width + g.pad_left + g.pad_right;
  const int64_t hp = g.height + g.pad_top + g.pad_bottom;
  const int64_t mult = g.out_per_group();
  const bool need_kernel_grad = out.routing_parts || out.weight;
  const Strides xs(x), gs(grad_out);
  const Strides dxs = grad_x ? Strides(*grad_x) : xs;
  const scalar_t* x_ptr = x.const_data_ptr<scalar_t>();
  const scalar_t* g_ptr = grad_out.const_data_ptr<scalar_t>();
  scalar_t* dx_ptr = grad_x ? grad_x->mutable_data_ptr<scalar_t>() : nullptr;
  const acc_t* r_ptr = ops.routing.template const_data_ptr<acc_t>();
  const acc_t* w_ptr = ops.weight.template const_data_ptr<acc_t>();

  at::parallel_for(0, g.in_channels, 1, [&](int64_t t0, int64_t t1) {
    // grad_out is copied with the padded plane's row pitch (zeros between rows), so with stride 1
    // each tap is one contiguous dot product / multiply-add over Ho x Wp values.
    std::vector<acc_t> plane(hp * wp), dplane(hp * wp), go(g.out_h * wp, acc_t(0)), w(taps),
        G(taps);
    const bool unit = g.stride_h == 1 && g.stride_w == 1;
    const int64_t span = (g.out_h - 1) * wp + g.out_w;
    for (int64_t ci = t0; ci < t1; ++ci) {
      for (int64_t b = 0; b < g.batch; ++b) {
        if (need_kernel_grad) {
          padded_plane<scalar_t, acc_t>(x_ptr + b * xs.n + ci * xs.c, xs.h, xs.w, g, plane.data());
        }
        if (grad_x) std::fill(dplane.begin(), dplane.end(), acc_t(0));
        for (int64_t m = 0; m < mult; ++m) {
          const int64_t co = ci * mult + m;
          const scalar_t* gp = g_ptr + b * gs.n + co * gs.c;
          for (int64_t oh = 0; oh < g.out_h; ++oh) {
            for (int64_t ow = 0; ow < g.out_w; ++ow) {
              go[oh * wp + ow] = static_cast<acc_t>(gp[oh * gs.h + ow * gs.w]);
            }
          }
          if (grad_x) mix_experts<acc_t>(w_ptr + co * taps, N, r_ptr + b * E, E, taps, w.data());
          for (int64_t i = 0; i < g.kernel_h; ++i) {
            for (int64_t j = 0; j < g.kernel_w; ++j) {
              const int64_t base = i * g.dilation_h * wp + j * g.dilation_w;
              const acc_t tap = grad_x ? w[i * g.kernel_w + j] : acc_t(0);
              acc_t sum = 0;
              if (unit) {
                if (need_kernel_grad) {
                  sum = pitched_dot(go.data(), plane.data() + base, g.out_h, wp, g.out_w);
                }
                if (grad_x) {
                  acc_t* dst = dplane.data() + base;
                  for (int64_t q = 0; q < span; ++q) dst[q] += tap * go[q];
                }
              } else {
                for (int64_t oh = 0; oh < g.out_h; ++oh) {
                  const int64_t row = base + oh * g.stride_h * wp;
                  const acc_t* gr = go.data() + oh * wp;
                  if (need_kernel_grad) {
                    const acc_t* src = plane.data() + row;
                    for (int64_t ow = 0; ow < g.out_w; ++ow) sum += gr[ow] * src[ow * g.stride_w];
                  }
                  if (grad_x) {
                    acc_t* dst = dplane.data() + row;
                    for (int64_t ow = 0; ow < g.out_w; ++ow) dst[ow * g.stride_w] += tap * gr[ow];
                  }
                }
              }
              G[i * g.kernel_w + j] = sum;
            }
          }
          if (!need_kernel_grad) continue;
          for (int64_t e = 0; e < E; ++e) {
            const acc_t* we = w_ptr + e * N + co * taps;
            if (out.routing_parts) {
              acc_t dot = 0;
              for (int64_t k = 0; k < taps; ++k) dot += G[k] * we[k];
              out.routing_parts[(ci * g.batch + b) * E + e] += dot;
            }
            if (out.weight) {
              acc_t* gw = out.weight + e * N + co * taps;
              const acc_t re = r_ptr[b * E + e];
              for (int64_t k = 0; k < taps; ++k) gw[k] += re * G[k];
            }
          }
        }
        if (grad_x) {
          scalar_t* dst = dx_ptr + b * dxs.n + ci * dxs.c;
          for (int64_t h = 0; h < g.height; ++h) {
            const acc_t* src = dplane.data() + (h + g.pad_top) * wp + g.pad_left;
            for (int64_t w_ = 0; w_ < g.width; ++w_) {
              dst[h * dxs.h + w_ * dxs.w] = static_cast<scalar_t>(src[w_]);
            }
          }
        }
      }
    }
  });
}

template <typename scalar_t>
void backward_typed(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& routing,
                    const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                    const ScaleArgs& scales, const Geometry& g, std::array<bool, 4> mask,
                    at::Tensor& grad_x, at::Tensor& grad_routing, at::Tensor& grad_weight,
                    at::Tensor& grad_bias, ScaleGrads& scale_grads) {
  using acc_t = typename Operands<scalar_t>::acc_t;
  const auto acc_type = Operands<scalar_t>::acc_type;
  const bool need_dx = mask[0], need_dr = mask[1], need_dw = mask[2], need_db = mask[3];
  const Operands<scalar_t> ops(routing, weight, Operands<scalar_t>::acc_type, scales);

  // Accumulate straight into grad_weight when it has the accumulation dtype.
  const bool gw_in_place = need_dw && grad_weight.scalar_type() == acc_type;
  const BackwardPath path = backward_path(x, g, scales.any());
  const bool direct_depthwise = path == BackwardPath::kDirectDepthwise;
  at::Tensor gw;
  if (need_dw) {
    // The direct depthwise kernels accumulate into gw; the other paths overwrite it.
    gw = gw_in_place ? grad_weight.view({g.experts, g.kernel_numel()})
                     : at::empty({g.experts, g.kernel_numel()}, ops.acc_opts);
    if (direct_depthwise) gw.zero_();
  }
  at::Tensor gr = need_dr ? at::empty({g.batch, g.experts}, ops.acc_opts) : at::Tensor();
  // The scales' gradients in the accumulation dtype (every row written by the fold).
  const auto acc_grad = [&](const at::Tensor& t) {
    return t.defined() ? at::empty({g.batch, t.numel() / g.batch}, ops.acc_opts) : at::Tensor();
  };
  ScaleGrads acc_scale_grads{acc_grad(scale_grads.in), acc_grad(scale_grads.out),
                             acc_grad(scale_grads.tap)};
  const KernelGradFold fold{ops.routing, ops.weight, ops.scales, g, need_dw ? &gw : nullptr,
                            need_dr ? &gr : nullptr, acc_scale_grads};
  switch (path) {
    case BackwardPath::kAtenDepthwise: {
      const at::Tensor G = grouped_depthwise_backward(grad_out, x, ops.routing, ops.weight,
                                                      ops.scales, g, need_dx ? &grad_x : nullptr,
                                                      fold.wanted());
      if (fold.wanted()) fold(G, 0);
      break;
    }
    case BackwardPath::kDirectDepthwise: {
      // Each input channel's task writes its own (B, E) partial of grad_routing.
      at::Tensor parts = need_dr ? at::zeros({g.in_channels, g.batch, g.experts}, ops.acc_opts)
                                 : at::Tensor();
      Grads<acc_t> grads{need_dr ? parts.mutable_data_ptr<acc_t>() : nullptr,
                         need_dw ? gw.mutable_data_ptr<acc_t>() : nullptr};
      depthwise_backward<scalar_t>(grad_out, x, ops, g, need_dx ? &grad_x : nullptr, grads);
      if (need_dr) {
        // Summed in channel order (not a parallel reduction): deterministic.
        gr.zero_();
        acc_t* gr_ptr = gr.mutable_data_ptr<acc_t>();
        const acc_t* parts_ptr = parts.const_data_ptr<acc_t>();
        const int64_t be = g.batch * g.experts;
        for (int64_t c = 0; c < g.in_channels; ++c) {
          for (int64_t i = 0; i < be; ++i) gr_ptr[i] += parts_ptr[c * be + i];
        }
      }
      break;
    }
    case BackwardPath::kAtenDense:
      grouped_dense_backward(grad_out, x, ops.routing, ops.weight, ops.scales, g,
                             need_dx ? &grad_x : nullptr, fold);
      break;
    case BackwardPath::kDense:
      dense_backward<scalar_t>(grad_out, x, ops, g, need_dx ? &grad_x : nullptr, fold);
      break;
  }
  if (need_dw && !gw_in_place) grad_weight.copy_(gw.view(weight.sizes()));
  bias_epilogue(grad_out, ops.routing, bias, need_dr, need_db, grad_bias, gr, ops.scales,
                acc_scale_grads.out);
  if (need_dr) grad_routing.copy_(gr);
  for (auto [dst, src] : {std::pair{scale_grads.in, acc_scale_grads.in},
                          std::pair{scale_grads.out, acc_scale_grads.out},
                          std::pair{scale_grads.tap, acc_scale_grads.tap}}) {
    if (dst.defined()) dst.copy_(src.view(dst.sizes()));
  }
}

}  // namespace

void backward(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& routing,
              const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
              const ScaleArgs& scales, const Geometry& g, std::array<bool, 4> output_mask,
              at::Tensor& grad_x, at::Tensor& grad_routing, at::Tensor& grad_weight,
              at::Tensor& grad_bias, ScaleGrads& scale_grads) {
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "condconv2d_backward_cpu", [&] {
        backward_typed<scalar_t>(grad_out, x, routing, weight, bias, scales, g, output_mask,
                                 grad_x, grad_routing, grad_weight, grad_bias, scale_grads);
      });
}

}  // namespace cpu
}  // namespace condconv
