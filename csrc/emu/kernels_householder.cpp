// Emulation translation unit for csrc/householder.cu (see module.cpp): one TU per kernel family, so the
// emulator modules build in parallel (MAX_JOBS) instead of one serial TU per flavour.
#include "kernel_tu_begin.h"
#include "../householder.cu"
#include "kernel_tu_end.h"
