// The `mokernels` op library and the extension module `mokernels._C`.
// Schemas: csrc/schemas.h. CUDA kernels: TORCH_LIBRARY_IMPL blocks in csrc/<family>.cu.
// CPU kernels (the pure-torch references), fake kernels and autograd: mokernels/ops/<family>.py.
#include <Python.h>
#include <pybind11/pybind11.h>
#include <torch/library.h>
#include <torch/version.h>

#include "schemas.h"
#include "cpu/cpu_ops.h"

#if MOKERNELS_WITH_CUDA
#include <cuda.h>
#endif

// setup.py passes the targets as shell-safe tokens (sm_80,compute_80,sm_90a); stringify them here.
#define MK_STRINGIFY_(...) #__VA_ARGS__
#define MK_STRINGIFY(...) MK_STRINGIFY_(__VA_ARGS__)
#ifdef MOKERNELS_CUDA_ARCHS_TOKENS
#define MOKERNELS_CUDA_ARCHS MK_STRINGIFY(MOKERNELS_CUDA_ARCHS_TOKENS)
#else
#define MOKERNELS_CUDA_ARCHS ""
#endif

TORCH_LIBRARY(mokernels, m) { mk::define_schemas(m); }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "mokernels compiled extension: op schemas and CUDA kernels";
  m.def("build_info", [] {
    pybind11::dict d;
    d["with_cuda"] = static_cast<bool>(MOKERNELS_WITH_CUDA);
    d["cuda_archs"] = std::string(MOKERNELS_CUDA_ARCHS);
#if MOKERNELS_WITH_CUDA
    d["cuda_version"] = std::to_string(CUDA_VERSION / 1000) + "." + std::to_string((CUDA_VERSION % 1000) / 10);
#else
    d["cuda_version"] = pybind11::none();
#endif
    d["torch_version"] = std::string(TORCH_VERSION);
    d["compiler"] = std::string(__VERSION__);
    return d;
  }, "Compile-time facts of this build: CUDA arches, CUDA and torch versions it was built with.");
  mk::cpu::bind(m);  // native CPU kernels of the ops' CPU path (csrc/cpu/)
}
