// The Python extension module condconv_kernels._C. Importing it loads the shared library, whose
// static initialisers register the `condconv` operators (ops.cpp); there is nothing else to bind,
// so the module is made with Python's C API alone (no pybind11 or torch/extension.h to compile).
#include <Python.h>

#define CONDCONV_CONCAT2(a, b) a##b
#define CONDCONV_CONCAT(a, b) CONDCONV_CONCAT2(a, b)
#define CONDCONV_STR2(a) #a
#define CONDCONV_STR(a) CONDCONV_STR2(a)

static struct PyModuleDef condconv_module = {
    PyModuleDef_HEAD_INIT, CONDCONV_STR(TORCH_EXTENSION_NAME),
    "condconv_kernels native operators (registered under torch.ops.condconv)", -1, nullptr};

PyMODINIT_FUNC CONDCONV_CONCAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  return PyModule_Create(&condconv_module);
}
