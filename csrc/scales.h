// The per-example scales of the dynamic-convolution family on every device (ATen operations and
// plain loops only). With s_b[co, ci, t] = out[b, co] * in[b, group(co) * Cin/g + ci] * tap[b, t]
// over the kernel's (Cout, Cin/g, taps):
//   W_b = s_b * M_b, M_b = sum_e routing[b, e] W[e]    bias_b = out[b] * sum_e routing[b, e] bias[e]
// The kernels apply s_b where they mix (the convolutions themselves are unchanged), so the scales
// cost no pass over x or the output. Backward, with G_b = dL/dW_b (what the kernels compute) and
// Q_b = G_b * M_b:
//   routing and weight gradients: those of the unscaled op with G_b replaced by s_b * G_b
//   grad_out_scale[b, co] = sum_{ci, t} Q_b * in * tap + <sum_pixels grad_out[b, co], bias_b/out>
//   grad_in_scale[b, ci]  = sum_{co in ci's group, t} Q_b * out * tap
//   grad_tap_scale[b, t]  = sum_{co, ci} Q_b * out * in
#pragma once

#include "condconv.h"

#include <ATen/ATen.h>

namespace condconv {

struct Scales {
  at::Tensor in, out, tap;  // (B, Cin), (B, Cout), (B, taps) in the accumulation dtype,
                            // contiguous; undefined where absent

  Scales(const ScaleArgs& a, at::ScalarType acc) {
    const auto prepare = [&](const c10::optional<at::Tensor>& t) {
      return t.has_value() ? t->to(acc).contiguous().view({t->size(0), -1}) : at::Tensor();
    };
    in = prepare(a.in);
    out = prepare(a.out);
    tap = prepare(a.tap);
  }
  bool any() const { return in.defined() || out.defined() || tap.defined(); }

  // s_b of examples [b0, b0 + n) as (n, |W|); undefined without scales.
  at::Tensor kernel_factor(int64_t b0, int64_t n, const Geometry& g) const {
    if (!any()) return at::Tensor();
    const at::Tensor& any_scale = in.defined() ? in : (out.defined() ? out : tap);
    const int64_t taps = g.kernel_h * g.kernel_w;
    at::Tensor f = at::ones({n, g.groups, g.out_per_group(), g.in_per_group(), taps},
                            any_scale.options());
    for (const at::Tensor& factor : factors(b0, n, g)) {
      if (factor.defined()) f.mul_(factor);
    }
    return f.view({n, -1});
  }

  // The three scales of examples [b0, b0 + n) shaped to broadcast over
  // (n, groups, Cout/g, Cin/g, taps): out, in, tap (undefined where absent).
  std::array<at::Tensor, 3> factors(int64_t b0, int64_t n, const Geometry& g) const {
    const int64_t taps = g.kernel_h * g.kernel_w;
    return {out.defined() ? out.narrow(0, b0, n).view({n, g.groups, g.out_per_group(), 1, 1})
                          : at::Tensor(),
            in.defined() ? in.narrow(0, b0, n).view({n, g.groups, 1, g.in_per_group(), 1})
                         : at::Tensor(),
            tap.defined() ? tap.narrow(0, b0, n).view({n, 1, 1, 1, taps}) : at::Tensor()};
  }

  // The mixed biases (B, Cout) times out, in place.
  void scale_bias(at::Tensor& bias_mix) const {
    if (out.defined() && bias_mix.defined()) bias_mix.mul_(out);
  }

  // Multiplies the mixed taps w (count channels from co, taps each, consecutive) of example b by
  // s_b: the direct depthwise kernels' form (Cin/g = 1, so in is indexed by co's group).
  template <typename acc_t>
  void scale_taps(acc_t* w, int64_t b, int64_t co, int64_t count, const Geometry& g) const {
    if (!any()) return;
    const int64_t taps = g.kernel_h * g.kernel_w, mult = g.out_per_group();
    const acc_t* o = out.defined() ? out.const_data_ptr<acc_t>() + b * g.out_channels : nullptr;
    const acc_t* i = in.defined() ? in.const_data_ptr<acc_t>() + b * g.in_channels : nullptr;
    const acc_t* t = tap.defined() ? tap.const_data_ptr<acc_t>() + b * taps : nullptr;
    for (int64_t c = 0; c < count; ++c) {
      const acc_t channel = (o ? o[co + c] : acc_t(1)) * (i ? i[(co + c) / mult] : acc_t(1));
      acc_t* wc = w + c * taps;
      for (int64_t k = 0; k < taps; ++k) wc[k] *= channel * (t ? t[k] : acc_t(1));
    }
  }
};

// W_b of examples [b0, b0 + n) into out (n, |W|): the mix of the experts (routing (B, E) and
// weight (E, |W|), in out's dtype), times s_b.
inline void mix_kernels(at::Tensor& out, const at::Tensor& routing, const at::Tensor& weight,
                        const Scales& scales, int64_t b0, int64_t n, const Geometry& g) {
  at::mm_out(out, routing.narrow(0, b0, n), weight);
  if (scales.any()) out.mul_(scales.kernel_factor(b0, n, g));
}

// The kernel terms of the scales' gradients for examples [b0, b0 + n), from their G (n, |W|)
// and unscaled mixed kernels M (n, |W|), written into those rows of the defined tensors of acc
// ((B, Cin), (B, Cout), (B, taps) in the accumulation dtype).
inline void scale_grads_from_kernels(const at::Tensor& G, const at::Tensor& M, int64_t b0,
                                     const Scales& s, const Geometry& g, ScaleGrads& acc) {
  const int64_t n = G.size(0), taps = g.kernel_h * g.kernel_w;
  const at::Tensor Q =
      (G * M).view({n, g.groups, g.out_per_group(), g.in_per_group(), taps});
  const auto [o, i, t] = s.factors(b0, n, g);
  // Q times every factor but the one whose gradient is taken, summed over the other dimensions.
  const auto product = [&](const at::Tensor& a, const at::Tensor& b) {
    at::Tensor p = Q;
    if (a.defined()) p = p * a;
    if (b.defined()) p = p * b;
    return p;
  };
  if (acc.out.defined()) {
    acc.out.narrow(0, b0, n).copy_(product(i, t).sum({3, 4}).view({n, g.out_channels}));
  }
  if (acc.in.defined()) {
    acc.in.narrow(0, b0, n).copy_(product(o, t).sum({2, 4}).view({n, g.in_channels}));
  }
  if (acc.tap.defined()) acc.tap.narrow(0, b0, n).copy_(product(o, i).sum({1, 2, 3}));
}

}  // namespace condconv
