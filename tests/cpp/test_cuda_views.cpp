// The CUDA kernels' index arithmetic (csrc/cuda/views.cuh), run on the CPU: each implicit-GEMM
// view is evaluated as a plain triple loop, and the depthwise per-pixel sums pixel by pixel, then
// compared with an independent computation (one at::conv2d per example with the kernel mixed by
// hand, and libtorch's autograd through it for grad_x and the per-example kernel gradients).
// What this cannot check is the device side: tiling, shared memory, launches. That is
// tests/test_gpu.py's job on a CUDA machine.
#include <torch/torch.h>

#include <condconv.h>

#include "checks.h"
#include <cuda/views.cuh>

#include <cstdio>
#include <string>

namespace {

using condconv::cuda::Shape;

struct Config {
  std::string name;
  int64_t batch, cin, cout, height, width, kernel, experts, groups;
  std::vector<int64_t> stride, padding, dilation;  // padding: top, bottom, left, right
  bool bias;
  std::string layout;  // "contiguous", "channels_last" or "sliced"
};

// C[z] = A[z] B[z] through the view, as a triple loop.
template <class View>
void run_gemm(const View& v) {
  using I = typename View::index;
  for (I z = 0; z < v.batches(); ++z) {
    for (I m = 0; m < v.m(); ++m) {
      for (I n = 0; n < v.n(); ++n) {
        double acc = 0;
        for (I k = 0; k < v.k(); ++k) acc += v.lhs(z, m, k) * v.rhs(z, k, n);
        v.store(z, m, n, acc);
      }
    }
  }
}

torch::Tensor layout(torch::Tensor t, const std::string& how) {
  if (how == "channels_last") return t.contiguous(at::MemoryFormat::ChannelsLast);
  if (how == "sliced") {  // every other column of a wider tensor: a non-unit innermost stride
    auto wide = torch::zeros({t.size(0), t.size(1), t.size(2), 2 * t.size(3)}, t.options());
    auto view = wide.slice(3, 0, 2 * t.size(3), 2);
    view.copy_(t);
    return view;
  }
  return t;
}

// I: the views' index type (int32_t where offsets fit, as on the GPU, or int64_t).
template <typename I>
bool run(const Config& c) {
  torch::manual_seed(0);
  const auto opts = torch::TensorOptions().dtype(torch::kFloat64);
  const auto x = layout(torch::randn({c.batch, c.cin, c.height, c.width}, opts), c.layout);
  const auto routing = torch::rand({c.batch, c.experts}, opts);
  const auto weight =
      torch::randn({c.experts, c.cout, c.cin / c.groups, c.kernel, c.kernel}, opts);
  const auto bias = torch::randn({c.experts, c.cout}, opts);
  const condconv::Geometry g =
      condconv::check_inputs(x, routing, weight, c10::optional<at::Tensor>(bias), c.stride,
                             c.padding, c.dilation, c.groups);

  // The independent computation: per example, conv2d with the mixed kernel as a leaf.
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
  const auto grad_out = layout(torch::randn_like(expected), c.layout);
  std::vector<torch::Tensor> leaves{x_leaf};
  leaves.insert(leaves.end(), kernels.begin(), kernels.end());
  const auto grads = torch::autograd::grad({expected}, leaves, {grad_out});
  const auto expected_dx =
      grads[0].narrow(2, c.padding[0], c.height).narrow(3, c.padding[2], c.width);
  const auto expected_G = torch::stack(std::vector<torch::Tensor>(grads.begin() + 1, grads.end()));

  auto out = layout(torch::empty_like(expected), c.layout);
  auto dx = layout(torch::empty_like(x), c.layout);
  const Shape<I> s = condconv::cuda::make_shape<I>(g, x, out, &dx);
  const Shape<I> sg = condconv::cuda::make_shape<I>(g, x, grad_out, &dx);  // grad_out's strides
  const std::string name = c.name + (sizeof(I) == 4 ? "/i32" : "/i64");
  const auto r = routing.contiguous();
  const auto w = weight.contiguous();
  const auto mixed_bias = at::mm(r, bias);
  const double* x_ptr = x.const_data_ptr<double>();
  const double* w_ptr = w.const_data_ptr<double>();
  const double* r_ptr = r.const_data_ptr<double>();
  const double* go_ptr = grad_out.const_data_ptr<double>();
  auto G = torch::empty({c.batch, c.cout, c.cin / c.groups * c.kernel * c.kernel}, opts);

  if (!g.depthwise()) {
    run_gemm(condconv::cuda::ForwardView<double, double, I>{
        s, x_ptr, w_ptr, r_ptr, c.bias ? mixed_bias.const_data_ptr<double>() : nullptr,
        out.mutable_data_ptr<double>()});
    run_gemm(condconv::cuda::GradInputView<double, double, I>{sg, go_ptr, w_ptr, r_ptr,
                                                           dx.mutable_data_ptr<double>()});
    // Two chunks, to cover the chunk offset.
    const int64_t half = c.batch / 2;
    run_gemm(condconv::cuda::KernelGradView<double, double, I>{sg, I(0), I(half), go_ptr, x_ptr,
                                                            G.mutable_data_ptr<double>()});
    run_gemm(condconv::cuda::KernelGradView<double, double, I>{
        sg, I(half), I(c.batch - half), go_ptr, x_ptr, G[half].mutable_data_ptr<double>()});
  } else {
    const int64_t taps = g.kernel_h * g.kernel_w, mult = g.out_per_group();
    std::vector<double> mixed(g.out_channels * taps);
    auto out_a = out.accessor<double, 4>();
    auto dx_a = dx.accessor<double, 4>();
    auto G_a = G.accessor<double, 3>();
    for (int64_t b = 0; b < g.batch; ++b) {
      for (int64_t i = 0; i < g.out_channels * taps; ++i) {
        mixed[i] = condconv::cuda::mixed_weight(w_ptr, r_ptr, s, I(b), I(i / taps), I(i % taps));
      }
      for (int64_t co = 0; co < g.out_channels; ++co) {
        for (int64_t oh = 0; oh < g.out_h; ++oh) {
          for (int64_t ow = 0; ow < g.out_w; ++ow) {
            out_a[b][co][oh][ow] =
                condconv::cuda::depthwise_output(x_ptr, s, mixed.data() + co * taps, I(b), I(co),
                                                 I(oh), I(ow)) +
                (c.bias ? mixed_bias[b][co].item<double>() : 0.0);
          }
        }
        for (int64_t t = 0; t < taps; ++t) {
          double sum = 0;
          for (int64_t p = 0; p < g.out_h * g.out_w; ++p) {
            sum += condconv::cuda::depthwise_kernel_grad_term<double, double>(
                go_ptr, x_ptr, sg, I(b), I(co), I(t), I(p));
          }
          G_a[b][co][t] = sum;
        }
      }
      for (int64_t ci = 0; ci < g.in_channels; ++ci) {
        for (int64_t ih = 0; ih < g.height; ++ih) {
          for (int64_t iw = 0; iw < g.width; ++iw) {
            dx_a[b][ci][ih][iw] = condconv::cuda::depthwise_grad_input(
                go_ptr, sg, mixed.data() + ci * mult * taps, I(b), I(ci), I(ih), I(iw));
          }
        }
      }
    }
  }
  bool ok = close(out, expected.detach(), name, "forward");
  ok = close(dx, expected_dx, name, "grad_x") && ok;
  ok = close(G.view(expected_G.sizes()), expected_G, name, "kernel grads") && ok;
  return ok;
}

}  // namespace

