#!/usr/bin/env bash
# For a session that is lent a GPU machine (device tool): build for the GPU there, run the CUDA tests,
# then subsets under compute-sanitizer, then the benchmarks. Logs and results go to $OUT (or ./gpu_out).
# A lent machine gives ~15 minutes in all, so every step has its own time limit (seconds, env
# overridable) and writes its log as it goes: a step that runs out of time leaves what it had.
# At most 8 files come back from a device run: logs are few (build, tests, sanitizers, benchmarks, summary)
# and each benchmark family's JSON is copied out of its scratch folder.
# That machine has its own torch (may differ from CI's) and lacks nvidia-cutlass: carry the wheel in
# .whl/ (python3 -m pip download --no-deps -d .whl nvidia-cutlass==4.2.0.0) and rebuild there.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
T_BUILD=${T_BUILD:-240} T_TESTS=${T_TESTS:-120} T_SAN=${T_SAN:-45} T_BENCH=${T_BENCH:-70}
SAN_K=${SAN_K:-"not 4096 and not 65536 and not hypothesis"}
t0=$(date +%s)
step() { echo "[$(( $(date +%s) - t0 )) s] $*"; }
PY=${PY:-python3}
export PYTHONUNBUFFERED=1
if ls .whl/nvidia_cutlass-*.whl >/dev/null 2>&1; then
  S=$(mktemp -d)
  $PY -m pip install -q --no-index --no-deps --target "$S" .whl/nvidia_cutlass-*.whl
  export PYTHONPATH="$S${PYTHONPATH:+:$PYTHONPATH}"
fi
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv,noheader
# The emulation modules are for machines without a GPU: skip them here (build time is device time).
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-"8.0;9.0a"} MAX_JOBS=${MAX_JOBS:-16} MOKERNELS_BUILD_EMU=0
step "build"
{ time timeout "$T_BUILD" $PY -m pip install --no-build-isolation --no-deps -e . ; } > "$OUT/build.log" 2>&1 \
  || { tail -50 "$OUT/build.log"; exit 1; }
$PY -c "import mokernels, json; print(json.dumps(mokernels.build_info()))"
step "cuda tests"
timeout "$T_TESTS" $PY -m pytest tests -m cuda -q -rs -p no:cacheprovider > "$OUT/test_cuda.log" 2>&1
echo "cuda tests rc=$?"; grep -E "passed|failed|error" "$OUT/test_cuda.log" | tail -3
grep -E "^(FAILED|ERROR)" "$OUT/test_cuda.log" | head -40
for tool in ${SAN_TOOLS-memcheck racecheck synccheck}; do
  step "compute-sanitizer $tool"
  timeout "$T_SAN" compute-sanitizer --tool $tool --error-exitcode 9 \
    $PY -m pytest tests -m cuda -q -x -p no:cacheprovider -k "$SAN_K" > /tmp/san_$tool.log 2>&1
  echo "$tool rc=$? (124 = step time limit)"; grep -E "ERROR SUMMARY|passed|failed" /tmp/san_$tool.log | tail -2
  { echo "=== $tool"; tail -200 /tmp/san_$tool.log; } >> "$OUT/sanitizers.log"
done
# One family at a time, each with its own limit, so a slow family cannot starve the others.
for fam in ${BENCH_FAMILIES:-router rank_one lora householder methods peft}; do
  step "benchmarks: $fam"
  timeout "$T_BENCH" $PY -m benchmarks --only "$fam" ${BENCH_ARGS:-} --out "/tmp/bench_$fam" > /tmp/bench_$fam.log 2>&1
  echo "bench $fam rc=$? (124 = step time limit)"; cat /tmp/bench_$fam.log >> "$OUT/bench.log"
  cp "/tmp/bench_$fam/bench_results.json" "$OUT/bench_$fam.json" 2>/dev/null
done
step "done"
