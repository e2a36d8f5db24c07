// Opens an emulation translation unit of kernel code (csrc/emu/kernels_<family>.cpp; setup.py and
// CMakeLists.txt compile every kernels_*.cpp into each emulator module). Kernel code: a
// maybe-uninitialised local (a forgotten neutral value, an accumulator set on one path only) is a build
// error, not a warning (torch/library.h is included first, outside the pragma, as module.cpp did).
// No include guard: each TU includes this once, then the family's .cu, then kernel_tu_end.h.
#include "../schemas.h"
#pragma GCC diagnostic push
#pragma GCC diagnostic error "-Wuninitialized"
#pragma GCC diagnostic error "-Wmaybe-uninitialized"
