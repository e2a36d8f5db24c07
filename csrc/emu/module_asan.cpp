// mokernels._emu_asan: module.cpp built with -fsanitize=address,undefined (a separate file name so its
// objects never collide with the plain build's in the shared build directory).
#include "module.cpp"
