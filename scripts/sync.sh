#!/usr/bin/env bash
# bench sync and bench hierarchy (BENCHES="sync hierarchy" by default) on scikit-learn's digits (1,797 8x8
# images, as 3x32x32 for LeNet-5) on the fleet testbed (root: network namespaces, tc, cgroups), then REPORT.md. scikit-learn is only needed to write the data:
# it goes into a throwaway virtualenv.
set -euo pipefail
cd "$(dirname "$0")/.."
R=${RESULTS:-bench/results}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m venv "$tmp/venv"
"$tmp/venv/bin/pip" install -q scikit-learn numpy
"$tmp/venv/bin/python" - "$tmp/digits.npz" <<'PY'
import sys
import numpy as np
from sklearn.datasets import load_digits
d = load_digits()
rng = np.random.default_rng(0)
order = rng.permutation(len(d.target))  # the held-out first samples are of every class
x = np.kron(d.images[order, None] * (255 / 16), np.ones((1, 3, 4, 4))).round().astype(np.uint8)  # as images are stored
np.savez(sys.argv[1], x=x, y=d.target[order].astype(np.int64))
PY
for b in ${BENCHES:-sync hierarchy}; do
  case $b in
    sync) .venv/bin/hiertrain bench sync --data "$tmp/digits.npz" --medium 5 --count 200 --every 2,4,8 \
            --out "$R/sync.json" >/dev/null ;;
    hierarchy) .venv/bin/hiertrain bench hierarchy --data "$tmp/digits.npz" --medium 5 --wan 5 --count 120 \
            --every 4,16 --out "$R/hierarchy.json" >/dev/null ;;
  esac
done
.venv/bin/hiertrain bench report --results "$R" >/dev/null
