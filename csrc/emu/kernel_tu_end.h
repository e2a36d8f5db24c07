// Closes an emulation translation unit of kernel code (see kernel_tu_begin.h).
#pragma GCC diagnostic pop
