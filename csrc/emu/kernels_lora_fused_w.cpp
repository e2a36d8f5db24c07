// Emulation translation unit for csrc/lora_fused_w.cu (see module.cpp): one TU per kernel family, so the
// emulator modules build in parallel (MAX_JOBS) instead of one serial TU per flavour.
#include "kernel_tu_begin.h"
#include "../lora_fused_w.cu"
#include "kernel_tu_end.h"
