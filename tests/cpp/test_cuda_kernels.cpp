// The CUDA kernels themselves (csrc/cuda/kernels.cuh: tiling, shared memory, barriers, warp
// shuffles, tensor-core fragments, launch grids) run on the CPU under an emulation of the CUDA
// execution model (cuda_emulation.h), against the float64 results of cuda_cases.h. Every output
// starts as NaN, so an element no block writes fails. Covered: every dense view on CUDA cores
// (float64 with both index types, float32, float16) and on tensor cores (TF32 and float16 with
// 32-bit offsets, bfloat16 with 64-bit ones), and the three depthwise kernels in every dtype
// with both thread layouts.
// The clustered 1x1 kernel (pointwise_cluster.cuh: clusters of 4 blocks, multicast copies,
// shared-memory barriers) runs, forward and grad_x in float16 and bfloat16, its products through
// ldmatrix and mma.sync on swizzled tiles and through wmma, and the wgmma kernel
// (pointwise_wgmma.cuh: the mix in registers, 128-row blocks), on every case they take, the
// blocks of a cluster together (cuda_emulation.h: launch_cluster); and the 1x1 kernel gradient
// (pointwise_kgrad.cuh: G_b on the tensor cores, folded into the experts' gradients and the
// routing's in registers), at two plans (one slice, and slices of 2 examples with 2 stages).
// What the emulation cannot show is speed, races between barriers, or the host launchers'
// streams and allocations: tests/test_gpu.py and compute-sanitizer on a GPU check those.
#include "cuda_emulation.h"  // first: the CUDA language for the host compiler

#include <torch/torch.h>

#include <ATen/OpMathType.h>

#include "checks.h"
#include "cuda_cases.h"
#include <cuda/kernels.cuh>
#include <cuda/pointwise_kgrad.cuh>
#include <cuda/pointwise_wgmma.cuh>

#include <cstdio>
#include <limits>
#include <string>
#include <type_traits>

