// The per-call operands every device's kernels read: the routing weights in the accumulation
// dtype, the experts as (E, |W|), both contiguous, and the per-example scales (scales.h). The
// CPU kernels take the experts in the accumulation dtype (they mix with GEMMs in it), the CUDA
// kernels in the input dtype (they mix
// as they stage tiles).
#pragma once

#include "scales.h"

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>

namespace condconv {

template <typename scalar_t>
struct Operands {
  using acc_t = at::opmath_type<scalar_t>;
  static constexpr at::ScalarType acc_type = c10::CppTypeToScalarType<acc_t>::value;
  at::TensorOptions acc_opts;  // routing's device, the accumulation dtype
  at::Tensor routing;          // (B, E)
  at::Tensor weight;           // (E, |W|), in experts_dtype
  Scales scales;               // in the accumulation dtype

  Operands(const at::Tensor& r, const at::Tensor& w, at::ScalarType experts_dtype,
           const ScaleArgs& scale_args = {})
      : acc_opts(r.options().dtype(acc_type)),
        routing(r.to(acc_type).contiguous()),
        weight(w.to(experts_dtype).contiguous().view({w.size(0), -1})),
        scales(scale_args, acc_type) {}
  const acc_t* routing_ptr() const { return routing.template const_data_ptr<acc_t>(); }
};

}  // namespace condconv
