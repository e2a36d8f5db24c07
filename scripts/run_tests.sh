#!/usr/bin/env bash
# The test command: set up + build (scripts/setup_env.sh), run the whole suite (emulated kernels
# included; CUDA tests run where a GPU is present), then the emulated-kernel tests again under the
# ASan/UBSan build of the emulator (our CPU stand-in for compute-sanitizer), under the ThreadSanitizer
# build (race detection, small shapes), and the mutation suite (every planted bug caught by some pass).
# Extra args go to the first pytest run. Each pass prints its time.
set -euo pipefail
cd "$(dirname "$0")/.."
export MOKERNELS_BUILD_EMU_ASAN=${MOKERNELS_BUILD_EMU_ASAN:-1}
export MOKERNELS_BUILD_EMU_TSAN=${MOKERNELS_BUILD_EMU_TSAN:-1}
bash scripts/setup_env.sh
# shellcheck disable=SC1091
. "${MOKERNELS_VENV:-.venv}/bin/activate"
export MOKERNELS_REQUIRE_EMU=1
timed() {  # timed NAME CMD...: runs CMD, then prints how long it took
  local name=$1 t0
  shift
  t0=$(date +%s)
  "$@"
  echo "mokernels: $name took $(( $(date +%s) - t0 )) s"
}
timed "pytest (plain emulator)" python -m pytest tests -m "not mutants" "$@"
echo "mokernels: emulated kernels under AddressSanitizer + UBSan (fibers scheduled forward-first)"
timed "ASan/UBSan pass" env LD_PRELOAD="$(python -m mokernels.emu --preload)" ASAN_OPTIONS=detect_leaks=0 \
  MOKERNELS_EMU_ASAN=1 MOKERNELS_EMU_SCHEDULE=forward python -m pytest -m emu tests -q -p no:cacheprovider
# TSan: one TSan fiber per CUDA thread, ordering only from barriers and launch start/end, warp collectives
# unordered (strict); small shapes (~100x slower); ASLR off or TSan aborts on "unexpected memory mapping";
# --capture=sys so a race report (printed by the runtime on fd 2, then exit 66) is not swallowed.
echo "mokernels: emulated kernels under ThreadSanitizer (strict, small shapes)"
timed "TSan pass" env LD_PRELOAD="$(python -m mokernels.emu --preload-tsan)" \
  TSAN_OPTIONS="$(python -m mokernels.emu --tsan-options)" MOKERNELS_EMU_TSAN=1 MOKERNELS_EMU_TSAN_STRICT=1 \
  MOKERNELS_EMU_SMALL=1 setarch "$(uname -m)" -R python -m pytest -m "emu and not racy" tests -q \
  -p no:cacheprovider --capture=sys
echo "mokernels: mutation suite (planted bugs x passes)"
mkdir -p results
timed "mutation suite" env MOKERNELS_MUTANTS_TABLE=results/emu_mutants.md \
  python -m pytest -m mutants tests/test_emu_mutants.py -q -p no:cacheprovider
cat results/emu_mutants.md
