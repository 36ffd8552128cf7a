// Configurations and the independent computation shared by the host tests of the CUDA backend
// (test_cuda_views.cpp, test_cuda_kernels.cpp): one at::conv2d per example with the kernel mixed
// by hand, and libtorch's autograd through it for grad_x and the per-example kernel gradients,
// all in float64.
#pragma once

#include <torch/torch.h>

#include <condconv.h>

#include <string>
#include <vector>

namespace cuda_cases {

struct Config {
  std::string name;
  int64_t batch, cin, cout, height, width, kernel, experts, groups;
  std::vector<int64_t> stride, padding, dilation;  // padding: top, bottom, left, right
  bool bias;
  std::string layout;  // "contiguous", "channels_last" or "sliced"
};

// Dense with stride, dilation, asymmetric padding and groups; channels_last (3x3 and 1x1);
// sliced inputs; several tiles in every GEMM dimension; depthwise with multiplier 1 and 2,
// channels_last with several tiles of channels, and planes of more than one block of pixels; a
// reduction longer than one tensor-core accumulation chain.
inline std::vector<Config> configs() {
  return {
      {"dense", 3, 4, 6, 9, 11, 3, 4, 2, {2, 1}, {1, 0, 2, 1}, {1, 2}, true, "contiguous"},
      {"dense-cl", 2, 6, 9, 8, 7, 3, 3, 3, {1, 2}, {0, 2, 1, 1}, {2, 1}, false, "channels_last"},
      {"pointwise", 2, 8, 16, 7, 5, 1, 8, 1, {1, 1}, {0, 0, 0, 0}, {1, 1}, true, "sliced"},
      {"wide-1x1", 2, 40, 72, 9, 9, 1, 4, 1, {1, 1}, {0, 0, 0, 0}, {1, 1}, true, "contiguous"},
      // 1x1 channels_last: the reduction index runs along the channels, staged channels first.
      {"pw-cl", 6, 40, 72, 9, 7, 1, 4, 1, {1, 1}, {0, 0, 0, 0}, {1, 1}, true, "channels_last"},
      {"wide-3x3", 5, 24, 80, 10, 9, 3, 2, 2, {1, 1}, {1, 1, 1, 1}, {1, 1}, false,
       "channels_last"},
      {"depthwise", 3, 6, 6, 13, 12, 5, 3, 6, {2, 2}, {2, 2, 1, 2}, {1, 1}, true, "contiguous"},
      {"dw-mult2", 2, 4, 8, 9, 9, 3, 2, 4, {1, 2}, {2, 2, 2, 2}, {2, 2}, false, "channels_last"},
      {"dw-sliced", 2, 3, 3, 6, 7, 3, 2, 3, {1, 1}, {1, 1, 0, 2}, {1, 1}, true, "sliced"},
      {"dw-large", 1, 2, 2, 20, 18, 3, 2, 2, {1, 1}, {1, 1, 1, 1}, {1, 1}, true, "contiguous"},
      // channels_last with more channels than a block's tile of 32 (the last tile partial) and
      // planes of several chunks; grad_x's 20 input channels a partial tile of their own.
      {"dw-cl-tiles", 2, 20, 40, 17, 16, 3, 2, 20, {1, 1}, {1, 1, 1, 1}, {1, 1}, true,
       "channels_last"},
      // 1x1 channels_last of the clustered kernel's (csrc/cuda/pointwise_cluster.cuh) shape:
      // 9 examples (3 blocks of 4, the last of one, a cluster of 4 with a block of none), two
      // tiles of 64 pixels and of 64 output channels, both partial, 5 steps of 32 input channels
      // (the last of 8: more steps than stages, so stages are refilled), 5 experts shared out
      // unevenly over the cluster's 4 blocks.
      {"pw-cl-cluster", 9, 136, 72, 10, 7, 1, 5, 1, {1, 1}, {0, 0, 0, 0}, {1, 1}, true,
       "channels_last"},
      // The same for the wgmma kernel's (pointwise_wgmma.cuh) last steps: both halves of 16 of
      // the forward's last step real (64 input channels), and of grad_x's (184 output channels:
      // 6 steps, the last of 24, more than its 4 stages at 3 experts); two tiles of 128 output
      // channels (the second of 56), 72 pixels, 5 examples (a cluster with two empty blocks).
      {"pw-cl-wgmma", 5, 64, 184, 8, 9, 1, 3, 1, {1, 1}, {0, 0, 0, 0}, {1, 1}, true,
       "channels_last"},
      // A kernel gradient reduced over 5184 pixels: more K-slices than one MMA chain takes.
      {"long-reduction", 1, 4, 4, 72, 72, 1, 2, 1, {1, 1}, {0, 0, 0, 0}, {1, 1}, false,
       "contiguous"},
  };
}

inline torch::Tensor layout(torch::Tensor t, const std::string& how) {
  if (how == "channels_last") return t.contiguous(at::MemoryFormat::ChannelsLast);
  if (how == "sliced") {  // every other column of a wider tensor: a non-unit innermost stride
    auto wide = torch::zeros({t.size(0), t.size(1), t.size(2), 2 * t.size(3)}, t.options());
    auto view = wide.slice(3, 0, 2 * t.size(3), 2);
    view.copy_(t);
    return view;
  }
  return t;
}

// Random inputs of a configuration in dtype (x and grad_out in the configuration's layout;
// routing in the accumulation dtype, as the kernels take it), and the float64 results expected
// from exactly these values.
struct Case {
  torch::Tensor x, routing, weight, bias, grad_out;
  condconv::Geometry geometry;
  torch::Tensor out, grad_x, kernel_grads;  // float64; kernel_grads is (B, Cout, Cin/g*kh*kw)
};

inline Case make_case(const Config& c, at::ScalarType dtype, uint64_t seed = 0) {
  torch::manual_seed(seed);
  const auto f64 = torch::TensorOptions().dtype(torch::kFloat64);
  const auto acc = dtype == torch::kFloat64 ? torch::kFloat64 : torch::kFloat32;
  Case k;
  k.x = layout(torch::randn({c.batch, c.cin, c.height, c.width}, f64).to(dtype), c.layout);
  k.routing = torch::rand({c.batch, c.experts}, f64).to(acc);
  k.weight = torch::randn({c.experts, c.cout, c.cin / c.groups, c.kernel, c.kernel}, f64)
                 .div(std::sqrt(double(c.cin / c.groups * c.kernel * c.kernel)))
                 .to(dtype);
  k.bias = torch::randn({c.experts, c.cout}, f64).to(dtype);
  k.geometry = condconv::check_inputs(k.x, k.routing.to(dtype), k.weight,
                                      c10::optional<at::Tensor>(k.bias), c.stride, c.padding,
                                      c.dilation, c.groups);

  const auto x = k.x.to(torch::kFloat64), routing = k.routing.to(torch::kFloat64);
  const auto weight = k.weight.to(torch::kFloat64), bias = k.bias.to(torch::kFloat64);
  const auto xp = torch::constant_pad_nd(
      x, {c.padding[2], c.padding[3], c.padding[0], c.padding[1]}, 0.0);
  const auto x_leaf = xp.clone().requires_grad_();
  std::vector<torch::Tensor> kernels, outs;
  for (int64_t b = 0; b < c.batch; ++b) {
    kernels.push_back((routing[b].view({-1, 1, 1, 1, 1}) * weight).sum(0).requires_grad_());
    const auto bias_b = c.bias ? c10::optional<at::Tensor>((routing[b].view({-1, 1}) * bias).sum(0))
                               : c10::nullopt;
    const std::vector<int64_t> no_padding{0, 0};
    outs.push_back(at::conv2d(x_leaf.narrow(0, b, 1), kernels.back(), bias_b,
                              at::IntArrayRef(c.stride), at::IntArrayRef(no_padding),
                              at::IntArrayRef(c.dilation), c.groups));
  }
  const auto expected = torch::cat(outs, 0);
  k.grad_out = layout(torch::randn_like(expected).to(dtype), c.layout);
  std::vector<torch::Tensor> leaves{x_leaf};
  leaves.insert(leaves.end(), kernels.begin(), kernels.end());
  const auto grads =
      torch::autograd::grad({expected}, leaves, {k.grad_out.to(torch::kFloat64)});
  k.out = expected.detach();
  k.grad_x = grads[0].narrow(2, c.padding[0], c.height).narrow(3, c.padding[2], c.width);
  k.kernel_grads = torch::stack(std::vector<torch::Tensor>(grads.begin() + 1, grads.end()))
                       .reshape({c.batch, c.cout, -1});
  return k;
}

}  // namespace cuda_cases
