// The half launchers of the CUDA backend (typed.cuh), compiled on their own.
#include "typed.cuh"

namespace condconv {
namespace cuda {
CONDCONV_INSTANTIATE(at::Half)

// Every file compiles the Hopper kernels for the same architectures: the float16 clustered
// kernel's code stands for them all.
bool hopper_kernels_run(int device) {
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  return runs_sm90(&pointwise::pointwise_cluster_kernel<__half, 8, false, true>);
}
}  // namespace cuda
}  // namespace condconv
