// The C++ operator against an independent computation: one at::conv2d per example with the
// kernel mixed by hand, and libtorch's autograd through that for the four gradients.
#include <torch/torch.h>

#include <condconv.h>

#include "checks.h"

#include <cstdio>
#include <string>

namespace {

struct Config {
  std::string name;
  int64_t batch, cin, cout, height, width, kernel, experts, groups;
  std::vector<int64_t> stride, padding, dilation;  // padding: top, bottom, left, right
  bool bias, channels_last;
};

torch::Tensor per_example(const torch::Tensor& x, const torch::Tensor& routing,
                          const torch::Tensor& weight, const c10::optional<torch::Tensor>& bias,
                          const Config& c) {
  const auto xp = torch::constant_pad_nd(
      x, {c.padding[2], c.padding[3], c.padding[0], c.padding[1]}, 0.0);
  std::vector<torch::Tensor> outs;
  for (int64_t b = 0; b < c.batch; ++b) {
    torch::Tensor w = (routing[b].view({-1, 1, 1, 1, 1}) * weight).sum(0);
    c10::optional<torch::Tensor> bb;
    if (bias) bb = (routing[b].view({-1, 1}) * *bias).sum(0);
    const std::vector<int64_t> no_padding{0, 0};
    outs.push_back(at::conv2d(xp.narrow(0, b, 1), w, bb, at::IntArrayRef(c.stride),
                              at::IntArrayRef(no_padding), at::IntArrayRef(c.dilation), c.groups));
  }
  return torch::cat(outs, 0);
}

bool run(const Config& c) {
  torch::manual_seed(0);
  auto opts = torch::TensorOptions().dtype(torch::kFloat64);
  auto x = torch::randn({c.batch, c.cin, c.height, c.width}, opts);
  if (c.channels_last) x = x.contiguous(at::MemoryFormat::ChannelsLast);
  auto routing = torch::rand({c.batch, c.experts}, opts);
  auto weight = torch::randn({c.experts, c.cout, c.cin / c.groups, c.kernel, c.kernel}, opts);
  c10::optional<torch::Tensor> bias;
  if (c.bias) bias = torch::randn({c.experts, c.cout}, opts);

  auto out = condconv::condconv2d(x, routing, weight, bias, c.stride, c.padding, c.dilation,
                                  c.groups);
  std::vector<torch::Tensor> leaves{x.clone().requires_grad_(), routing.clone().requires_grad_(),
                                    weight.clone().requires_grad_()};
  c10::optional<torch::Tensor> bias_leaf;
  if (bias) {
    bias_leaf = bias->clone().requires_grad_();
    leaves.push_back(*bias_leaf);
  }
  auto expected = per_example(leaves[0], leaves[1], leaves[2], bias_leaf, c);
  bool ok = close(out, expected.detach(), c.name, "forward");
  ok = ok && (!c.channels_last || out.is_contiguous(at::MemoryFormat::ChannelsLast));

  auto grad_out = torch::randn_like(expected);
  auto expected_grads = torch::autograd::grad({expected}, leaves, {grad_out});
  auto grads = condconv::condconv2d_backward(grad_out, x, routing, weight, bias, c.stride,
                                             c.padding, c.dilation, c.groups,
                                             {true, true, true, c.bias});
  ok = close(std::get<0>(grads), expected_grads[0], c.name, "grad_x") && ok;
  ok = close(std::get<1>(grads), expected_grads[1], c.name, "grad_routing") && ok;
  ok = close(std::get<2>(grads), expected_grads[2], c.name, "grad_weight") && ok;
  if (c.bias) ok = close(std::get<3>(grads), expected_grads[3], c.name, "grad_bias") && ok;
  return ok;
}

}  // namespace

int main() {
  const std::vector<Config> configs{
      {"dense", 3, 4, 6, 9, 11, 3, 4, 2, {2, 1}, {1, 0, 2, 1}, {1, 2}, true, false},
      {"pointwise", 2, 8, 16, 7, 7, 1, 8, 1, {1, 1}, {0, 0, 0, 0}, {1, 1}, false, true},
      {"depthwise", 3, 6, 6, 13, 13, 5, 3, 6, {2, 2}, {2, 2, 1, 2}, {1, 1}, true, true},
  };
  bool ok = true;
  for (const auto& c : configs) ok = run(c) && ok;
  // Bad input is a c10::Error naming the argument, not a crash.
  try {
    auto x = torch::randn({2, 4, 5, 5});
    condconv::condconv2d(x, torch::rand({2, 3}), torch::randn({4, 6, 4, 3, 3}), c10::nullopt,
                         {1, 1}, {0, 0, 0, 0}, {1, 1}, 1);
    std::printf("bad routing accepted: FAIL\n");
    ok = false;
  } catch (const c10::Error& e) {
    const bool named = std::string(e.what()).find("'routing'") != std::string::npos;
    std::printf("bad routing rejected %s\n", named ? "ok" : "FAIL (argument not named)");
    ok = ok && named;
  }
  std::printf("%s\n", ok ? "PASSED" : "FAILED");
  return ok ? 0 : 1;
}
