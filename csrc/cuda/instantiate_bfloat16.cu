// The bfloat16 launchers of the CUDA backend (typed.cuh), compiled on their own.
#include "typed.cuh"

namespace condconv {
namespace cuda {
CONDCONV_INSTANTIATE(at::BFloat16)
}  // namespace cuda
}  // namespace condconv
