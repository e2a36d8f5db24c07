#!/usr/bin/env bash
# The main job: set up + build (scripts/setup_env.sh), run the methods demo on the real MiniLM
# (python -m mokernels.demo --quick: every method wraps, trains, saves and reloads), then run the benchmark suite on the embedded
# default workloads (--quick unless --full is given) and write tables, JSON and PNGs to results/.
# On a machine without a GPU the tables are labelled as CPU reference / emulated runs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
# shellcheck disable=SC1091
. "${MOKERNELS_VENV:-.venv}/bin/activate"
mode=--quick
if [ "${1:-}" = "--full" ]; then mode=; shift; fi
python -m mokernels.demo --quick
python -m benchmarks $mode --out "${MOKERNELS_RESULTS:-results}" "$@"
