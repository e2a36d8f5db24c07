// mokernels._emu_tsan: module.cpp built with -fsanitize=thread (the race-detection pass). Its shim
// (shim_tsan.cpp) is built without instrumentation and gives TSan one fiber per CUDA thread; see
// tsan_hooks.h for the happens-before edges it adds.
#include "module.cpp"
