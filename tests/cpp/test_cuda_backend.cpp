// The whole CUDA backend (csrc/cuda/typed.cuh and condconv_cuda.cu: operand preparation, dtype
// and index-type dispatch, the choice of tensor cores, launches, the chunked kernel gradient
// folded into grad_weight and grad_routing, bias gradients, output masks) run on CPU tensors:
// the host side is compiled here for the CPU, its launches going to the emulation of cuda_emulation.h. Checked
// against the float64 results of cuda_cases.h, from which grad_weight, grad_routing and
// grad_bias are formed independently.
#include "cuda_emulation.h"  // first: the CUDA language for the host compiler
#include <cuda/kernels.cuh>

#include <c10/core/Device.h>

// The runtime pieces the host side takes from CUDA (runtime.cuh), on the CPU.
namespace condconv {
namespace cuda {
namespace {
int cluster_launches = 0;  // the clustered kernels' launches (pointwise_cluster.cuh, _wgmma.cuh)
int wgmma_launches = 0;    // of which pointwise_wgmma_kernel's
int kgrad_launches = 0;    // pointwise_kgrad_kernel's (counted apart from the others)
struct DeviceGuard {
  explicit DeviceGuard(c10::Device) {}
};
cudaStream_t current_stream() { return nullptr; }
int compute_capability_major() { return 9; }  // as the H100 / H200
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, size_t shared_bytes, cudaStream_t,
            const Args&... args) {
  emu::launch(kernel, grid, dim3(kThreads), shared_bytes, args...);
}
template <typename Kernel>
bool runs_sm90(Kernel) {
  return true;
}
bool is_wgmma(const void* kernel);
bool is_kgrad(const void* kernel);
template <typename... Params, typename... Args>
void launch_cluster(void (*kernel)(Params...), dim3 grid, unsigned cluster_y, size_t shared_bytes,
                    cudaStream_t, const Args&... args) {
  if (is_kgrad(reinterpret_cast<const void*>(kernel))) {
    ++kgrad_launches;
  } else {
    ++cluster_launches;
    wgmma_launches += is_wgmma(reinterpret_cast<const void*>(kernel)) ? 1 : 0;
  }
  emu::launch_cluster(kernel, grid, dim3(kThreads), shared_bytes, cluster_y, args...);
}
}  // namespace
}  // namespace cuda
}  // namespace condconv

#define CONDCONV_EMULATE_CUDA
#define CONDCONV_KERNEL_GRAD_BYTES 1024  // several chunks of examples in the dense backward
#include <cuda/typed.cuh>
#include <cuda/condconv_cuda.cu>

#include <torch/torch.h>

#include "checks.h"
#include "cuda_cases.h"

#include <array>
#include <cstdio>
#include <string>

namespace condconv {
namespace cuda {
namespace {
// Whether `kernel` is an instance of pointwise_wgmma_kernel.
bool is_wgmma(const void* kernel) {
  using pointwise::wgmma::pointwise_wgmma_kernel;
  const void* instances[] = {
      reinterpret_cast<const void*>(&pointwise_wgmma_kernel<__half, 4, false>),
      reinterpret_cast<const void*>(&pointwise_wgmma_kernel<__half, 4, true>),
      reinterpret_cast<const void*>(&pointwise_wgmma_kernel<__half, 8, false>),
      reinterpret_cast<const void*>(&pointwise_wgmma_kernel<__half, 8, true>),
      reinterpret_cast<const void*>(&pointwise_wgmma_kernel<__nv_bfloat16, 4, false>),
      reinterpret_cast<const void*>(&pointwise_wgmma_kernel<__nv_bfloat16, 4, true>),
      reinterpret_cast<const void*>(&pointwise_wgmma_kernel<__nv_bfloat16, 8, false>),
      reinterpret_cast<const void*>(&pointwise_wgmma_kernel<__nv_bfloat16, 8, true>)};
  for (const void* k : instances) {
    if (k == kernel) return true;
  }
  return false;
}
// Whether `kernel` is an instance of pointwise_kgrad_kernel.
bool is_kgrad(const void* kernel) {
  using pointwise_kgrad::pointwise_kgrad_kernel;
  return kernel == reinterpret_cast<const void*>(&pointwise_kgrad_kernel<__half, 4>) ||
         kernel == reinterpret_cast<const void*>(&pointwise_kgrad_kernel<__half, 8>) ||
         kernel == reinterpret_cast<const void*>(&pointwise_kgrad_kernel<__nv_bfloat16, 4>) ||
         kernel == reinterpret_cast<const void*>(&pointwise_kgrad_kernel<__nv_bfloat16, 8>);
}
}  // namespace
}  // namespace cuda
}  // namespace condconv

