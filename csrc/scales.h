// The per-example scales of the dynamic-convolution family in the CPU kernels and the backward
// epilogue (host loops over host memory and ATen operations; the cuda backend does not take
// scales yet). With s_b[co, ci, t] = out[b, co] * in[b, group(co) * Cin/g + ci] * tap[b, t]
// over the kernel's (Cout, Cin/g, taps):
//   W_b = s_b * M_b, M_b = sum_e routing[b, e] W[e]    bias_b = out[b] * sum_e routing[b, e] bias[e]
// The kernels apply s_b where they mix (the convolutions themselves are unchanged), so the scales
// cost no pass over x or the output. Backward, with G_b = dL/dW_b (what the kernels compute) and
// Q_b = G_b * M_b:
//   routing and weight gradients: those of the unscaled op with G_b replaced by s_b * G_b
//   grad_out_scale[b, co] = sum_{ci, t} Q_b * in * tap
//                           + sum_pixels grad_out[b, co] * sum_e routing[b, e] bias[e, co]
//   grad_in_scale[b, ci]  = sum_{co in ci's group, t} Q_b * out * tap
//   grad_tap_scale[b, t]  = sum_{co, ci} Q_b * out * in
#pragma once

#include "condconv.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <vector>

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

  // The three scales' rows of example b (null where absent), in the accumulation dtype.
  template <typename acc_t>
  struct Rows {
    const acc_t *out, *in, *tap;
  };
  template <typename acc_t>
  Rows<acc_t> rows(int64_t b) const {
    const auto row = [&](const at::Tensor& t) {
      return t.defined() ? t.const_data_ptr<acc_t>() + b * t.size(1) : nullptr;
    };
    return {row(out), row(in), row(tap)};
  }

  // in[b, group gi's ci] * tap[b, t] at k = ci * taps + t (Cin/g x taps), into it.
  template <typename acc_t>
  void in_times_tap(const Rows<acc_t>& r, int64_t gi, const Geometry& g, acc_t* it) const {
    const int64_t taps = g.kernel_h * g.kernel_w, cin_g = g.in_per_group();
    for (int64_t ci = 0; ci < cin_g; ++ci) {
      const acc_t in = r.in ? r.in[gi * cin_g + ci] : acc_t(1);
      for (int64_t t = 0; t < taps; ++t) it[ci * taps + t] = in * (r.tap ? r.tap[t] : acc_t(1));
    }
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

namespace detail {

// The kernel rows (b, co) of examples [b0, b0 + n) of a (n, |W|) tensor, a task per (example,
// group) so that a group's sums over its output channels stay in one task: f(b, gi, rows) with
// the scales' rows of example b0 + b.
template <typename F>
void for_each_group(int64_t n, const Geometry& g, const F& f) {
  at::parallel_for(0, n * g.groups, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) f(t / g.groups, t % g.groups);
  });
}

// Each kernel row (b, co) of w (n, |W|) times out[co] * in[ci] * tap[t].
template <typename T>
void scale_kernels(T* w, const Scales& scales, int64_t b0, int64_t n, const Geometry& g) {
  const int64_t K = g.k(), cout_g = g.out_per_group();
  for_each_group(n, g, [&](int64_t b, int64_t gi) {
    const auto s = scales.rows<T>(b0 + b);
    std::vector<T> it(K);  // in x tap of the group: one contiguous loop per row
    scales.in_times_tap(s, gi, g, it.data());
    for (int64_t c = 0; c < cout_g; ++c) {
      const int64_t co = gi * cout_g + c;
      T* row = w + (b * g.out_channels + co) * K;
      const T o = s.out ? s.out[co] : T(1);
#pragma omp simd
      for (int64_t k = 0; k < K; ++k) row[k] *= o * it[k];
    }
  });
}

// fold_scales' pass over the rows: G = s_b * G; d_out[b, co] = sum_k Q * in * tap (or nothing
// where d_out is null); part[b, gi, k] = sum over the group's rows of Q * out.
template <typename T>
void fold_kernel_rows(T* gp, const T* mp, T* pp, T* d_out, const Scales& scales, int64_t b0,
                      int64_t n, const Geometry& g) {
  const int64_t K = g.k(), cout_g = g.out_per_group();
  for_each_group(n, g, [&](int64_t b, int64_t gi) {
    const auto r = scales.rows<T>(b0 + b);
    T* part = pp + (b * g.groups + gi) * K;
    std::vector<T> it(K);
    scales.in_times_tap(r, gi, g, it.data());
    for (int64_t c = 0; c < cout_g; ++c) {
      const int64_t co = gi * cout_g + c;
      T* gr = gp + (b * g.out_channels + co) * K;
      const T* mr = mp + (b * g.out_channels + co) * K;
      const T o = r.out ? r.out[co] : T(1);
      T d_o = 0;
#pragma omp simd reduction(+ : d_o)
      for (int64_t k = 0; k < K; ++k) {
        const T q = gr[k] * mr[k];
        d_o += q * it[k];
        part[k] += q * o;
        gr[k] *= o * it[k];
      }
      if (d_out) d_out[(b0 + b) * g.out_channels + co] = d_o;
    }
  });
}

}  // namespace detail

