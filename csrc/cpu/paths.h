// Which CPU kernel runs a call: every path of each direction, and the one function per
// direction that picks it (condconv_fwd.cpp and condconv_bwd.cpp switch on it; a test asserts
// that the test matrix takes every path: torch.ops.condconv.cpu_paths).
//
// Forward, in the order they are tried (bf16: bfloat16; NCHW: x NCHW-contiguous and ATen built
// with oneDNN; 1x1: 1x1, stride 1, unpadded):
// | path                   | dtype         | layout                      | shape                  |
// |------------------------|---------------|-----------------------------|------------------------|
// | kAtenDepthwise         | float32, bf16 | NCHW                        | depthwise              |
// | kAtenDense             | float32, bf16 | NCHW                        | dense, not 1x1         |
// | kBf16Pointwise         | bf16          | x's (h, w) one run          | 1x1, one group         |
// | kDense (im2col + GEMM) | any           | any (1)                     | dense; depthwise with  |
// |                        |               |                             | windows sparse (2)     |
// | kDepthwiseChannelsLast | any           | x and output channel-strided| depthwise, multiplier 1|
// | kDepthwisePlanar       | any           | any                         | other depthwise        |
//
// Backward:
// | path                   | dtype         | layout                      | shape                  |
// |------------------------|---------------|-----------------------------|------------------------|
// | kAtenDepthwise         | float32       | NCHW                        | depthwise, not (2)     |
// | kDirectDepthwise       | any           | any                         | other depthwise, not(2)|
// | kAtenDense             | float32       | NCHW                        | dense, not 1x1         |
// | kDense (im2col + GEMM) | any           | any (1)                     | the rest               |
//
// (1) ungrouped with x read in place (and, backward, grad_out and grad_x NCHW or channels_last):
// a chunk's GEMMs run as one batched GEMM. (2) windows_sparse_in_plane: windows that read a
// small part of a huge plane, which the direct depthwise kernels would copy whole.
// The rules differ by direction: the forward's ATen depthwise path also takes bfloat16 and
// sparse windows, the backward's runs convolution_backward in float32 only.
// With per-example scales (scaled), every path applies them where it mixes, except two:
// kBf16Pointwise (it mixes in bfloat16) gives way to kDense, and so does kDirectDepthwise (it
// folds its kernel gradients tap by tap, where the scales' gradients need them whole).
#pragma once

#include "aten_grouped.h"
#include "kernel_utils.h"

namespace condconv {
namespace cpu {

enum class ForwardPath {
  kAtenDepthwise, kAtenDense, kBf16Pointwise, kDense, kDepthwiseChannelsLast, kDepthwisePlanar
};
enum class BackwardPath { kAtenDepthwise, kDirectDepthwise, kAtenDense, kDense };

// The output is allocated in x's suggested memory format: NCHW, or channels_last (channel
// stride 1); either way its (h, w) is one run of strides.
inline ForwardPath forward_path(const at::Tensor& x, const Geometry& g, bool scaled) {
  if (grouped_depthwise_forward_applies(x, g)) return ForwardPath::kAtenDepthwise;
  if (grouped_dense_applies(x, g)) return ForwardPath::kAtenDense;
  if (!scaled && x.scalar_type() == at::kBFloat16 && g.groups == 1 && g.pointwise() &&
      plane_is_one_run(g, Strides(x))) {
    return ForwardPath::kBf16Pointwise;
  }
  if (!g.depthwise() || windows_sparse_in_plane(g)) return ForwardPath::kDense;
  const bool out_channels_last =
      x.suggest_memory_format() == at::MemoryFormat::ChannelsLast || g.out_h * g.out_w == 1;
  if (g.out_per_group() == 1 && x.stride(1) == 1 && out_channels_last) {
    return ForwardPath::kDepthwiseChannelsLast;
  }
  return ForwardPath::kDepthwisePlanar;
}

inline BackwardPath backward_path(const at::Tensor& x, const Geometry& g, bool scaled) {
  if (g.depthwise() && !windows_sparse_in_plane(g)) {
    if (grouped_depthwise_applies(x, g)) return BackwardPath::kAtenDepthwise;
    if (!scaled) return BackwardPath::kDirectDepthwise;
  }
  if (grouped_dense_applies(x, g) && x.scalar_type() == at::kFloat) return BackwardPath::kAtenDense;
  return BackwardPath::kDense;
}

}  // namespace cpu
}  // namespace condconv
