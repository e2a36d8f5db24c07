// The emulation module (mokernels._emu, mokernels._emu_asan built with ASan/UBSan, or
// mokernels._emu_tsan built with TSan): every
// csrc/<family>.cu wrapper compiled as host C++ with MOKERNELS_EMULATION, so its kernels run on
// CPU tensors through the fiber emulator (shim.cpp) as the `mokernels_emu` ops.
#include <pybind11/pybind11.h>

#include "../schemas.h"

// The kernel families are separate translation units (kernels_<family>.cpp, compiled into every
// emulator module by setup.py / CMakeLists.txt) so the build runs them in parallel; this TU holds the
// schema library, the emulator self-test kernels and the sanitizer/mutation catalogues.
#include "kernel_tu_begin.h"
#include "selftest.h"
#include "kernel_tu_end.h"

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
