#!/usr/bin/env bash
# Packaging checks (run by CI after the tests, inside the venv of scripts/setup_env.sh):
#  1. `pip wheel` with an arch list yields a wheel whose kernels are exactly those arches and whose
#     version records the torch it was built against;
#  2. a build without CUDA (as on a machine without nvcc) installs, warns once at import and runs
#     ops through the reference path.
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export MAX_JOBS=${MAX_JOBS:-2}

echo "== wheel for TORCH_CUDA_ARCH_LIST=8.0 (no PTX)"
TORCH_CUDA_ARCH_LIST=8.0 MOKERNELS_BUILD_EMU=0 MOKERNELS_REQUIRE_CUDA=1 \
  python -m pip wheel -q --no-build-isolation --no-deps -w "$work/cuda" .
whl=$(ls "$work"/cuda/mokernels-*.whl)
echo "built $(basename "$whl")"
case "$(basename "$whl")" in *torch2.14*) ;; *) echo "wheel version lacks the torch tag"; exit 1 ;; esac
(cd "$work/cuda" && python -m zipfile -e "$whl" x >/dev/null)
elfs=$("$(python - <<'PY'
import os, shutil
home = os.environ.get("CUDA_HOME") or ""
print(os.path.join(home, "bin", "cuobjdump") if home and os.path.exists(os.path.join(home, "bin", "cuobjdump")) else shutil.which("cuobjdump") or "/usr/local/cuda/bin/cuobjdump")
PY
)" --list-elf "$work"/cuda/x/mokernels/_C*.so | grep -o 'sm_[0-9a-z]*' | sort -u | tr '\n' ' ')
echo "cubins in the wheel: $elfs"
[ "$elfs" = "sm_80 " ] || { echo "expected only sm_80 cubins"; exit 1; }

echo "== build without CUDA kernels (MOKERNELS_FORCE_CPU=1)"
MOKERNELS_FORCE_CPU=1 MOKERNELS_BUILD_EMU=0 python -m pip wheel -q --no-build-isolation --no-deps -w "$work/cpu" .
python -m pip install -q --no-deps --target "$work/site" "$work"/cpu/mokernels-*.whl
(cd "$work" && PYTHONPATH="$work/site" python -W always - <<'PY'
import warnings
import torch
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import mokernels
msgs = [str(w.message) for w in caught if "without CUDA kernels" in str(w.message)]
assert len(msgs) == 1, msgs
info = mokernels.build_info()
assert not info["with_cuda"] and info["cuda_archs"] == [], info
z, s, g = torch.randn(3, 4), torch.randn(4), torch.randn(3, 4)
torch.testing.assert_close(mokernels.rank_one_scale(z, s, g), z * (s + g))
print("CPU-only build OK:", mokernels.__file__, info["version"])
PY
)
echo "packaging checks passed"