int main() {
  const std::vector<Config> configs{
      {"dense", 3, 4, 6, 9, 11, 3, 4, 2, {2, 1}, {1, 0, 2, 1}, {1, 2}, true, "contiguous"},
      {"dense-cl", 2, 6, 9, 8, 7, 3, 3, 3, {1, 2}, {0, 2, 1, 1}, {2, 1}, false, "channels_last"},
      {"pointwise", 2, 8, 16, 7, 5, 1, 8, 1, {1, 1}, {0, 0, 0, 0}, {1, 1}, true, "sliced"},
      {"depthwise", 3, 6, 6, 13, 12, 5, 3, 6, {2, 2}, {2, 2, 1, 2}, {1, 1}, true, "contiguous"},
      {"dw-mult2", 2, 4, 8, 9, 9, 3, 2, 4, {1, 2}, {2, 2, 2, 2}, {2, 2}, false, "channels_last"},
      {"dw-sliced", 2, 3, 3, 6, 7, 3, 2, 3, {1, 1}, {1, 1, 0, 2}, {1, 1}, true, "sliced"},
  };
  bool ok = true;
  for (const auto& c : configs) {
    ok = run<int32_t>(c) && ok;
    ok = run<int64_t>(c) && ok;
  }
  std::printf("%s\n", ok ? "PASSED" : "FAILED");
  return ok ? 0 : 1;
}
