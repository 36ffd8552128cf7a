// The little of the CUDA runtime the host side uses: launches (clustered ones included), the
// current stream, the device guard and the compute capability. tests/cpp/test_cuda_backend.cpp
// compiles the host side for the CPU with CONDCONV_EMULATE_CUDA and supplies its own
// (cuda_emulation.h), so that the whole backend runs there on CPU tensors.
#pragma once

#include "kernels.cuh"
#ifndef CONDCONV_EMULATE_CUDA
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <atomic>

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

// Whether the current device runs `kernel`'s sm_90 code: a Hopper GPU (compute capability 9.x),
// and this build has the kernel's code for it (TORCH_CUDA_ARCH_LIST with 9.0). Cached per
// device.
template <typename Kernel>
bool runs_sm90(Kernel kernel) {
  static std::atomic<int> known[64] = {};  // 0 unknown, 1 no, 2 yes
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  if (device < 0 || device >= 64) return false;
  int state = known[device].load(std::memory_order_relaxed);
  if (state == 0) {
    cudaFuncAttributes attr{};
    // ptxVersion too: a build with PTX for an older GPU only (TORCH_CUDA_ARCH_LIST="8.0+PTX")
    // has the kernel's body compiled out, and the driver would JIT that for sm_90.
    const bool ok = compute_capability_major() == 9 &&
                    cudaFuncGetAttributes(&attr, kernel) == cudaSuccess &&
                    attr.binaryVersion >= 90 && attr.ptxVersion >= 90;
    (void)cudaGetLastError();
    state = ok ? 2 : 1;
    known[device].store(state, std::memory_order_relaxed);
  }
  return state == 2;
}

// kernel<<<grid, kThreads, shared_bytes, stream>>>(args...) in clusters of (1, cluster_y, 1)
// blocks, its dynamic shared memory opted in, then the launch check.
template <typename... Params, typename... Args>
void launch_cluster(void (*kernel)(Params...), dim3 grid, unsigned cluster_y, size_t shared_bytes,
                    cudaStream_t stream, const Args&... args) {
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(shared_bytes)));
  cudaLaunchConfig_t config{};
  config.gridDim = grid;
  config.blockDim = dim3(kThreads);
  config.dynamicSmemBytes = shared_bytes;
  config.stream = stream;
  cudaLaunchAttribute cluster[1];
  cluster[0].id = cudaLaunchAttributeClusterDimension;
  cluster[0].val.clusterDim.x = 1;
  cluster[0].val.clusterDim.y = cluster_y;
  cluster[0].val.clusterDim.z = 1;
  config.attrs = cluster;
  config.numAttrs = 1;
  C10_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, args...));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
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
