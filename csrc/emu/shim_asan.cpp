// The emulator for mokernels._emu_asan (see module_asan.cpp).
#include "shim.cpp"