namespace {

using cuda_cases::Config;

template <typename scalar_t>
bool run(const Config& c, bool tf32, double tol, std::array<bool, 4> mask) {
  constexpr at::ScalarType dtype = c10::CppTypeToScalarType<scalar_t>::value;
  at::globalContext().setAllowTF32CuDNN(tf32);
  const auto k = cuda_cases::make_case(c, dtype, 2);
  const auto& g = k.geometry;
  const c10::optional<at::Tensor> bias =
      c.bias ? c10::optional<at::Tensor>(k.bias) : c10::nullopt;
  const auto f64 = torch::kFloat64;

  const condconv::ScaleArgs no_scales{};
  const at::Tensor out = condconv::cuda::forward(k.x, k.routing, k.weight, bias, no_scales, g);
  const auto empty = [](const at::Tensor& like) { return at::empty({0}, like.options()); };
  at::Tensor grad_x = mask[0] ? at::empty(k.x.sizes(), k.x.options().memory_format(
                                                           k.x.suggest_memory_format()))
                              : empty(k.x);
  at::Tensor grad_routing = mask[1] ? at::empty(k.routing.sizes(), k.routing.options())
                                    : empty(k.routing);
  at::Tensor grad_weight = mask[2] ? at::empty(k.weight.sizes(), k.weight.options())
                                   : empty(k.weight);
  at::Tensor grad_bias = mask[3] ? at::empty({g.experts, g.out_channels}, k.weight.options())
                                 : empty(k.weight);
  condconv::ScaleGrads scale_grads{};
  condconv::cuda::backward(k.grad_out, k.x, k.routing, k.weight, bias, no_scales, g, mask,
                           grad_x, grad_routing, grad_weight, grad_bias, scale_grads);

  // The parameter gradients from the per-example kernel gradients G_b, in float64.
  const auto G = k.kernel_grads.reshape({c.batch, -1});
  const auto r = k.routing.to(f64), W = k.weight.to(f64).reshape({c.experts, -1});
  const auto gsum = k.grad_out.to(f64).sum({2, 3});
  auto want_routing = at::mm(G, W.t());
  if (c.bias) want_routing = want_routing + at::mm(gsum, k.bias.to(f64).t());

  const std::string name = c.name + "/" + c10::toString(dtype) +
                           (dtype == torch::kFloat && tf32 ? "/tf32" : "") +
                           (mask == std::array<bool, 4>{true, true, true, c.bias} ? "" : "/mask");
  bool ok = close(out, k.out, name, "forward", tol);
  if (!out.is_contiguous(k.x.suggest_memory_format())) {
    std::printf("%-22s output layout differs from x's: FAIL\n", name.c_str());
    ok = false;
  }
  if (mask[0]) ok = close(grad_x, k.grad_x, name, "grad_x", tol) && ok;
  if (mask[1]) ok = close(grad_routing, want_routing, name, "grad_routing", tol) && ok;
  if (mask[2]) {
    ok = close(grad_weight, at::mm(r.t(), G).view(k.weight.sizes()), name, "grad_weight", tol) &&
         ok;
  }
  if (mask[3]) ok = close(grad_bias, at::mm(r.t(), gsum), name, "grad_bias", tol) && ok;
  return ok;
}

}  // namespace

