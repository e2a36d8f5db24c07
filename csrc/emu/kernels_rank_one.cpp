// Emulation translation unit for csrc/rank_one.cu (see module.cpp): one TU per kernel family, so the
// emulator modules build in parallel (MAX_JOBS) instead of one serial TU per flavour.
#include "kernel_tu_begin.h"
#include "../rank_one.cu"
#include "kernel_tu_end.h"