namespace {

namespace cc = condconv::cuda;
using cuda_cases::Config;
using cuda_cases::layout;

enum class Path { kCudaCores, kTensorCores };

// One dense pass, launched as the host launcher does (typed.cuh: launch_gemm).
template <typename scalar_t, class View>
void gemm(const View& v, Path path) {
  using acc_t = at::opmath_type<scalar_t>;
  if (v.m() == 0 || v.n() == 0 || v.batches() == 0) return;
  const dim3 block(cc::kThreads);
  if constexpr (!std::is_same<scalar_t, double>::value) {
    if (path == Path::kTensorCores) {
      emu::launch(cc::tensor_core_gemm_kernel<View, cc::TensorCoreOperand<scalar_t>>,
                  cc::gemm_grid(v, cc::kTensorCoreExamples<View>), block, 0, v);
      return;
    }
  }
  emu::launch(cc::implicit_gemm_kernel<View, acc_t>, cc::gemm_grid(v), block, 0, v);
}

// An empty tensor like t in the configuration's layout, filled with NaN.
torch::Tensor poisoned(const torch::Tensor& t, at::ScalarType dtype, const std::string& how) {
  return layout(torch::empty(t.sizes(), t.options().dtype(dtype)), how)
      .fill_(std::numeric_limits<double>::quiet_NaN());
}

template <typename scalar_t, typename I>
bool run(const Config& c, Path path, double tol) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr at::ScalarType dtype = c10::CppTypeToScalarType<scalar_t>::value;
  constexpr at::ScalarType acc = c10::CppTypeToScalarType<acc_t>::value;
  const auto k = cuda_cases::make_case(c, dtype, 1);
  const auto& g = k.geometry;
  const auto routing = k.routing.contiguous();
  const auto weight = k.weight.contiguous();
  const auto mixed_bias = at::mm(routing, k.bias.to(acc));
  const scalar_t* x = k.x.const_data_ptr<scalar_t>();
  const scalar_t* w = weight.const_data_ptr<scalar_t>();
  const acc_t* r = routing.const_data_ptr<acc_t>();
  const acc_t* bias = c.bias ? mixed_bias.const_data_ptr<acc_t>() : nullptr;
  const scalar_t* go = k.grad_out.const_data_ptr<scalar_t>();
  const std::string name = c.name + "/" + c10::toString(dtype) + (sizeof(I) == 4 ? "/i32" : "/i64") +
                           (path == Path::kTensorCores && !g.depthwise() ? "/tc" : "");
  // The depthwise kernels run with both thread layouts, whatever the tensors' layout: threads
  // along the pixels of a plane, and along the channels (the channels_last one).
  bool ok = true;
  const std::vector<bool> layouts = g.depthwise() ? std::vector<bool>{false, true}
                                                 : std::vector<bool>{false};
  for (const bool inner : layouts) {
    auto out = poisoned(k.out, dtype, c.layout);
    auto dx = poisoned(k.x, dtype, c.layout);
    const auto s = cc::make_shape<I>(g, k.x, out, &dx);
    const auto sg = cc::make_shape<I>(g, k.x, k.grad_out, &dx);  // grad_out's strides
    at::Tensor G = torch::full(k.kernel_grads.sizes(), std::numeric_limits<double>::quiet_NaN(),
                               k.x.options().dtype(acc));
    const dim3 block(cc::kThreads);
    int tile = 0;  // the depthwise forward's channels a block
    if (!g.depthwise()) {
      gemm<scalar_t>(cc::ForwardView<scalar_t, acc_t, I>{s, x, w, r, bias,
                                                         out.mutable_data_ptr<scalar_t>()},
                     path);
      gemm<scalar_t>(cc::GradInputView<scalar_t, acc_t, I>{sg, go, w, r,
                                                           dx.mutable_data_ptr<scalar_t>()},
                     path);
      // Two chunks, to cover the chunk offset.
      const int64_t half = c.batch / 2;
      gemm<scalar_t>(cc::KernelGradView<scalar_t, acc_t, I>{sg, I(0), I(half), go, x,
                                                            G.mutable_data_ptr<acc_t>()},
                     path);
      gemm<scalar_t>(cc::KernelGradView<scalar_t, acc_t, I>{sg, I(half), I(c.batch - half), go,
                                                            x, G[half].mutable_data_ptr<acc_t>()},
                     path);
    } else {
      const int64_t taps = g.kernel_h * g.kernel_w, mult = g.out_per_group();
      const auto fwd = cc::depthwise_grid(g.batch, g.out_channels, g.out_pixels(), taps,
                                          sizeof(acc_t), inner);
      tile = fwd.tile;
      emu::launch(cc::depthwise_forward_kernel<scalar_t, acc_t, I>, fwd.grid, block,
                  fwd.shared_bytes, s, fwd.tile, x, w, r, bias, out.mutable_data_ptr<scalar_t>());
      const auto bwd = cc::depthwise_grid(g.batch, g.in_channels, g.height * g.width,
                                          mult * taps, sizeof(acc_t), inner);
      emu::launch(cc::depthwise_grad_input_kernel<scalar_t, acc_t, I>, bwd.grid, block,
                  bwd.shared_bytes, sg, bwd.tile, go, w, r, dx.mutable_data_ptr<scalar_t>());
      // Two slices of the plane, summed after, as the launcher does for large planes.
      auto kg = cc::depthwise_grid(g.batch, g.out_channels, g.out_pixels(), 0, sizeof(acc_t),
                                   inner);
      kg.grid.y = 2;
      at::Tensor partial = torch::full({2, g.batch, g.out_channels * taps},
                                       std::numeric_limits<double>::quiet_NaN(), G.options());
      emu::launch(cc::depthwise_kernel_grad_kernel<scalar_t, acc_t, I>, kg.grid, block, 0, sg,
                  kg.tile, go, x, partial.mutable_data_ptr<acc_t>());
      G.copy_(partial.sum(0).view(G.sizes()));
    }
    const std::string what = name + (tile > 0 ? "/tile" + std::to_string(tile) : "");
    ok = close(out, k.out, what, "forward", tol) && ok;
    ok = close(dx, k.grad_x, what, "grad_x", tol) && ok;
    ok = close(G, k.kernel_grads, what, "kernel grads", tol) && ok;
  }
  return ok;
}

int cluster_runs = 0;  // the cases (and dtypes) the clustered kernel took

