// The backward's epilogue, the same on every device (ATen operations only): the per-example
// kernel gradients G folded into the parameter gradients, and the bias terms. With G_b the
// kernel gradient of example b, gsum the grad_out summed over pixels (B, Cout):
//   grad_weight[e]     = sum_b routing[b, e] G_b           grad_bias = routing^T gsum
//   grad_routing[b, e] = <G_b, W[e]> + <gsum[b], bias[e]>
// With per-example scales (scales.h), G_b becomes s_b * G_b and gsum out_scale * gsum here, and
// the scales' gradients are added.
#pragma once

#include "scales.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>

#include <c10/util/Optional.h>

namespace condconv {

// A (n, N) @ B (E, N)^T for small n, E and long N (grad_routing = G W^T): a plain GEMM of that
// shape runs its long reduction serially (one CPU thread), so N is cut into blocks that run as a
// batched GEMM, and the (blocks, n, E) partials are summed (a fixed order: deterministic).
inline at::Tensor rows_dot(const at::Tensor& a, const at::Tensor& b) {
  constexpr int64_t kBlock = 4096;
  const int64_t n = a.size(0), e = b.size(0), N = a.size(1);
  const int64_t blocks = N / kBlock, head = blocks * kBlock;
  if (blocks < 2) return at::mm(a, b.t());
  at::Tensor out = at::bmm(a.narrow(1, 0, head).view({n, blocks, kBlock}).transpose(0, 1),
                           b.narrow(1, 0, head).view({e, blocks, kBlock}).permute({1, 2, 0}))
                       .sum(0);
  if (head < N) out.add_(at::mm(a.narrow(1, head, N - head), b.narrow(1, head, N - head).t()));
  return out;
}

// The per-example kernel gradients G (n, N) of a chunk of examples folded into the parameter
// gradients: grad_weight (E, N) = r^T G, or += for the chunks after the first (accumulate), and
// grad_routing (n, E) = G W^T with W the experts (E, N). Either output may be null. (On the CPU
// one fused pass over G, axpy rows for grad_weight and 4-wide dots for grad_routing, measured
// 0.95 ms against these GEMMs' 0.66 ms on a 192x1152 kernel at batch 8.)
inline void fold_kernel_grads(const at::Tensor& G, const at::Tensor& routing, const at::Tensor& W,
                              at::Tensor* grad_weight, bool accumulate, at::Tensor* grad_routing) {
  if (grad_weight && accumulate) {
    grad_weight->addmm_(routing.t(), G);
  } else if (grad_weight) {
    at::mm_out(*grad_weight, routing.t(), G);
  }
  if (grad_routing) grad_routing->copy_(rows_dot(G, W));
}

// The per-example kernel gradients G (n, |W|, contiguous) of examples [b0, b0 + n), chunk after
// chunk from b0 = 0, folded into the gradients: fold_kernel_grads of s_b * G_b (G_b itself
// without scales; with scales G is scaled in place: the fold consumes it), and the kernel terms
// of the scales' gradients (scale_grads, in the accumulation dtype). routing (B, E) and weight
// (E, |W|) in the accumulation dtype.
struct KernelGradFold {
  const at::Tensor& routing;
  const at::Tensor& weight;
  const Scales& scales;
  const Geometry& g;
  at::Tensor* grad_weight;   // (E, |W|), or null
  at::Tensor* grad_routing;  // (B, E), or null
  ScaleGrads& scale_grads;   // defined where the scale is and its gradient asked for

  // Whether G is needed at all.
  bool wanted() const { return grad_weight || grad_routing || scale_grads.any(); }

  void operator()(const at::Tensor& G, int64_t b0) const {
    const int64_t n = G.size(0);
    const at::Tensor r = routing.narrow(0, b0, n);
    at::Tensor folded = G;  // contiguous: the callers' scratch or fresh results
    if (scale_grads.any()) {
      fold_scales(folded, at::mm(r, weight), b0, scales, g, scale_grads);
    } else if (scales.any()) {
      scale_rows(folded, b0, scales, g);  // s_b * G, without the mixed kernels
    }
    at::Tensor gr = grad_routing ? grad_routing->narrow(0, b0, n) : at::Tensor();
    fold_kernel_grads(folded, r, weight, grad_weight, b0 > 0, grad_routing ? &gr : nullptr);
  }
};

// The bias terms, where a bias exists and grad_routing (need_dr), grad_bias (need_db) or the
// out scale's gradient (grad_out_scale defined) is asked for: with gsum' = out_scale * gsum,
// grad_bias = routing^T gsum', grad_routing += gsum' bias^T and grad_out_scale += gsum *
// (routing bias). routing, grad_routing and grad_out_scale are in the accumulation dtype, which
// gsum is summed in.
inline void bias_epilogue(const at::Tensor& grad_out, const at::Tensor& routing,
                          const c10::optional<at::Tensor>& bias, bool need_dr, bool need_db,
                          at::Tensor& grad_bias, at::Tensor& grad_routing, const Scales& scales,
                          const at::Tensor& grad_out_scale) {
  const bool need_ds = grad_out_scale.defined();
  if (!bias.has_value() || !(need_dr || need_db || need_ds)) return;
  const auto acc = routing.scalar_type();
  const at::Tensor b = bias->to(acc);
  at::Tensor gsum = at::sum(grad_out, at::IntArrayRef{2, 3}, false, acc);
  if (need_ds) grad_out_scale.add_(gsum * at::mm(routing, b));
  if (scales.out.defined()) gsum = gsum * scales.out;
  if (need_db) grad_bias.copy_(at::mm(routing.t(), gsum));
  if (need_dr) grad_routing.add_(at::mm(gsum, b.t()));
}

}  // namespace condconv