// Rows (n, |W|, contiguous) of examples [b0, b0 + n) times their s_b, in place.
inline void scale_rows(at::Tensor& rows, int64_t b0, const Scales& scales, const Geometry& g) {
  TORCH_INTERNAL_ASSERT(rows.is_contiguous());
  AT_DISPATCH_FLOATING_TYPES(rows.scalar_type(), "condconv_scale_rows", [&] {
    detail::scale_kernels<scalar_t>(rows.mutable_data_ptr<scalar_t>(), scales, b0, rows.size(0),
                                    g);
  });
}

// W_b of examples [b0, b0 + n) into out (n, |W|): the mix of the experts (routing (B, E) and
// weight (E, |W|), in out's dtype), times s_b in one pass over out.
inline void mix_kernels(at::Tensor& out, const at::Tensor& routing, const at::Tensor& weight,
                        const Scales& scales, int64_t b0, int64_t n, const Geometry& g) {
  at::mm_out(out, routing.narrow(0, b0, n), weight);
  if (scales.any()) scale_rows(out, b0, scales, g);
}

// For the kernel gradients G (n, |W|) of examples [b0, b0 + n) and their unscaled mixed kernels
// M (n, |W|), both contiguous in the accumulation dtype, in one pass: G becomes s_b * G (what
// the routing and weight gradients fold), and the kernel terms of the scales' gradients go
// into those rows of the defined tensors of acc ((B, Cin), (B, Cout), (B, taps)). A task per
// (example, group) sums over its output channels in order; the tap gradients' per-group
// partials are added in group order: deterministic.
inline void fold_scales(at::Tensor& G, const at::Tensor& M, int64_t b0, const Scales& s,
                        const Geometry& g, ScaleGrads& acc) {
  TORCH_INTERNAL_ASSERT(G.is_contiguous() && M.is_contiguous());
  const int64_t n = G.size(0), taps = g.kernel_h * g.kernel_w, cin_g = g.in_per_group();
  const int64_t K = cin_g * taps;
  // Per (example, group): sum over the group's output channels of Q * out (Cin/g x taps).
  at::Tensor P = at::zeros({n, g.groups, K}, G.options());
  AT_DISPATCH_FLOATING_TYPES(G.scalar_type(), "condconv_fold_scales", [&] {
    scalar_t* gp = G.mutable_data_ptr<scalar_t>();
    const scalar_t* mp = M.const_data_ptr<scalar_t>();
    scalar_t* pp = P.mutable_data_ptr<scalar_t>();
    scalar_t* d_out = acc.out.defined() ? acc.out.mutable_data_ptr<scalar_t>() : nullptr;
    detail::fold_kernel_rows<scalar_t>(gp, mp, pp, d_out, s, b0, n, g);
    // grad_in[b, ci] = sum_t part * tap; grad_tap[b, t] = sum_{groups, ci} part * in.
    for (int64_t b = 0; b < n; ++b) {
      const auto r = s.rows<scalar_t>(b0 + b);
      if (acc.in.defined()) {
        scalar_t* d_in = acc.in.mutable_data_ptr<scalar_t>() + (b0 + b) * g.in_channels;
        for (int64_t gi = 0; gi < g.groups; ++gi) {
          const scalar_t* part = pp + (b * g.groups + gi) * K;
          for (int64_t ci = 0; ci < cin_g; ++ci) {
            scalar_t sum = 0;
            for (int64_t t = 0; t < taps; ++t) sum += part[ci * taps + t] * (r.tap ? r.tap[t] : 1);
            d_in[gi * cin_g + ci] = sum;
          }
        }
      }
      if (acc.tap.defined()) {
        scalar_t* d_tap = acc.tap.mutable_data_ptr<scalar_t>() + (b0 + b) * taps;
        for (int64_t t = 0; t < taps; ++t) d_tap[t] = 0;
        for (int64_t gi = 0; gi < g.groups; ++gi) {
          const scalar_t* part = pp + (b * g.groups + gi) * K;
          for (int64_t ci = 0; ci < cin_g; ++ci) {
            const scalar_t in = r.in ? r.in[gi * cin_g + ci] : scalar_t(1);
            for (int64_t t = 0; t < taps; ++t) d_tap[t] += part[ci * taps + t] * in;
          }
        }
      }
    }
  });
}

}  // namespace condconv
