// The public entry points of the condconv CUDA backend: the device guard, the output, and the
// dispatch on dtype and index type to the typed launchers of typed.cuh, which are compiled in one
// translation unit per dtype (instantiate_<dtype>.cu). Inputs were checked in ops.cpp (the one
// place for checks); the kernels are in kernels.cuh, their index arithmetic in views.cuh.
#include "../condconv.h"
#include "runtime.cuh"
#include "views.cuh"

#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>

namespace condconv {
namespace cuda {

// Defined in typed.cuh, instantiated per dtype in instantiate_<dtype>.cu.
template <typename scalar_t, typename index_t>
void forward_typed(const at::Tensor& x, const at::Tensor& routing, const at::Tensor& weight,
                   const c10::optional<at::Tensor>& bias, const Geometry& g, at::Tensor& out);
template <typename scalar_t, typename index_t>
void backward_typed(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& routing,
                    const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                    const Geometry& g, std::array<bool, 4> mask, at::Tensor& grad_x,
                    at::Tensor& grad_routing, at::Tensor& grad_weight, at::Tensor& grad_bias);

// The per-example scales (in_scale, out_scale, tap_scale) are not in these kernels yet.
static void require_no_scales(const ScaleArgs& scales) {
  TORCH_CHECK_NOT_IMPLEMENTED(!scales.any(),
                              "condconv2d: backend 'cuda' does not support the arguments "
                              "'in_scale', 'out_scale' and 'tap_scale' yet; use backend "
                              "'triton' (or 'reference') on CUDA tensors");
}

at::Tensor forward(const at::Tensor& x, const at::Tensor& routing, const at::Tensor& weight,
                   const c10::optional<at::Tensor>& bias, const ScaleArgs& scales,
                   const Geometry& g) {
  require_no_scales(scales);
  const DeviceGuard guard(x.device());
  at::Tensor out = at::empty({g.batch, g.out_channels, g.out_h, g.out_w},
                             x.options().memory_format(x.suggest_memory_format()));
  const bool narrow = fits_int32({&x, &out, &weight});
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "condconv2d_forward_cuda", [&] {
        if (narrow) {
          forward_typed<scalar_t, int32_t>(x, routing, weight, bias, g, out);
        } else {
          forward_typed<scalar_t, int64_t>(x, routing, weight, bias, g, out);
        }
      });
  return out;
}

void backward(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& routing,
              const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
              const ScaleArgs& scales, const Geometry& g, std::array<bool, 4> output_mask,
              at::Tensor& grad_x, at::Tensor& grad_routing, at::Tensor& grad_weight,
              at::Tensor& grad_bias, ScaleGrads& /*scale_grads: no scales here yet*/) {
  require_no_scales(scales);
  const DeviceGuard guard(x.device());
  const bool narrow =
      fits_int32({&x, &grad_out, &weight, output_mask[0] ? &grad_x : nullptr});
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "condconv2d_backward_cuda", [&] {
        if (narrow) {
          backward_typed<scalar_t, int32_t>(grad_out, x, routing, weight, bias, g, output_mask,
                                            grad_x, grad_routing, grad_weight, grad_bias);
        } else {
          backward_typed<scalar_t, int64_t>(grad_out, x, routing, weight, bias, g, output_mask,
                                            grad_x, grad_routing, grad_weight, grad_bias);
        }
      });
}

}  // namespace cuda
}  // namespace condconv
