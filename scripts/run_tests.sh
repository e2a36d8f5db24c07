#!/usr/bin/env bash
# The test command: set up + build (scripts/setup_env.sh), run the whole suite (emulated kernels
# included; CUDA tests run where a GPU is present), then the emulated-kernel tests again under the
# ASan/UBSan build of the emulator (our CPU stand-in for compute-sanitizer). Extra args go to the
# first pytest run.
set -euo pipefail
cd "$(dirname "$0")/.."
export MOKERNELS_BUILD_EMU_ASAN=${MOKERNELS_BUILD_EMU_ASAN:-1}
bash scripts/setup_env.sh
# shellcheck disable=SC1091
. "${MOKERNELS_VENV:-.venv}/bin/activate"
export MOKERNELS_REQUIRE_EMU=1
python -m pytest tests "$@"
echo "mokernels: emulated kernels under AddressSanitizer + UBSan (fibers scheduled forward-first)"
LD_PRELOAD="$(python -m mokernels.emu --preload)" ASAN_OPTIONS=detect_leaks=0 MOKERNELS_EMU_ASAN=1 \
  MOKERNELS_EMU_SCHEDULE=forward python -m pytest -m emu tests -q -p no:cacheprovider
