// The emulator for mokernels._emu_tsan: compiled WITHOUT -fsanitize=thread (its own bookkeeping is
// not checked) but with -DMK_EMU_TSAN, which turns on the TSan fiber annotations of tsan_hooks.h.
#include "shim.cpp"
