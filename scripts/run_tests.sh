#!/usr/bin/env bash
# The test command: set up + build (scripts/setup_env.sh), then the passes below, each timed.
#   pass 1  the whole suite but the mutation suite (emulated kernels included, default schedule: reverse-first warps/lanes;
#           CUDA tests run where a GPU is present). Extra args go to this pytest run.
#   pass 2  the emulated tests again, forward-first warps/lanes and the grid's blocks last to first
#           (MOKERNELS_EMU_SCHEDULE=forward MOKERNELS_EMU_BLOCK_ORDER=reverse): a missing barrier or
#           a dependence on block order that one schedule hides, the other shows.
#   pass 3  the emulated tests under the ASan/UBSan build of the emulator (our CPU stand-in for
#           compute-sanitizer; -fno-wrapv, pattern-initialised locals), fibers forward-first.
#   pass 4  the emulated tests under the ThreadSanitizer build (race detection: one TSan fiber per CUDA
#           thread, ordering only from barriers and launch start/end, warp collectives unordered =
#           strict), small shapes only (MOKERNELS_EMU_SMALL=1; TSan is ~100x slower); of the router
#           forward modes only keep-all (fp32 and fp64: route_fwd_warp at N <= 256, the shared-memory sort kernel above, whose layouts differ by dtype) and top-2 (the register kernel).
#   pass 5  the mutation suite: every planted bug of tests/emu_mutants.py caught by some pass, every
#           correct twin by none; prints the caught/silent table (results/emu_mutants.md).
set -euo pipefail
cd "$(dirname "$0")/.."
export MOKERNELS_BUILD_EMU_ASAN=${MOKERNELS_BUILD_EMU_ASAN:-1}
export MOKERNELS_BUILD_EMU_TSAN=${MOKERNELS_BUILD_EMU_TSAN:-1}
bash scripts/setup_env.sh
# shellcheck disable=SC1091
. "${MOKERNELS_VENV:-.venv}/bin/activate"
export MOKERNELS_REQUIRE_EMU=1

timings=()
# run_pass NAME CMD...: runs one pass, prints and records its wall time (a failing pass stops the script).
run_pass() {
  local name=$1 t0
  shift
  echo "mokernels: pass $name"
  t0=$(date +%s)
  "$@"
  timings+=("pass $name: $(( $(date +%s) - t0 )) s")
  echo "${timings[-1]}"
}

run_pass "1 (pytest, all tests but the mutation suite)" python -m pytest tests -m "not mutants" "$@"
run_pass "2 (emulated, forward-first fibers, blocks reversed)" \
  env MOKERNELS_EMU_SCHEDULE=forward MOKERNELS_EMU_BLOCK_ORDER=reverse \
  python -m pytest -m emu tests -q -p no:cacheprovider
run_pass "3 (emulated under ASan/UBSan, forward-first fibers)" \
  env LD_PRELOAD="$(python -m mokernels.emu --preload)" ASAN_OPTIONS=detect_leaks=0 MOKERNELS_EMU_ASAN=1 \
  MOKERNELS_EMU_SCHEDULE=forward python -m pytest -m emu tests -q -p no:cacheprovider

# ---- H7b (issue 7): the TSan race pass and the mutation suite. ----
# TSan needs ASLR off (else "unexpected memory mapping"); --capture=sys so that a race report (written by
# the runtime to fd 2 just before it exits with 66) is not swallowed by pytest's fd capture.
run_pass "4 (emulated under TSan, strict, small shapes)" \
  env LD_PRELOAD="$(python -m mokernels.emu --preload-tsan)" TSAN_OPTIONS="$(python -m mokernels.emu --tsan-options)" \
  MOKERNELS_EMU_TSAN=1 MOKERNELS_EMU_TSAN_STRICT=1 MOKERNELS_EMU_SMALL=1 \
  setarch "$(uname -m)" -R python -m pytest -m "emu and not racy" tests -q -p no:cacheprovider --capture=sys --durations=15 \
    -k "not forward_matches_rules or keepall-dtype0 or keepall-dtype3 or top2"
mkdir -p results
run_pass "5 (mutation suite)" env MOKERNELS_MUTANTS_TABLE=results/emu_mutants.md \
  python -m pytest -m mutants tests/test_emu_mutants.py -q -p no:cacheprovider
cat results/emu_mutants.md
# ---- end of H7b's section ----

printf '%s\n' "mokernels: test pass times" "${timings[@]}"