// The clustered kernel's forward and grad_x on a case it takes (pointwise_cluster::fits).
template <typename scalar_t>
bool run_cluster(const Config& c, double tol) {
  namespace pc = cc::pointwise;
  constexpr at::ScalarType dtype = c10::CppTypeToScalarType<scalar_t>::value;
  const auto k = cuda_cases::make_case(c, dtype, 1);
  const auto& g = k.geometry;
  auto out = poisoned(k.out, dtype, c.layout);
  auto dx = poisoned(k.x, dtype, c.layout);
  const auto weight = k.weight.contiguous();
  if (!pc::fits(g, k.x, out, weight) || !pc::fits(g, k.grad_out, dx, weight)) return true;
  ++cluster_runs;
  const auto routing = k.routing.contiguous();
  const auto mixed_bias = at::mm(routing, k.bias.to(torch::kFloat32));
  // The three kernels (1: pointwise_cluster_kernel through ldmatrix and mma.sync, 2: the same
  // through wmma, 3: pointwise_wgmma_kernel), each through the forward and grad_x into fresh NaN
  // outputs.
  const auto form = [&](int mode) {
    const char* names[] = {"", "/cluster", "/cluster-wmma", "/cluster-wgmma"};
    const std::string name = c.name + "/" + c10::toString(dtype) + names[mode];
    out.fill_(std::numeric_limits<double>::quiet_NaN());
    dx.fill_(std::numeric_limits<double>::quiet_NaN());
    for (const bool grad_x : {false, true}) {
      pc::Pass pass;
      std::string error;
      const void* in = grad_x ? k.grad_out.const_data_ptr() : k.x.const_data_ptr();
      void* dst = grad_x ? dx.mutable_data_ptr() : out.mutable_data_ptr();
      const float* bias = c.bias ? mixed_bias.const_data_ptr<float>() : nullptr;
      const bool bf16 = dtype == torch::kBFloat16;
      const bool ready =
          mode == 3 ? pc::wgmma::prepare(grad_x, bf16, weight.const_data_ptr(), in, dst,
                                         routing.const_data_ptr<float>(), bias, g.batch,
                                         g.in_channels, g.out_channels, g.out_pixels(), g.experts,
                                         &pass, &error)
                    : pc::prepare(grad_x, bf16, mode == 1, weight.const_data_ptr(), in, dst,
                                  routing.const_data_ptr<float>(), bias, g.batch, g.in_channels,
                                  g.out_channels, g.out_pixels(), g.experts, &pass, &error);
      if (!ready) {
        std::printf("%-22s cluster maps refused: %s: FAIL\n", name.c_str(), error.c_str());
        return false;
      }
      if (pass.plan.example_blocks % pc::kClusterSize != 0 || pass.plan.stages < 2) {
        std::printf("%-22s cluster plan: FAIL\n", name.c_str());
        return false;
      }
      const auto launch = [](auto kernel, dim3 grid, size_t bytes, const auto&... args) {
        emu::launch_cluster(kernel, grid, dim3(pc::kBlockThreads), bytes, pc::kClusterSize,
                            args...);
      };
      mode == 3 ? pc::wgmma::dispatch<scalar_t>(pass, launch)
                : pc::dispatch<scalar_t>(pass, launch);
    }
    const bool fwd = close(out, k.out, name, "forward", tol);
    return close(dx, k.grad_x, name, "grad_x", tol) && fwd;
  };
  bool ok = true;
  for (const int mode : {1, 2, 3}) ok = form(mode) && ok;
  return ok;
}

int kgrad_runs = 0;  // the cases (and dtypes) the kernel gradient took

// The 1x1 kernel gradient (pointwise_kgrad.cuh) on a case it takes: grad_weight (the slices'
// sums) and grad_routing (the tiles' sums) against r^T G and G W^T from the case's float64
// per-example kernel gradients G, at the host's plan, and at slices of 2 examples with 2 stages
// (every slice's examples pipelined, stages refilled) whose copies land as soon as issued (a
// stage refilled before every warp has read it shows).
template <typename scalar_t>
bool run_kgrad(const Config& c, double tol) {
  namespace kg = cc::pointwise_kgrad;
  constexpr at::ScalarType dtype = c10::CppTypeToScalarType<scalar_t>::value;
  const auto k = cuda_cases::make_case(c, dtype, 2);
  const auto& g = k.geometry;
  const auto weight = k.weight.contiguous();
  if (!kg::fits(g, k.grad_out, k.x, weight)) return true;
  ++kgrad_runs;
  const auto routing = k.routing.contiguous();
  const auto G = k.kernel_grads.reshape({g.batch, -1});                   // (B, Cout Cin)
  const auto want_w = at::mm(routing.to(torch::kFloat64).t(), G);        // (E, Cout Cin)
  const auto want_r = at::mm(G, weight.to(torch::kFloat64).reshape({g.experts, -1}).t());
  bool ok = true;
  for (const bool small : {false, true}) {
    const std::string name =
        c.name + "/" + c10::toString(dtype) + (small ? "/kgrad-2x2" : "/kgrad");
    kg::Plan plan = kg::plan(g.batch, g.in_channels, g.out_channels, g.experts);
    if (small) {
      plan.per_slice = 2;
      plan.slices = unsigned((g.batch + 1) / 2);
      plan.shared_bytes -= (plan.stages - 2) * kg::kStepBytes;
      plan.stages = 2;
    }
    const auto f32 = torch::TensorOptions().dtype(torch::kFloat32);
    auto gw = torch::full({int64_t(plan.slices), g.experts, g.out_channels, g.in_channels},
                          std::numeric_limits<float>::quiet_NaN(), f32);
    auto gr = torch::full({int64_t(plan.tiles), g.batch, g.experts},
                          std::numeric_limits<float>::quiet_NaN(), f32);
    kg::Pass pass;
    std::string error;
    if (!kg::prepare(dtype == torch::kBFloat16, weight.const_data_ptr(),
                     k.grad_out.const_data_ptr(), k.x.const_data_ptr(),
                     routing.const_data_ptr<float>(), gw.mutable_data_ptr<float>(),
                     gr.mutable_data_ptr<float>(), g.batch, g.in_channels, g.out_channels,
                     g.out_pixels(), g.experts, plan, &pass, &error)) {
      std::printf("%-22s kgrad maps refused: %s: FAIL\n", name.c_str(), error.c_str());
      return false;
    }
    emu::land_at_issue = small;  // the small plan's copies land as soon as they are issued
    kg::dispatch<scalar_t>(pass, [](auto kernel, dim3 grid, size_t bytes, const auto&... args) {
      emu::launch_cluster(kernel, grid, dim3(kg::kBlockThreads), bytes, 1, args...);
    });
    emu::land_at_issue = false;
    ok = close(gw.sum(0).reshape({g.experts, -1}), want_w, name, "grad_weight", tol) && ok;
    ok = close(gr.sum(0), want_r, name, "grad_routing", tol) && ok;
  }
  return ok;
}

