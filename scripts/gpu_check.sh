#!/usr/bin/env bash
# For a session that is lent a GPU machine (device tool): build for the GPU there, run the CUDA tests,
# once more under compute-sanitizer, then the full benchmarks. Logs and results go to $OUT (or ./gpu_out).
# That machine has its own torch (may differ from CI's) and lacks nvidia-cutlass: carry the wheel in
# .whl/ (python3 -m pip download --no-deps -d .whl nvidia-cutlass==4.2.0.0) and rebuild there.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
if ls .whl/nvidia_cutlass-*.whl >/dev/null 2>&1; then
  S=$(mktemp -d)
  pip install -q --no-index --no-deps --target "$S" .whl/nvidia_cutlass-*.whl
  export PYTHONPATH="$S${PYTHONPATH:+:$PYTHONPATH}"
fi
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-"8.0;9.0a"} MAX_JOBS=${MAX_JOBS:-16}
{ time pip install --no-build-isolation --no-deps -e . ; } > "$OUT/build.log" 2>&1 || { tail -50 "$OUT/build.log"; exit 1; }
python -c "import mokernels, json; print(json.dumps(mokernels.build_info(), indent=1))" | tee "$OUT/build_info.json"
python -m pytest tests -m cuda -q -rs > "$OUT/test_cuda.log" 2>&1; echo "cuda tests rc=$?"; tail -3 "$OUT/test_cuda.log"
for tool in memcheck racecheck synccheck; do
  compute-sanitizer --tool $tool --error-exitcode 9 python -m pytest tests -m cuda -q -x -k "not 4096" \
    > "$OUT/test_cuda_$tool.log" 2>&1; echo "$tool rc=$?"; tail -3 "$OUT/test_cuda_$tool.log"
done
python -m benchmarks ${BENCH_ARGS:-} --out "$OUT/bench" > "$OUT/bench.log" 2>&1; echo "bench rc=$?"; tail -60 "$OUT/bench.log"
