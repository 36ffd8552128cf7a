// The Python extension module condconv_kernels._C. Importing it loads the shared library, whose
// static initialisers register the `condconv` operators (ops.cpp); there is nothing else to bind.
#include <torch/extension.h>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "condconv_kernels native operators (registered under torch.ops.condconv)";
}
