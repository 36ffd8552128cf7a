// The CUDA kernels' index arithmetic (csrc/cuda/views.cuh), run on the CPU: each implicit-GEMM
// view is evaluated as a plain triple loop, and the depthwise per-pixel sums pixel by pixel, then
// compared with an independent computation (one at::conv2d per example with the kernel mixed by
// hand, and libtorch's autograd through it for grad_x and the per-example kernel gradients).
// The kernels themselves (tiling, shared memory, launches) run in test_cuda_kernels.cpp.
#include <torch/torch.h>

#include <condconv.h>

#include "checks.h"
#include "cuda_cases.h"
#include <cuda/views.cuh>

#include <cstdio>
#include <string>

namespace {

using condconv::cuda::Shape;
using cuda_cases::Config;
using cuda_cases::layout;

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

// I: the views' index type (int32_t where offsets fit, as on the GPU, or int64_t).
template <typename I>
bool run(const Config& c) {
  const auto k = cuda_cases::make_case(c, torch::kFloat64);
  const auto& g = k.geometry;
  const auto& x = k.x;
  const auto& grad_out = k.grad_out;
  const auto opts = x.options();
  auto out = layout(torch::empty_like(k.out), c.layout);
  auto dx = layout(torch::empty_like(x), c.layout);
  const Shape<I> s = condconv::cuda::make_shape<I>(g, x, out, &dx);
  const Shape<I> sg = condconv::cuda::make_shape<I>(g, x, grad_out, &dx);  // grad_out's strides
  const std::string name = c.name + (sizeof(I) == 4 ? "/i32" : "/i64");
  const auto r = k.routing.contiguous();
  const auto w = k.weight.contiguous();
  const auto mixed_bias = at::mm(r, k.bias);
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
  bool ok = close(out, k.out, name, "forward");
  ok = close(dx, k.grad_x, name, "grad_x") && ok;
  ok = close(G, k.kernel_grads, name, "kernel grads") && ok;
  return ok;
}

}  // namespace

int main() {
  bool ok = true;
  for (const auto& c : cuda_cases::configs()) {
    ok = run<int32_t>(c) && ok;
    ok = run<int64_t>(c) && ok;
  }
  std::printf("%s\n", ok ? "PASSED" : "FAILED");
  return ok ? 0 : 1;
}
