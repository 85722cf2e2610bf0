#!/usr/bin/env bash
# The claims ledger's GPU command: fills every missing (or stale) cell of every setting on one GPU, many runs at
# once, into results/cells/ (each cell marked with its device), then writes results/results.md, claims.md and the
# figures. On a bare machine with a CUDA PyTorch (e.g. a lent H100 / H200) it installs what else it needs first.
#
#   bash gpu_ledger.sh                      every missing cell, JOBS (default 16) runs at once on the GPU
#   bash gpu_ledger.sh --setting decssl     one setting; any compare.py flag passes through
#   LEDGER_DEVICE=cpu bash gpu_ledger.sh --dry-run     what it would run, on any machine (the test does this)
#
# When $OUT is set (the device tool), the new cells and the tables are packed into $OUT/ledger-cells.tgz: unpack it
# in the repository root here (`tar xzf ledger-cells.tgz`) and commit results/.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
DEVICE=${LEDGER_DEVICE:-cuda}
JOBS=${JOBS:-16}
if ! "$PY" -c "import torch, numpy, matplotlib" 2>/dev/null; then
    "$PY" -m pip install -q -r requirements.txt        # a bare machine; a CUDA PyTorch already there is kept
fi
if [ "$DEVICE" = cuda ]; then
    "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'error: no CUDA GPU visible to torch')"
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
fi
# one CPU thread per run: the GPU does the work, the data already lives on it
export OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1
status=0
"$PY" compare.py --device "$DEVICE" --jobs "$JOBS" --yes "$@" || status=$?
if [ -n "${OUT:-}" ] && [ -d results/cells ]; then
    tar czf "$OUT/ledger-cells.tgz" results/cells results/results.md results/claims.md results/results*.png \
        results/results.json 2>/dev/null || tar czf "$OUT/ledger-cells.tgz" results/cells
    echo "packed $(find results/cells -name cell.json | wc -l) cells into $OUT/ledger-cells.tgz"
fi
exit $status