// The kernel gradient's plan (no kernel run): the model's layers at batch 256 in one slice of
// 108 tiles (s6.b1.expand) or 11 of 24 (s5.b0.expand); at any batch up to the largest the
// grid takes, every example in a slice, at least 2 stages, within the shared-memory limit.
bool kgrad_plans() {
  namespace kg = cc::pointwise_kgrad;
  bool ok = true;
  const auto check = [&](bool cond, const char* what, int64_t batch, int64_t experts) {
    if (!cond) {
      std::printf("kgrad plan, batch %lld, %lld experts: %s: FAIL\n",
                  static_cast<long long>(batch), static_cast<long long>(experts), what);
      ok = false;
    }
  };
  const kg::Plan expand = kg::plan(256, 192, 1152, 8);
  check(expand.tiles == 108 && expand.slices == 1 && expand.per_slice == 256, "s6.b1.expand",
        256, 8);
  const kg::Plan s5 = kg::plan(256, 80, 480, 8);
  check(s5.tiles == 24 && s5.slices == 11 && s5.per_slice == 24, "s5.b0.expand", 256, 8);
  for (const int64_t batch : {1, 37, 256, 5000, 5500, 6000, 20000, 4 * (65535 - 4)}) {
    for (const int64_t experts : {1, 3, 4, 8}) {
      for (const auto& [cin, cout] : {std::pair<int64_t, int64_t>{192, 1152}, {1152, 320},
                                      {80, 480}}) {
        const kg::Plan p = kg::plan(batch, cin, cout, experts);
        check(p.per_slice >= 1 && int64_t(p.slices) * p.per_slice >= batch &&
                  int64_t(p.slices - 1) * p.per_slice < batch, "slices", batch, experts);
        check(p.stages >= 2 && p.stages <= kg::kMaxStages, "stages", batch, experts);
        check(p.shared_bytes <= kg::kSharedLimit, "shared memory", batch, experts);
      }
    }
  }
  return ok;
}

}  // namespace

int main() {
  bool ok = kgrad_plans();
  for (const auto& c : cuda_cases::configs()) {
    ok = run<double, int32_t>(c, Path::kCudaCores, 1e-10) && ok;
    ok = run<double, int64_t>(c, Path::kCudaCores, 1e-10) && ok;
    ok = run<float, int32_t>(c, Path::kCudaCores, 1e-5) && ok;
    if (c.cin / c.groups > 1) ok = run<float, int32_t>(c, Path::kTensorCores, 5e-3) && ok;  // TF32
    ok = run<at::Half, int64_t>(c, Path::kCudaCores, 5e-3) && ok;
    ok = run<at::Half, int32_t>(c, Path::kTensorCores, 5e-3) && ok;
    ok = run<at::BFloat16, int64_t>(c, Path::kTensorCores, 3e-2) && ok;  // 64-bit offsets
    ok = run_cluster<at::Half>(c, 5e-3) && ok;
    ok = run_cluster<at::BFloat16>(c, 3e-2) && ok;
    ok = run_kgrad<at::Half>(c, 1e-4) && ok;
    ok = run_kgrad<at::BFloat16>(c, 1e-4) && ok;
  }
  if (kgrad_runs < 6) {  // pw-cl, pw-cl-cluster and pw-cl-wgmma, in both dtypes
    std::printf("the kernel gradient took %d cases of 6: FAIL\n", kgrad_runs);
    ok = false;
  }
  if (cluster_runs < 6) {  // pw-cl, pw-cl-cluster and pw-cl-wgmma, in both dtypes
    std::printf("the clustered kernels took %d cases of 6: FAIL\n", cluster_runs);
    ok = false;
  }
  std::printf("%s\n", ok ? "PASSED" : "FAILED");
  return ok ? 0 : 1;
}
