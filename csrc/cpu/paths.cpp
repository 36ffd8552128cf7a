// The names of the CPU paths (paths.h), for torch.ops.condconv.cpu_paths and cpu_path_names: a
// test asserts that its matrix of cases takes every path.
#include "paths.h"

#include <string>
#include <vector>

namespace condconv {
namespace cpu {

namespace {

const char* name(ForwardPath p) {
  switch (p) {
    case ForwardPath::kAtenDepthwise: return "forward/aten_depthwise";
    case ForwardPath::kAtenDense: return "forward/aten_dense";
    case ForwardPath::kBf16Pointwise: return "forward/bf16_pointwise";
    case ForwardPath::kDense: return "forward/dense";
    case ForwardPath::kDepthwiseChannelsLast: return "forward/depthwise_channels_last";
    case ForwardPath::kDepthwisePlanar: return "forward/depthwise_planar";
  }
  return "forward/?";
}

const char* name(BackwardPath p) {
  switch (p) {
    case BackwardPath::kAtenDepthwise: return "backward/aten_depthwise";
    case BackwardPath::kDirectDepthwise: return "backward/direct_depthwise";
    case BackwardPath::kAtenDense: return "backward/aten_dense";
    case BackwardPath::kDense: return "backward/dense";
  }
  return "backward/?";
}

}  // namespace

std::vector<std::string> path_names(const at::Tensor& x, const Geometry& g, bool scaled) {
  return {name(forward_path(x, g, scaled)), name(backward_path(x, g, scaled))};
}

std::vector<std::string> all_path_names() {
  std::vector<std::string> names;
  for (ForwardPath p : {ForwardPath::kAtenDepthwise, ForwardPath::kAtenDense,
                        ForwardPath::kBf16Pointwise, ForwardPath::kDense,
                        ForwardPath::kDepthwiseChannelsLast, ForwardPath::kDepthwisePlanar}) {
    names.push_back(name(p));
  }
  for (BackwardPath p : {BackwardPath::kAtenDepthwise, BackwardPath::kDirectDepthwise,
                         BackwardPath::kAtenDense, BackwardPath::kDense}) {
    names.push_back(name(p));
  }
  return names;
}

}  // namespace cpu
}  // namespace condconv
