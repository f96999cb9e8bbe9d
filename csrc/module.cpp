// The Python module adalora_fast._C: importing it runs the op registrations (TORCH_LIBRARY in
// orth_penalty.cpp, TORCH_LIBRARY_IMPL for CUDA in cuda/); the ops are called as torch.ops.adalora_fast.*.
//
// Written against the CPython C API alone (no pybind11): of its own symbols the module exports PyInit__C alone, and
// shares no C++ runtime state with torch's own Python bindings.
#include <Python.h>

namespace {

PyObject* built_with_cuda(PyObject* /*self*/, PyObject* /*args*/) {
#ifdef ADALORA_FAST_WITH_CUDA
  Py_RETURN_TRUE;
#else
  Py_RETURN_FALSE;
#endif
}

PyMethodDef methods[] = {
    {"built_with_cuda", built_with_cuda, METH_NOARGS, "Whether the CUDA implementation was compiled in."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    "adalora_fast._C",
    "adalora-fast C++/CUDA ops (registered under torch.ops.adalora_fast)",
    -1,
    methods,
    nullptr,
    nullptr,
    nullptr,
    nullptr,
};

}  // namespace

PyMODINIT_FUNC PyInit__C() { return PyModule_Create(&module_def); }