int main() {
  bool ok = true;
  for (const auto& c : cuda_cases::configs()) {
    const std::array<bool, 4> all{true, true, true, c.bias};
    ok = run<double>(c, false, 1e-10, all) && ok;
    ok = run<float>(c, false, 1e-5, all) && ok;
    ok = run<float>(c, true, 5e-3, all) && ok;
    ok = run<float>(c, false, 1e-5, {false, true, false, false}) && ok;
    ok = run<float>(c, false, 1e-5, {true, false, true, false}) && ok;
    ok = run<at::Half>(c, true, 5e-3, all) && ok;
    ok = run<at::BFloat16>(c, true, 3e-2, all) && ok;
  }
  // The 16-bit 1x1 channels_last cases (pw-cl, pw-cl-cluster, pw-cl-wgmma) took the clustered
  // kernel, forward and grad_x in both dtypes (12 launches); then the same in its wmma form, in
  // the wgmma kernel, and with the switch off the tiled kernels instead.
  const auto set_mode = [](int64_t mode) {
    torch::Dispatcher::singleton()
        .findSchemaOrThrow("condconv::cuda_pointwise_cluster", "")
        .typed<int64_t(c10::optional<int64_t>)>()
        .call(mode);
  };
  const std::array<int64_t, 3> modes{2, 3, 0};
  for (size_t i = 0; i < modes.size(); ++i) {
    const int launches = condconv::cuda::cluster_launches;
    const int wgmma = condconv::cuda::wgmma_launches;
    if (launches != 12 * int(i + 1) || wgmma != (i == 2 ? 12 : 0)) {
      std::printf("clustered kernel launches before mode %d: %d (wgmma %d): FAIL\n",
                  int(modes[i]), launches, wgmma);
      ok = false;
    }
    set_mode(modes[i]);
    for (const auto& c : cuda_cases::configs()) {
      if (c.kernel != 1 || c.layout != "channels_last") continue;
      const std::array<bool, 4> all{true, true, true, c.bias};
      ok = run<at::Half>(c, true, 5e-3, all) && ok;
      ok = run<at::BFloat16>(c, true, 3e-2, all) && ok;
    }
  }
  if (condconv::cuda::cluster_launches != 36 || condconv::cuda::wgmma_launches != 12) {
    std::printf("the clustered kernels ran with the switch off: FAIL\n");
    ok = false;
  }
  // The kernel gradient's switch on (the clustered kernels off still): the same cases'
  // gradients, each backward's kernel gradient one launch of pointwise_kgrad_kernel.
  const auto set_kgrad = [](int64_t mode) {
    torch::Dispatcher::singleton()
        .findSchemaOrThrow("condconv::cuda_pointwise_kgrad", "")
        .typed<int64_t(c10::optional<int64_t>)>()
        .call(mode);
  };
  if (condconv::cuda::kgrad_launches != 0) {
    std::printf("the kernel gradient's kernel ran with its switch off: FAIL\n");
    ok = false;
  }
  set_kgrad(1);
  int cases = 0;
  for (const auto& c : cuda_cases::configs()) {
    if (c.kernel != 1 || c.layout != "channels_last") continue;
    const std::array<bool, 4> all{true, true, true, c.bias};
    ok = run<at::Half>(c, true, 5e-3, all) && ok;
    ok = run<at::BFloat16>(c, true, 3e-2, all) && ok;
    cases += 2;
  }
  set_kgrad(0);
  if (cases != 6 || condconv::cuda::kgrad_launches != cases) {
    std::printf("kernel gradient launches: %d for %d runs: FAIL\n",
                condconv::cuda::kgrad_launches, cases);
    ok = false;
  }
  set_mode(1);
  std::printf("%s\n", ok ? "PASSED" : "FAILED");
  return ok ? 0 : 1;
}
