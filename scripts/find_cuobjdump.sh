#!/usr/bin/env bash
# Prints the path of a cuobjdump: next to the real nvcc (the nvcc on PATH may be a wrapper script;
# nvcc says where it lives), else $CUDA_HOME/bin, else on PATH, else the copy inside triton's wheel
# (a torch dependency). Used by scripts/check_packaging.sh and scripts/sass_report.py.
set -euo pipefail
bindir=$(nvcc -dryrun -c -x cu /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ _HERE_=//p' | head -1 || true)
if [ -n "$bindir" ] && [ -x "$bindir/cuobjdump" ]; then echo "$bindir/cuobjdump"; exit 0; fi
if [ -n "${CUDA_HOME:-}" ] && [ -x "$CUDA_HOME/bin/cuobjdump" ]; then echo "$CUDA_HOME/bin/cuobjdump"; exit 0; fi
if command -v cuobjdump >/dev/null; then command -v cuobjdump; exit 0; fi
python -c "import os, triton; print(os.path.join(os.path.dirname(triton.__file__), 'backends/nvidia/bin/cuobjdump'))"
