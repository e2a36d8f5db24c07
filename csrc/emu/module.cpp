// The emulation module (mokernels._emu, mokernels._emu_asan built with ASan/UBSan, or
// mokernels._emu_tsan built with TSan): every
// csrc/<family>.cu wrapper compiled as host C++ with MOKERNELS_EMULATION, so its kernels run on
// CPU tensors through the fiber emulator (shim.cpp) as the `mokernels_emu` ops.
#include <pybind11/pybind11.h>

#include "../schemas.h"

// Kernel code: a maybe-uninitialised local (a forgotten neutral value, an accumulator set on one path
// only) is a build error, not a warning (torch's headers, included above, are not held to it).
#pragma GCC diagnostic push
#pragma GCC diagnostic error "-Wuninitialized"
#pragma GCC diagnostic error "-Wmaybe-uninitialized"
#include "../rank_one.cu"
#include "../tile_gemm.cu"
#include "../router.cu"
#include "../lora.cu"
#include "../lora_bwd.cu"
#include "../lora_fused_w.cu"
#include "../householder.cu"
#include "../moore.cu"

#include "selftest.h"
#pragma GCC diagnostic pop

#include "planted.h"  // deliberately wrong kernels (sanitizer build only)
#include "mutants.h"  // the planted-bug catalogue (tests/test_emu_mutants.py)

TORCH_LIBRARY(mokernels_emu, m) {
  mk::define_schemas(m);
  mk::planted::define(m);
  mk::selftest::define(m);
  mk::mutants::define(m);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "mokernels kernels run on CPU through the CUDA emulator (logic only, not speed)";
#if defined(__SANITIZE_ADDRESS__)
  m.attr("sanitized") = true;
#else
  m.attr("sanitized") = false;
#endif
#if defined(__SANITIZE_THREAD__)
  m.attr("thread_sanitized") = true;
#else
  m.attr("thread_sanitized") = false;
#endif
}
