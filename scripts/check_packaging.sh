#!/usr/bin/env bash
# Packaging checks (run by CI after the tests, inside the venv of scripts/setup_env.sh):
#  1. `pip wheel` with an arch list yields a wheel whose kernels are exactly those arches and whose
#     version records the torch it was built against;
#  2. a build on a machine without a CUDA toolkit (nvcc hidden from PATH) installs, warns once at
#     import and runs ops through the reference path;
#  3. CMakeLists.txt (the C++ developers' build) configures and lists every csrc/*.cu in
#     compile_commands.json.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# Build from a copy (tracked + untracked, not ignored files): setup.py writes mokernels/_build_config.py
# and pip wheel builds in-tree, which must not touch this checkout's own build.
mkdir "$work/src"
git ls-files -co --exclude-standard -z | xargs -0 cp --parents -t "$work/src"
cd "$work/src"
export MAX_JOBS=${MAX_JOBS:-2}

echo "== wheel for TORCH_CUDA_ARCH_LIST=8.0 (no PTX)"
TORCH_CUDA_ARCH_LIST=8.0 MOKERNELS_BUILD_EMU=0 MOKERNELS_REQUIRE_CUDA=1 \
  python -m pip wheel -q --no-build-isolation --no-deps -w "$work/cuda" .
whl=$(ls "$work"/cuda/mokernels-*.whl)
echo "built $(basename "$whl")"
case "$(basename "$whl")" in *torch2.14*) ;; *) echo "wheel version lacks the torch tag"; exit 1 ;; esac
(cd "$work/cuda" && python -m zipfile -e "$whl" x >/dev/null)
find_cuobjdump() { bash "$repo/scripts/find_cuobjdump.sh"; }
elfs=$("$(find_cuobjdump)" --list-elf "$work"/cuda/x/mokernels/_C*.so | grep -o 'sm_[0-9a-z]*' | sort -u | tr '\n' ' ')
echo "cubins in the wheel: $elfs"
[ "$elfs" = "sm_80 " ] || { echo "expected only sm_80 cubins"; exit 1; }
ptx=$("$(find_cuobjdump)" --list-ptx "$work"/cuda/x/mokernels/_C*.so 2>/dev/null | grep -c 'ptx' || true)
[ "$ptx" = "0" ] || { echo "expected no PTX without +PTX, found $ptx entries"; exit 1; }

echo "== build without a CUDA toolkit (nvcc hidden from PATH, CUDA_HOME unset)"
nocuda_path=$(echo "$PATH" | tr ':' '\n' | while read -r d; do [ -x "$d/nvcc" ] || echo "$d"; done | paste -sd:)
rm -rf build mokernels/*.so
env -u CUDA_HOME -u CUDA_PATH -u MOKERNELS_REQUIRE_CUDA PATH="$nocuda_path" \
  python -m pip wheel -q --no-build-isolation --no-deps -w "$work/cpu" .
python -m pip install -q --no-deps --target "$work/site" "$work"/cpu/mokernels-*.whl
# python -S: no site processing, so the editable install's import hook (a .pth file) cannot lend
# this checkout's modules to the wheel under test; torch comes from the venv's site-packages.
venv_site=$(python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
(cd "$work" && PYTHONPATH="$work/site:$venv_site" python -S -W always - <<'PY'
import os, warnings
import torch
site = os.environ["PYTHONPATH"].split(":")[0]  # the wheel under test
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import mokernels
msgs = [str(w.message) for w in caught if "without CUDA kernels" in str(w.message)]
assert len(msgs) == 1, msgs
info = mokernels.build_info()
assert not info["with_cuda"] and info["cuda_archs"] == [], info
assert not info["emulation"], "no toolkit headers: the emulator cannot have been built"
z, s, g = torch.randn(3, 4), torch.randn(4), torch.randn(3, 4)
torch.testing.assert_close(mokernels.rank_one_scale(z, s, g), z * (s + g))
import mokernels._C
assert all(m.__file__.startswith(site) for m in (mokernels, mokernels._C)), (mokernels.__file__, mokernels._C.__file__)
print("CPU-only build OK:", mokernels.__file__, info["version"])
PY
)
echo "== CMake configure"
cmake -S . -B "$work/cmake" -G Ninja -DCMAKE_CUDA_ARCHITECTURES=80-real > "$work/cmake.log" 2>&1 \
  || { tail -40 "$work/cmake.log"; exit 1; }
for f in csrc/*.cu csrc/bindings.cpp; do
  grep -q "$f" "$work/cmake/compile_commands.json" || { echo "compile_commands.json lacks $f"; exit 1; }
done
echo "compile_commands.json covers $(ls csrc/*.cu | wc -l) CUDA sources + bindings.cpp"
echo "packaging checks passed"
