// The little of the CUDA runtime the host side uses: launches, the current stream, the device
// guard and the compute capability. tests/cpp/test_cuda_backend.cpp compiles the host side for
// the CPU with CONDCONV_EMULATE_CUDA and supplies its own (cuda_emulation.h), so that the whole
// backend runs there on CPU tensors.
#pragma once

#include "kernels.cuh"
#ifndef CONDCONV_EMULATE_CUDA
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

namespace condconv {
namespace cuda {

using DeviceGuard = c10::cuda::CUDAGuard;

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream(); }

inline int compute_capability_major() {
  int device = 0, major = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  return major;
}

// kernel<<<grid, kThreads, shared_bytes, stream>>>(args...), then the launch check.
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, size_t shared_bytes, cudaStream_t stream,
            const Args&... args) {
  kernel<<<grid, kThreads, shared_bytes, stream>>>(args...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace cuda
}  // namespace condconv
#endif
