// The float launchers of the CUDA backend (typed.cuh), compiled on their own.
#include "typed.cuh"

namespace condconv {
namespace cuda {
CONDCONV_INSTANTIATE(float)
}  // namespace cuda
}  // namespace condconv
