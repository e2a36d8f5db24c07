// Emulation translation unit for csrc/moore.cu (see module.cpp): one TU per kernel family, so the
// emulator modules build in parallel (MAX_JOBS) instead of one serial TU per flavour.
#include "kernel_tu_begin.h"
#include "../moore.cu"
#include "kernel_tu_end.h"
